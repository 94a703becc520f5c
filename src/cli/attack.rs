//! `gradleak attack`: what a server can reconstruct from the files it holds.

use super::values;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use faer::Mat;

use gradleak::attack::conv::{Fill, PixelOptions};
use gradleak::attack::{self, AttackParams, Method, ReadOptions, ServerView, activation_fit};
use gradleak::io::npy;
use gradleak::io::outputs::{Outputs, check_writable};
use gradleak::model::{Activation, Loss};
use gradleak::report::AttackReport;
use gradleak::{Dtype, metrics};

use super::progress::{Bars, Mode, cpu_seconds};

/// The model's activation: a name, or `auto` (probe every activation).
#[derive(Clone, Copy, Debug)]
pub enum ActivationArg {
    Auto,
    Known(Activation),
}

fn parse_activation(s: &str) -> Result<ActivationArg, String> {
    if s == "auto" {
        return Ok(ActivationArg::Auto);
    }
    s.parse::<Activation>()
        .map(ActivationArg::Known)
        .map_err(|e| e.to_string())
}

#[derive(Args, Debug)]
pub struct AttackArgs {
    /// The model the server sent (safetensors), or a CNN model folder (model.json +
    /// model.safetensors, from `gradleak.export_model`): then the features entering
    /// its fully connected head are recovered and written to --out.
    #[arg(long)]
    model: PathBuf,
    /// The gradient the client returned (safetensors, same names).
    #[arg(long)]
    gradient: PathBuf,
    /// The model's activation, or `auto`: probe each activation with a short span search
    /// and keep the one whose samples pass their test (default, unless the model file's
    /// metadata names it).
    #[arg(long, value_parser = parse_activation)]
    activation: Option<ActivationArg>,
    /// Layer names in forward order, e.g. `fc1,fc2,head` (default: matched by structure:
    /// names in natural order whose shapes chain, wrapper prefixes such as `module.` stripped).
    #[arg(long, value_delimiter = ',')]
    names: Option<Vec<String>>,
    /// The precision the client computed in (default: detected from the gradient's values,
    /// e.g. float32 values stored as float64 are attacked at float32's floor).
    #[arg(long)]
    precision: Option<String>,
    /// The true batch (.npy rows, or a batch safetensors with `x` and optional `y`):
    /// print the matched metrics as `simulate` does.
    #[arg(long)]
    truth: Option<PathBuf>,
    /// Relative error under which a sample counts as recovered (with --truth).
    #[arg(long, default_value_t = gradleak::metrics::DEFAULT_TOL)]
    tol: f64,
    /// No progress lines or bars on stderr.
    #[arg(long)]
    quiet: bool,
    /// The attack (auto: the best available route for the case).
    #[arg(long, value_parser = values::method(), default_value_t = Method::Auto)]
    method: Method,
    /// Force the batch size instead of estimating it from the gradient's rank.
    #[arg(long)]
    batch: Option<usize>,
    /// The client's loss, if known: enables label recovery rules and baselines.
    #[arg(long, value_parser = values::loss())]
    loss: Option<Loss>,
    /// Public prior over input values: mean=..,std=..,min=..,max=..
    #[arg(long)]
    prior: Option<String>,
    /// Public prior mean image (.npy, 1 x d; n x d gives the mean of its rows): starts of
    /// the labelled joint fit when the inputs are rank-deficient.
    #[arg(long)]
    prior_image: Option<PathBuf>,
    /// Known noise standard deviation per gradient entry (a defence's noise).
    #[arg(long)]
    noise_std: Option<f64>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[command(flatten)]
    budget: super::Budget,
    /// Reconstruction: rows are recovered samples (any order), float64 .npy.
    #[arg(long)]
    out: PathBuf,
    /// JSON report (without it, the per-sample table is printed only).
    #[arg(long)]
    report: Option<PathBuf>,
    /// Recovered labels as int64 .npy (-1 where unknown), in the order of --out.
    #[arg(long)]
    labels: Option<PathBuf>,
    /// CNN models: also recover the pixels below the features (B x C*H*W float64 .npy,
    /// in the order of --out); --prior-image fills what the gradient leaves free.
    #[arg(long)]
    pixels: Option<PathBuf>,
    /// Pixel stage: CGLS steps per layer solve at most (below convergence the free
    /// directions are over-counted and no layer is determined).
    #[arg(long, default_value_t = gradleak::attack::conv::pixels::ITERATIONS)]
    pixel_iterations: usize,
    /// Pixel stage: what fills the free directions at the pixels: `prior` (the prior
    /// image) or `tv` (then the least total variation with the same equations).
    #[arg(long, default_value = "prior", value_parser = ["prior", "tv"])]
    pixel_fill: String,
    /// Pixel stage: descent steps of the TV fill.
    #[arg(long, default_value_t = gradleak::attack::conv::pixels::TV_ITERATIONS)]
    tv_iterations: usize,
}

pub fn run(a: AttackArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let c0 = cpu_seconds();
    let mode = Mode::detect(a.quiet);
    // every output path is checked before any work
    let outs: Vec<&std::path::Path> = std::iter::once(a.out.as_path())
        .chain(a.report.as_deref())
        .chain(a.labels.as_deref())
        .collect();
    check_writable(outs)?;
    let precision = a
        .precision
        .as_deref()
        .map(super::parse::<Dtype>)
        .transpose()?;
    let truth = a.truth.as_deref().map(read_truth).transpose()?;
    let mut p = AttackParams::new(a.method)
        .seed(a.seed)
        .observer(Bars::new(mode));
    if let Some(b) = a.batch {
        p = p.batch(b);
    }
    if let Some(l) = a.loss {
        p = p.loss(l);
    }
    if let Some(pr) = a.prior.as_deref().map(super::parse).transpose()? {
        p = p.prior(pr);
    }
    let mut prior_image = None;
    if let Some(path) = &a.prior_image {
        let m = npy::read_matrix(path)?;
        let n = m.nrows().max(1) as f64;
        let mean: Vec<f64> = (0..m.ncols())
            .map(|j| m.col(j).iter().sum::<f64>() / n)
            .collect();
        p = p.prior_image(mean.clone());
        prior_image = Some(mean);
    }
    if let Some(s) = a.noise_std {
        p = p.noise_std(s);
    }
    let cfg = a.budget.apply_params(p)?;
    if gradleak::io::cnn::is_model_dir(&a.model) {
        let run = super::attack_cnn::CnnRun {
            model: &a.model,
            gradient: &a.gradient,
            precision,
            truth,
            tol: a.tol,
            out: &a.out,
            report: a.report.as_deref(),
            labels: a.labels.as_deref(),
            pixels: a.pixels.as_deref().map(|path| super::attack_cnn::PixelRun {
                path,
                prior: prior_image,
                loss: a.loss,
                opts: PixelOptions {
                    iterations: a.pixel_iterations,
                    fill: match a.pixel_fill.as_str() {
                        "tv" => Fill::Tv {
                            iterations: a.tv_iterations,
                        },
                        _ => Fill::Prior,
                    },
                },
            }),
            mode,
        };
        return super::attack_cnn::run(run, &cfg);
    }
    let opts = ReadOptions {
        names: a.names.clone(),
        precision,
    };
    let t_read = Instant::now();
    let (mut view, info) = ServerView::open(&a.model, &a.gradient, Activation::Tanh, &opts)?;
    mode.line(&format!(
        "read {} layers ({} x {} first), gradient stored {} worked at {} ({}) in {:.2} s",
        info.layers.len(),
        view.width(),
        view.input_dim(),
        info.storage,
        info.precision,
        info.precision_rule,
        t_read.elapsed().as_secs_f64()
    ));
    let from_file = info
        .activation_in_file
        .as_deref()
        .map(|s| {
            s.parse::<Activation>()
                .map_err(|e| anyhow::anyhow!("{}: metadata 'activation': {e}", a.model.display()))
        })
        .transpose()?;
    let mut choice = None;
    view.activation = match (a.activation, from_file) {
        (Some(ActivationArg::Known(x)), _) => x,
        (None, Some(x)) => x,
        (Some(ActivationArg::Auto), _) | (None, None) => {
            let t = Instant::now();
            mode.line(&format!(
                "activation: probing {} candidates",
                Activation::ALL.len()
            ));
            let c = activation_fit::choose(&view, &cfg, &Activation::ALL)?;
            mode.line(&format!(
                "activation: {} fits ({}) in {:.2} s",
                c.chosen,
                fit_summary(&c),
                t.elapsed().as_secs_f64()
            ));
            let x = c.chosen;
            choice = Some(c);
            x
        }
    };
    let t_attack = Instant::now();
    mode.line(&format!(
        "attack: {} with {}",
        cfg.method(),
        view.activation
    ));
    let rec = super::with_spinner("attacking", || attack::run(&view, &cfg))?;
    mode.line(&format!(
        "attack: {} samples in {:.2} s",
        rec.samples.len(),
        t_attack.elapsed().as_secs_f64()
    ));
    let d = view.input_dim();
    let n = rec.samples.len();
    if n == 0 {
        anyhow::bail!(
            "no sample recovered{}: {}",
            if choice.is_none() && matches!(cfg.method(), Method::Auto | Method::Span) {
                format!(
                    " (is the activation {} right? try --activation auto)",
                    view.activation
                )
            } else {
                String::new()
            },
            rec.notes
                .first()
                .map_or("the search found nothing at its floor", String::as_str)
        );
    }
    let x = Mat::from_fn(n, d, |i, j| rec.samples[i].x[j]);
    let labels: Vec<Option<usize>> = rec.samples.iter().map(|s| s.label).collect();
    let mut report = AttackReport::new(
        &view,
        &cfg,
        &rec,
        (
            a.model.display().to_string(),
            a.gradient.display().to_string(),
        ),
        t0.elapsed().as_secs_f64(),
    );
    report.cpu_seconds = Some(cpu_seconds() - c0);
    report.attack.notes.extend(info.notes());
    report.files = Some(info.clone());
    report.activation_fit = choice.clone();
    let matched = match &truth {
        Some((tx, ty)) => Some(metrics::evaluate(
            tx,
            &rec.samples,
            None,
            a.tol,
            ty.as_deref(),
        )?),
        None => None,
    };
    report.truth = matched.clone();
    let mut files = Outputs::new();
    files.write(&a.out, &npy::matrix_bytes(&x)?)?;
    if let Some(r) = &a.report {
        files.write(r, &serde_json::to_vec_pretty(&report)?)?;
    }
    if let Some(p) = &a.labels {
        let l: Vec<i64> = labels.iter().map(|l| l.map_or(-1, |v| v as i64)).collect();
        files.write(p, &npy::labels_bytes(&l)?)?;
    }
    files.commit()?;
    println!(
        "batch size {} ({}); recovered {} ({} exact), missing {}; {:.2} s ({:.2} s CPU)",
        rec.batch_estimated,
        match rec.rank_rule {
            Some(gradleak::attack::RankRule::Threshold) => "numerical rank",
            Some(gradleak::attack::RankRule::LargestGap) => "largest singular-value gap",
            Some(gradleak::attack::RankRule::Forced) => "given by --batch",
            None => "not estimated",
        },
        n,
        report.exact,
        rec.missing(),
        report.seconds,
        report.cpu_seconds.unwrap_or(f64::NAN)
    );
    println!(
        "precision: gradient stored {}, attacked at {} ({}); activation {}{}",
        info.storage,
        info.precision,
        info.precision_rule,
        view.activation,
        match &choice {
            Some(c) => format!(" (detected: {})", fit_summary(c)),
            None => String::new(),
        }
    );
    if let Some(c) = &rec.certificate {
        println!("{}", super::table::certificate_line(c));
    }
    for (i, s) in report.samples.iter().enumerate() {
        println!(
            "  sample {i}: residual {} exact {} stage {}{}{}",
            s.residual.map_or("-".into(), |r| format!("{r:.2e}")),
            if s.exact { "yes" } else { "no" },
            s.stage,
            s.label.map_or(String::new(), |l| format!(" label {l}")),
            s.why.as_ref().map_or(String::new(), |w| format!(": {w}"))
        );
    }
    for n in &report.attack.notes {
        println!("note: {n}");
    }
    if let Some(m) = &matched {
        super::table::print_matched(m);
    }
    match &a.report {
        Some(r) => eprintln!("wrote {} and {}", a.out.display(), r.display()),
        None => eprintln!("wrote {}", a.out.display()),
    }
    Ok(())
}

/// "tanh 8/8 exact, relu 0/8, ..." (candidates with a sample first).
fn fit_summary(c: &activation_fit::Choice) -> String {
    let mut f = c.fits.clone();
    f.sort_by_key(|f| std::cmp::Reverse(f.exact));
    f.iter()
        .map(|f| format!("{} {}/{}", f.activation, f.exact, f.batch))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The true batch: .npy rows, or a batch safetensors (`x`, and integer `y` as labels).
fn read_truth(path: &std::path::Path) -> anyhow::Result<(Mat<f64>, Option<Vec<usize>>)> {
    if path.extension().is_some_and(|e| e == "npy") {
        return Ok((npy::read_matrix(path)?, None));
    }
    let b = gradleak::io::safetensors::read_batch(path)?;
    let y = match (&b.y, b.y_is_integer) {
        (Some(y), true) if y.ncols() == 1 => Some(
            (0..y.nrows())
                .map(|i| y[(i, 0)].max(0.0) as usize)
                .collect(),
        ),
        _ => None,
    };
    Ok((b.x, y))
}
