//! What a search did and why its samples are (or are not) exact: plain data shared
//! by the exact route (which fills it) and the [`Reconstruction`](super::Reconstruction)
//! (which reports it). The rules that fill the certificate are in
//! `exact/certificate.rs` (docs/DESIGN.md, "The certificate").

use serde::Serialize;

/// What the search did (reported under the keys `search_starts`, ...).
#[derive(Clone, Debug, Default, Serialize)]
pub struct SearchStats {
    #[serde(rename = "search_starts")]
    pub starts: usize,
    #[serde(rename = "search_candidates")]
    pub candidates: usize,
    #[serde(rename = "search_lm_iterations")]
    pub lm_iterations: usize,
    #[serde(rename = "search_duplicates")]
    pub duplicates: usize,
    #[serde(rename = "search_degenerate")]
    pub degenerate: usize,
    #[serde(rename = "search_seconds")]
    pub seconds: f64,
    pub exact_floor: f64,
    #[serde(rename = "search_rounds")]
    pub rounds: usize,
    /// Zeros found by the seeding rounds (before the random-start search).
    #[serde(rename = "search_seeded")]
    pub seeded: usize,
    /// Seconds spent in the seeding rounds (ICA and their polish).
    pub seed_seconds: f64,
}

/// Relative closure of one layer: ||G_rec - G_obs||_F / ||G_obs||_F (weight and bias).
#[derive(Clone, Debug, Serialize)]
pub struct LayerClosure {
    pub layer: usize,
    pub residual: f64,
}

/// Why one sample is, or is not, exact.
#[derive(Clone, Debug, Serialize)]
pub struct SampleEvidence {
    pub exact: bool,
    /// Span residual F on every neuron (best output residual).
    pub span_residual: f64,
    /// F on the held-back neurons, when there are any.
    pub held_out_residual: Option<f64>,
    /// This sample's rounding floor of F: SAMPLE_FACTOR u (1 + amp).
    pub floor: f64,
    /// Rounding amplification of its signal direction (1 when the inputs are orthogonal).
    pub amplification: f64,
    pub why: String,
}

/// The certificate of a reconstruction.
#[derive(Clone, Debug, Serialize)]
pub struct Certificate {
    /// All B samples found, each passes its own test, and the batch reproduces the gradient.
    pub certified: bool,
    /// Samples missing, and the found ones certified as a part (own tests and the split test).
    pub part_certified: bool,
    pub found: usize,
    pub batch: usize,
    /// Overall relative closure of the whole gradient (all samples found).
    pub closure_residual: Option<f64>,
    pub layers: Vec<LayerClosure>,
    /// Tolerance of the closure: CLOSURE_FACTOR u sqrt(n_path).
    pub closure_tolerance: f64,
    /// Closure with r_i from the known loss and the recovered labels (cross-entropy only).
    pub loss_closure_residual: Option<f64>,
    /// Largest normalised off-diagonal of the split test (samples missing, or the batch
    /// failing its closure), and its tolerance.
    pub split_residual: Option<f64>,
    pub split_tolerance: Option<f64>,
    pub samples: Vec<SampleEvidence>,
    pub why: String,
}
