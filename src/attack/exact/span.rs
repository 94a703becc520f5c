//! `--method span`: the inputs are the zeros of the span residual
//! F(c, r) = ||P_perp s(c, r)|| / ||s(c, r)|| (ALGORITHM.md, "Beyond the paper 2";
//! docs/DESIGN.md, "Span search"). Multi-start Levenberg-Marquardt on a
//! subsample of neurons, starts screened by F, deflation of the zeros found, and a
//! final check of each zero on every neuron.

// `!(x > 0.0)` is deliberate throughout: it also rejects NaN.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

use std::time::Instant;

use faer::linalg::solvers::Solve;
use faer::{Col, Mat, Side};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_distr::{Distribution, StandardNormal};

use super::signal::{Neurons, SignalModel};
use super::{labels, pattern};
use crate::attack::subspace::{self, Subspace};
use crate::attack::{AttackConfig, Method, Prior, Reconstruction, Sample, ServerView};
use crate::numerics::lm::{self, LmOptions, Problem};
use crate::{Error, Result};

/// Options of the search (`AttackConfig::search`).
#[derive(Clone, Debug)]
pub struct SearchOptions {
    /// Neurons the search iterates on (None: `NEURONS_PER_UNKNOWN` per unknown,
    /// at least `MIN_NEURONS`); every neuron is used for the final check.
    pub neurons: Option<usize>,
    /// Most Levenberg-Marquardt runs.
    pub max_starts: usize,
    /// Wall-clock budget of the search in seconds.
    pub seconds: f64,
    /// Starts drawn from the prior besides the gradient's own row points.
    pub prior_starts: usize,
}

impl Default for SearchOptions {
    fn default() -> Self {
        SearchOptions {
            neurons: None,
            max_starts: 4000,
            seconds: 45.0,
            prior_starts: 64,
        }
    }
}

/// Neurons per unknown of one sample's problem (B - 1 + K): enough equations that a
/// spurious zero on the subsample is unlikely, few enough that an iteration is cheap.
pub const NEURONS_PER_UNKNOWN: usize = 32;
/// Fewest neurons in the subsample.
pub const MIN_NEURONS: usize = 768;
/// Neurons used to screen start candidates by F (a rough ranking suffices).
pub const SCREEN_NEURONS: usize = 384;

/// A zero counts as exact when F <= EXACT_FACTOR * eps(dtype) * kappa, kappa = sigma_1 / sigma_B:
/// rounding the gradient to its dtype perturbs G~ by ~eps ||G~||, which tilts its
/// column space by up to ~eps kappa (Wedin's theorem); the factor covers the client's
/// own accumulated rounding. Measured F at the truth: 1-3 eps on all twelve PyTorch
/// fixtures (f32 and f64), well inside the floor; wrong inputs give F > 1e-4.
pub const EXACT_FACTOR: f64 = 200.0;
/// LM result on the subsample worth checking on all neurons.
pub const PROMISING: f64 = 1e-3;
/// Reconstructions closer than this (relative) are the same sample.
pub const DUPLICATE_TOL: f64 = 1e-3;
/// A zero whose x lies farther than this many prior standard deviations (RMS over
/// coordinates) from the prior mean is implausible: the search does not step there.
pub const PRIOR_RADIUS: f64 = 8.0;
/// Share of neurons whose act' must exceed `SATURATION_FLOOR * max|act'|` for a zero
/// not to be a saturated (degenerate) one.
pub const MIN_ACTIVE: f64 = 0.05;
pub const SATURATION_FLOOR: f64 = 1e-3;
/// Iterations of each LM run on the subsample and of the final polish on all neurons.
pub const LM_ITERATIONS: usize = 40;
pub const POLISH_ITERATIONS: usize = 8;
/// Polishing iterations of a least-squares fit under known noise.
pub const NOISY_POLISH_ITERATIONS: usize = 100;

/// One sample's problem: unknowns u = (t, r), residual P_perp s / ||s||, times the
/// deflation factor prod_i (1 + rho^2 / ||t - t_i||^2) of the zeros already found.
pub struct SpanProblem<'a> {
    pub model: &'a SignalModel,
    pub neurons: &'a Neurons,
    pub found: Vec<Col<f64>>,
    pub rho: f64,
    /// Plausible region: ||x - mean|| / sqrt(d) <= radius.
    pub bound: Option<(f64, f64)>,
}

impl SpanProblem<'_> {
    fn split(&self, u: &Col<f64>) -> (Col<f64>, Col<f64>) {
        let nb = self.model.dims();
        (
            Col::from_fn(nb, |k| u[k]),
            Col::from_fn(self.model.k, |k| u[nb + k]),
        )
    }

    fn plausible(&self, c: &Col<f64>) -> bool {
        match self.bound {
            None => true,
            Some((mean, radius)) => {
                let x = self.model.coords.x_of_c(c);
                let d2: f64 =
                    x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / x.len().max(1) as f64;
                d2.sqrt() <= radius
            }
        }
    }

    /// Deflation factor and its gradient in t.
    fn deflation(&self, t: &Col<f64>) -> (f64, Col<f64>) {
        let mut mu = 1.0;
        let mut g = Col::zeros(t.nrows());
        for ti in &self.found {
            let diff = t - ti;
            let d2 = diff.squared_norm_l2().max(1e-300);
            let mi = 1.0 + self.rho * self.rho / d2;
            mu *= mi;
            let coef = -2.0 * self.rho * self.rho / (d2 * d2) / mi;
            g += &diff * coef;
        }
        (mu, g * mu)
    }

    /// F without deflation.
    pub fn span_residual(&self, u: &Col<f64>) -> Option<f64> {
        let (t, r) = self.split(u);
        let c = self.model.coords.c_of_t(&t);
        let s = self.model.signal_matrix(&c, &self.neurons.rows) * &r;
        let ns = s.norm_l2();
        (ns > 0.0 && ns.is_finite()).then(|| self.neurons.perp(&s).norm_l2() / ns)
    }
}

impl Problem for SpanProblem<'_> {
    fn residual(&self, u: &Col<f64>) -> Option<Col<f64>> {
        let (t, r) = self.split(u);
        let c = self.model.coords.c_of_t(&t);
        if !self.plausible(&c) {
            return None;
        }
        let s = self.model.signal_matrix(&c, &self.neurons.rows) * &r;
        let ns = s.norm_l2();
        if !(ns > 0.0 && ns.is_finite()) {
            return None;
        }
        let (mu, _) = self.deflation(&t);
        Some(self.neurons.perp(&s) * (mu / ns))
    }

    fn jacobian(&self, u: &Col<f64>) -> Option<(Col<f64>, Mat<f64>)> {
        let (t, r) = self.split(u);
        let c = self.model.coords.c_of_t(&t);
        if !self.plausible(&c) {
            return None;
        }
        let (s, dt, m) = self.model.signal_and_dt(&c, &r, &self.neurons.rows);
        let ns = s.norm_l2();
        if !(ns > 0.0 && ns.is_finite()) {
            return None;
        }
        let nb = self.model.dims();
        let nu = nb + self.model.k;
        let n = s.nrows();
        let js = Mat::from_fn(
            n,
            nu,
            |i, k| if k < nb { dt[(i, k)] } else { m[(i, k - nb)] },
        );
        let shat = &s * (1.0 / ns);
        let e0 = self.neurons.perp(&shat);
        let sj = shat.transpose() * &js; // 1 x nu
        let pj = self.neurons.perp_mat(&js);
        let (mu, gmu) = self.deflation(&t);
        let j = Mat::from_fn(n, nu, |i, k| {
            let base = (pj[(i, k)] - e0[i] * sj[k]) / ns;
            let defl = if k < nb { e0[i] * gmu[k] } else { 0.0 };
            mu * base + defl
        });
        Some((e0 * mu, j))
    }

    fn normalise(&self, u: &mut Col<f64>) {
        let nb = self.model.dims();
        let k = self.model.k;
        let nr = (0..k).map(|i| u[nb + i] * u[nb + i]).sum::<f64>().sqrt();
        if nr > 0.0 {
            for i in 0..k {
                u[nb + i] /= nr;
            }
        }
    }
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
    if m.nrows() < k || !m.norm_l2().is_finite() || m.norm_l2() == 0.0 {
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
    pub exact: bool,
}

/// What the search did.
#[derive(Clone, Debug, Default)]
pub struct SearchStats {
    pub starts: usize,
    pub candidates: usize,
    pub lm_iterations: usize,
    pub duplicates: usize,
    pub degenerate: usize,
    pub seconds: f64,
    pub exact_floor: f64,
    pub rounds: usize,
}

/// Multiple of the noise's tilt of the column space under which a zero is accepted.
/// Gaussian noise of sd sigma has spectral norm ~ sigma (sqrt m + sqrt(d+1)), which tilts
/// the B-dimensional column space by at most that over sigma_B (Wedin); a true sample's
/// F is below this bound, a wrong input's F stays O(1e-1) and above (docs/DESIGN.md,
/// "Noise").
pub const NOISE_ACCEPT: f64 = 1.0;

/// The largest F a true sample can have under noise of sd `noise` per gradient entry
/// (0 when no noise is known).
pub fn noise_floor(view: &ServerView, sub: &Subspace, noise: Option<f64>) -> f64 {
    let Some(sd) = noise else { return 0.0 };
    let edge = (view.width() as f64).sqrt() + ((view.input_dim() + 1) as f64).sqrt();
    NOISE_ACCEPT * sd * edge / sub.singular_values[sub.batch - 1].max(f64::MIN_POSITIVE)
}

/// The exact floor of F for this gradient (see `EXACT_FACTOR`).
pub fn exact_floor(view: &ServerView, sub: &Subspace) -> f64 {
    let s = &sub.singular_values;
    let kappa = s[0] / s[sub.batch - 1].max(f64::MIN_POSITIVE);
    EXACT_FACTOR * view.dtype.epsilon() * kappa
}

/// Prior mean and sd used for starts and bounds: the configured prior, or one
/// estimated from the gradient's row points (robust median and spread).
fn effective_prior(cfg: &AttackConfig, model: &SignalModel, rows: &[Col<f64>]) -> Prior {
    if let Some(p) = cfg.prior {
        return p;
    }
    let mut vals: Vec<f64> = rows
        .iter()
        .take(256)
        .flat_map(|c| model.coords.x_of_c(c))
        .filter(|v| v.is_finite())
        .collect();
    if vals.is_empty() {
        return Prior::default();
    }
    vals.sort_by(f64::total_cmp);
    let q = |p: f64| vals[((vals.len() - 1) as f64 * p) as usize];
    let mean = q(0.5);
    let std = ((q(0.84) - q(0.16)) / 2.0).max(1e-6);
    Prior {
        mean,
        std,
        min: f64::NEG_INFINITY,
        max: f64::INFINITY,
    }
}

/// Row points of a projected gradient GV (m x B): row j divided by its bias
/// coordinate is an affine combination of the inputs, dominated by one sample on
/// many neurons. Ordered by the share of the row in the bias direction.
pub(crate) fn row_points(sub: &Subspace, gv: &Mat<f64>) -> Vec<Col<f64>> {
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

/// Draws from the prior, projected into the span.
fn prior_points(model: &SignalModel, prior: &Prior, count: usize, seed: u64) -> Vec<Col<f64>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x5a11_c0de);
    let d = model.coords.input_dim();
    (0..count)
        .map(|_| {
            let x: Vec<f64> = (0..d)
                .map(|_| {
                    let z: f64 = StandardNormal.sample(&mut rng);
                    (prior.mean + prior.std * z).clamp(prior.min, prior.max)
                })
                .collect();
            model.coords.c_of_x(&x)
        })
        .collect()
}

fn rel_dist(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// A candidate this close (relative) to a found sample converges to it: skip it.
pub const SKIP_RADIUS: f64 = 0.05;
/// Rounds of row points from the residual gradient (found samples removed).
pub const MAX_ROUNDS: usize = 12;
/// Failed starts (times B) after which a new round is begun, if samples were found
/// since the last one: removing them from the gradient makes better row points.
pub const ROUND_PATIENCE: usize = 2;
/// With this few samples missing, a new round starts at once: the projected
/// gradient then has rank <= LAST_FEW and its row points are (nearly) the samples.
pub const LAST_FEW: usize = 2;

/// The projected gradient with the found samples removed exactly: GV projected
/// onto the complement of the found signals, (I - S_f S_f^+) GV = (I - S_f S_f^+) S_m C_m^T.
/// Its rows are combinations of the missing samples only (no scale needs fitting).
fn residual_gradient(sub: &Subspace, model: &SignalModel, zeros: &[Zero]) -> Mat<f64> {
    let b = sub.batch;
    let gv = Mat::from_fn(sub.q.nrows(), b, |j, k| {
        sub.q[(j, k)] * sub.singular_values[k]
    });
    if zeros.is_empty() {
        return gv;
    }
    let all: Vec<usize> = (0..model.width()).collect();
    let mut sf = Mat::<f64>::zeros(model.width(), zeros.len());
    for (i, z) in zeros.iter().enumerate() {
        let s = model.signal_matrix(&z.c, &all) * &z.r;
        sf.col_mut(i).copy_from(&s);
    }
    let qf = sf.qr().compute_thin_Q();
    let proj = qf.transpose() * &gv;
    &gv - &qf * &proj
}

/// Run the search. `extra` are starting inputs from another stage (e.g. tensor estimates).
pub fn search(
    view: &ServerView,
    sub: &Subspace,
    cfg: &AttackConfig,
    extra: &[Vec<f64>],
) -> Result<(Vec<Zero>, SearchStats, SignalModel)> {
    let t0 = Instant::now();
    let opts = &cfg.search;
    let model = SignalModel::new(view, sub)?;
    let (m, b, k) = (model.width(), model.batch(), model.k);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x5ea_2c4);
    let mut perm: Vec<usize> = (0..m).collect();
    perm.shuffle(&mut rng);
    let n = opts
        .neurons
        .unwrap_or(NEURONS_PER_UNKNOWN * (b - 1 + k))
        .max(MIN_NEURONS)
        .min(m);
    let mut rows: Vec<usize> = perm[..n].to_vec();
    rows.sort_unstable();
    let neurons = Neurons::new(&sub.q, rows);
    let ns = SCREEN_NEURONS.max(4 * (b + k)).min(m);
    let mut srows: Vec<usize> = perm[..ns].to_vec();
    srows.sort_unstable();
    let screen = Neurons::new(&sub.q, srows);
    let all = Neurons::all(&sub.q);
    let floor = exact_floor(view, sub);
    // Under known noise, zeros are least-squares fits: accept F up to the noise floor
    // (such samples are never called exact).
    let accept = floor.max(noise_floor(view, sub, cfg.noise_std.or(view.noise_std)));
    let promising = PROMISING.max(2.0 * accept);

    let gv0 = Mat::from_fn(m, b, |j, kk| sub.q[(j, kk)] * sub.singular_values[kk]);
    let first_rows = row_points(sub, &gv0);
    let prior = effective_prior(cfg, &model, &first_rows);
    let d = model.coords.input_dim();
    let bound = Some((prior.mean, PRIOR_RADIUS * prior.std.max(1e-12)));
    let in_bound = |c: &Col<f64>| {
        let x = model.coords.x_of_c(c);
        let d2: f64 = x.iter().map(|v| (v - prior.mean).powi(2)).sum::<f64>() / d.max(1) as f64;
        d2.sqrt() <= PRIOR_RADIUS * prior.std
    };
    let screen_all = |cands: Vec<Col<f64>>| {
        let mut scored: Vec<(f64, Col<f64>, Col<f64>)> = cands
            .into_iter()
            .filter(|c| in_bound(c))
            .filter_map(|c| best_residual(&model, &screen, &c).map(|(f, r)| (f, c, r)))
            .filter(|(f, _, _)| f.is_finite())
            .collect();
        scored.sort_by(|a, b| a.0.total_cmp(&b.0));
        scored
    };
    let mut round0: Vec<Col<f64>> = extra.iter().map(|x| model.coords.c_of_x(x)).collect();
    round0.extend(prior_points(&model, &prior, opts.prior_starts, cfg.seed));
    round0.extend(first_rows);
    let scored = screen_all(round0);

    let mut stats = SearchStats {
        exact_floor: floor,
        candidates: scored.len(),
        ..Default::default()
    };
    // deflation radius: a tenth of the typical spread of the candidates in t
    let rho = {
        let ts: Vec<Col<f64>> = scored
            .iter()
            .take(64)
            .map(|(_, c, _)| model.coords.t_of_c(c))
            .collect();
        let mean = ts
            .iter()
            .fold(Col::<f64>::zeros(model.dims()), |a, t| a + t)
            * (1.0 / ts.len().max(1) as f64);
        (ts.iter()
            .map(|t| (t - &mean).squared_norm_l2())
            .sum::<f64>()
            / ts.len().max(1) as f64)
            .sqrt()
            .max(1e-6)
            * 0.1
    };
    let mut zeros: Vec<Zero> = Vec::new();
    let mut found_x: Vec<Vec<f64>> = Vec::new();
    let bar = cfg.progress.then(|| {
        let pb = indicatif::ProgressBar::new(b as u64);
        pb.set_message("span search");
        pb
    });
    let lm_opts = LmOptions {
        max_iterations: LM_ITERATIONS,
        target: floor * 1e-3,
        stall: 1e-4,
    };
    let out_of_budget = |stats: &SearchStats| {
        stats.starts >= opts.max_starts
            || t0.elapsed().as_secs_f64() > opts.seconds
            || cfg.cancel.is_cancelled()
    };
    let mut round = 0;
    let mut failures = 0;
    let mut found_at_round = 0;
    let patience = ROUND_PATIENCE * b;
    let mut pending: std::collections::VecDeque<(f64, Col<f64>, Col<f64>)> = scored.into();
    loop {
        while let Some((_, c, r)) = pending.pop_front() {
            if zeros.len() >= b || out_of_budget(&stats) {
                break;
            }
            if (failures >= patience || b - zeros.len() <= LAST_FEW)
                && zeros.len() > found_at_round
                && round < MAX_ROUNDS
            {
                pending.push_front((0.0, c, r));
                break;
            }
            let xc = model.coords.x_of_c(&c);
            if found_x.iter().any(|y| rel_dist(&xc, y) < SKIP_RADIUS) {
                continue;
            }
            stats.starts += 1;
            failures += 1;
            let t = model.coords.t_of_c(&c);
            let nb = model.dims();
            let u0 = Col::from_fn(nb + k, |i| if i < nb { t[i] } else { r[i - nb] });
            let prob = SpanProblem {
                model: &model,
                neurons: &neurons,
                found: zeros.iter().map(|z| model.coords.t_of_c(&z.c)).collect(),
                rho,
                bound,
            };
            let Some(res) = lm::solve(&prob, u0, &lm_opts) else {
                continue;
            };
            stats.lm_iterations += res.iterations;
            let Some(f_sub) = prob.span_residual(&res.u) else {
                continue;
            };
            if f_sub > promising {
                continue;
            }
            // a start that stalled next to a found zero would polish onto it: skip early
            let xs = model
                .coords
                .x_of_c(&model.coords.c_of_t(&prob.split(&res.u).0));
            if found_x.iter().any(|y| rel_dist(&xs, y) < SKIP_RADIUS) {
                stats.duplicates += 1;
                continue;
            }
            // polish and check on every neuron, without deflation
            let full = SpanProblem {
                model: &model,
                neurons: &all,
                found: Vec::new(),
                rho,
                bound,
            };
            // exact zeros need a few steps; least-squares fits under noise need to
            // converge to the minimum itself
            let polish = if accept > floor {
                LmOptions {
                    max_iterations: NOISY_POLISH_ITERATIONS,
                    target: 0.0,
                    stall: 1e-9,
                }
            } else {
                LmOptions {
                    max_iterations: POLISH_ITERATIONS,
                    target: 0.0,
                    stall: 1e-3,
                }
            };
            let polished = lm::solve(&full, res.u.clone(), &polish)
                .map(|p| p.u)
                .unwrap_or(res.u);
            let Some(f) = full.span_residual(&polished) else {
                continue;
            };
            let (tv, rv) = full.split(&polished);
            let cz = model.coords.c_of_t(&tv);
            if degenerate(&model, &cz) {
                stats.degenerate += 1;
                continue;
            }
            let x = model.coords.x_of_c(&cz);
            if found_x.iter().any(|y| rel_dist(&x, y) < DUPLICATE_TOL) {
                stats.duplicates += 1;
                continue;
            }
            if f <= accept {
                found_x.push(x);
                zeros.push(Zero {
                    c: cz,
                    r: rv,
                    residual: f,
                    exact: f <= floor,
                });
                failures = 0;
                if let Some(pb) = &bar {
                    pb.inc(1);
                }
            }
        }
        if zeros.len() >= b
            || out_of_budget(&stats)
            || round >= MAX_ROUNDS
            || zeros.len() == found_at_round
        {
            break;
        }
        // a new round: row points of the gradient with the found samples removed,
        // merged with what is left of the earlier rounds
        round += 1;
        found_at_round = zeros.len();
        failures = 0;
        let gv = residual_gradient(sub, &model, &zeros);
        let fresh = screen_all(row_points(sub, &gv));
        stats.candidates += fresh.len();
        let mut merged: Vec<_> = fresh.into_iter().chain(pending.drain(..)).collect();
        merged.sort_by(|a, b| a.0.total_cmp(&b.0));
        pending = merged.into();
    }
    stats.rounds = round;
    if let Some(pb) = bar {
        pb.finish_and_clear();
    }
    stats.seconds = t0.elapsed().as_secs_f64();
    Ok((zeros, stats, model))
}

/// A zero is degenerate when the activation is saturated on almost every neuron.
fn degenerate(model: &SignalModel, c: &Col<f64>) -> bool {
    let rows: Vec<usize> = (0..model.width()).collect();
    let z = model.z(c, &rows);
    let d1: Vec<f64> = z.iter().map(|&z| model.act.d1(z).abs()).collect();
    let mx = d1.iter().copied().fold(0.0, f64::max);
    if !(mx > 0.0) {
        return true;
    }
    let active = d1.iter().filter(|&&v| v > SATURATION_FLOOR * mx).count();
    (active as f64) < MIN_ACTIVE * model.width() as f64
}

/// Turn zeros into samples: output residuals with their absolute scale and sign, labels.
pub fn to_samples(
    view: &ServerView,
    sub: &Subspace,
    model: &SignalModel,
    zeros: &[Zero],
    cfg: &AttackConfig,
    stage: &str,
) -> Vec<Sample> {
    let scaled = labels::output_residuals(sub, model, zeros);
    let lab = labels::assign(cfg.loss, &scaled, view.outputs());
    zeros
        .iter()
        .enumerate()
        .map(|(i, z)| Sample {
            x: model.coords.x_of_c(&z.c),
            residual: Some(z.residual),
            exact: z.exact,
            stage: stage.into(),
            label: lab.get(i).copied().flatten(),
            output_residual: scaled.get(i).map(|r| r.iter().copied().collect()),
        })
        .collect()
}

/// Record the search's figures in the reconstruction.
pub fn record(rec: &mut Reconstruction, stats: &SearchStats, found: usize) {
    let d = &mut rec.diagnostics;
    d.insert("search_starts".into(), stats.starts.into());
    d.insert("search_candidates".into(), stats.candidates.into());
    d.insert("search_lm_iterations".into(), stats.lm_iterations.into());
    d.insert("search_duplicates".into(), stats.duplicates.into());
    d.insert("search_degenerate".into(), stats.degenerate.into());
    d.insert("search_seconds".into(), stats.seconds.into());
    d.insert("exact_floor".into(), stats.exact_floor.into());
    d.insert("search_rounds".into(), stats.rounds.into());
    d.insert("found".into(), found.into());
    if found < rec.batch_estimated {
        rec.notes.push(format!(
            "span search found {found} of {} samples within its budget ({} starts, {:.1} s); the rest are missing",
            rec.batch_estimated, stats.starts, stats.seconds
        ));
    }
}

pub fn attack(view: &ServerView, cfg: &AttackConfig) -> Result<Reconstruction> {
    let sub = subspace::estimate(view, &cfg.subspace_options())?;
    attack_on(view, cfg, &sub)
}

/// The search (or the pattern search) on an already computed subspace.
pub fn attack_on(view: &ServerView, cfg: &AttackConfig, sub: &Subspace) -> Result<Reconstruction> {
    let sub = sub.clone();
    let mut rec = Reconstruction::from_subspace(Method::Span, &sub);
    if view.first.bias.is_none() {
        return Err(Error::Invalid(
            "the span search needs a first-layer bias to fix each sample's scale".into(),
        ));
    }
    if view.activation == crate::model::Activation::Identity {
        rec.notes.push(
            "with the identity activation every sample's signal is the same vector A^T r: the inputs \
             cannot be separated (only their span is known)"
                .into(),
        );
        return Ok(rec);
    }
    if pattern::slopes(view.activation).is_some() && view.depth() > 1 {
        rec.notes.push(format!(
            "{} with {} hidden layers: the pattern search handles one hidden layer only; no sample returned",
            view.activation,
            view.depth()
        ));
        return Ok(rec);
    }
    let (zeros, stats, model, stage) = if pattern::slopes(view.activation).is_some() {
        let (z, s, m) = pattern::search(view, &sub, cfg)?;
        if z.is_empty() {
            rec.notes.push(format!(
                "pattern search found {} of {} activation patterns; the inputs need all of them",
                s.rounds, sub.batch
            ));
        }
        (z, s, m, "pattern")
    } else {
        let (z, s, m) = search(view, &sub, cfg, &[])?;
        (z, s, m, "span")
    };
    rec.samples = to_samples(view, &sub, &model, &zeros, cfg, stage);
    record(&mut rec, &stats, zeros.len());
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Dtype;
    use crate::model::{Activation, Init, InitConfig, Loss, Mlp, Targets};

    /// A small two-layer (or deeper) tanh client in f64 and the server's view of it.
    fn case(
        act: Activation,
        depth: usize,
        b: usize,
        seed: u64,
    ) -> (ServerView, Mat<f64>, Vec<usize>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let (d, m, k) = (6, 400, 3);
        let model: Mlp<f64> = InitConfig {
            input_dim: d,
            width: m,
            hidden: 16,
            depth,
            outputs: k,
            init: Init::TorchDefault,
            activation: act,
            prior_mean: 0.0,
            prior_sq_norm: d as f64,
            prior_centred_sq_norm: d as f64,
        }
        .build(&mut rng)
        .unwrap();
        let x = Mat::from_fn(b, d, |_, _| StandardNormal.sample(&mut rng));
        let y: Vec<usize> = (0..b).map(|i| i % k).collect();
        let g = model
            .gradient(x.as_ref(), &Targets::Classes(y.clone()), Loss::Ce)
            .unwrap();
        (
            ServerView::from_memory(&model, &g, Dtype::F64).unwrap(),
            x,
            y,
        )
    }

    fn truth_u(model: &SignalModel, x: &Mat<f64>, i: usize, all: &Neurons) -> Col<f64> {
        let xi: Vec<f64> = (0..x.ncols()).map(|j| x[(i, j)]).collect();
        let c = model.coords.c_of_x(&xi);
        let (_, r) = best_residual(model, all, &c).unwrap();
        let t = model.coords.t_of_c(&c);
        let nb = model.dims();
        Col::from_fn(nb + model.k, |q| if q < nb { t[q] } else { r[q - nb] })
    }

    /// The analytic Jacobian (with deflation) against central differences:
    /// truncation O(h^2) ~ 1e-12 and rounding eps/h ~ 1e-10 relative to ||J||.
    #[test]
    fn span_jacobian_matches_finite_differences() {
        for depth in [1, 2] {
            let (view, x, _) = case(Activation::Tanh, depth, 3, 7);
            let sub = subspace::estimate(&view, &Default::default()).unwrap();
            let model = SignalModel::new(&view, &sub).unwrap();
            let all = Neurons::all(&sub.q);
            let mut u = truth_u(&model, &x, 0, &all);
            for q in 0..u.nrows() {
                u[q] += 0.05 * ((q as f64) * 1.7).sin();
            }
            let found = vec![Col::from_fn(model.dims(), |q| 0.3 * q as f64)];
            let prob = SpanProblem {
                model: &model,
                neurons: &all,
                found,
                rho: 0.2,
                bound: None,
            };
            let (_, j) = prob.jacobian(&u).unwrap();
            let h = 1e-6;
            let scale = j.norm_l2();
            let tol = if depth == 1 { 1e-7 } else { 1e-5 }; // deeper nets: FD inside the model
            for q in 0..u.nrows() {
                let mut p = u.clone();
                p[q] += h;
                let mut mm = u.clone();
                mm[q] -= h;
                let fd = (prob.residual(&p).unwrap() - prob.residual(&mm).unwrap()) * (0.5 / h);
                let err = (&fd - j.col(q)).norm_l2();
                assert!(
                    err <= tol * scale,
                    "depth {depth} column {q}: {err:e} vs ||J|| {scale:e}"
                );
            }
        }
    }

    /// F is at the rounding floor at every true sample and far from it elsewhere.
    #[test]
    fn span_residual_is_zero_at_the_truth_only() {
        let (view, x, _) = case(Activation::Tanh, 1, 3, 8);
        let sub = subspace::estimate(&view, &Default::default()).unwrap();
        let model = SignalModel::new(&view, &sub).unwrap();
        let all = Neurons::all(&sub.q);
        let floor = exact_floor(&view, &sub);
        for i in 0..3 {
            let xi: Vec<f64> = (0..x.ncols()).map(|j| x[(i, j)]).collect();
            let (f, _) = best_residual(&model, &all, &model.coords.c_of_x(&xi)).unwrap();
            assert!(f <= floor, "sample {i}: F = {f:e} > floor {floor:e}");
            // the midpoint of two samples, and a perturbed sample, are not zeros
            let xj: Vec<f64> = (0..x.ncols())
                .map(|j| 0.5 * (x[(i, j)] + x[((i + 1) % 3, j)]))
                .collect();
            let (fm, _) = best_residual(&model, &all, &model.coords.c_of_x(&xj)).unwrap();
            assert!(fm > 1e-4, "midpoint {i}: F = {fm:e}");
            let xp: Vec<f64> = xi
                .iter()
                .enumerate()
                .map(|(j, v)| v + 0.01 * (j as f64).cos())
                .collect();
            let (fp, _) = best_residual(&model, &all, &model.coords.c_of_x(&xp)).unwrap();
            assert!(fp > 1e3 * floor, "perturbed {i}: F = {fp:e}");
        }
    }

    /// The whole search on a small simulated case (smooth, deep, and ReLU):
    /// every sample exact, labels right.
    #[test]
    fn recovers_a_small_simulated_batch() {
        for (act, depth) in [
            (Activation::Tanh, 1),
            (Activation::Gelu, 2),
            (Activation::Relu, 1),
        ] {
            let (view, x, y) = case(act, depth, 3, 11);
            let mut cfg = AttackConfig::new(Method::Span, 3);
            cfg.loss = Some(crate::model::Loss::Ce);
            let rec = attack(&view, &cfg).unwrap();
            let m = crate::metrics::evaluate(&x, &rec.samples, None, 1e-8, Some(&y)).unwrap();
            assert_eq!(
                m.recovered_fraction, 1.0,
                "{act} depth {depth}: max error {:e}",
                m.max_rel_error
            );
            assert_eq!(m.label_accuracy, Some(1.0), "{act} depth {depth}");
        }
    }
}
