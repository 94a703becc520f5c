//! Seeding stage: independent component analysis of the projected gradient's rows
//! (docs/DESIGN.md, "Seeding by demixing").
//!
//! Row j of G~V is sum_i delta_ij c_i: a mixture of the per-sample signals with the
//! fixed mixing vectors c_i (the Cocktail Party Attack's model, Kariyappa et al. 2023).
//! FastICA (Hyvarinen 1999: whitening, tanh contrast, symmetric decorrelation) on those
//! m rows returns the mixing vectors up to scale and order; each, normalised by its bias
//! coordinate, is a candidate c for the span search to polish.

// `!(x > 0.0)` is deliberate throughout: it also rejects NaN.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

use faer::{Col, Mat, Side};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

/// Stop when every unmixing row moves by less than this (1 - |<w_new, w_old>|).
/// Measured (photos B = 64, m = 8192, tanh): 1e-3 stops after ~30 iterations and the
/// polish finds as many samples from its seeds as from 1e-4 (~100 iterations).
pub const ICA_TOL: f64 = 1e-3;
/// Directions whose variance is below this share of the largest are dropped before whitening.
pub const RANK_FLOOR: f64 = 1e-10;

/// FastICA on the rows of `y` (m x n). Returns the mixing matrix (n x k, k <= n
/// the numerical rank): y_j - mean ~ sum_i s_ij a_i with independent s_.i.
/// Deterministic for a given `seed`.
pub fn fastica(y: &Mat<f64>, seed: u64, max_iterations: usize) -> Option<Mat<f64>> {
    let (m, n) = y.shape();
    if m < 2 || n == 0 {
        return None;
    }
    let mean = Col::from_fn(n, |k| (0..m).map(|j| y[(j, k)]).sum::<f64>() / m as f64);
    let xc = Mat::from_fn(m, n, |j, k| y[(j, k)] - mean[k]);
    let cov = (xc.transpose() * &xc) * (1.0 / m as f64);
    let eig = cov.self_adjoint_eigen(Side::Lower).ok()?;
    let lam: Vec<f64> = eig.S().column_vector().iter().copied().collect();
    let lmax = lam.iter().copied().fold(0.0, f64::max);
    if !(lmax > 0.0) || !lmax.is_finite() {
        return None;
    }
    let keep: Vec<usize> = (0..n).filter(|&i| lam[i] > RANK_FLOOR * lmax).collect();
    let k = keep.len();
    // whitening K (k x n) and its pseudo-inverse K^+ (n x k)
    let kw = Mat::from_fn(k, n, |a, b| eig.U()[(b, keep[a])] / lam[keep[a]].sqrt());
    let kinv = Mat::from_fn(n, k, |b, a| eig.U()[(b, keep[a])] * lam[keep[a]].sqrt());
    let z = &xc * kw.transpose(); // m x k, identity covariance

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x1ca_5eed);
    let w0 = Mat::from_fn(k, k, |_, _| StandardNormal.sample(&mut rng));
    let mut w = decorrelate(&w0)?;
    let inv_m = 1.0 / m as f64;
    for _ in 0..max_iterations {
        let mut g = &z * w.transpose(); // m x k projections, overwritten by g(.)
        let mut gp = vec![0.0; k];
        for (i, gpi) in gp.iter_mut().enumerate() {
            let col = g
                .col_mut(i)
                .try_as_col_major_mut()
                .expect("an owned matrix has contiguous columns")
                .as_slice_mut();
            let mut acc = 0.0;
            for v in col.iter_mut() {
                let t = contrast(*v);
                *v = t;
                acc += 1.0 - t * t;
            }
            *gpi = acc * inv_m;
        }
        let gz = (g.transpose() * &z) * inv_m; // k x k
        let w1 = Mat::from_fn(k, k, |i, l| gz[(i, l)] - gp[i] * w[(i, l)]);
        let w1 = decorrelate(&w1)?;
        let moved = (0..k)
            .map(|i| {
                let dot: f64 = (0..k).map(|l| w1[(i, l)] * w[(i, l)]).sum();
                (1.0 - dot.abs()).abs()
            })
            .fold(0.0, f64::max);
        w = w1;
        if moved < ICA_TOL {
            break;
        }
    }
    // sources s = W K (y - mean); mixing = (W K)^+ = K^+ W^T (W orthogonal)
    Some(kinv * w.transpose())
}

/// FastICA's contrast g(u) ~ tanh(u): the (7, 6) Lambert continued fraction of tanh,
/// clamped at +-4.97 where it reaches 1 - 6e-7 (|error| < 1e-4 everywhere, far below the
/// O(1/sqrt m) sampling error of the estimates). libm's tanh was a third of the attack's
/// CPU (photos B = 64, m = 8192); this is a handful of multiplications and one division.
#[inline]
fn contrast(u: f64) -> f64 {
    let x = u.clamp(-4.97, 4.97);
    let x2 = x * x;
    let p = x * (135135.0 + x2 * (17325.0 + x2 * (378.0 + x2)));
    let q = 135135.0 + x2 * (62370.0 + x2 * (3150.0 + 28.0 * x2));
    p / q
}

/// Symmetric decorrelation W <- (W W^T)^{-1/2} W.
fn decorrelate(w: &Mat<f64>) -> Option<Mat<f64>> {
    let k = w.nrows();
    let eig = (w * w.transpose()).self_adjoint_eigen(Side::Lower).ok()?;
    let s = eig.S().column_vector();
    if (0..k).any(|i| !(s[i] > 0.0)) {
        return None;
    }
    let u = eig.U();
    let scaled = Mat::from_fn(k, k, |a, b| u[(a, b)] / s[b].sqrt());
    Some(scaled * u.transpose() * w)
}

/// Candidate coordinates c (bias coordinate 1) of the samples mixed in the rows of
/// `gv` (m x B, rank <= B): SVD to the numerical rank, FastICA there, each mixing
/// direction mapped back to c-space and divided by its bias coordinate v_l . c.
pub fn candidates(gv: &Mat<f64>, vl: &Col<f64>, seed: u64, max_iterations: usize) -> Vec<Col<f64>> {
    let b = gv.ncols();
    let Ok(svd) = gv.thin_svd() else {
        return Vec::new();
    };
    let s = svd.S().column_vector();
    let smax = s.iter().copied().fold(0.0, f64::max);
    if !(smax > 0.0) {
        return Vec::new();
    }
    // the residual gradient has its removed directions at the rounding floor
    let rank = (0..b.min(s.nrows()))
        .filter(|&i| s[i] > 1e-9 * smax)
        .count();
    if rank == 0 {
        return Vec::new();
    }
    let u = svd.U();
    let y = Mat::from_fn(gv.nrows(), rank, |j, i| u[(j, i)] * s[i]);
    let Some(a) = fastica(&y, seed, max_iterations) else {
        return Vec::new();
    };
    let v = svd.V().subcols(0, rank);
    let dirs = v * &a; // B x k
    (0..dirs.ncols())
        .filter_map(|i| {
            let d = dirs.col(i).to_owned();
            let bias = (0..b).map(|q| d[q] * vl[q]).sum::<f64>();
            let rel = bias.abs() / (d.norm_l2() * vl.norm_l2()).max(f64::MIN_POSITIVE);
            (rel > 1e-6).then(|| d * (1.0 / bias))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two independent super-Gaussian sources mixed by a known matrix: the mixing
    /// columns come back up to order and scale (cosine > 0.99 with m = 4000 draws,
    /// the ICA error being O(1/sqrt m)).
    #[test]
    fn fastica_recovers_a_known_mixing() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let m = 4000;
        let src = Mat::from_fn(m, 3, |_, _| {
            let g: f64 = StandardNormal.sample(&mut rng);
            g * g * g // heavy tails
        });
        let mix = Mat::from_fn(3, 3, |i, j| {
            [[1.0, 0.5, -0.3], [0.2, 1.0, 0.4], [-0.6, 0.1, 1.0]][i][j]
        });
        let y = &src * mix.transpose();
        let a = fastica(&y, 1, crate::attack::params::ICA_ITERATIONS).unwrap();
        for t in 0..3 {
            let col = mix.col(t).to_owned();
            let best = (0..a.ncols())
                .map(|i| {
                    let ai = a.col(i).to_owned();
                    (ai.transpose() * &col).abs() / (ai.norm_l2() * col.norm_l2())
                })
                .fold(0.0, f64::max);
            assert!(best > 0.99, "mixing column {t}: best cosine {best}");
        }
    }
}
