//! One simulated round with a convolutional client: photo crops -> LeNet, ConvNet or
//! a model folder (PyTorch's default init from the seeded generator) -> the client's
//! cross-entropy gradient -> the CNN attack (features and labels by the head's exact
//! route, then optionally the pixels) -> metrics against the truth -> report.

use std::path::{Path, PathBuf};
use std::time::Instant;

use faer::Mat;
use rand::RngExt;

use crate::attack::conv::{ConvProblem, pixels};
use crate::attack::{self, AttackConfig, Sample};
use crate::data::{Batch, DataSpec};
use crate::io::png::ImageShape;
use crate::metrics::{self, Metrics};
use crate::model::cnn::arch::{self, Architecture};
use crate::model::cnn::{Cnn, CnnGradient, ModelSpec, Tensors};
use crate::model::{Loss, Targets, cast_mat};
use crate::report::{
    AttackSummary, CnnFeatureSummary, CnnPixelSummary, CnnSimulationReport, Seconds,
};
use crate::rng::{Stream, stream};
use crate::{Dtype, Error, Result};

/// Which convolutional client the round uses.
#[derive(Clone, Debug, PartialEq)]
pub enum CnnModel {
    /// A built-in architecture, drawn with PyTorch's default init.
    Builtin(Architecture),
    /// A model folder (`model.json` + `model.safetensors`), parameters as stored.
    Folder(PathBuf),
}

impl std::fmt::Display for CnnModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CnnModel::Builtin(a) => write!(f, "{a}"),
            CnnModel::Folder(p) => write!(f, "{}", p.display()),
        }
    }
}

/// A simulated round with a CNN client (cross-entropy, labels drawn uniformly).
#[derive(Clone, Debug)]
pub struct CnnSimConfig {
    /// Image data (the crops are the client's private inputs).
    pub data: DataSpec,
    pub batch: usize,
    pub model: CnnModel,
    /// Classes K of a built-in model (default 10); a folder's model has its own.
    pub classes: Option<usize>,
    pub dtype: Dtype,
    pub seed: u64,
    pub tol: f64,
    /// Also recover the pixels below the features (the data set's mean image fills
    /// what the gradient leaves free).
    pub pixels: bool,
    /// The attack on the head (its loss is set to cross-entropy).
    pub attack: AttackConfig,
}

/// Everything a CNN round produced.
pub struct CnnSimOutput {
    pub report: CnnSimulationReport,
    /// The private batch, rows in PyTorch's C, H, W order.
    pub x: Mat<f64>,
    pub labels: Vec<usize>,
    /// The description of the model the client ran (BatchNorm folded) and its parameters.
    pub spec: ModelSpec,
    pub cnn: Cnn<f64>,
    pub gradient: CnnGradient<f64>,
    /// The true features phi(x_i) (server's model on the true pixels) and the recovered
    /// ones in the truth's order (None where missing).
    pub true_features: Mat<f64>,
    pub features: Vec<Option<Vec<f64>>>,
    /// The recovered pixels in the truth's order (C, H, W), when the pixel stage ran.
    pub pixels: Option<Vec<Option<Vec<f64>>>>,
    pub image: ImageShape,
    /// The client's precision (the saved model and gradient are written in it).
    pub dtype: Dtype,
}

/// Rows from channels-last (the data loaders' H, W, C) to PyTorch's C, H, W.
pub fn to_chw(x: &Mat<f64>, s: ImageShape) -> Mat<f64> {
    let (h, w, c) = (s.height, s.width, s.channels);
    Mat::from_fn(x.nrows(), s.len(), |i, j| {
        let (ch, rest) = (j / (h * w), j % (h * w));
        x[(i, rest * c + ch)]
    })
}

/// One row from PyTorch's C, H, W to channels-last (for drawing).
fn to_hwc(v: &[f64], s: ImageShape) -> Vec<f64> {
    let (h, w, c) = (s.height, s.width, s.channels);
    (0..s.len())
        .map(|j| {
            let (pix, ch) = (j / c, j % c);
            v[ch * h * w + pix]
        })
        .collect()
}

fn in_truth_order(m: &Metrics, rows: &[Vec<f64>]) -> Vec<Option<Vec<f64>>> {
    m.per_sample
        .iter()
        .map(|p| p.matched.map(|k| rows[k].clone()))
        .collect()
}

/// The client's model: its description (BatchNorm folded) and parameters.
fn client_model(cfg: &CnnSimConfig, input: [usize; 3]) -> Result<(ModelSpec, Cnn<f64>)> {
    let (spec, tensors): (ModelSpec, Tensors) = match &cfg.model {
        CnnModel::Builtin(a) => {
            let k = cfg.classes.unwrap_or(10);
            if k < 2 {
                return Err(Error::Param {
                    name: "classes",
                    reason: "cross-entropy needs at least 2".into(),
                });
            }
            let spec = a.spec(input, k)?;
            let t = arch::torch_default(&spec, &mut stream(cfg.seed, Stream::Model))?;
            (spec, t)
        }
        CnnModel::Folder(dir) => {
            let (spec, t, _) = crate::io::cnn::read_model_dir(dir)?;
            if spec.input != input {
                return Err(Error::Shape(format!(
                    "{} takes inputs {:?} (C, H, W), the data gives {:?}",
                    dir.display(),
                    spec.input,
                    input
                )));
            }
            (spec, t)
        }
    };
    let (cnn, _) = Cnn::from_spec(&spec, &tensors)?;
    Ok((arch::folded(&spec), cnn))
}

/// Run one round.
pub fn run(cfg: &CnnSimConfig) -> Result<CnnSimOutput> {
    let t0 = Instant::now();
    if cfg.batch == 0 {
        return Err(Error::Param {
            name: "batch",
            reason: "must be at least 1".into(),
        });
    }
    if !matches!(cfg.dtype, Dtype::F32 | Dtype::F64) {
        return Err(Error::Invalid(format!(
            "simulate computes in f32 or f64, not {}",
            cfg.dtype
        )));
    }
    let data = cfg
        .data
        .load(cfg.batch, &mut stream(cfg.seed, Stream::Data))?;
    let image = data.image.ok_or_else(|| {
        Error::Unsupported(format!(
            "a CNN client takes images; {} has no image shape",
            data.name
        ))
    })?;
    let input = [image.channels, image.height, image.width];
    let Batch { x: hwc, .. } = data.draw_batch(cfg.batch, &mut stream(cfg.seed, Stream::Data))?;
    let (spec, mut cnn) = client_model(cfg, input)?;
    let k = cnn.output_dim();
    if k < 2 {
        return Err(Error::Param {
            name: "classes",
            reason: format!("cross-entropy needs at least 2 outputs; the model has {k}"),
        });
    }
    // labels as the MLP round draws them for unlabelled data
    let mut rng = stream(cfg.seed, Stream::Labels);
    let labels: Vec<usize> = (0..cfg.batch).map(|_| rng.random_range(0..k)).collect();
    let targets = Targets::Classes(labels.clone());

    // The client computes in its dtype; the server reads the values it sent.
    let t_grad = Instant::now();
    let mut x = to_chw(&hwc, image);
    let grad = match cfg.dtype {
        Dtype::F32 => {
            let c32: Cnn<f32> = cnn.cast();
            let x32: Mat<f32> = cast_mat(x.as_ref());
            let g = c32.gradient(&x32, &targets, Loss::Ce)?.cast::<f64>();
            cnn = c32.cast();
            x = cast_mat(x32.as_ref());
            g
        }
        _ => cnn.gradient(&x, &targets, Loss::Ce)?,
    };
    let grad_seconds = t_grad.elapsed().as_secs_f64();

    let p = ConvProblem::from_parts(cnn, grad, cfg.dtype, Some(cfg.dtype))?;
    let mut acfg = cfg.attack.clone();
    acfg.loss = Some(Loss::Ce);
    let t_att = Instant::now();
    let rec = attack::run_conv(&p, &acfg)?;
    let attack_seconds = t_att.elapsed().as_secs_f64();
    let feats = &rec.features;
    let true_features = p.features(&x)?;
    let fm = metrics::evaluate(&true_features, &feats.samples, None, cfg.tol, Some(&labels))?;
    let rows: Vec<Vec<f64>> = feats.samples.iter().map(|s| s.x.clone()).collect();
    let features = in_truth_order(&fm, &rows);

    let mut pixel_rows = None;
    let (pixel_summary, pixels_skipped) = if cfg.pixels {
        let mean = data.mean_image();
        let prior = to_chw(&Mat::from_fn(1, image.len(), |_, j| mean[j]), image);
        let prior: Vec<f64> = prior.row(0).iter().copied().collect();
        let t = Instant::now();
        match pixels::recover(
            &p,
            feats,
            Loss::Ce,
            &prior,
            cfg.dtype,
            acfg.seed(),
            &pixels::PixelOptions::default(),
        ) {
            Ok(px) => {
                let seconds = t.elapsed().as_secs_f64();
                let samples = px.samples(feats);
                let range = data.range.unwrap_or((0.0, 1.0));
                let pm = metrics::evaluate(&x, &samples, Some(range), cfg.tol, Some(&labels))?;
                let prior_only: Vec<Sample> = (0..cfg.batch)
                    .map(|_| Sample {
                        x: prior.clone(),
                        ..samples[0].clone()
                    })
                    .collect();
                let prior_psnr =
                    metrics::evaluate(&x, &prior_only, Some(range), cfg.tol, None)?.mean_psnr;
                let rows: Vec<Vec<f64>> = samples.into_iter().map(|s| s.x).collect();
                pixel_rows = Some(in_truth_order(&pm, &rows));
                (
                    Some(CnnPixelSummary::new(px, pm, prior_psnr, seconds)),
                    None,
                )
            }
            Err(Error::Unsupported(why)) => (None, Some(why)),
            Err(e) => return Err(e),
        }
    } else {
        (None, None)
    };

    let certified = feats.certificate.as_ref().is_some_and(|c| c.certified);
    let report = CnnSimulationReport {
        gradleak_version: env!("CARGO_PKG_VERSION"),
        data: data.name.clone(),
        model: cfg.model.to_string(),
        input,
        batch_true: cfg.batch,
        batch_estimated: feats.batch_estimated,
        head_layer: rec.head_layer.clone(),
        feature_dim: rec.feature_dim,
        head_width: rec.head_width,
        batch_limit: rec.batch_limit,
        outputs: k,
        loss: Loss::Ce.to_string(),
        init: match cfg.model {
            CnnModel::Builtin(_) => "torch-default".into(),
            CnnModel::Folder(_) => "from the folder".into(),
        },
        dtype: cfg.dtype.to_string(),
        method: cfg.attack.method().to_string(),
        seed: cfg.seed,
        tol: cfg.tol,
        features: CnnFeatureSummary::new(&fm, feats, certified),
        pixels: pixel_summary,
        pixels_skipped,
        seconds: Seconds {
            gradient: grad_seconds,
            attack: attack_seconds,
            total: t0.elapsed().as_secs_f64(),
            cpu: None,
        },
        attack: AttackSummary::from(feats),
    };
    Ok(CnnSimOutput {
        report,
        x,
        labels,
        spec,
        cnn: p.cnn,
        gradient: p.grad,
        true_features,
        features,
        pixels: pixel_rows,
        image,
        dtype: cfg.dtype,
    })
}

impl CnnSimOutput {
    /// Write truth.npy (pixels, C, H, W), labels.npy, features.npy (recovered, in the
    /// truth's order, zeros where missing) and truth_features.npy, model/ (model.json +
    /// model.safetensors) and gradient.safetensors in the client's dtype, report.json,
    /// and with pixels reconstruction.npy and grid.png (truth / recovered). The folder
    /// reruns as `gradleak attack --model DIR/model --gradient DIR/gradient.safetensors
    /// --truth DIR/truth.npy`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        use crate::io::{cnn, ensure_dir, npy, png};
        ensure_dir(dir)?;
        let rows = |r: &[Option<Vec<f64>>], d: usize| {
            Mat::from_fn(r.len(), d, |i, j| r[i].as_ref().map_or(0.0, |v| v[j]))
        };
        npy::write_matrix(dir.join("truth.npy"), &self.x)?;
        let l: Vec<i64> = self.labels.iter().map(|&c| c as i64).collect();
        crate::io::write_atomic(&dir.join("labels.npy"), &npy::labels_bytes(&l)?)?;
        npy::write_matrix(dir.join("truth_features.npy"), &self.true_features)?;
        npy::write_matrix(
            dir.join("features.npy"),
            &rows(&self.features, self.true_features.ncols()),
        )?;
        let dtype = self.dtype;
        cnn::write_model_dir(
            &dir.join("model"),
            &self.spec,
            &self.cnn.to_tensors(),
            dtype,
        )?;
        cnn::write_named(
            &dir.join("gradient.safetensors"),
            &self.gradient.to_tensors(&self.cnn),
            dtype,
        )?;
        let json =
            serde_json::to_vec_pretty(&self.report).map_err(|e| Error::encode("the report", e))?;
        crate::io::write_atomic(&dir.join("report.json"), &json)?;
        if let Some(px) = &self.pixels {
            npy::write_matrix(dir.join("reconstruction.npy"), &rows(px, self.x.ncols()))?;
            let s = self.image;
            let truth: Vec<Option<Vec<f64>>> = (0..self.x.nrows())
                .map(|i| {
                    let v: Vec<f64> = self.x.row(i).iter().copied().collect();
                    Some(to_hwc(&v, s))
                })
                .collect();
            let rec: Vec<Option<Vec<f64>>> = px
                .iter()
                .map(|r| r.as_ref().map(|v| to_hwc(v, s)))
                .collect();
            png::write_grid_labelled(
                dir.join("grid.png"),
                &[truth, rec],
                &["truth", "recovered"],
                s,
                (0.0, 1.0),
                (96 / s.height.max(1)).max(1),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chw_and_hwc_are_inverse_layouts() {
        let s = ImageShape {
            height: 2,
            width: 3,
            channels: 3,
        };
        // channels-last row: pixel p, channel c holds 10 p + c
        let hwc = Mat::from_fn(1, 18, |_, j| (10 * (j / 3) + j % 3) as f64);
        let chw = to_chw(&hwc, s);
        // C, H, W: channel 1's block starts at 6 and holds pixels 0..6 in order
        assert_eq!(chw[(0, 6)], 1.0);
        assert_eq!(chw[(0, 7)], 11.0);
        assert_eq!(chw[(0, 17)], 52.0);
        let row: Vec<f64> = chw.row(0).iter().copied().collect();
        let back = to_hwc(&row, s);
        assert!((0..18).all(|j| back[j] == hwc[(0, j)]));
    }
}
