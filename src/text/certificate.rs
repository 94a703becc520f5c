//! The text certificate (docs/DESIGN.md, "Text: certificate"): the recovered inputs must
//! account for the whole gradient of both blocks' input projections.

use faer::{Mat, MatRef};

use super::span::RowSpan;

/// The recovered inputs explain the gradient when what is left of G~ off their span is
/// at the rounding level of the client's gradient: storage adds u relative, the client's
/// accumulation in its dtype the same factor as the rank floor.
pub const RESIDUAL_FACTOR: f64 = crate::attack::subspace::ROUNDING_FACTOR;

/// One block's evidence.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LayerCheck {
    pub layer: String,
    /// Rank of the gradient at its floor.
    pub rank: usize,
    /// Rows of G~ (d + 1): the span is full when rank reaches it.
    pub dim: usize,
    /// sigma_rank / sigma_(rank+1).
    pub cliff: f64,
    pub floor: f64,
    /// The worst-case threshold (each input has its own, at most this).
    pub tau: f64,
    /// The largest threshold that discriminates.
    pub max_tau: f64,
    /// Distinct recovered inputs of this block.
    pub recovered_inputs: usize,
    /// Rank of the recovered inputs (exact f64 vectors).
    pub recovered_rank: usize,
    /// Largest distance of a recovered input from the span.
    pub max_distance: f64,
    /// ||G~ - P_rec G~||_F / ||G~||_F.
    pub unexplained: f64,
    pub tolerance: f64,
    pub passed: bool,
}

/// Check one block: every recovered input in the span, and the span of the recovered
/// inputs explains G~ to the tolerance. `need_count` also asks that the recovered inputs
/// be exactly as many as the rank (true for the attention output, whose inputs are distinct
/// by causality; the first block's are nearly additive, see DESIGN).
pub(crate) fn check(
    layer: &str,
    span: &RowSpan,
    g: MatRef<'_, f64>,
    inputs: &Mat<f64>,
    u: f64,
    need_count: bool,
) -> LayerCheck {
    let tests = span.test(inputs.as_ref());
    let max_distance = tests.iter().map(|t| t.distance).fold(0.0, f64::max);
    let all_in = tests.iter().all(|&t| span.accepts(t));
    let basis = super::span::orthonormal_rows(inputs.as_ref());
    let unexplained = span.unexplained(g, basis.as_ref());
    // under a float64 gradient our own f64 evaluation of the inputs (about sqrt(dim) eps,
    // `RowSpan::evaluation_floor`) is the larger error
    let tolerance = (RESIDUAL_FACTOR * u).max(span.evaluation_floor());
    let recovered_rank = basis.ncols();
    let count_ok = !need_count || inputs.nrows() == span.rank;
    let passed = !span.is_full()
        && all_in
        && unexplained <= tolerance
        && recovered_rank == span.rank
        && count_ok;
    LayerCheck {
        layer: layer.to_string(),
        rank: span.rank,
        dim: span.dim,
        cliff: span.cliff(),
        floor: span.floor,
        tau: span.tau,
        max_tau: span.max_tau(),
        recovered_inputs: inputs.nrows(),
        recovered_rank,
        max_distance,
        unexplained,
        tolerance,
        passed,
    }
}
