//! The vocabulary of the exact route: a zero of the span residual F, the
//! unknowns u = (t, r) of one sample, F at a point with its best output residual,
//! and the gradient's row points (where searches start).

// `!(x > 0.0)` is deliberate throughout: it also rejects NaN.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

use faer::linalg::solvers::Solve;
use faer::{Col, ColRef, Mat, Side};

use super::signal::{Neurons, SignalModel};
use crate::attack::subspace::Subspace;

/// The unknowns of one sample, u = (t, r): t in R^(B-1) with c = c0 + N t, then the
/// output residual r in R^K. Every problem of the exact route packs them this way.
pub fn pack(model: &SignalModel, c: &Col<f64>, r: &Col<f64>) -> Col<f64> {
    let t = model.coords.t_of_c(c);
    let nb = model.dims();
    Col::from_fn(nb + model.k, |i| if i < nb { t[i] } else { r[i - nb] })
}

/// (t, r) of one sample's unknowns (see [`pack`]).
pub fn unpack(model: &SignalModel, u: ColRef<'_, f64>) -> (Col<f64>, Col<f64>) {
    let nb = model.dims();
    (
        Col::from_fn(nb, |k| u[k]),
        Col::from_fn(model.k, |k| u[nb + k]),
    )
}

/// F at c with the best output residual r (variable projection: the smallest
/// generalized eigenvalue of (M^T P_perp M, M^T M)). Returns (F, r).
pub fn best_residual(
    model: &SignalModel,
    neurons: &Neurons,
    c: &Col<f64>,
) -> Option<(f64, Col<f64>)> {
    best_residual_of(&model.signal_matrix(c, &neurons.rows), neurons)
}

/// As [`best_residual`] for a given signal matrix M (n x K) on `neurons`.
/// F is the sine of the smallest principal angle between col(M) and span Q,
/// computed without squaring (QR of M, then the smallest singular value of
/// P_perp Q_M), so it resolves F down to eps rather than sqrt(eps).
pub fn best_residual_of(m: &Mat<f64>, neurons: &Neurons) -> Option<(f64, Col<f64>)> {
    let k = m.ncols();
    let norm = m.norm_l2();
    if m.nrows() < k || !norm.is_finite() || norm == 0.0 {
        return None;
    }
    let qr = m.qr();
    let qm = qr.compute_thin_Q();
    let rm = qr.thin_R().to_owned();
    let rmax = (0..k).map(|i| rm[(i, i)].abs()).fold(0.0, f64::max);
    // directions of M that are (numerically) absent cannot carry a signal
    let keep: Vec<usize> = (0..k)
        .filter(|&i| rm[(i, i)].abs() > 1e-12 * rmax)
        .collect();
    if keep.len() < k {
        // fall back to the normal equations on the well-determined part
        return best_residual_normal(m, neurons);
    }
    let w = neurons.perp_mat(&qm);
    let svd = w.thin_svd().ok()?;
    let sv = svd.S().column_vector();
    let (imin, smin) = sv
        .iter()
        .copied()
        .enumerate()
        .min_by(|a, b| a.1.total_cmp(&b.1))?;
    let y = svd.V().col(imin).to_owned();
    let r = rm.partial_piv_lu().solve(&y);
    let nr = r.norm_l2();
    if !(nr > 0.0) || !nr.is_finite() {
        return None;
    }
    Some((smin.max(0.0), r * (1.0 / nr)))
}

/// Variable projection by the generalized eigenproblem (M^T P_perp M, M^T M):
/// robust to rank-deficient M, accurate to sqrt(eps).
fn best_residual_normal(m: &Mat<f64>, neurons: &Neurons) -> Option<(f64, Col<f64>)> {
    let k = m.ncols();
    let g1 = m.transpose() * m;
    let mq = neurons.q.transpose() * m;
    let g2 = &g1 - mq.transpose() * &mq;
    let eig = g1.self_adjoint_eigen(Side::Lower).ok()?;
    let lam: Vec<f64> = eig.S().column_vector().iter().copied().collect();
    let lmax = lam.iter().copied().fold(0.0, f64::max);
    if !(lmax > 0.0) || !lmax.is_finite() {
        return None;
    }
    let keep: Vec<usize> = (0..k).filter(|&i| lam[i] > 1e-12 * lmax).collect();
    let w = Mat::from_fn(k, keep.len(), |i, j| {
        eig.U()[(i, keep[j])] / lam[keep[j]].sqrt()
    });
    let h = w.transpose() * &g2 * &w;
    let e2 = h.self_adjoint_eigen(Side::Lower).ok()?;
    let (imin, lmin) = e2
        .S()
        .column_vector()
        .iter()
        .copied()
        .enumerate()
        .min_by(|a, b| a.1.total_cmp(&b.1))?;
    let y = e2.U().col(imin).to_owned();
    let mut r = &w * &y;
    let nr = r.norm_l2();
    if !(nr > 0.0) {
        return None;
    }
    r *= 1.0 / nr;
    Some((lmin.max(0.0).sqrt(), r))
}

/// A zero of F found by the search.
#[derive(Clone, Debug)]
pub struct Zero {
    pub c: Col<f64>,
    /// Unit-norm output residual direction.
    pub r: Col<f64>,
    /// F on every neuron.
    pub residual: f64,
    /// The search's acceptance test held (the sample's own rounding floor, on all and on
    /// the held-back neurons): the claim the route hands to the verdict.
    pub accepted: bool,
}

/// Row points of a projected gradient GV (m x B): row j divided by its bias
/// coordinate is an affine combination of the inputs, dominated by one sample on
/// many neurons. Ordered by the share of the row in the bias direction.
pub fn row_points(sub: &Subspace, gv: &Mat<f64>) -> Vec<Col<f64>> {
    let b = sub.batch;
    let vl = Col::from_fn(b, |k| sub.v[(sub.v.nrows() - 1, k)]);
    let mut rows: Vec<(f64, Col<f64>)> = (0..gv.nrows())
        .filter_map(|j| {
            let g = Col::from_fn(b, |k| gv[(j, k)]);
            let gb = (0..b).map(|k| g[k] * vl[k]).sum::<f64>();
            let share = gb.abs() / g.norm_l2().max(f64::MIN_POSITIVE);
            (share > 1e-6).then(|| (share, g * (1.0 / gb)))
        })
        .collect();
    rows.sort_by(|a, b| b.0.total_cmp(&a.0));
    rows.into_iter().map(|(_, c)| c).collect()
}

/// Relative distance ||a - b|| / ||b||.
pub(crate) fn rel_dist(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}
