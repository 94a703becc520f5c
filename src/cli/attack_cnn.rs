//! `gradleak attack --model DIR`: a convolutional model folder (`model.json` +
//! `model.safetensors`, as `gradleak.export_model` writes it). The features entering
//! its fully connected head are recovered and certified by the exact route.

use std::path::Path;
use std::time::Instant;

use faer::Mat;

use gradleak::Dtype;
use gradleak::attack::conv::{ConvProblem, pixels};
use gradleak::attack::{self, AttackConfig};
use gradleak::io::cnn::{read_model_dir, read_tensors};
use gradleak::io::npy;
use gradleak::io::outputs::Outputs;
use gradleak::metrics;
use gradleak::model::Loss;
use gradleak::report::AttackReport;

use super::progress::{Mode, cpu_seconds};

/// Where the pixels go, the prior image, the loss given on the command line and the
/// pixel stage's options.
pub struct PixelRun<'a> {
    pub path: &'a Path,
    pub prior: Option<Vec<f64>>,
    pub loss: Option<Loss>,
    pub opts: pixels::PixelOptions,
}

/// Where the CNN attack writes and what it compares with.
pub struct CnnRun<'a> {
    pub model: &'a Path,
    pub gradient: &'a Path,
    pub precision: Option<Dtype>,
    pub truth: Option<(Mat<f64>, Option<Vec<usize>>)>,
    pub tol: f64,
    pub out: &'a Path,
    pub report: Option<&'a Path>,
    pub labels: Option<&'a Path>,
    pub pixels: Option<PixelRun<'a>>,
    pub mode: Mode,
}

pub fn run(r: CnnRun<'_>, cfg: &AttackConfig) -> anyhow::Result<()> {
    let (t0, c0) = (Instant::now(), cpu_seconds());
    let (spec, params, _) = read_model_dir(r.model)?;
    let (gt, storage) = read_tensors(r.gradient)?;
    let p = ConvProblem::new(&spec, &params, &gt, storage, r.precision)?;
    let head = &p.head;
    r.mode.line(&format!(
        "read a CNN of {} layers ({} with parameters); head {} -> {} ({} hidden, {}), \
         batch limit min(m, d + 1) = {}; gradient stored {storage}, attacked at {}",
        p.cnn.layers.len(),
        p.cnn.names.len(),
        head.feature_dim(),
        head.model.width(),
        head.model.depth(),
        head.model.activation,
        head.batch_limit(),
        p.view.dtype
    ));
    let rec = super::with_spinner("attacking the head", || attack::run_conv(&p, cfg))?;
    let feats = &rec.features;
    let (n, d) = (feats.samples.len(), rec.feature_dim);
    if n == 0 {
        anyhow::bail!(
            "no feature vector recovered: {}",
            feats
                .notes
                .first()
                .map_or("the search found nothing at its floor", String::as_str)
        );
    }
    let mut report = AttackReport::new(
        &p.view,
        cfg,
        feats,
        (
            r.model.display().to_string(),
            r.gradient.display().to_string(),
        ),
        t0.elapsed().as_secs_f64(),
    );
    report.cpu_seconds = Some(cpu_seconds() - c0);
    report.attack.notes.push(format!(
        "CNN: the samples are the features h_i = phi(x_i) entering '{}' (d = {d}), not pixels",
        rec.head_layer
    ));
    // the true features, computed with the server's own model from the true pixels
    let matched = match &r.truth {
        Some((tx, ty)) => Some(metrics::evaluate(
            &p.features(tx)?,
            &feats.samples,
            None,
            r.tol,
            ty.as_deref(),
        )?),
        None => None,
    };
    report.truth = matched.clone();
    let x = Mat::from_fn(n, d, |i, j| feats.samples[i].x[j]);
    let mut files = Outputs::new();
    files.write(r.out, &npy::matrix_bytes(&x)?)?;
    if let Some(path) = r.report {
        files.write(path, &serde_json::to_vec_pretty(&report)?)?;
    }
    if let Some(path) = r.labels {
        let l: Vec<i64> = feats
            .samples
            .iter()
            .map(|s| s.label.map_or(-1, |v| v as i64))
            .collect();
        files.write(path, &npy::labels_bytes(&l)?)?;
    }
    let pix = match &r.pixels {
        Some(PixelRun {
            path,
            prior,
            loss,
            opts,
        }) => {
            let prior = prior.as_deref().ok_or_else(|| {
                anyhow::anyhow!(
                    "--pixels needs --prior-image: the prior fills what the gradient leaves free"
                )
            })?;
            let loss = loss.unwrap_or(Loss::Ce);
            let t = Instant::now();
            let px = super::with_spinner("solving the conv layers", || {
                pixels::recover(&p, feats, loss, prior, p.view.dtype, cfg.seed(), opts)
            })?;
            files.write(path, &npy::matrix_bytes(&px.x)?)?;
            Some((px, t.elapsed().as_secs_f64()))
        }
        None => None,
    };
    files.commit()?;
    println!(
        "CNN features: batch size {}; recovered {} ({} exact), missing {}; certified {}; {:.2} s ({:.2} s CPU)",
        feats.batch_estimated,
        n,
        report.exact,
        feats.missing(),
        report.certified,
        report.seconds,
        report.cpu_seconds.unwrap_or(f64::NAN)
    );
    if let Some(c) = &feats.certificate {
        println!("{}", super::table::certificate_line(c));
    }
    for note in &report.attack.notes {
        println!("note: {note}");
    }
    if let Some(m) = &matched {
        super::table::print_matched(m);
    }
    if let Some((px, secs)) = &pix {
        print_pixels(px, *secs, feats, r.truth.as_ref(), r.tol)?;
    }
    eprintln!("wrote {}", r.out.display());
    Ok(())
}

/// The pixel stage's table (one line per solved layer) and its match with the truth.
fn print_pixels(
    px: &pixels::Pixels,
    secs: f64,
    feats: &attack::Reconstruction,
    truth: Option<&(Mat<f64>, Option<Vec<usize>>)>,
    tol: f64,
) -> anyhow::Result<()> {
    println!(
        "pixels: exact {}; feature closure {:.1e}; {}{:.2} s",
        px.exact,
        px.feature_closure,
        if px.guessed_pooling {
            format!(
                "max pooling's kept positions guessed ({} rounds); ",
                px.rounds
            )
        } else {
            String::new()
        },
        secs
    );
    super::table::print_pixel_layers(&px.layers, true);
    if let Some((tx, ty)) = truth {
        let m = metrics::evaluate(tx, &px.samples(feats), Some((0.0, 1.0)), tol, ty.as_deref())?;
        let psnrs: Vec<String> = m
            .per_sample
            .iter()
            .map(|s| s.psnr.map_or("-".into(), |v| format!("{v:.1}")))
            .collect();
        println!(
            "pixels vs truth: max rel. error {:.2e}, median {:.2e}; mean PSNR {:.2} dB (per sample: {})",
            m.max_rel_error,
            m.median_rel_error,
            m.mean_psnr.unwrap_or(f64::NAN),
            psnrs.join(" ")
        );
    }
    Ok(())
}
