//! Figures of the defended and joint-fit stages, one struct per stage. Each field is
//! present when its stage set it and serialises under the report's flat key
//! (`completion_rank`, `likelihood_objective`, ...), as part of [`super::Diagnostics`].

use serde::Serialize;

/// The completion of a pruned or sparsified first layer (`defended::complete`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct CompletionDiagnostics {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_rank: Option<usize>,
    /// Relative residual on the observed entries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_residual: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_sweeps: Option<usize>,
    /// Neurons kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_neurons: Option<usize>,
    /// Share of the first layer's entries observed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_observed: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_seconds: Option<f64>,
}

/// The joint likelihood fit under known noise or quantisation (`defended`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct LikelihoodDiagnostics {
    /// Multiply-adds the conjugate-gradient path would cost, when skipped for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub likelihood_skipped_work: Option<f64>,
    /// Dimension of the row space the reduced fit ran in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub likelihood_row_space: Option<usize>,
    /// The objective of a reduced fit that was not kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub likelihood_rejected: Option<f64>,
    /// Samples seeded from the residual.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub likelihood_filled: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub likelihood_iterations: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub likelihood_evaluations: Option<usize>,
    /// Weighted residual per entry before and after.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub likelihood_start: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub likelihood_objective: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub likelihood_seconds: Option<f64>,
}

/// The prior's box and the residual search after the reduced fit (`defended::reseek`,
/// `defended::polish`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReseekDiagnostics {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prior_dropped: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub residual_found: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swaps: Option<usize>,
}

/// A fit of the E-step map on the observed entries (`defended::masked`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct MaskedDiagnostics {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub masked_iterations: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub masked_start: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub masked_objective: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub masked_seconds: Option<f64>,
}

/// The consistent refit of every layer (`defended::consistent`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct ConsistentDiagnostics {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consistent_iterations: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consistent_start: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consistent_objective: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consistent_seconds: Option<f64>,
}

/// The local-steps pipeline: the seed on the augmented view, then the E-step fit
/// (`defended::local_steps`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct LocalStepsDiagnostics {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_seed_found: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_seed_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_iterations: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_start: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_objective: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_seconds: Option<f64>,
}

/// The labelled joint fit for rank-deficient inputs (`exact::labelled`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct JointDiagnostics {
    /// The fit was not run (the reason is in the notes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub joint_skipped: Option<bool>,
    /// Batch sizes tried, best first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub joint_batch_candidates: Option<Vec<usize>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub joint_batch: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub joint_label_counts: Option<Vec<usize>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub joint_steps: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub joint_start_closure: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub joint_fit_closure: Option<f64>,
    /// The batch closure of the fitted batch (null when it could not be computed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub joint_closure: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub joint_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub joint_accepted: Option<bool>,
}

/// Figures of the defended-gradient and joint-fit stages, each present when it ran.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DefendedDiagnostics {
    /// The first layer carried no signal above its floor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nothing_recoverable: Option<bool>,
    #[serde(flatten)]
    pub completion: CompletionDiagnostics,
    #[serde(flatten)]
    pub likelihood: LikelihoodDiagnostics,
    #[serde(flatten)]
    pub reseek: ReseekDiagnostics,
    #[serde(flatten)]
    pub masked: MaskedDiagnostics,
    #[serde(flatten)]
    pub consistent: ConsistentDiagnostics,
    #[serde(flatten)]
    pub local_steps: LocalStepsDiagnostics,
    #[serde(flatten)]
    pub joint: JointDiagnostics,
}
