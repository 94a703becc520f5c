//! Round driver of the seeded span search (docs/DESIGN.md, "Seeding by demixing"):
//! FastICA on the projected gradient proposes one candidate per sample, each is
//! polished by Levenberg-Marquardt on the span residual, the exact zeros are kept, the
//! gradient is projected off their signals and the next round demixes what is left.
//! The random-start search finishes what the rounds miss.

// `!(x > 0.0)` is deliberate throughout: it also rejects NaN.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

use std::time::Instant;

use faer::{Col, Mat};

use super::accept::{Acceptance, Verdict};
use super::context::Context;
use super::floor::noise_floor;
use super::problem::SpanProblem;
use super::search::{self, MIN_NEURONS, SCREEN_NEURONS};
use super::seed;
use super::signal::{Neurons, SignalModel};
use super::subsample;
use super::zero::{Zero, best_residual, rel_dist, row_points, unpack};
use crate::Result;
use crate::attack::evidence::SearchStats;
use crate::attack::params::AttackConfig;
use crate::numerics::lm::{self, LmOptions, Problem};

/// LM iterations of a seed's polish on the subsample: seeds are rough (median error
/// ~0.5), so they get more steps than a random start; 100 measured better than 40
/// (photos B = 64, m = 8192: round 1 found 23 instead of 8).
pub const SEED_LM_ITERATIONS: usize = 100;
/// Neurons per unknown of the seeds' subsample (fewer than the random-start search's
/// `search::NEURONS_PER_UNKNOWN`: every zero is checked on all neurons anyway, and the
/// polish costs O(n) per step; 8 found as many as 32 on the case above).
pub const SEED_NEURONS_PER_UNKNOWN: usize = 8;

/// The polish on the kept neurons stops once F is under this share of the sample's own
/// rounding floor (the floor the zero is judged by). Polishing to stall instead took 3-8
/// LM steps per zero, most of them at the floor already (photos B = 64, m = 8192: the
/// polish was 19 of 48 s of a loaded run, 4.8 s with this margin; same 64 zeros).
pub const POLISH_MARGIN: f64 = 0.5;

/// Neurons per unknown of the subsample a zero is polished on before the kept neurons
/// (the polish on all 3/4 of m was most of the rounds' time at B = 128, m = 16384).
pub const MID_NEURONS_PER_UNKNOWN: usize = 16;

/// What one seed's polish gave.
enum Outcome {
    Zero(Zero),
    Degenerate,
    Failed,
}

/// Everything a seed's polish reads (shared, read-only: seeds of one round are
/// independent and may run on several threads).
struct Polisher<'a> {
    model: &'a SignalModel,
    sub_neurons: &'a Neurons,
    screen: &'a Neurons,
    /// Own floors, held-back check, and the neurons zeros are polished on.
    acc: &'a Acceptance<'a>,
    bound: Option<(f64, f64)>,
    /// Orthonormal basis of the found signals on `sub_neurons` (deflation in signal space).
    signals: Option<Mat<f64>>,
    promising: f64,
    /// Kept neurons the polish first runs on (a prefix of the kept order), if any.
    mid: Option<&'a Neurons>,
    /// Polish to stall on the kept neurons, no target and no mid subsample: under known
    /// noise (a least-squares fit) and for float32 gradients, whose own floor is near the
    /// precision asked of an exact sample (stopping at half of it left a sample 1.3e-4
    /// off on photos12-tanh-ce-depth3, tests/certificate.rs).
    to_stall: bool,
    lm_opts: LmOptions,
    polish_opts: LmOptions,
}

impl Polisher<'_> {
    /// LM on the subsample from seed c: the point reached when F there is promising,
    /// and the iterations spent.
    fn descend(&self, c: &Col<f64>) -> (Option<Col<f64>>, usize) {
        let model = self.model;
        let Some((_, r)) = best_residual(model, self.screen, c) else {
            return (None, 0);
        };
        let t = model.coords.t_of_c(c);
        let nb = model.dims();
        let u0 = Col::from_fn(nb + model.k, |i| if i < nb { t[i] } else { r[i - nb] });
        let prob = SpanProblem {
            model,
            neurons: self.sub_neurons,
            found: Vec::new(),
            rho: 0.0,
            bound: self.bound,
            signals: self.signals.clone(),
        };
        let Some(res) = lm::solve(&prob, u0, &self.lm_opts) else {
            return (None, 0);
        };
        let iters = res.iterations;
        match prob.span_residual(&res.u) {
            Some(f) if f <= self.promising => (Some(res.u), iters),
            _ => (None, iters),
        }
    }

    /// Polish a promising point on the kept neurons and judge it.
    fn finish(&self, u: Col<f64>) -> Outcome {
        let model = self.model;
        let full = SpanProblem {
            model,
            neurons: &self.acc.kept,
            found: Vec::new(),
            rho: 0.0,
            bound: self.bound,
            signals: None,
        };
        // stop at a margin under the sample's own floor: at the floor LM only stalls,
        // and most points from the subsample are there already
        let mut opts = self.polish_opts;
        if !self.to_stall {
            let (tv, rv) = full.split(&u);
            opts.target = POLISH_MARGIN * self.acc.own_floor(&model.coords.c_of_t(&tv), &rv);
        }
        // first on a mid-sized subsample when there is one (a zero there is a zero on
        // every neuron, at a fraction of the cost), then on the kept neurons; a point
        // already under the target skips LM (its first Jacobian alone costs ~50 residuals)
        let u = match self.mid.filter(|_| !self.to_stall) {
            Some(mid) => {
                let p = SpanProblem {
                    model,
                    neurons: mid,
                    found: Vec::new(),
                    rho: 0.0,
                    bound: self.bound,
                    signals: None,
                };
                polish_on(&p, u, &opts)
            }
            None => u,
        };
        let u = polish_on(&full, u, &opts);
        let Some(f) = full.span_residual(&u) else {
            return Outcome::Failed;
        };
        let (tv, rv) = full.split(&u);
        let cz = model.coords.c_of_t(&tv);
        if search::degenerate(model, &cz) {
            return Outcome::Degenerate;
        }
        // the sample's own floor, here and on the held-back neurons (docs/DESIGN.md, "Certificate")
        let accepted = match self.acc.judge(&cz, &rv, f) {
            Verdict::Rejected => return Outcome::Failed,
            v => v == Verdict::Exact,
        };
        Outcome::Zero(Zero {
            c: cz,
            r: rv,
            residual: f,
            accepted,
        })
    }
}

/// LM on `p` from `u` unless F there is already under the target.
fn polish_on(p: &SpanProblem<'_>, u: Col<f64>, opts: &LmOptions) -> Col<f64> {
    if opts.target > 0.0 && p.span_residual(&u).is_some_and(|f| f <= opts.target) {
        let mut u = u;
        p.normalise(&mut u);
        u
    } else {
        lm::solve(p, u.clone(), opts).map(|r| r.u).unwrap_or(u)
    }
}

/// Descend from every seed, on `threads` threads; results in seed order whatever the count.
fn descend_all(
    p: &Polisher<'_>,
    seeds: &[Col<f64>],
    threads: usize,
) -> Vec<(Option<Col<f64>>, usize)> {
    let threads = threads.clamp(1, seeds.len().max(1));
    if threads == 1 {
        return seeds.iter().map(|c| p.descend(c)).collect();
    }
    let chunk = seeds.len().div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = seeds
            .chunks(chunk)
            .map(|part| s.spawn(move || part.iter().map(|c| p.descend(c)).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("polish thread panicked"))
            .collect()
    })
}

/// Seeded search in a run's context: demixing rounds, then the random-start search for
/// what is missing.
pub fn search(ctx: &Context<'_>, cfg: &AttackConfig) -> Result<(Vec<Zero>, SearchStats)> {
    let t0 = Instant::now();
    let opts = &cfg.search;
    let (view, sub, model, order) = (ctx.view, ctx.sub, &ctx.model, &ctx.order);
    let (m, b, k) = (model.width(), model.batch(), model.k);
    let n = subsample::size(
        opts.neurons,
        SEED_NEURONS_PER_UNKNOWN,
        MIN_NEURONS,
        b - 1 + k,
        m,
    );
    let sub_neurons = Neurons::new(&sub.q, order.first_kept(n));
    let screen = Neurons::new(&sub.q, order.first_kept(SCREEN_NEURONS.max(4 * (b + k))));
    let n_mid = MID_NEURONS_PER_UNKNOWN * (b - 1 + k);
    let mid = (n_mid < order.kept().len()).then(|| Neurons::new(&sub.q, order.first_kept(n_mid)));
    let floor = ctx.floor;
    let accept = floor.max(noise_floor(view, sub, cfg.noise_std.or(view.noise_std)));
    let acc = Acceptance::new(ctx, accept);
    let gv0 = sub.projected_gradient();
    let prior = search::effective_prior(cfg, model, &row_points(sub, &gv0));
    let bound = Some((prior.mean, search::PRIOR_RADIUS * prior.std.max(1e-12)));
    let vl = Col::from_fn(b, |q| sub.v[(sub.v.nrows() - 1, q)]);

    let mut stats = SearchStats {
        exact_floor: floor,
        ..Default::default()
    };
    let mut zeros: Vec<Zero> = Vec::new();
    let mut found_x: Vec<Vec<f64>> = Vec::new();
    for round in 0..opts.seed_rounds {
        if zeros.len() >= b || out_of_time(opts.seconds, &t0) || cfg.cancel.is_cancelled() {
            break;
        }
        let gv = search::residual_gradient(sub, model, &zeros);
        let seeds = seed::candidates(
            &gv,
            &vl,
            cfg.seed.wrapping_add(round as u64),
            opts.ica_iterations,
        );
        stats.candidates += seeds.len();
        stats.starts += seeds.len();
        stats.rounds = round + 1;
        let polisher = Polisher {
            model,
            sub_neurons: &sub_neurons,
            screen: &screen,
            acc: &acc,
            bound,
            signals: found_signals(model, &sub_neurons, &zeros),
            promising: search::PROMISING.max(2.0 * accept),
            mid: mid.as_ref(),
            to_stall: accept > floor || view.dtype == crate::Dtype::F32,
            lm_opts: LmOptions {
                max_iterations: SEED_LM_ITERATIONS,
                target: floor * 1e-3,
                stall: 1e-4,
            },
            polish_opts: search::polish_options(accept > floor),
        };
        let before = zeros.len();
        // the subsample descents are independent (threads); the polish on the kept
        // neurons, the costly step, runs in seed order and skips a point that lies next
        // to a sample found before it (most seeds of a round reach the same few samples)
        for (point, iters) in descend_all(&polisher, &seeds, opts.threads) {
            stats.lm_iterations += iters;
            let Some(u) = point else { continue };
            let xs = model
                .coords
                .x_of_c(&model.coords.c_of_t(&unpack(model, u.as_ref()).0));
            if found_x
                .iter()
                .any(|y| rel_dist(&xs, y) < search::DUPLICATE_TOL)
            {
                stats.duplicates += 1;
                continue;
            }
            match polisher.finish(u) {
                Outcome::Zero(z) => {
                    let x = model.coords.x_of_c(&z.c);
                    if found_x
                        .iter()
                        .any(|y| rel_dist(&x, y) < search::DUPLICATE_TOL)
                    {
                        stats.duplicates += 1;
                        continue;
                    }
                    if zeros.len() >= b {
                        continue;
                    }
                    found_x.push(x);
                    zeros.push(z);
                }
                Outcome::Degenerate => stats.degenerate += 1,
                Outcome::Failed => {}
            }
        }
        if zeros.len() == before {
            break;
        }
    }
    let seeded = zeros.len();
    stats.seed_seconds = t0.elapsed().as_secs_f64();
    if zeros.len() < b && !out_of_time(opts.seconds, &t0) {
        // the random-start search for the rest, deflating the zeros found
        let left = opts
            .seconds
            .map(|s| (s - t0.elapsed().as_secs_f64()).max(0.0));
        let (z, s) = search::search_in(ctx, cfg, &[], zeros, left)?;
        zeros = z;
        stats.starts += s.starts;
        stats.candidates += s.candidates;
        stats.lm_iterations += s.lm_iterations;
        stats.duplicates += s.duplicates;
        stats.degenerate += s.degenerate;
        stats.rounds += s.rounds;
    }
    stats.seeded = seeded;
    stats.seconds = t0.elapsed().as_secs_f64();
    Ok((zeros, stats))
}

/// Orthonormal basis of the found samples' signals on `neurons` (None before any is found).
fn found_signals(model: &SignalModel, neurons: &Neurons, zeros: &[Zero]) -> Option<Mat<f64>> {
    if zeros.is_empty() {
        return None;
    }
    let mut sf = Mat::<f64>::zeros(neurons.len(), zeros.len());
    for (i, z) in zeros.iter().enumerate() {
        let s = model.signal_matrix(&z.c, &neurons.rows) * &z.r;
        sf.col_mut(i).copy_from(&s);
    }
    Some(sf.qr().compute_thin_Q())
}

fn out_of_time(seconds: Option<f64>, t0: &Instant) -> bool {
    seconds.is_some_and(|s| t0.elapsed().as_secs_f64() > s)
}

#[cfg(test)]
mod tests {
    use super::super::route;
    use super::super::testing::case;
    use crate::attack::params::{AttackConfig, Method};
    use crate::model::Activation;

    /// Same seed -> bit-identical samples, for one or two threads, and the seeded
    /// route recovers the whole (small) batch exactly. A budget in seconds, a data race
    /// or an order that depends on thread timing would make the two runs differ.
    #[test]
    fn seeded_search_is_deterministic_for_any_thread_count() {
        for act in [Activation::Tanh, Activation::Relu] {
            let (view, x, _) = case(act, 1, 6, 5);
            let run = |threads: usize| {
                let mut cfg = AttackConfig::new(Method::Span, 9);
                cfg.search.threads = threads;
                route::attack(&view, &cfg).unwrap()
            };
            let a = run(1);
            let b = run(1);
            let c = run(2);
            let bits = |r: &crate::attack::Reconstruction| {
                r.samples
                    .iter()
                    .flat_map(|s| s.x.iter().map(|v| v.to_bits()))
                    .collect::<Vec<u64>>()
            };
            assert_eq!(bits(&a), bits(&b), "{act}: two runs differ");
            assert_eq!(bits(&a), bits(&c), "{act}: one and two threads differ");
            let m = crate::metrics::evaluate(&x, &a.samples, None, 1e-8, None).unwrap();
            assert_eq!(
                m.recovered_fraction, 1.0,
                "{act}: max error {:e}",
                m.max_rel_error
            );
        }
    }
}
