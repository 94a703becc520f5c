//! Piecewise-linear activations (ReLU, leaky ReLU): activation-pattern search
//! (docs/DESIGN.md, "Piecewise-linear activations").
//!
//! For a two-layer net, sample i's signal is s_i = p_i (.) (A^T r_i) with p_i a vector
//! of slopes (0/1 for ReLU): a structured vector in the B-dimensional column space
//! Q (the idea behind SPEAR, Dimitrov et al. 2024). The span residual is flat inside
//! each activation cell, so instead of descending it we alternate projections:
//! pattern -> best r (variable projection) -> project the signal onto span Q ->
//! round each neuron's ratio to the nearer slope -> new pattern, until the pattern
//! is stable. Starts are the patterns of the gradient's row points. Once all B
//! signals S are known, the inputs follow linearly from G~ V = S diag(alpha) C^T.

// `!(x > 0.0)` is deliberate throughout: it also rejects NaN.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

use faer::linalg::solvers::{Solve, SolveLstsq};
use faer::{Col, Mat};
use rand::SeedableRng;
use rand::seq::SliceRandom;

use super::signal::{Neurons, SignalModel};
use super::span::{self, SearchStats, Zero, best_residual_of};
use crate::attack::subspace::Subspace;
use crate::attack::{AttackConfig, ServerView};
use crate::model::{Activation, LEAKY_SLOPE};
use crate::{Error, Result};

/// Alternating-projection sweeps per start (a correct pattern is stable after a few).
pub const MAX_SWEEPS: usize = 30;
/// Patterns differing on fewer than this share of neurons are the same sample.
pub const SAME_PATTERN: f64 = 1e-3;

/// The two slopes of a piecewise-linear activation.
pub fn slopes(act: Activation) -> Option<(f64, f64)> {
    match act {
        Activation::Relu => Some((0.0, 1.0)),
        Activation::LeakyRelu => Some((LEAKY_SLOPE, 1.0)),
        _ => None,
    }
}

/// Alternating projections on `neurons` from pattern `pat` (one entry per neuron of
/// `neurons`); Some((pattern, unit r, F)) when F reaches `floor`.
fn alternate(
    a: &Mat<f64>,
    neurons: &Neurons,
    mut pat: Vec<bool>,
    (lo, hi): (f64, f64),
    floor: f64,
    stats: &mut SearchStats,
) -> Option<(Vec<bool>, Col<f64>, f64)> {
    let n = neurons.len();
    let mid = 0.5 * (lo + hi);
    for _ in 0..MAX_SWEEPS {
        stats.lm_iterations += 1;
        let mmat = Mat::from_fn(
            n,
            a.nrows(),
            |i, k| if pat[i] { hi } else { lo } * a[(k, neurons.rows[i])],
        );
        let (f, r) = best_residual_of(&mmat, neurons)?;
        if f <= floor {
            return Some((pat, r, f));
        }
        let ar: Vec<f64> = neurons
            .rows
            .iter()
            .map(|&j| (0..a.nrows()).map(|k| a[(k, j)] * r[k]).sum())
            .collect();
        let s = &mmat * &r;
        let y = &s - neurons.perp(&s);
        let gamma = (y.transpose() * &s) / s.squared_norm_l2().max(f64::MIN_POSITIVE);
        let new: Vec<bool> = (0..n)
            .map(|i| {
                if ar[i].abs() < 1e-300 {
                    pat[i]
                } else {
                    y[i] / (gamma * ar[i]) > mid
                }
            })
            .collect();
        if new == pat {
            return None;
        }
        pat = new;
    }
    None
}

/// Neurons of the subsample the alternation starts on.
pub const PATTERN_NEURONS: usize = 2048;

/// Signals found by the pattern search, then the inputs by the linear solve.
pub fn search(
    view: &ServerView,
    sub: &Subspace,
    cfg: &AttackConfig,
) -> Result<(Vec<Zero>, SearchStats, SignalModel)> {
    let t0 = std::time::Instant::now();
    let (lo, hi) = slopes(view.activation).ok_or_else(|| {
        Error::Invalid(format!(
            "the pattern search handles relu and leaky_relu; {} {}",
            view.activation,
            if view.activation == Activation::Identity {
                "makes every signal the same vector A^T r: the inputs cannot be separated"
            } else {
                "is smooth: use the span search"
            }
        ))
    })?;
    let model = SignalModel::new(view, sub)?;
    let a = model
        .output_weights()
        .ok_or_else(|| {
            Error::Invalid("the pattern search needs a two-layer model (one hidden layer)".into())
        })?
        .clone();
    let (m, b) = (model.width(), model.batch());
    let all = Neurons::all(&sub.q);
    let floor = span::exact_floor(view, sub);
    let rows: Vec<usize> = (0..m).collect();
    let small = {
        let mut perm = rows.clone();
        perm.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(
            cfg.seed ^ 0x9a7,
        ));
        let n = PATTERN_NEURONS.max(16 * (b + a.nrows())).min(m);
        let mut r = perm[..n].to_vec();
        r.sort_unstable();
        Neurons::new(&sub.q, r)
    };
    // F on the subsample is computed against a re-orthonormalised basis: the same
    // rounding floor applies (it depends on the conditioning of G~, not on m)
    let floor_small = floor;
    let gv = Mat::from_fn(m, b, |j, k| sub.q[(j, k)] * sub.singular_values[k]);
    let starts = span::row_points(sub, &gv);
    let mut stats = SearchStats {
        exact_floor: floor,
        candidates: starts.len(),
        ..Default::default()
    };
    let mut found: Vec<(Vec<bool>, Col<f64>, f64)> = Vec::new();
    let mid = 0.5 * (lo + hi);
    for c in starts {
        if found.len() >= b
            || stats.starts >= cfg.search.max_starts
            || t0.elapsed().as_secs_f64() > cfg.search.seconds
            || cfg.cancel.is_cancelled()
        {
            break;
        }
        stats.starts += 1;
        // alternate on the subsample (fewer hyperplanes: row-point patterns agree more),
        // then lift the signal to every neuron through its coordinates in Q and finish there
        let zs = model.z(&c, &small.rows);
        let pat0: Vec<bool> = zs.iter().map(|&z| z > 0.0).collect();
        let Some((ps, rs, _)) = alternate(&a, &small, pat0, (lo, hi), floor_small, &mut stats)
        else {
            continue;
        };
        let ss = Col::from_fn(ps.len(), |i| {
            let j = small.rows[i];
            (if ps[i] { hi } else { lo }) * (0..a.nrows()).map(|k| a[(k, j)] * rs[k]).sum::<f64>()
        });
        let qs = Mat::from_fn(small.len(), b, |i, k| sub.q[(small.rows[i], k)]);
        let coef = qs.qr().solve_lstsq(&ss);
        let y = &sub.q * &coef;
        let ar = a.transpose() * &rs;
        let pat_full: Vec<bool> = (0..m)
            .map(|j| {
                if ar[j].abs() < 1e-300 {
                    false
                } else {
                    y[j] / ar[j] > mid
                }
            })
            .collect();
        let result = alternate(&a, &all, pat_full, (lo, hi), floor, &mut stats);
        let Some((pat, r, f)) = result else { continue };
        let result = Some((r, f));
        let Some((r, f)) = result else { continue };
        let active = pat.iter().filter(|&&p| p).count();
        if active == 0 || (lo == 0.0 && active < b) {
            stats.degenerate += 1;
            continue;
        }
        let dup = found.iter().any(|(p, _, _)| {
            p.iter().zip(&pat).filter(|(a, b)| a != b).count() as f64 <= SAME_PATTERN * m as f64
        });
        if dup {
            stats.duplicates += 1;
            continue;
        }
        found.push((pat, r, f));
    }
    stats.seconds = t0.elapsed().as_secs_f64();
    if found.len() < b {
        return Ok((
            Vec::new(),
            SearchStats {
                rounds: found.len(),
                ..stats
            },
            model,
        ));
    }
    // inputs from the signals: G~ V = S diag(alpha) C^T, so diag(alpha) C^T = S^+ G~ V
    let s = Mat::from_fn(m, b, |j, i| {
        let (p, r, _) = &found[i];
        (if p[j] { hi } else { lo }) * (0..a.nrows()).map(|k| a[(k, j)] * r[k]).sum::<f64>()
    });
    let sts = s.transpose() * &s;
    let rhs = s.transpose() * &gv;
    let w = sts.partial_piv_lu().solve(&rhs); // B x B, row i = alpha_i c_i^T
    let vl = Col::from_fn(b, |k| sub.v[(sub.v.nrows() - 1, k)]);
    let mut zeros = Vec::new();
    for (i, (p, r, f)) in found.iter().enumerate() {
        let row = Col::from_fn(b, |k| w[(i, k)]);
        let scale = row.transpose() * &vl;
        if !(scale.abs() > 0.0) {
            continue;
        }
        let c = &row * (1.0 / scale);
        // the input must produce the pattern it was found with
        let zc = model.z(&c, &rows);
        let agree = zc.iter().zip(p).filter(|(z, p)| (**z > 0.0) == **p).count();
        let exact = *f <= floor && agree == m;
        zeros.push(Zero {
            c,
            r: r.clone(),
            residual: *f,
            exact,
        });
    }
    Ok((
        zeros,
        SearchStats {
            rounds: found.len(),
            ..stats
        },
        model,
    ))
}
