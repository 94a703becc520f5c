//! Recovery from a defended gradient, using only what the server legitimately knows
//! (the defences' parameters, not the client's data): docs/DESIGN.md, "Defended
//! gradients".
//!
//! * [`nothing_recoverable`]: a gradient below its noise floor is a result, not an error.
//! * [`complete`]: pruned / sparsified entries are unknowns; the rank-B first layer is
//!   completed from the rest, then the exact route runs on it.
//! * [`likelihood`]: under known noise or quantisation, the exact route's estimates
//!   refined jointly by maximum likelihood on every layer ([`gauss_newton`] for two
//!   layers, L-BFGS deeper).
//! * [`quantized`]: the rounding error of `quantize:BITS` as the exact route's noise level.

// `!(x > 0.0)` is deliberate throughout: it also rejects NaN.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

pub mod block;
pub mod complete;
pub mod consistent;
pub mod likelihood;
pub mod local_steps;
pub mod masked;
mod observed;
mod one_step;
pub mod polish;
pub mod quantized;
pub mod reduced;
pub mod reseek;
pub mod split;
#[cfg(test)]
mod testing;
mod two_layer_fit;
pub mod unrolled;

use super::two_layer::gauss_newton;
use super::verdict::{Candidate, Claim};
use super::{AttackConfig, Method, Reconstruction, ServerView};
use crate::Result;
use crate::attack::Stage;

/// After the exact route: when the server knows the gradient carries noise or
/// quantisation error, refine the found samples jointly by maximum likelihood.
pub fn refine_found(
    view: &ServerView,
    cfg: &AttackConfig,
    mut rec: Reconstruction,
) -> Result<Reconstruction> {
    // only a known error (noise, quantisation) calls for the joint fit: skip reading
    // the whole gradient otherwise
    let quantized = view
        .defenses
        .iter()
        .any(|d| matches!(d, crate::defense::Defense::Quantize(_)));
    if rec.samples.is_empty() || !(quantized || view.noise_std.is_some_and(|s| s > 0.0)) {
        return Ok(rec);
    }
    let b = rec.batch_estimated.max(rec.samples.len());
    if view.depth() == 1
        && reduced::rank(view.width(), view.input_dim(), view.outputs(), b).is_none()
        && let Some(work) =
            gauss_newton::over_budget(view.width(), view.input_dim(), view.outputs(), b)
    {
        rec.diagnostics.defended.likelihood.likelihood_skipped_work = Some(work);
        rec.notes.push(format!(
            "joint likelihood fit skipped: B (d + K) = {} unknowns is over the dense limit {} and \
             its conjugate-gradient path would cost ~{work:.1e} multiply-adds (budget {:.0e}); \
             the exact route's estimates are kept",
            rec.batch_estimated * (view.input_dim() + view.outputs()),
            gauss_newton::DENSE_MAX_UNKNOWNS,
            gauss_newton::CG_MAX_WORK
        ));
        return Ok(rec);
    }
    let observed = view.gradient()?;
    let Some(errors) = likelihood::ErrorModel::of(view, &observed) else {
        return Ok(rec);
    };
    let (m, d, k) = (view.width(), view.input_dim(), view.outputs());
    let (mut two_layer, mut reduction) = (None, None);
    if view.depth() == 1
        && let Some(r) = reduced::rank(m, d, k, b)
        && let Ok(tl) = crate::attack::two_layer::TwoLayer::new(view, &errors.weights())
    {
        // the fit in the row space needs every sample right: wrong zeros out, the
        // missing searched for in the residual gradient
        let red = reduced::Reduction::new(&tl, r, cfg.seed)?;
        let (dropped, added, rest) = reseek::reseek(view, cfg, &tl, &red, &mut rec)?;
        // the sample the gradient needs least replaced by another candidate when that
        // explains it better (a repeat of a found sample chosen for a missing one)
        let (before, after, swaps) = polish::improve(&tl, &red, &mut rec, &rest)?;
        let dd = &mut rec.diagnostics.defended;
        dd.reseek.prior_dropped = Some(dropped);
        dd.reseek.residual_found = Some(added);
        dd.reseek.swaps = Some(swaps);
        if dropped + added > 0 {
            rec.notes.push(format!(
                "{dropped} found samples outside the prior's box dropped; {added} found in \
                 the residual gradient"
            ));
        }
        if swaps > 0 {
            rec.notes.push(format!(
                "{swaps} samples swapped for other residual-search candidates (weighted \
                 residual per entry {before:.3e} -> {after:.3e} in the row space)"
            ));
        }
        (two_layer, reduction) = (Some(tl), Some(red));
    }
    let rec = joint_fit(view, cfg, rec, &errors, false, two_layer, reduction)?;
    consistent::refine(view, cfg, rec)
}

/// Refine `rec`'s samples jointly on the weighted gradient equations (two layers: by
/// Gauss-Newton, seeding the samples the exact route missed from the residual; deeper:
/// by L-BFGS). `two_layer` and `reduction`, when the caller has them, are this view's
/// problem and its row-space restriction (built here otherwise).
fn joint_fit(
    view: &ServerView,
    cfg: &AttackConfig,
    mut rec: Reconstruction,
    errors: &likelihood::ErrorModel,
    hold_found: bool,
    two_layer: Option<crate::attack::two_layer::TwoLayer>,
    reduction: Option<reduced::Reduction>,
) -> Result<Reconstruction> {
    let t0 = std::time::Instant::now();
    let two_layer =
        two_layer.or_else(|| crate::attack::two_layer::TwoLayer::new(view, &errors.weights()).ok());
    let (samples, stats) = match &two_layer {
        Some(tl) => {
            let d = view.input_dim();
            let xs = faer::Mat::from_fn(rec.samples.len(), d, |i, j| rec.samples[i].x[j]);
            let missing = rec.batch_estimated.saturating_sub(xs.nrows());
            let (m, k) = (view.width(), view.outputs());
            let rank = reduced::rank(m, d, k, xs.nrows() + missing).filter(|_| !hold_found);
            let (fit, filled, start) = match rank {
                Some(r) => {
                    rec.diagnostics.defended.likelihood.likelihood_row_space = Some(r);
                    let red = match reduction.filter(|red| red.v.ncols() == r) {
                        Some(red) => red,
                        None => reduced::Reduction::new(tl, r, cfg.seed)?,
                    };
                    let out = red.fit(tl, xs, missing, cfg.seed)?;
                    if !(out.0.objective <= reduced::ACCEPT) {
                        let d = &mut rec.diagnostics.defended;
                        d.likelihood.likelihood_rejected = Some(out.0.objective);
                        rec.notes.push(format!(
                            "joint likelihood fit in the top-{r} row space stopped at weighted \
                             residual {:.3e} per entry (from {:.3e}), above {}: it does not \
                             explain the gradient, the exact route's estimates are kept",
                            out.0.objective,
                            out.2,
                            reduced::ACCEPT
                        ));
                        return Ok(rec);
                    }
                    out
                }
                None => two_layer_fit::fit_two_layer(tl, xs, missing, hold_found, cfg.seed)?,
            };
            let xs_len = fit.x.nrows();
            let k = view.outputs();
            let held = if hold_found { xs_len - filled } else { 0 };
            let samples: Vec<super::Sample> = (0..fit.x.nrows())
                .map(|i| {
                    Candidate {
                        x: (0..d).map(|j| fit.x[(i, j)]).collect(),
                        residual: Some(fit.objective.sqrt()),
                        stage: if i < held {
                            rec.samples[i].stage
                        } else {
                            Stage::Likelihood
                        },
                        label: None,
                        output_residual: Some((0..k).map(|j| fit.r[(i, j)]).collect()),
                        claim: Claim::Kept(i < held && rec.samples[i].exact),
                    }
                    .judge()
                })
                .collect();
            rec.diagnostics.defended.likelihood.likelihood_filled = Some(filled);
            (
                samples,
                likelihood::MlStats {
                    iterations: fit.iterations,
                    evaluations: fit.iterations,
                    start_objective: start,
                    objective: fit.objective,
                },
            )
        }
        None => likelihood::refine(view, &rec.samples, errors, likelihood::ML_ITERATIONS)?,
    };
    let labels = super::exact::labels::assign(
        cfg.loss,
        &samples
            .iter()
            .map(|s| {
                let r = s.output_residual.as_deref().unwrap_or(&[]);
                faer::Col::from_fn(r.len(), |k| r[k])
            })
            .collect::<Vec<_>>(),
        view.outputs(),
    );
    rec.samples = samples
        .into_iter()
        .zip(labels)
        .map(|(mut s, l)| {
            s.label = l.or(s.label);
            s
        })
        .collect();
    let d = &mut rec.diagnostics.defended;
    d.likelihood.likelihood_iterations = Some(stats.iterations);
    d.likelihood.likelihood_evaluations = Some(stats.evaluations);
    d.likelihood.likelihood_start = Some(stats.start_objective);
    d.likelihood.likelihood_objective = Some(stats.objective);
    d.likelihood.likelihood_seconds = Some(t0.elapsed().as_secs_f64());
    rec.notes.push(format!(
        "refined {} samples jointly by maximum likelihood under the known error \
         (weighted residual per entry {:.4e} -> {:.4e}, {} iterations)",
        rec.samples.len(),
        stats.start_objective,
        stats.objective,
        stats.iterations
    ));
    Ok(rec)
}

/// The reconstruction of a gradient whose first layer carries no signal above its
/// floor (rounding, or the known noise): no sample, and the reason in words.
pub fn nothing_recoverable(
    method: Method,
    view: &ServerView,
    largest: f64,
    floor: f64,
) -> Reconstruction {
    let why = match view.noise_std {
        Some(sd) => format!(
            "nothing recoverable: the largest singular value of the first-layer gradient ({largest:.3e}) \
             is below the floor {floor:.3e} set by the known noise (sd {sd:.3e} per entry); \
             no sample can be told from noise"
        ),
        None => format!(
            "nothing recoverable: the first-layer gradient is zero to its dtype's rounding \
             (largest singular value {largest:.3e} <= floor {floor:.3e})"
        ),
    };
    let mut rec = Reconstruction {
        method,
        batch_estimated: 0,
        samples: Vec::new(),
        singular_values: vec![largest],
        rank_threshold: floor,
        rank_rule: None,
        notes: vec![why],
        diagnostics: Default::default(),
        certificate: None,
    };
    rec.diagnostics.defended.nothing_recoverable = Some(true);
    rec
}

/// The attack a defended pipeline runs on the view it derived (`auto` passes
/// `attack::run`): a parameter, so that this folder imports nothing above it.
pub type Inner = fn(&ServerView, &AttackConfig) -> Result<Reconstruction>;

/// `auto` on a pruned or sparsified gradient: complete the first layer, then run the
/// exact route (`inner`) on the completed neurons. When completion fails, `inner` runs
/// on the gradient as received and a note says why.
pub fn complete_then_attack(
    view: &ServerView,
    cfg: &AttackConfig,
    inner: Inner,
) -> Result<Reconstruction> {
    let t0 = std::time::Instant::now();
    let c = match complete::complete(view) {
        Ok(c) => c,
        Err(e) => {
            let mut plain = view.clone();
            plain.defenses.clear();
            let mut rec = inner(&plain, cfg)?;
            rec.notes
                .push(format!("completion of the sparsified gradient failed: {e}"));
            return Ok(rec);
        }
    };
    let seconds = t0.elapsed().as_secs_f64();
    let reduced = complete::completed_view(view, &c)?;
    // the completion's error is known to the server: the search reads it as noise
    let mut known = cfg.clone();
    let e = c.error_std();
    known.noise_std = Some(cfg.noise_std.map_or(e, |sd| sd.hypot(e)));
    let mut rec = inner(&reduced, &known)?;
    if rec.samples.len() < rec.batch_estimated && reduced.depth() == 1 && !rec.samples.is_empty() {
        // the completed first layer is exact to the fit's floor; the upper layers are
        // still sparsified, so only the first layer's equations count
        let errors = likelihood::ErrorModel {
            variance: vec![(1.0, 1.0), (f64::INFINITY, f64::INFINITY)],
        };
        rec = joint_fit(&reduced, cfg, rec, &errors, true, None, None)?;
    }
    if rec.samples.len() == rec.batch_estimated && rec.samples.iter().any(|s| !s.exact) {
        // the completion need not be the gradient off the mask: refit on what was received
        rec = masked::refine(view, cfg, rec, &c.g)?;
    }
    let d = &mut rec.diagnostics.defended;
    d.completion.completion_rank = Some(c.rank);
    d.completion.completion_residual = Some(c.residual);
    d.completion.completion_sweeps = Some(c.sweeps);
    d.completion.completion_neurons = Some(c.rows.len());
    d.completion.completion_observed = Some(c.observed);
    d.completion.completion_seconds = Some(seconds);
    rec.notes.push(format!(
        "completed the sparsified first layer ({:.1} % observed) at rank {} on {} of {} neurons \
         (relative residual {:.1e} on the observed entries, {} ALS sweeps, {:.1} s)",
        100.0 * c.observed,
        c.rank,
        c.rows.len(),
        view.width(),
        c.residual,
        c.sweeps,
        seconds
    ));
    Ok(rec)
}

/// A simulated digits round (PyTorch's init) under `defenses`, and the server's view
/// of its gradient with the defences known: the set-up of this folder's tests.
#[cfg(test)]
pub(crate) fn defended_round(
    defenses: Vec<crate::defense::Defense>,
    batch: usize,
    width: usize,
) -> (crate::simulate::SimOutput, ServerView) {
    let cfg = crate::simulate::SimConfig {
        batch,
        width,
        init: crate::model::Init::TorchDefault,
        defenses,
        attack: AttackConfig::new(Method::Analytic, 1),
        ..Default::default()
    };
    let out = crate::simulate::run(&cfg).expect("a simulated round");
    let mut view = ServerView::from_memory(&out.model, &out.gradient, crate::Dtype::F64)
        .expect("the round's view");
    view.defenses = cfg.defenses;
    (out, view)
}

/// A fixed start for the fits' tests: `x` moved by about 1 % of its entries' RMS.
#[cfg(test)]
pub(crate) fn one_percent_off(x: &faer::Mat<f64>) -> faer::Mat<f64> {
    let (b, d) = x.shape();
    let scale = x.norm_l2() / ((b * d) as f64).sqrt();
    faer::Mat::from_fn(b, d, |i, j| {
        x[(i, j)] + 0.01 * scale * ((3 * i + 7 * j) as f64).sin()
    })
}

#[cfg(test)]
mod tests {
    use crate::attack::{AttackConfig, Method};
    use crate::defense::Defense;
    use crate::simulate::{self, SimConfig};

    /// DP-SGD noise far above the signal: the attack returns (no error) with no sample
    /// and says why, so a sweep records a row.
    #[test]
    fn below_the_noise_floor_is_a_result() {
        let cfg = SimConfig {
            batch: 4,
            width: 256,
            defenses: vec![Defense::Clip(1.0), Defense::Noise(0.5)],
            attack: AttackConfig::new(Method::Auto, 1),
            ..SimConfig::default()
        };
        let out = simulate::run(&cfg).unwrap();
        assert!(out.reconstruction.samples.is_empty());
        assert_eq!(out.report.recovered_fraction, 0.0);
        assert!(
            out.reconstruction.notes[0].contains("nothing recoverable"),
            "{:?}",
            out.reconstruction.notes
        );
    }

    /// Pruned entries are unknowns: the completed first layer of a rank-2 gradient has
    /// rank 2 and matches the clean gradient on the kept neurons to the fit's floor
    /// (FINAL_FIT 1e-11 on the observed entries, times the conditioning).
    #[test]
    fn pruned_first_layer_is_completed() {
        let base = SimConfig {
            data: "gaussian:6".parse().unwrap(),
            batch: 2,
            width: 200,
            attack: AttackConfig::new(Method::Analytic, 1),
            ..SimConfig::default()
        };
        let clean = simulate::run(&base).unwrap();
        let pruned = simulate::run(&SimConfig {
            defenses: vec![Defense::Prune(0.3)],
            ..base
        })
        .unwrap();
        let mut view = crate::attack::ServerView::from_memory(
            &pruned.model,
            &pruned.gradient,
            crate::Dtype::F64,
        )
        .unwrap();
        view.defenses = vec![Defense::Prune(0.3)];
        let c = super::complete::complete(&view).unwrap();
        eprintln!(
            "rank {} rows {} residual {:e}",
            c.rank,
            c.rows.len(),
            c.residual
        );
        let g = &clean.gradient.layers[0];
        let (mut num, mut den) = (0.0, 0.0);
        for (a, &j) in c.rows.iter().enumerate() {
            for k in 0..7 {
                let t = if k < 6 {
                    g.weight[(j, k)]
                } else {
                    g.bias.as_ref().unwrap()[j]
                };
                num += (c.g[(a, k)] - t).powi(2);
                den += t * t;
            }
        }
        assert!(c.rows.len() > 100, "{} neurons kept", c.rows.len());
        assert!(
            (num / den).sqrt() < 1e-8,
            "rank {}: {:e}",
            c.rank,
            (num / den).sqrt()
        );
        assert_eq!(c.rank, 2);
    }

    /// On digits (m = 4096; blank pixels: whole columns unobserved) a magnitude mask makes the
    /// over-parametrised fit count more than B directions; the bisection below the first
    /// fitting rank brings it back to B (without it: 14).
    #[test]
    fn completion_rank_is_the_batch_size_on_digits() {
        let (_, view) = super::defended_round(vec![Defense::Prune(0.5)], 8, 4096);
        let c = super::complete::complete(&view).unwrap();
        assert_eq!(c.rank, 8, "residual {:e}", c.residual);
        assert!(c.residual < 1e-9, "{:e}", c.residual);
    }
}
