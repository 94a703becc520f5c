//! The attacks: from what the server holds ([`ServerView`]) to a [`Reconstruction`].
//!
//! Stages (docs/DESIGN.md): [`subspace`] (batch size, row space) -> a method:
//! [`analytic`] (B = 1), [`tensor`] (the paper's moments + CP decomposition),
//! [`refine`] and [`span`] (exact equations), [`baseline`] (DLG, IG).

pub mod baseline;
pub mod defended;
pub mod exact;
pub mod moment;
pub mod prior;
pub mod subspace;
pub mod view;

use serde::Serialize;

pub use prior::Prior;
pub use subspace::{RankRule, Subspace, SubspaceOptions};
pub use view::{FirstLayer, Rows, ServerView};

use crate::model::Loss;
use crate::{Error, Result};

/// Which attack to run (`--method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Exact single-sample recovery x = g_w / g_b.
    Analytic,
    /// Wang, Lee & Lei (2023): Hermite moments and tensor decomposition.
    Tensor,
    /// Levenberg-Marquardt on the exact gradient equations from tensor starts.
    Refine,
    /// Span-membership search for exact zeros.
    Span,
    /// The best available route for the case.
    Auto,
    /// Deep Leakage from Gradients (Zhu et al. 2019).
    Dlg,
    /// Inverting Gradients (Geiping et al. 2020).
    Ig,
}

impl Method {
    pub const ALL: [Method; 7] = [
        Method::Analytic,
        Method::Tensor,
        Method::Refine,
        Method::Span,
        Method::Auto,
        Method::Dlg,
        Method::Ig,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Method::Analytic => "analytic",
            Method::Tensor => "tensor",
            Method::Refine => "refine",
            Method::Span => "span",
            Method::Auto => "auto",
            Method::Dlg => "dlg",
            Method::Ig => "ig",
        }
    }
}

impl std::str::FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Method::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| Error::Unknown {
                kind: "method",
                name: s.into(),
                expected: Method::ALL.map(|m| m.name()).join(" "),
            })
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Everything an attack may be told besides the view.
#[derive(Clone, Debug)]
pub struct AttackConfig {
    pub method: Method,
    /// Force the batch size instead of estimating it from the rank.
    pub batch: Option<usize>,
    pub seed: u64,
    /// Public prior over inputs (search starts, baselines' initialisation).
    pub prior: Option<Prior>,
    /// The client's loss, when the server knows it (labels, baselines).
    pub loss: Option<Loss>,
    /// Known noise standard deviation per gradient entry (defences).
    pub noise_std: Option<f64>,
    /// Show progress bars on the terminal.
    pub progress: bool,
    pub tensor: moment::TensorOptions,
    pub search: exact::search::SearchOptions,
    pub baseline: baseline::BaselineOptions,
}

impl AttackConfig {
    pub fn new(method: Method, seed: u64) -> Self {
        AttackConfig {
            method,
            batch: None,
            seed,
            prior: None,
            loss: None,
            noise_std: None,
            progress: false,
            tensor: Default::default(),
            search: Default::default(),
            baseline: Default::default(),
        }
    }

    /// Options of the subspace stage implied by this configuration.
    pub fn subspace_options(&self) -> SubspaceOptions {
        SubspaceOptions {
            batch: self.batch,
            noise_std: self.noise_std,
            seed: self.seed,
        }
    }
}

/// One recovered input.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    /// The input x (d values, the bias coordinate removed).
    pub x: Vec<f64>,
    /// Relative residual of the equations this sample satisfies, when the method has one.
    pub residual: Option<f64>,
    /// The residual is at the floating-point floor of the gradient's dtype.
    pub exact: bool,
    /// Which stage produced it.
    pub stage: String,
    /// Recovered class label, when the loss allows it.
    pub label: Option<usize>,
    /// Recovered output residual r_i = dL/df(x_i) (up to the method's normalisation).
    pub output_residual: Option<Vec<f64>>,
}

/// What an attack returns: the samples it found, and what it knows about the rest.
#[derive(Clone, Debug, Serialize)]
pub struct Reconstruction {
    pub method: Method,
    /// Batch size the attack believes the gradient came from.
    pub batch_estimated: usize,
    /// Found samples (never padded: `batch_estimated - samples.len()` are missing).
    pub samples: Vec<Sample>,
    /// Leading singular values of the augmented first-layer gradient.
    pub singular_values: Vec<f64>,
    pub rank_threshold: f64,
    pub rank_rule: Option<RankRule>,
    /// Plain-language remarks (e.g. "scale came from moments").
    pub notes: Vec<String>,
    /// Method-specific figures (fit residuals, restarts, iterations).
    pub diagnostics: serde_json::Map<String, serde_json::Value>,
}

impl Reconstruction {
    /// An empty reconstruction carrying the subspace stage's findings.
    pub fn from_subspace(method: Method, s: &Subspace) -> Self {
        Reconstruction {
            method,
            batch_estimated: s.batch,
            samples: Vec::new(),
            singular_values: s
                .singular_values
                .iter()
                .take(2 * s.batch + 8)
                .copied()
                .collect(),
            rank_threshold: s.threshold,
            rank_rule: Some(s.rule),
            notes: Vec::new(),
            diagnostics: Default::default(),
        }
    }

    /// Samples not found.
    pub fn missing(&self) -> usize {
        self.batch_estimated.saturating_sub(self.samples.len())
    }
}

/// Run the configured attack. A gradient below its noise floor is a result with no
/// sample and the reason, not an error.
pub fn run(view: &ServerView, cfg: &AttackConfig) -> Result<Reconstruction> {
    let out = match cfg.method {
        Method::Analytic => exact::analytic::attack(view, cfg),
        Method::Tensor => moment::attack(view, cfg),
        Method::Refine => exact::refine::attack(view, cfg),
        Method::Span => exact::route::attack(view, cfg),
        Method::Auto => auto(view, cfg),
        Method::Dlg => baseline::dlg(view, cfg),
        Method::Ig => baseline::ig(view, cfg),
    };
    match out {
        Err(Error::NoSignal { largest, floor }) => Ok(defended::nothing_recoverable(
            cfg.method, view, largest, floor,
        )),
        other => other,
    }
}

/// The default route: exact analytic recovery for one sample, otherwise the best
/// multi-sample method available.
fn auto(view: &ServerView, cfg: &AttackConfig) -> Result<Reconstruction> {
    if defended::complete::applies(view) {
        let mut rec = defended::complete_then_attack(view, cfg)?;
        rec.method = Method::Auto;
        return Ok(rec);
    }
    let sub = subspace::estimate(view, &cfg.subspace_options())?;
    let mut rec = if sub.batch == 1 && view.first.grad_bias.is_some() {
        let mut rec = exact::analytic::attack(view, cfg)?;
        // with one sample the output bias gradient is its residual r_1 = dL/df
        if let (Some(s), Some(gc)) = (
            rec.samples.first_mut(),
            view.upper_grad.last().and_then(|l| l.bias.as_ref()),
        ) {
            let r = faer::Col::from_fn(gc.nrows(), |k| gc[k]);
            s.label = exact::labels::assign(cfg.loss, std::slice::from_ref(&r), view.outputs())[0];
            s.output_residual = Some(r.iter().copied().collect());
        }
        rec
    } else {
        defended::refine_found(view, cfg, exact::route::attack_on(view, cfg, &sub)?)?
    };
    rec.method = Method::Auto;
    Ok(rec)
}
