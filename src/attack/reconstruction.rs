//! What an attack returns: the samples, the stage that produced each, and typed
//! diagnostics that serialise to the JSON report's keys.

use serde::Serialize;

use super::evidence::{Certificate, SearchStats};
use super::law::LawSource;
use super::params::Method;
use super::stages::DefendedDiagnostics;
use super::subspace::{RankRule, Subspace};

/// The stage that produced a sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// x = g_w / g_b (one sample).
    Analytic,
    /// The paper's moments and CP decomposition.
    Tensor,
    /// Joint Levenberg-Marquardt on the projected equations.
    Refine,
    /// A zero of the span residual.
    Span,
    /// An activation pattern (ReLU, leaky ReLU).
    Pattern,
    /// Gradient matching (Zhu et al. 2019).
    Dlg,
    /// Gradient matching with a cosine objective (Geiping et al. 2020).
    Ig,
    /// Refined jointly by maximum likelihood under a known defence error.
    Likelihood,
    /// The labelled joint fit of every layer's equations (rank-deficient inputs).
    Joint,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Analytic => "analytic",
            Stage::Tensor => "tensor",
            Stage::Refine => "refine",
            Stage::Span => "span",
            Stage::Pattern => "pattern",
            Stage::Dlg => "dlg",
            Stage::Ig => "ig",
            Stage::Likelihood => "likelihood",
            Stage::Joint => "joint",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Method-specific figures; each part is present when its stage ran, and serialises
/// to the report's flat keys (`search_starts`, `fit_residual`, ...).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Diagnostics {
    #[serde(flatten)]
    pub search: Option<SearchStats>,
    /// Samples the search found.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub found: Option<usize>,
    #[serde(flatten)]
    pub tensor: Option<TensorDiagnostics>,
    #[serde(flatten)]
    pub baseline: Option<BaselineDiagnostics>,
    /// Expected relative error of the single-sample formula under known noise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub predicted_rel_error: Option<f64>,
    /// Figures of the defended-gradient and joint-fit stages (completion, likelihood, ...).
    #[serde(flatten)]
    pub defended: DefendedDiagnostics,
    /// The batch certificate holds (docs/DESIGN.md, "Certificate").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certified: Option<bool>,
    /// Relative difference between the recovered batch's gradient and the observed one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub closure_residual: Option<f64>,
    /// Input coordinates zero in every sample (zero columns of G~), when there are any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zero_input_coordinates: Option<usize>,
    /// The largest rank the inputs allow: d + 1 minus the zero coordinates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_rank_limit: Option<usize>,
    /// B read off the found samples' cross-entropy residuals when the first-layer rank
    /// sits at that limit (docs/DESIGN.md, "Rank-deficient inputs").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_from_residuals: Option<usize>,
}

/// What the tensor method did.
#[derive(Clone, Debug, Serialize)]
pub struct TensorDiagnostics {
    /// Gaps between the estimated and the known weight law (when the law is known).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub law_covariance_gap: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub law_mean_gap: Option<f64>,
    /// Tensor order p + 1.
    pub order: usize,
    pub hermite_coefficients: Vec<f64>,
    /// (mu, sigma) of the pre-activation law the coefficients are taken under.
    pub coefficient_law: [f64; 2],
    pub fit_residual: f64,
    pub restarts: usize,
    pub start_residuals: Vec<f64>,
    pub als_sweeps: usize,
    pub law: LawSource,
    /// "regression" (default) or "stein" (the paper's plain moments).
    pub estimator: &'static str,
    pub output_modes: [usize; 2],
    pub tensor_shape: [usize; 3],
}

/// What a gradient-matching baseline did.
#[derive(Clone, Debug, Serialize)]
pub struct BaselineDiagnostics {
    /// Final objective of the best start.
    pub objective: f64,
    pub iterations: usize,
    /// Objective evaluations (DLG).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evaluations: Option<usize>,
    /// ||G - G_obs|| / ||G_obs|| of the result.
    pub gradient_residual: f64,
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
    pub stage: Stage,
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
    pub diagnostics: Diagnostics,
    /// What vouches for the word "exact" (exact route; docs/DESIGN.md, "Certificate").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate: Option<Certificate>,
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
            certificate: None,
        }
    }

    /// Samples not found.
    pub fn missing(&self) -> usize {
        self.batch_estimated.saturating_sub(self.samples.len())
    }
}
