//! One simulated round, end to end: data -> server's parameters -> client gradient
//! -> defences -> attack -> metrics -> report; [`cnn`]: the same round with a
//! convolutional client.

pub mod cnn;

use std::time::Instant;

use faer::Mat;
use rand::RngExt;

use crate::attack::{self, AttackConfig, Prior, Reconstruction, ServerView};
use crate::data::{Batch, DataSpec, Dataset};
use crate::defense::{self, ClientContext, Defense, DefenseReport};
use crate::io::png::ImageShape;
use crate::metrics::{self, Metrics};
use crate::model::{Activation, Gradient, Init, InitConfig, Loss, Mlp, Targets, cast_mat};
use crate::report::{AttackSummary, Seconds, SimulationReport, per_sample};
use crate::rng::{Stream, stream};
use crate::{Dtype, Error, Result};

/// A simulated round.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub data: DataSpec,
    pub batch: usize,
    pub width: usize,
    pub depth: usize,
    pub hidden: usize,
    pub activation: Activation,
    pub loss: Loss,
    /// Output dimension K (classes for `ce`); None: the data set's classes, or 10
    /// for `ce` and 1 for `mse`/`bce`.
    pub classes: Option<usize>,
    pub init: Init,
    pub dtype: Dtype,
    pub seed: u64,
    pub defenses: Vec<Defense>,
    pub tol: f64,
    /// The attack; its `prior` defaults to the data set's statistics.
    pub attack: AttackConfig,
}

/// Everything a round produced.
pub struct SimOutput {
    pub report: SimulationReport,
    pub batch: Batch,
    pub model: Mlp<f64>,
    /// The gradient as the server received it (after defences, in the dtype's values).
    pub gradient: Gradient<f64>,
    pub reconstruction: Reconstruction,
    pub metrics: Metrics,
    pub range: Option<(f64, f64)>,
    pub image: Option<ImageShape>,
}

fn targets(cfg: &SimConfig, data: &Dataset, batch: &Batch, k: usize) -> Result<Targets> {
    let mut rng = stream(cfg.seed, Stream::Labels);
    match cfg.loss {
        Loss::Ce => {
            let labels = match &batch.labels {
                Some(l) if l.iter().all(|&c| c < k) => l.clone(),
                Some(_) => {
                    return Err(Error::Param {
                        name: "classes",
                        reason: format!(
                            "{k} is fewer than the {} classes of {}",
                            data.classes.unwrap_or(0),
                            data.name
                        ),
                    });
                }
                None => (0..cfg.batch).map(|_| rng.random_range(0..k)).collect(),
            };
            Ok(Targets::Classes(labels))
        }
        Loss::Bce => Ok(Targets::Values(Mat::from_fn(
            cfg.batch,
            k,
            |i, j| match &batch.labels {
                Some(l) if k == 1 => f64::from(l[i] % 2 == 1),
                Some(l) => f64::from(l[i] == j),
                None => f64::from(rng.random::<bool>()),
            },
        ))),
        Loss::Mse => {
            let n = rand_distr::Normal::new(0.0, 1.0).expect("finite");
            Ok(Targets::Values(Mat::from_fn(cfg.batch, k, |_, _| {
                rand_distr::Distribution::sample(&n, &mut rng)
            })))
        }
    }
}

/// The class labels the client trained with, when the loss has classes.
fn class_labels(t: &Targets, loss: Loss) -> Option<Vec<usize>> {
    match (t, loss) {
        (Targets::Classes(c), _) => Some(c.clone()),
        (Targets::Values(v), Loss::Bce) if v.ncols() == 1 => {
            Some((0..v.nrows()).map(|i| v[(i, 0)] as usize).collect())
        }
        _ => None,
    }
}

/// Run one round.
pub fn run(cfg: &SimConfig) -> Result<SimOutput> {
    let t0 = Instant::now();
    if cfg.batch == 0 {
        return Err(Error::Param {
            name: "batch",
            reason: "must be at least 1".into(),
        });
    }
    let data = cfg
        .data
        .load(cfg.batch, &mut stream(cfg.seed, Stream::Data))?;
    let batch = data.draw_batch(cfg.batch, &mut stream(cfg.seed, Stream::Data))?;
    let k = match (cfg.classes, cfg.loss) {
        (Some(k), _) => k,
        (None, Loss::Ce) => data.classes.unwrap_or(10),
        (None, _) => 1,
    };
    if cfg.loss == Loss::Ce && k < 2 {
        return Err(Error::Param {
            name: "classes",
            reason: "cross-entropy needs at least 2".into(),
        });
    }
    let stats = data.prior_stats();
    let init = InitConfig {
        input_dim: data.dim(),
        width: cfg.width,
        hidden: cfg.hidden,
        depth: cfg.depth,
        outputs: k,
        init: cfg.init,
        activation: cfg.activation,
        prior_mean: stats.mean,
        prior_sq_norm: stats.sq_norm,
        prior_centred_sq_norm: stats.centred_sq_norm,
    };
    let mut model = init.build(&mut stream(cfg.seed, Stream::Model))?;
    let targets = targets(cfg, &data, &batch, k)?;

    // The client computes in its dtype; the server reads the values it sent.
    let t_grad = Instant::now();
    let (x, grad) = match cfg.dtype {
        Dtype::F64 => {
            let g = model.gradient(batch.x.as_ref(), &targets, cfg.loss)?;
            (batch.x.clone(), g)
        }
        Dtype::F32 => {
            let m32: Mlp<f32> = model.cast();
            let x32: Mat<f32> = cast_mat(batch.x.as_ref());
            let g = m32
                .gradient(x32.as_ref(), &targets, cfg.loss)?
                .cast::<f64>();
            model = m32.cast();
            (cast_mat(x32.as_ref()), g)
        }
        Dtype::Bf16 | Dtype::F16 => {
            return Err(Error::Invalid(format!(
                "simulate computes in f32 or f64, not {}",
                cfg.dtype
            )));
        }
    };
    let ctx = ClientContext {
        model: &model,
        x: &x,
        targets: &targets,
        loss: cfg.loss,
    };
    let (grad, defense_report): (Gradient<f64>, Option<DefenseReport>) = if cfg.defenses.is_empty()
    {
        (grad, None)
    } else {
        let (g, r) = defense::apply(
            &cfg.defenses,
            &ctx,
            grad,
            &mut stream(cfg.seed, Stream::Defense),
        )?;
        let g = if cfg.dtype == Dtype::F32 {
            g.cast::<f32>().cast::<f64>()
        } else {
            g
        };
        (g, Some(r))
    };
    let grad_seconds = t_grad.elapsed().as_secs_f64();

    let mut view = ServerView::from_memory(&model, &grad, cfg.dtype)?;
    view.noise_std = defense_report.as_ref().and_then(|r| r.noise_std);
    view.defenses = cfg.defenses.clone();
    let mut acfg = cfg.attack.clone();
    if acfg.prior.is_none() {
        acfg.prior = Some(Prior::from(stats));
    }
    if acfg.prior_image.is_none() && !matches!(cfg.data, crate::data::DataSpec::Gaussian { .. }) {
        // a named data set's mean image is public (docs/DESIGN.md, "Rank-deficient inputs")
        acfg.prior_image = Some(data.mean_image());
    }
    if acfg.tensor.known_law.is_none() {
        acfg.tensor.known_law = Some(attack::law::WeightLaw::of_init(&init));
    }
    if acfg.baseline.image.is_none() {
        acfg.baseline.image = data.image; // IG's total-variation prior
    }
    let t_att = Instant::now();
    let rec = attack::run(&view, &acfg)?;
    let attack_seconds = t_att.elapsed().as_secs_f64();

    let labels = class_labels(&targets, cfg.loss);
    let metrics = metrics::evaluate(&x, &rec.samples, data.range, cfg.tol, labels.as_deref())?;
    let report = SimulationReport {
        gradleak_version: env!("CARGO_PKG_VERSION"),
        data: data.name.clone(),
        batch_true: cfg.batch,
        batch_estimated: rec.batch_estimated,
        dim: data.dim(),
        width: cfg.width,
        depth: cfg.depth,
        hidden: (cfg.depth > 1).then_some(cfg.hidden),
        outputs: k,
        activation: cfg.activation.to_string(),
        loss: cfg.loss.to_string(),
        init: cfg.init.to_string(),
        dtype: cfg.dtype.to_string(),
        method: cfg.attack.method.to_string(),
        seed: cfg.seed,
        defenses: cfg.defenses.clone(),
        defense: defense_report,
        median_rel_error: metrics.median_rel_error,
        max_rel_error: metrics.max_rel_error,
        recovered_fraction: metrics.recovered_fraction,
        tol: cfg.tol,
        missing: metrics.missing,
        label_accuracy: metrics.label_accuracy,
        mean_psnr: metrics.mean_psnr,
        per_sample: per_sample(&metrics, &rec),
        seconds: Seconds {
            gradient: grad_seconds,
            attack: attack_seconds,
            total: t0.elapsed().as_secs_f64(),
            cpu: None,
        },
        attack: AttackSummary::from(&rec),
    };
    Ok(SimOutput {
        report,
        batch: Batch {
            x,
            labels: batch.labels,
            indices: batch.indices,
        },
        model,
        gradient: grad,
        reconstruction: rec,
        metrics,
        range: data.range,
        image: data.image,
    })
}

impl SimOutput {
    /// Reconstructions in the truth's order (None where missing), for saving and drawing.
    pub fn matched_reconstructions(&self) -> Vec<Option<Vec<f64>>> {
        self.metrics
            .per_sample
            .iter()
            .map(|p| p.matched.map(|k| self.reconstruction.samples[k].x.clone()))
            .collect()
    }

    /// Write truth.npy, reconstruction.npy (matched order; missing rows are NaN-free
    /// zeros and listed in the report), model and gradient safetensors, report.json,
    /// and for images grid.png.
    pub fn save(&self, dir: &std::path::Path) -> Result<()> {
        use crate::io::{ensure_dir, npy, png, safetensors};
        ensure_dir(dir)?;
        npy::write_matrix(dir.join("truth.npy"), &self.batch.x)?;
        let d = self.batch.x.ncols();
        let rec = self.matched_reconstructions();
        let rows: Vec<Vec<f64>> = rec
            .iter()
            .map(|r| r.clone().unwrap_or_else(|| vec![0.0; d]))
            .collect();
        npy::write_matrix(
            dir.join("reconstruction.npy"),
            &Mat::from_fn(rows.len(), d, |i, j| rows[i][j]),
        )?;
        match self.report.dtype.as_str() {
            "f32" => {
                safetensors::write_model(dir.join("model.safetensors"), &self.model.cast::<f32>())?;
                safetensors::write_gradient(
                    dir.join("gradient.safetensors"),
                    &self.gradient.cast::<f32>(),
                )?;
            }
            _ => {
                safetensors::write_model(dir.join("model.safetensors"), &self.model)?;
                safetensors::write_gradient(dir.join("gradient.safetensors"), &self.gradient)?;
            }
        }
        let json =
            serde_json::to_vec_pretty(&self.report).map_err(|e| Error::encode("the report", e))?;
        crate::io::write_atomic(&dir.join("report.json"), &json)?;
        if let Some(shape) = self.image {
            let truth: Vec<Option<Vec<f64>>> = (0..self.batch.x.nrows())
                .map(|i| Some((0..d).map(|j| self.batch.x[(i, j)]).collect()))
                .collect();
            let zoom = (96 / shape.height.max(1)).max(1);
            png::write_grid_labelled(
                dir.join("grid.png"),
                &[truth, rec],
                &["truth", "recovered"],
                shape,
                self.range.unwrap_or((0.0, 1.0)),
                zoom,
            )?;
        }
        Ok(())
    }
}

impl Default for SimConfig {
    /// digits, B = 8, m = 4096, tanh, cross-entropy, Gaussian init (the paper's), f64, seed 1, auto.
    fn default() -> Self {
        SimConfig {
            data: DataSpec::Digits,
            batch: 8,
            width: 4096,
            depth: 1,
            hidden: 256,
            activation: Activation::Tanh,
            loss: Loss::Ce,
            classes: None,
            init: Init::Gaussian,
            dtype: Dtype::F64,
            seed: 1,
            defenses: Vec::new(),
            tol: metrics::DEFAULT_TOL,
            attack: AttackConfig::new(attack::Method::Auto, 1),
        }
    }
}

/// Keys `SimConfig::set` understands (the sweep's grid keys).
pub const KEYS: &[&str] = &[
    "data",
    "batch",
    "width",
    "depth",
    "hidden",
    "activation",
    "loss",
    "classes",
    "init",
    "dtype",
    "seed",
    "method",
    "defense",
    "tol",
    "prior",
    "attack-batch",
    "tensor-law",
    "tensor-order",
    "tensor-estimator",
];

impl SimConfig {
    /// Set one field from its command-line spelling (`defense` takes `+`-joined steps,
    /// `none` for no defence).
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        fn num<T: std::str::FromStr>(key: &str, v: &str) -> Result<T> {
            v.parse()
                .map_err(|_| Error::Invalid(format!("{key}={v}: not a valid number")))
        }
        match key {
            "data" => self.data = value.parse()?,
            "batch" => self.batch = num(key, value)?,
            "width" => self.width = num(key, value)?,
            "depth" => self.depth = num(key, value)?,
            "hidden" => self.hidden = num(key, value)?,
            "activation" => self.activation = value.parse()?,
            "loss" => self.loss = value.parse()?,
            "classes" => self.classes = Some(num(key, value)?),
            "init" => self.init = value.parse()?,
            "dtype" => self.dtype = value.parse()?,
            "seed" => {
                self.seed = num(key, value)?;
                self.attack.seed = self.seed;
            }
            "method" => self.attack.method = value.parse()?,
            "defense" => {
                self.defenses = if value == "none" || value.is_empty() {
                    Vec::new()
                } else {
                    value.split('+').map(str::parse).collect::<Result<_>>()?
                }
            }
            "tol" => self.tol = num(key, value)?,
            "prior" => self.attack.prior = Some(value.parse()?),
            // the batch size the attack is told (`auto`: estimated from the rank)
            "attack-batch" => {
                self.attack.batch = if value == "auto" {
                    None
                } else {
                    Some(num(key, value)?)
                }
            }
            "tensor-law" => {
                self.attack.tensor.use_known_law = match value {
                    "known" => true,
                    "estimated" => false,
                    _ => {
                        return Err(Error::Unknown {
                            kind: "tensor law",
                            name: value.into(),
                            expected: "estimated known".into(),
                        });
                    }
                }
            }
            "tensor-estimator" => {
                self.attack.tensor.plain_moments = match value {
                    "stein" => true,
                    "regression" => false,
                    _ => {
                        return Err(Error::Unknown {
                            kind: "tensor estimator",
                            name: value.into(),
                            expected: "regression stein".into(),
                        });
                    }
                }
            }
            "tensor-order" => {
                self.attack.tensor.order = (value != "auto").then(|| num(key, value)).transpose()?
            }
            _ => {
                return Err(Error::Unknown {
                    kind: "setting",
                    name: key.into(),
                    expected: KEYS.join(" "),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod baseline_tests;
