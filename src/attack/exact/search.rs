//! The span search: the inputs are the zeros of the span residual
//! F(c, r) = ||P_perp s(c, r)|| / ||s(c, r)|| (docs/DESIGN.md, "Span search").
//! Multi-start Levenberg-Marquardt on a subsample of neurons, starts screened by F,
//! deflation of the zeros found, rounds of fresh starts from the gradient with the
//! found samples removed, and a final check of each zero on every neuron.

// `!(x > 0.0)` is deliberate throughout: it also rejects NaN.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

use std::time::Instant;

use faer::{Col, Mat};
use rand_distr::{Distribution, StandardNormal};

use super::accept::{Acceptance, Verdict};
use super::context::Context;
use super::floor::noise_floor;
use super::problem::SpanProblem;
use super::signal::{Neurons, SignalModel};
use super::subsample;
use super::zero::{Zero, best_residual, pack, rel_dist, row_points};
use crate::Result;
use crate::attack::evidence::SearchStats;
use crate::attack::observer::Progress;
use crate::attack::params::AttackConfig;
use crate::attack::prior::Prior;
use crate::attack::subspace::Subspace;
use crate::numerics::lm::{self, LmOptions};
use crate::rng::{Salt, salted};

/// Neurons per unknown of one sample's problem (B - 1 + K): enough equations that a
/// spurious zero on the subsample is unlikely, few enough that an iteration is cheap.
pub const NEURONS_PER_UNKNOWN: usize = 32;
/// Fewest neurons in the subsample.
pub const MIN_NEURONS: usize = 768;
/// Neurons used to screen start candidates by F (a rough ranking suffices).
pub const SCREEN_NEURONS: usize = 384;

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

/// Prior mean and sd used for starts and bounds: the configured prior, or one
/// estimated from the gradient's row points (robust median and spread).
pub(crate) fn effective_prior(cfg: &AttackConfig, model: &SignalModel, rows: &[Col<f64>]) -> Prior {
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

/// Draws from the prior, projected into the span.
fn prior_points(model: &SignalModel, prior: &Prior, count: usize, seed: u64) -> Vec<Col<f64>> {
    let mut rng = salted(seed, Salt::SearchPrior);
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
/// Under known noise, consecutive failed starts (times B) after which the search
/// stops when nothing was found since the last round: the samples still missing are
/// then pairs whose zeros merged in the noise, which the defended refinement splits
/// (docs/DESIGN.md, "Noise"); more starts only find the same fits again.
pub const NOISY_PATIENCE: usize = 8;

/// The projected gradient with the found samples removed exactly: GV projected
/// onto the complement of the found signals, (I - S_f S_f^+) GV = (I - S_f S_f^+) S_m C_m^T.
/// Its rows are combinations of the missing samples only (no scale needs fitting).
pub(crate) fn residual_gradient(sub: &Subspace, model: &SignalModel, zeros: &[Zero]) -> Mat<f64> {
    let gv = sub.projected_gradient();
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

/// LM options of the polish on every neuron: exact zeros need a few steps;
/// least-squares fits under noise need to converge to the minimum itself.
pub(crate) fn polish_options(noisy: bool) -> LmOptions {
    if noisy {
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
    }
}

/// Run the search in a run's context. `extra` are starting inputs from another stage
/// (e.g. tensor estimates); `known` are zeros already found (deflated and kept); at most
/// `seconds`.
pub fn search_in(
    ctx: &Context<'_>,
    cfg: &AttackConfig,
    extra: &[Vec<f64>],
    known: Vec<Zero>,
    seconds: Option<f64>,
) -> Result<(Vec<Zero>, SearchStats)> {
    let t0 = Instant::now();
    let opts = &cfg.search;
    let (view, sub, model, order) = (ctx.view, ctx.sub, &ctx.model, &ctx.order);
    let (m, b, k) = (model.width(), model.batch(), model.k);
    let n = subsample::size(opts.neurons, NEURONS_PER_UNKNOWN, MIN_NEURONS, b - 1 + k, m);
    let neurons = Neurons::new(&sub.q, order.first_kept(n));
    let screen = Neurons::new(&sub.q, order.first_kept(SCREEN_NEURONS.max(4 * (b + k))));
    let floor = ctx.floor;
    // Under known noise, zeros are least-squares fits: accept F up to the noise floor
    // (such samples are never called exact).
    let accept = floor.max(noise_floor(view, sub, cfg.noise_std.or(view.noise_std)));
    let noisy = accept > floor;
    // zeros are polished and judged on every neuron but the held-back ones
    let acc = Acceptance::new(ctx, accept);
    let all = &acc.kept;
    let promising = PROMISING.max(2.0 * accept);

    let gv0 = sub.projected_gradient();
    let first_rows = row_points(sub, &gv0);
    let prior = effective_prior(cfg, model, &first_rows);
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
            .filter_map(|c| best_residual(model, &screen, &c).map(|(f, r)| (f, c, r)))
            .filter(|(f, _, _)| f.is_finite())
            .collect();
        scored.sort_by(|a, b| a.0.total_cmp(&b.0));
        scored
    };
    let mut round0: Vec<Col<f64>> = extra.iter().map(|x| model.coords.c_of_x(x)).collect();
    round0.extend(prior_points(model, &prior, opts.prior_starts, cfg.seed));
    if known.is_empty() {
        round0.extend(first_rows);
    } else {
        round0.extend(row_points(sub, &residual_gradient(sub, model, &known)));
    }
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
    let mut found_x: Vec<Vec<f64>> = known.iter().map(|z| model.coords.x_of_c(&z.c)).collect();
    let mut zeros: Vec<Zero> = known;
    let progress = Progress::begin(cfg.observer.as_ref(), "span search", b as u64);
    let lm_opts = LmOptions {
        max_iterations: LM_ITERATIONS,
        target: floor * 1e-3,
        stall: 1e-4,
    };
    let out_of_budget = |stats: &SearchStats| {
        stats.starts >= opts.max_starts
            || seconds.is_some_and(|s| t0.elapsed().as_secs_f64() > s)
            || cfg.cancel.is_cancelled()
    };
    let mut round = 0;
    let mut failures = 0;
    let mut found_at_round = zeros.len();
    let patience = ROUND_PATIENCE * b;
    let mut pending: std::collections::VecDeque<(f64, Col<f64>, Col<f64>)> = scored.into();
    loop {
        while let Some((_, c, r)) = pending.pop_front() {
            if zeros.len() >= b || out_of_budget(&stats) {
                break;
            }
            progress.advance(zeros.len() as u64, None)?;
            if noisy && failures >= NOISY_PATIENCE * b && zeros.len() == found_at_round {
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
            let u0 = pack(model, &c, &r);
            let prob = SpanProblem {
                model,
                neurons: &neurons,
                found: zeros.iter().map(|z| model.coords.t_of_c(&z.c)).collect(),
                rho,
                bound,
                signals: None,
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
                model,
                neurons: all,
                found: Vec::new(),
                rho,
                bound,
                signals: None,
            };
            let polish = polish_options(noisy);
            let polished = lm::solve(&full, res.u.clone(), &polish)
                .map(|p| p.u)
                .unwrap_or(res.u);
            let Some(f) = full.span_residual(&polished) else {
                continue;
            };
            let (tv, rv) = full.split(&polished);
            let cz = model.coords.c_of_t(&tv);
            if degenerate(model, &cz) {
                stats.degenerate += 1;
                continue;
            }
            let x = model.coords.x_of_c(&cz);
            if found_x.iter().any(|y| rel_dist(&x, y) < DUPLICATE_TOL) {
                stats.duplicates += 1;
                continue;
            }
            // under the sample's own rounding floor, here and on the held-back neurons
            // (docs/DESIGN.md, "Certificate"): a wrong zero inside the global floor, or one
            // fitted to the search's neurons alone, does not take a slot
            let verdict = acc.judge(&cz, &rv, f);
            if verdict != Verdict::Rejected {
                found_x.push(x);
                zeros.push(Zero {
                    c: cz,
                    r: rv,
                    residual: f,
                    accepted: verdict == Verdict::Exact,
                });
                failures = 0;
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
        let gv = residual_gradient(sub, model, &zeros);
        let fresh = screen_all(row_points(sub, &gv));
        stats.candidates += fresh.len();
        let mut merged: Vec<_> = fresh.into_iter().chain(pending.drain(..)).collect();
        merged.sort_by(|a, b| a.0.total_cmp(&b.0));
        pending = merged.into();
    }
    stats.rounds = round;
    stats.seconds = t0.elapsed().as_secs_f64();
    Ok((zeros, stats))
}

/// A zero is degenerate when the activation is saturated on almost every neuron.
pub(crate) fn degenerate(model: &SignalModel, c: &Col<f64>) -> bool {
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
