//! Pruning and top-k as missing data (docs/DESIGN.md, "Defended gradients: missing
//! entries").
//!
//! `prune:P` and `topk:K` zero entries the server then cannot tell from true zeros:
//! every zero of the first-layer gradient is an unknown entry. G~ = Delta^T X~ has
//! rank B, so it is completed from its observed entries by alternating least squares
//! at rank r (U: m x r, V: (d+1) x r, G~ ~ U V^T on the observed set), seeded by the
//! SVD of the zero-filled matrix. A rank that fits is found by doubling; B is then
//! the number of the fit's singular values above its floor, and the fit is redone at
//! B from those directions. Neurons with fewer than
//! `MIN_OBSERVED_PER_RANK` r observed entries are not determined and are dropped: the
//! exact route then runs on the remaining neurons.

// `!(x > 0.0)` is deliberate throughout: it also rejects NaN.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

use faer::Mat;

use super::observed::Observed;
use crate::attack::ServerView;
use crate::attack::view::{FirstLayer, Rows};
use crate::defense::Defense;
use crate::model::Dense;
use crate::{Error, Result};

/// A neuron needs this many observed entries per unit of rank to be kept (r are the
/// bare minimum for its r coefficients; twice that guards against a bad condition).
pub const MIN_OBSERVED_PER_RANK: usize = 2;
/// Largest rank tried (the batch sizes the exact route handles).
pub const MAX_RANK: usize = 64;
/// ALS sweeps of one rank probe and of the final fit.
pub const PROBE_SWEEPS: usize = 60;
pub const MAX_SWEEPS: usize = 2000;
/// ALS sweeps of a probe below the first fitting rank, warm-started from its
/// directions (ALS at the exact rank converges slowly on a magnitude mask).
pub const REFIT_SWEEPS: usize = 300;
/// A probe fits when the relative residual on the observed entries falls below this
/// (a rank below B stalls at the (r+1)-th singular value's share, >= 1e-4 on every
/// case measured).
pub const PROBE_FIT: f64 = 1e-6;
/// The final fit stops at this relative residual (the f64 floor of the products).
pub const FINAL_FIT: f64 = 1e-11;
/// ... or, once it fits (PROBE_FIT), when 5 sweeps gain less than 1 %: the normal
/// equations of the least-observed neurons set a floor above FINAL_FIT (photos B = 8,
/// prune:0.9: 5.8e-11, unchanged over 50 sweeps).
pub const STALLED: f64 = 0.99;

/// The completion's error off the mask over its relative residual on the observed
/// entries (photos B = 8, m = 4096, prune:0.9: 4.0e-10 against the clean gradient for
/// a residual of 5.8e-11, 7x; the margin covers a worse-observed case).
pub const COMPLETION_MARGIN: f64 = 30.0;

/// Whether the server knows the client sparsified its gradient.
pub fn applies(view: &ServerView) -> bool {
    view.defenses
        .iter()
        .any(|d| matches!(d, Defense::Prune(_) | Defense::TopK(_)))
}

/// A completed first layer.
#[derive(Clone, Debug)]
pub struct Completion {
    /// Neurons kept (enough observed entries), ascending.
    pub rows: Vec<usize>,
    /// Completed augmented gradient on those neurons, rows.len() x (d+1).
    pub g: Mat<f64>,
    pub rank: usize,
    /// Relative residual on the observed entries.
    pub residual: f64,
    pub sweeps: usize,
    /// Share of the first layer's entries observed (non-zero).
    pub observed: f64,
}

impl Completion {
    /// The completion's error as a known noise level per entry of G~ (the span search
    /// and the subspace read it as noise): its Frobenius size, `COMPLETION_MARGIN` x the
    /// relative residual x ||G~||_F, spread like Gaussian noise's spectral norm,
    /// sd (sqrt(rows) + sqrt(d+1)). Without it the search's rounding floor (1e-16)
    /// rejects every zero of a gradient completed to 1e-10.
    pub fn error_std(&self) -> f64 {
        let edge = (self.g.nrows() as f64).sqrt() + (self.g.ncols() as f64).sqrt();
        COMPLETION_MARGIN * self.residual * self.g.norm_l2() / edge
    }
}

/// Solve (A + ridge I) x = b for a symmetric positive semi-definite r x r A (row-major),
/// by Cholesky; None when it is not positive definite.
fn spd_solve(a: &mut [f64], b: &mut [f64], r: usize, ridge: f64) -> Option<()> {
    for i in 0..r {
        a[i * r + i] += ridge;
    }
    for j in 0..r {
        let mut s = a[j * r + j];
        for k in 0..j {
            s -= a[j * r + k] * a[j * r + k];
        }
        if !(s > 0.0) {
            return None;
        }
        let l = s.sqrt();
        a[j * r + j] = l;
        for i in j + 1..r {
            let mut s = a[i * r + j];
            for k in 0..j {
                s -= a[i * r + k] * a[j * r + k];
            }
            a[i * r + j] = s / l;
        }
    }
    for i in 0..r {
        let mut s = b[i];
        for k in 0..i {
            s -= a[i * r + k] * b[k];
        }
        b[i] = s / a[i * r + i];
    }
    for i in (0..r).rev() {
        let mut s = b[i];
        for k in i + 1..r {
            s -= a[k * r + i] * b[k];
        }
        b[i] = s / a[i * r + i];
    }
    Some(())
}

/// One half-sweep: every row of `out` (entries `lists`) fitted by least squares against
/// the factor `other` (row-major, r per row). Lists shorter than `min_obs` get zeros.
fn half_sweep(
    lists: &[Vec<(usize, f64)>],
    other: &[f64],
    out: &mut [f64],
    r: usize,
    min_obs: usize,
) {
    let mut a = vec![0.0; r * r];
    let mut b = vec![0.0; r];
    for (j, list) in lists.iter().enumerate() {
        let row = &mut out[j * r..(j + 1) * r];
        if list.len() < min_obs {
            row.iter_mut().for_each(|v| *v = 0.0);
            continue;
        }
        a.iter_mut().for_each(|v| *v = 0.0);
        b.iter_mut().for_each(|v| *v = 0.0);
        for &(k, g) in list {
            let v = &other[k * r..(k + 1) * r];
            for p in 0..r {
                b[p] += v[p] * g;
                for q in 0..=p {
                    a[p * r + q] += v[p] * v[q];
                }
            }
        }
        let tr: f64 = (0..r).map(|p| a[p * r + p]).sum::<f64>() / r as f64;
        for p in 0..r {
            for q in 0..p {
                a[q * r + p] = a[p * r + q];
            }
        }
        if spd_solve(&mut a, &mut b, r, 1e-13 * tr.max(f64::MIN_POSITIVE)).is_some() {
            row.copy_from_slice(&b);
        }
    }
}

/// Relative residual on the observed entries of the kept neurons; infinite when
/// fewer than a tenth of the neurons (or fewer than r) are kept, which no fit is.
fn residual(obs: &Observed, u: &[f64], v: &[f64], r: usize) -> f64 {
    let (mut s, mut norm, mut kept) = (0.0, 0.0, 0);
    for (j, list) in obs.by_row.iter().enumerate() {
        let uj = &u[j * r..(j + 1) * r];
        if list.len() < MIN_OBSERVED_PER_RANK * r {
            continue;
        }
        kept += 1;
        for &(k, g) in list {
            let vk = &v[k * r..(k + 1) * r];
            let p: f64 = uj.iter().zip(vk).map(|(a, b)| a * b).sum();
            s += (g - p) * (g - p);
            norm += g * g;
        }
    }
    if kept < r.max(obs.m / 10) || !(norm > 0.0) {
        return f64::INFINITY;
    }
    (s / norm).sqrt()
}

/// The rows of `v` (n x r) one after another.
fn row_major(v: &Mat<f64>) -> Vec<f64> {
    let r = v.ncols();
    (0..v.nrows() * r).map(|i| v[(i / r, i % r)]).collect()
}

/// ALS at rank r from the start `v` ((d+1) x r, row-major).
fn als(
    obs: &Observed,
    mut v: Vec<f64>,
    r: usize,
    sweeps: usize,
    fit: f64,
) -> (Vec<f64>, Vec<f64>, f64, usize) {
    let m = obs.m;
    let mut u = vec![0.0; m * r];
    let min_obs = MIN_OBSERVED_PER_RANK * r;
    let mut res = f64::INFINITY;
    let mut done = 0;
    for s in 0..sweeps {
        half_sweep(&obs.by_row, &v, &mut u, r, min_obs);
        // columns: fit against the kept rows only (dropped rows have u = 0)
        half_sweep(&obs.by_col, &u, &mut v, r, 1);
        done = s + 1;
        if s % 5 == 4 || s + 1 == sweeps {
            let last = res;
            res = residual(obs, &u, &v, r);
            if res <= fit || (res <= PROBE_FIT && res > STALLED * last) {
                break;
            }
        }
    }
    half_sweep(&obs.by_row, &v, &mut u, r, min_obs);
    (u, v, res, done)
}

/// Top right singular vectors of the zero-filled matrix (at most `k`).
fn zero_filled_svd(obs: &Observed, k: usize) -> Result<Mat<f64>> {
    // (d+1) x (d+1) Gram matrix G^T G from the sparse rows: cheap for any m.
    let n = obs.n;
    let mut gram = Mat::<f64>::zeros(n, n);
    for list in &obs.by_row {
        for &(a, x) in list {
            for &(b, y) in list {
                gram[(a, b)] += x * y;
            }
        }
    }
    let eig = gram.self_adjoint_eigen(faer::Side::Lower).map_err(|e| {
        Error::Numerical(format!("eigenproblem of the zero-filled gradient: {e:?}"))
    })?;
    // eigenvalues ascending: take the last k columns, largest first
    let k = k.min(n);
    Ok(Mat::from_fn(n, k, |i, j| eig.U()[(i, n - 1 - j)]))
}

/// Relative size under which a singular value of a converged fit is spurious (the
/// fit's own residual is at PROBE_FIT; a sample's direction carries far more).
pub const RANK_FLOOR: f64 = 1e-5;

/// The numerical rank of U V^T and the leading right singular vectors at that rank.
/// Only columns observed at least `MIN_OBSERVED_PER_RANK` r times count: a column seen
/// on fewer neurons (a pixel blank in most of the batch) is not determined at rank r.
fn truncate(obs: &Observed, u: &[f64], v: &[f64], r: usize) -> Result<(usize, Mat<f64>)> {
    let (m, n) = (obs.m, obs.n);
    let um = Mat::from_fn(m, r, |j, p| u[j * r + p]);
    let vm = Mat::from_fn(n, r, |k, p| {
        if obs.by_col[k].len() >= MIN_OBSERVED_PER_RANK * r {
            v[k * r + p]
        } else {
            0.0
        }
    });
    let (qu, qv) = (um.qr(), vm.qr());
    let core = qu.thin_R() * qv.thin_R().transpose();
    let svd = core
        .thin_svd()
        .map_err(|e| Error::Numerical(format!("SVD of the completed gradient: {e:?}")))?;
    let s = svd.S().column_vector();
    let s1 = s[0];
    let rank = (0..r).filter(|&i| s[i] > RANK_FLOOR * s1).count().max(1);
    let right = qv.compute_thin_Q() * svd.V().subcols(0, rank);
    Ok((rank, right))
}

/// Complete the first layer of a pruned / sparsified gradient.
pub fn complete(view: &ServerView) -> Result<Completion> {
    let obs = Observed::of(view)?;
    let (m, n) = (obs.m, obs.n);
    let total = obs.count();
    if total == 0 {
        return Err(Error::NoSignal {
            largest: 0.0,
            floor: 0.0,
        });
    }
    let rmax = MAX_RANK.min(n - 1).min(m - 1);
    let mut sweeps = 0;
    let block = super::block::find(&obs);
    if let Some((r, u0)) = super::block::seed(view, &obs, &block, rmax)? {
        // V from the block's rows, then ALS over every observed entry
        let mut v0 = vec![0.0; n * r];
        half_sweep(&obs.by_col, &u0, &mut v0, r, 1);
        let (u, v, res, s) = als(&obs, v0, r, MAX_SWEEPS, FINAL_FIT);
        sweeps += s;
        if res <= PROBE_FIT {
            return Ok(finish(&obs, &u, &v, r, res, sweeps));
        }
    }
    let v0 = zero_filled_svd(&obs, rmax)?;
    // a rank that fits: doubling (an over-parametrised fit converges fastest)
    let mut r = 1;
    let fitted = loop {
        let (u, v, res, s) = als(
            &obs,
            row_major(&v0.subcols(0, r).to_owned()),
            r,
            PROBE_SWEEPS,
            PROBE_FIT,
        );
        sweeps += s;
        if res <= PROBE_FIT {
            break Some((u, v));
        }
        if r == rmax {
            break None;
        }
        r = (2 * r).min(rmax);
    };
    let Some((u, v)) = fitted else {
        return Err(Error::Numerical(format!(
            "the observed entries of the first-layer gradient fit no rank up to {rmax}: \
             too few survive the sparsification to complete it"
        )));
    };
    // the rank is the number of singular values of the fit above its floor
    let last_failed = r / 2;
    let (mut r, mut vstart) = truncate(&obs, &u, &v, r)?;
    // the over-parametrised fit is not unique on a structured mask, so its count can
    // exceed B: bisect down to the smallest rank that fits from its leading directions
    let (mut lo, mut hi) = (last_failed.max(1), r);
    while lo < hi {
        let mid = (lo + hi) / 2;
        let start = row_major(&vstart.subcols(0, mid).to_owned());
        let (_, vm, res, s) = als(&obs, start, mid, REFIT_SWEEPS, PROBE_FIT);
        sweeps += s;
        if res <= PROBE_FIT {
            hi = mid;
            let vm = Mat::from_fn(n, mid, |k, p| vm[k * mid + p]);
            vstart = vm.qr().compute_thin_Q().subcols(0, mid).to_owned();
            r = mid;
        } else {
            lo = mid + 1;
        }
    }
    let (u, v, res, s) = als(&obs, row_major(&vstart), r, MAX_SWEEPS, FINAL_FIT);
    sweeps += s;
    Ok(finish(&obs, &u, &v, r, res, sweeps))
}

/// The completion U V^T on the neurons observed at least `MIN_OBSERVED_PER_RANK` r times.
fn finish(obs: &Observed, u: &[f64], v: &[f64], r: usize, res: f64, sweeps: usize) -> Completion {
    let (m, n) = (obs.m, obs.n);
    let rows: Vec<usize> = (0..m)
        .filter(|&j| obs.by_row[j].len() >= MIN_OBSERVED_PER_RANK * r)
        .collect();
    let g = Mat::from_fn(rows.len(), n, |a, k| {
        let j = rows[a];
        (0..r).map(|p| u[j * r + p] * v[k * r + p]).sum()
    });
    Completion {
        rows,
        g,
        rank: r,
        residual: res,
        sweeps,
        observed: obs.count() as f64 / (m * n) as f64,
    }
}

/// The server's view restricted to the completed neurons, with the completed
/// first-layer gradient (and the sparsifying defences removed).
pub fn completed_view(view: &ServerView, c: &Completion) -> Result<ServerView> {
    let d = view.input_dim();
    let w = view.first.weight.to_mat()?;
    let pick = |m: &Mat<f64>| Mat::from_fn(c.rows.len(), m.ncols(), |a, k| m[(c.rows[a], k)]);
    let pick_col = |b: &faer::Col<f64>| faer::Col::from_fn(c.rows.len(), |a| b[c.rows[a]]);
    // the second layer keeps only the completed neurons' columns
    let keep = |layers: &[Dense<f64>]| -> Vec<Dense<f64>> {
        layers
            .iter()
            .enumerate()
            .map(|(l, layer)| match l {
                0 => Dense {
                    weight: Mat::from_fn(layer.weight.nrows(), c.rows.len(), |o, a| {
                        layer.weight[(o, c.rows[a])]
                    }),
                    bias: layer.bias.clone(),
                },
                _ => layer.clone(),
            })
            .collect()
    };
    let (upper, upper_grad) = (keep(&view.upper), keep(&view.upper_grad));
    Ok(ServerView {
        activation: view.activation,
        dtype: view.dtype,
        first: FirstLayer {
            weight: Rows::Memory(pick(&w)),
            bias: view.first.bias.as_ref().map(pick_col),
            grad_weight: Rows::Memory(Mat::from_fn(c.rows.len(), d, |a, k| c.g[(a, k)])),
            grad_bias: view
                .first
                .bias
                .as_ref()
                .map(|_| faer::Col::from_fn(c.rows.len(), |a| c.g[(a, d)])),
        },
        upper,
        upper_grad,
        noise_std: view.noise_std,
        defenses: view
            .defenses
            .iter()
            .filter(|d| !matches!(d, Defense::Prune(_) | Defense::TopK(_)))
            .copied()
            .collect(),
    })
}
