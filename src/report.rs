//! The JSON reports `simulate` and `attack` write.

use serde::Serialize;

use crate::attack::evidence::Certificate;
use crate::attack::{AttackConfig, Diagnostics, RankRule, Reconstruction, ServerView, Stage};
use crate::defense::{Defense, DefenseReport};
use crate::metrics::{Metrics, SampleMetrics};

/// Wall-clock seconds of each stage, and the CPU seconds of the whole command when the
/// command line measured them (the comparable figure on a shared machine).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Seconds {
    pub gradient: f64,
    pub attack: f64,
    pub total: f64,
    pub cpu: Option<f64>,
}

/// What the attack said about itself (beyond the samples).
#[derive(Clone, Debug, Serialize)]
pub struct AttackSummary {
    pub singular_values: Vec<f64>,
    pub rank_threshold: f64,
    pub rank_rule: Option<RankRule>,
    pub notes: Vec<String>,
    pub diagnostics: Diagnostics,
    /// What vouches for "exact" (exact route): certified yes/no, closure residual, per sample why.
    pub certificate: Option<Certificate>,
}

impl From<&Reconstruction> for AttackSummary {
    fn from(r: &Reconstruction) -> Self {
        AttackSummary {
            singular_values: r.singular_values.clone(),
            rank_threshold: r.rank_threshold,
            rank_rule: r.rank_rule,
            notes: r.notes.clone(),
            diagnostics: r.diagnostics.clone(),
            certificate: r.certificate.clone(),
        }
    }
}

/// One true sample: its metrics and how the attack found its match.
#[derive(Clone, Debug, Serialize)]
pub struct PerSample {
    #[serde(flatten)]
    pub metrics: SampleMetrics,
    pub residual: Option<f64>,
    pub exact: Option<bool>,
    pub stage: Option<Stage>,
    /// Why the matched sample is (or is not) exact, from the certificate.
    pub why: Option<String>,
}

/// The report of a simulated round: setting, truth-based metrics, timings.
#[derive(Clone, Debug, Serialize)]
pub struct SimulationReport {
    pub gradleak_version: &'static str,
    pub data: String,
    pub batch_true: usize,
    pub batch_estimated: usize,
    pub dim: usize,
    pub width: usize,
    pub depth: usize,
    /// Width of the layers after the first (only for depth > 1: a one-hidden-layer
    /// network has none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hidden: Option<usize>,
    pub outputs: usize,
    pub activation: String,
    pub loss: String,
    pub init: String,
    pub dtype: String,
    pub method: String,
    pub seed: u64,
    pub defenses: Vec<Defense>,
    pub defense: Option<DefenseReport>,
    pub median_rel_error: f64,
    pub max_rel_error: f64,
    pub recovered_fraction: f64,
    pub tol: f64,
    pub missing: usize,
    pub label_accuracy: Option<f64>,
    pub mean_psnr: Option<f64>,
    pub per_sample: Vec<PerSample>,
    pub seconds: Seconds,
    pub attack: AttackSummary,
}

/// Per-sample rows joining metrics with the reconstruction's own account.
pub fn per_sample(metrics: &Metrics, rec: &Reconstruction) -> Vec<PerSample> {
    metrics
        .per_sample
        .iter()
        .map(|m| {
            let s = m.matched.map(|k| &rec.samples[k]);
            PerSample {
                metrics: m.clone(),
                residual: s.and_then(|s| s.residual),
                exact: s.map(|s| s.exact),
                stage: s.map(|s| s.stage),
                why: m.matched.and_then(|k| {
                    rec.certificate
                        .as_ref()
                        .and_then(|c| c.samples.get(k))
                        .map(|e| e.why.clone())
                }),
            }
        })
        .collect()
}

/// One recovered sample in an `attack` report (no truth to compare with).
#[derive(Clone, Debug, Serialize)]
pub struct AttackSample {
    pub index: usize,
    pub residual: Option<f64>,
    pub exact: bool,
    pub stage: Stage,
    pub label: Option<usize>,
    /// Why it is (or is not) exact, from the certificate.
    pub why: Option<String>,
}

/// The report of `gradleak attack` on files.
#[derive(Clone, Debug, Serialize)]
pub struct AttackReport {
    pub gradleak_version: &'static str,
    pub model: String,
    pub gradient: String,
    pub dim: usize,
    pub width: usize,
    pub depth: usize,
    pub outputs: usize,
    pub activation: String,
    pub dtype: String,
    pub method: String,
    pub batch_estimated: usize,
    pub recovered: usize,
    pub missing: usize,
    pub exact: usize,
    /// The certificate holds (every sample found and the batch reproduces the gradient,
    /// or the found part certified).
    pub certified: bool,
    /// Relative closure of the whole gradient by the recovered batch (all samples found).
    pub closure_residual: Option<f64>,
    pub labels: Option<Vec<Option<usize>>>,
    pub samples: Vec<AttackSample>,
    pub seconds: f64,
    /// CPU seconds (user + system) of the whole command, when the caller measured them.
    pub cpu_seconds: Option<f64>,
    pub attack: AttackSummary,
    /// What reading the files found (storage and working precision, layer names).
    pub files: Option<crate::attack::ReadInfo>,
    /// The evidence for a detected activation.
    pub activation_fit: Option<crate::attack::activation_fit::Choice>,
    /// Matched metrics against a true batch given to the command.
    pub truth: Option<Metrics>,
}

impl AttackReport {
    /// The report of `rec`, an attack with `cfg` on `view`; `model` and `gradient` name
    /// where they came from (file paths, or `"<memory>"`).
    pub fn new(
        view: &ServerView,
        cfg: &AttackConfig,
        rec: &Reconstruction,
        (model, gradient): (String, String),
        seconds: f64,
    ) -> AttackReport {
        let labels: Vec<Option<usize>> = rec.samples.iter().map(|s| s.label).collect();
        let why = |i: usize| {
            rec.certificate
                .as_ref()
                .and_then(|c| c.samples.get(i))
                .map(|e| e.why.clone())
        };
        AttackReport {
            gradleak_version: env!("CARGO_PKG_VERSION"),
            model,
            gradient,
            dim: view.input_dim(),
            width: view.width(),
            depth: view.depth(),
            outputs: view.outputs(),
            activation: view.activation.to_string(),
            dtype: view.dtype.to_string(),
            method: cfg.method().to_string(),
            batch_estimated: rec.batch_estimated,
            recovered: rec.samples.len(),
            missing: rec.missing(),
            exact: rec.samples.iter().filter(|s| s.exact).count(),
            certified: rec.certificate.as_ref().is_some_and(|c| c.certified),
            closure_residual: rec.certificate.as_ref().and_then(|c| c.closure_residual),
            labels: labels.iter().any(Option::is_some).then_some(labels),
            samples: rec
                .samples
                .iter()
                .enumerate()
                .map(|(i, s)| AttackSample {
                    index: i,
                    residual: s.residual,
                    exact: s.exact,
                    stage: s.stage,
                    label: s.label,
                    why: why(i),
                })
                .collect(),
            seconds,
            cpu_seconds: None,
            attack: AttackSummary::from(rec),
            files: None,
            activation_fit: None,
            truth: None,
        }
    }
}

/// The features h_i = phi(x_i) a CNN round recovered, against the true ones.
#[derive(Clone, Debug, Serialize)]
pub struct CnnFeatureSummary {
    pub median_rel_error: f64,
    pub max_rel_error: f64,
    pub recovered_fraction: f64,
    pub missing: usize,
    /// Found samples the head's route called exact.
    pub exact: usize,
    /// The head's certificate holds (every sample found, the batch reproduces the gradient).
    pub certified: bool,
    pub closure_residual: Option<f64>,
    pub label_accuracy: Option<f64>,
    pub per_sample: Vec<PerSample>,
}

impl CnnFeatureSummary {
    pub fn new(m: &Metrics, rec: &Reconstruction, certified: bool) -> Self {
        CnnFeatureSummary {
            median_rel_error: m.median_rel_error,
            max_rel_error: m.max_rel_error,
            recovered_fraction: m.recovered_fraction,
            missing: m.missing,
            exact: rec.samples.iter().filter(|s| s.exact).count(),
            certified,
            closure_residual: rec.certificate.as_ref().and_then(|c| c.closure_residual),
            label_accuracy: m.label_accuracy,
            per_sample: per_sample(m, rec),
        }
    }
}

/// The pixels a CNN round recovered below the features, against the true pixels.
#[derive(Clone, Debug, Serialize)]
pub struct CnnPixelSummary {
    /// Every layer determined, nothing guessed, features of the pixels closing at the floor.
    pub exact: bool,
    pub feature_closure: f64,
    pub guessed_pooling: bool,
    pub layers: Vec<crate::attack::conv::LayerSolve>,
    pub median_rel_error: f64,
    pub max_rel_error: f64,
    pub recovered_fraction: f64,
    pub mean_psnr: Option<f64>,
    /// PSNR of the prior (the data set's mean image) alone, for comparison.
    pub prior_psnr: Option<f64>,
    pub per_sample: Vec<SampleMetrics>,
    pub seconds: f64,
}

impl CnnPixelSummary {
    pub fn new(
        px: crate::attack::conv::Pixels,
        m: Metrics,
        prior_psnr: Option<f64>,
        seconds: f64,
    ) -> Self {
        CnnPixelSummary {
            exact: px.exact,
            feature_closure: px.feature_closure,
            guessed_pooling: px.guessed_pooling,
            layers: px.layers,
            median_rel_error: m.median_rel_error,
            max_rel_error: m.max_rel_error,
            recovered_fraction: m.recovered_fraction,
            mean_psnr: m.mean_psnr,
            prior_psnr,
            per_sample: m.per_sample,
            seconds,
        }
    }
}

/// The report of a simulated round with a convolutional client.
#[derive(Clone, Debug, Serialize)]
pub struct CnnSimulationReport {
    pub gradleak_version: &'static str,
    pub data: String,
    /// `lenet`, `convnet`, or the model folder.
    pub model: String,
    /// (C, H, W) of one input.
    pub input: [usize; 3],
    pub batch_true: usize,
    pub batch_estimated: usize,
    /// The head's first Linear layer (PyTorch name), its input d and width m, min(m, d + 1).
    pub head_layer: String,
    pub feature_dim: usize,
    pub head_width: usize,
    pub batch_limit: usize,
    pub outputs: usize,
    pub loss: String,
    pub init: String,
    pub dtype: String,
    pub method: String,
    pub seed: u64,
    pub tol: f64,
    pub features: CnnFeatureSummary,
    pub pixels: Option<CnnPixelSummary>,
    /// Why the pixel stage did not run when it was asked for (e.g. features missing).
    pub pixels_skipped: Option<String>,
    pub seconds: Seconds,
    pub attack: AttackSummary,
}
