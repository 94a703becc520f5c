//! The labelled joint fit for rank-deficient inputs (docs/DESIGN.md, "Rank-deficient
//! inputs: the labelled joint fit"). When blank input coordinates cap the first-layer
//! rank below B, the samples in linear relations are not span zeros one by one; every
//! layer's equations of a two-layer net ([`TwoLayer`])
//!
//! ```text
//! O_W = Delta^T X,  O_b = Delta^T 1,  O_A = R^T H,  O_c = R^T 1,
//! r_i = (softmax(A h_i + c) - e_{y_i}) / B       (cross-entropy: R tied to X)
//! ```
//!
//! are solved for X alone (the blank coordinates held at 0) by Levenberg-Marquardt on
//! the chain-ruled normal matrix, from the public prior mean image plus noise, with the
//! labels' multiset read off O_c: count_k = sum_i softmax_k(x_i) - B O_c(k). The fit
//! finds the batch up to the order of its samples; it is kept only when the batch
//! reproduces every layer's gradient to the certificate's closure tolerance.

// `!(x > y)` is deliberate: it also stops on NaN.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

use faer::linalg::solvers::Solve;
use faer::{Col, Mat};
use rand_distr::{Distribution, StandardNormal};

use crate::attack::exact::certificate::{self, CLOSURE_FACTOR};
use crate::attack::exact::context::Context;
use crate::attack::reconstruction::{Reconstruction, Sample, Stage};
use crate::attack::two_layer::TwoLayer;
use crate::attack::verdict::{self, Candidate, Claim};
use crate::attack::{AttackConfig, ServerView};
use crate::model::Loss;
use crate::numerics::damped;
use crate::rng::{Salt, salted};
use crate::{Error, Result};

/// Levenberg-Marquardt steps at most (digits B = 64 converges in 17).
pub const STEPS: usize = 30;
/// Start noise, relative to the prior image's root-mean-square entry (measured on
/// digits B = 64: 0.1 reaches 64/64).
pub const START_NOISE: f64 = 0.1;
/// Largest number of unknowns (B x free coordinates) solved densely.
pub const MAX_UNKNOWNS: usize = 6000;
/// The fit stops once its relative closure is this fraction of the tolerance.
pub const STOP_FRACTION: f64 = 0.1;
/// Label counts B (p_k - O_c(k)) must round to integers within this for B to be a
/// candidate (digits B = 64 seeds 1-3: 0.12 at the true B, the next size 0.17-0.21).
pub const COUNT_TOL: f64 = 0.25;
/// Batch sizes tried when no exact sample tells B (each a full fit).
pub const B_TRIES: usize = 2;

/// Cross-entropy residuals r_i = (softmax(A act(W x_i + b) + c) - e_{y_i}) / B (no e
/// term where y_i = usize::MAX) and their derivatives dr_i / dx_i (K x d each):
/// (diag(s) - s s^T) A diag(act'(z_i)) W / B.
pub(super) fn ce_residuals(
    tl: &TwoLayer,
    c: &Col<f64>,
    y: &[usize],
    x: &Mat<f64>,
) -> (Mat<f64>, Vec<Mat<f64>>) {
    let b = x.nrows();
    let z = tl.pre(x);
    let m = z.ncols();
    let h = Mat::from_fn(b, m, |i, j| tl.act.eval(z[(i, j)]));
    let logits = &h * tl.a.transpose();
    let k = logits.ncols();
    let mut r = Mat::zeros(b, k);
    let mut t = Vec::with_capacity(b);
    for i in 0..b {
        let mx = (0..k)
            .map(|kk| logits[(i, kk)] + c[kk])
            .fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = (0..k)
            .map(|kk| (logits[(i, kk)] + c[kk] - mx).exp())
            .collect();
        let sum: f64 = e.iter().sum();
        let sm: Vec<f64> = e.iter().map(|v| v / sum).collect();
        for kk in 0..k {
            r[(i, kk)] = (sm[kk] - f64::from(kk == y[i])) / b as f64;
        }
        let js = Mat::from_fn(k, k, |p, q| {
            (f64::from(p == q) * sm[p] - sm[p] * sm[q]) / b as f64
        });
        let ad = Mat::from_fn(k, m, |kk, j| tl.a[(kk, j)] * tl.act.d1(z[(i, j)]));
        t.push(js * (ad * &tl.w));
    }
    (r, t)
}

/// The labels' counts read off the output-bias gradient at inputs `x`:
/// count_k = sum_i softmax_k(x_i) - B O_c[k] (exact at the truth), rounded, and the
/// largest distance of a count from its integer.
pub(super) fn label_counts(tl: &TwoLayer, c: &Col<f64>, x: &Mat<f64>) -> (Vec<usize>, f64) {
    let b = x.nrows();
    let (r, _) = ce_residuals(tl, c, &vec![usize::MAX; b], x);
    let mut off: f64 = 0.0;
    let counts = (0..r.ncols())
        .map(|k| {
            let v: f64 = (0..b).map(|i| r[(i, k)]).sum::<f64>() * b as f64 - b as f64 * tl.oc[k];
            off = off.max((v - v.round()).abs());
            v.round().max(0.0) as usize
        })
        .collect();
    (counts, off)
}

/// What the fit did.
pub(super) struct JointFit {
    pub x: Mat<f64>,
    pub r: Mat<f64>,
    pub labels: Vec<usize>,
    pub steps: usize,
    /// Relative closure sqrt(f / ||O||^2) at the start and the end.
    pub start: f64,
    pub end: f64,
    pub stalled: bool,
}

/// Levenberg-Marquardt in X alone (coordinates `free`, the rest held) with R tied to X
/// by the cross-entropy loss and `labels`, at most `steps`, stopping once the relative
/// closure is under `stop`.
pub(super) fn fit(
    tl: &TwoLayer,
    c: &Col<f64>,
    labels: &[usize],
    x0: Mat<f64>,
    free: &[usize],
    steps: usize,
    stop: f64,
) -> JointFit {
    let obs2 = tl.ow.squared_norm_l2()
        + tl.ob.squared_norm_l2()
        + tl.oa.squared_norm_l2()
        + tl.oc.squared_norm_l2();
    let rel = |f: f64| (f / obs2.max(f64::MIN_POSITIVE)).sqrt();
    let p = Tied {
        tl,
        c,
        labels,
        free,
    };
    let f = damped::NormalEquations::objective(&p, &x0);
    let start = rel(f);
    let stop = damped::Stop {
        steps,
        min_gain: None,
        converged: |f: f64| !(rel(f) > stop),
    };
    let m = damped::minimise(&p, x0, f, &damped::LARGE, stop);
    let (r, _) = ce_residuals(tl, c, labels, &m.point);
    JointFit {
        x: m.point,
        r,
        labels: labels.to_vec(),
        steps: m.steps,
        start,
        end: rel(m.objective),
        stalled: m.stalled,
    }
}

/// The inputs' free coordinates with R tied to them by cross-entropy and `labels`:
/// normal equations for [`damped::minimise`].
struct Tied<'a> {
    tl: &'a TwoLayer,
    c: &'a Col<f64>,
    labels: &'a [usize],
    free: &'a [usize],
}

impl damped::NormalEquations for Tied<'_> {
    type Point = Mat<f64>;
    /// The chain-ruled normal matrix and right-hand side (B nf unknowns).
    type System = (Mat<f64>, Col<f64>);

    fn system(&self, xc: &Mat<f64>) -> Option<(Mat<f64>, Col<f64>)> {
        let (tl, free) = (self.tl, self.free);
        let (b, d) = xc.shape();
        let k = tl.a.nrows();
        let nf = free.len();
        let nx = b * nf;
        let full = |p: usize| (p / nf) * d + free[p % nf];
        let (r, tb) = ce_residuals(tl, self.c, self.labels, xc);
        let pt = tl.point(xc, &r);
        let (gx, gr) = tl.vjp(&pt, &tl.weigh(tl.residual(&pt)));
        let nm = tl.normal_matrix(&pt);
        let bd = b * d;
        // dr_i/dx_i on the free coordinates, block diagonal (BK x B nf)
        let tm = Mat::from_fn(b * k, nx, |p, q| {
            if p / k == q / nf {
                tb[p / k][(p % k, free[q % nf])]
            } else {
                0.0
            }
        });
        let nxx = Mat::from_fn(nx, nx, |p, q| nm[(full(p), full(q))]);
        let nxr = Mat::from_fn(nx, b * k, |p, q| nm[(full(p), bd + q)]);
        let nrr = nm.submatrix(bd, bd, b * k, b * k).to_owned();
        drop(nm);
        let nxr_t = &nxr * &tm;
        let nc = nxx + &nxr_t + nxr_t.transpose() + tm.transpose() * (nrr * &tm);
        let g = Col::from_fn(nx, |p| gx[(p / nf, free[p % nf])])
            + tm.transpose() * Col::from_fn(b * k, |p| gr[(p / k, p % k)]);
        let rhs = Col::from_fn(nx, |p| -g[p]);
        Some((nc, rhs))
    }

    fn step(&self, xc: &Mat<f64>, sys: &(Mat<f64>, Col<f64>), lambda: f64) -> Option<Mat<f64>> {
        let (nc, rhs) = sys;
        let nf = self.free.len();
        let nx = nc.nrows();
        let mut a = nc.clone();
        for p in 0..nx {
            a[(p, p)] *= 1.0 + lambda;
        }
        let sol = a.partial_piv_lu().solve(rhs);
        let mut cand = xc.clone();
        for p in 0..nx {
            cand[(p / nf, self.free[p % nf])] += sol[p];
        }
        Some(cand)
    }

    fn objective(&self, xx: &Mat<f64>) -> f64 {
        let (r, _) = ce_residuals(self.tl, self.c, self.labels, xx);
        self.tl
            .weighted_norm2(&self.tl.residual(&self.tl.point(xx, &r)))
    }
}

/// Why the fit does not run on this view, if it does not.
fn refusal(view: &ServerView, cfg: &AttackConfig, b: usize, nf: usize) -> Option<String> {
    if !matches!(cfg.loss, Some(Loss::Ce) | None) || view.outputs() < 2 {
        return Some("it needs the cross-entropy loss (the labels tie R to X)".into());
    }
    if view.depth() != 1 {
        return Some(
            "it is built for one hidden layer (deeper nets: the second layer's gradient has \
             rank B and is not used yet)"
                .into(),
        );
    }
    if view.activation.is_piecewise_linear() {
        return Some(format!(
            "the {} activation is piecewise linear (the fit's Jacobian jumps)",
            view.activation
        ));
    }
    if cfg.prior_image.is_none() {
        return Some(
            "it needs a public prior mean image to start from (--prior-image; the scalar prior \
             mean in every coordinate reached 0 of 64 on digits)"
                .into(),
        );
    }
    if b * nf > MAX_UNKNOWNS {
        return Some(format!(
            "B x free coordinates = {} unknowns is over its dense limit {MAX_UNKNOWNS}",
            b * nf
        ));
    }
    None
}

/// Batch sizes above the rank whose label counts B (p_k - O_c[k]) (p the softmax at the
/// prior image) all round to integers >= 0, best first, with their largest distance
/// from an integer (at most `COUNT_TOL`): B when no exact sample tells it.
pub(super) fn batch_candidates(
    tl: &TwoLayer,
    c: &Col<f64>,
    prior: &Mat<f64>,
    sizes: std::ops::RangeInclusive<usize>,
) -> Vec<(usize, f64)> {
    let (r, _) = ce_residuals(tl, c, &[usize::MAX], prior);
    let k = r.ncols();
    let mut out: Vec<(usize, f64)> = sizes
        .filter_map(|b| {
            let mut off: f64 = 0.0;
            for kk in 0..k {
                let v = b as f64 * (r[(0, kk)] - tl.oc[kk]);
                if v.round() < 0.0 {
                    return None;
                }
                off = off.max((v - v.round()).abs());
            }
            (off <= COUNT_TOL).then_some((b, off))
        })
        .collect();
    out.sort_by(|p, q| p.1.total_cmp(&q.1));
    out
}

/// One fit of `b` samples and its closure.
struct Attempt {
    fit: JointFit,
    counts: Vec<usize>,
    /// Per-layer and overall closure of the fitted X (free R), when computable.
    closure: Option<(Vec<f64>, f64)>,
    loss_closure: Option<f64>,
    seconds: f64,
}

#[allow(clippy::too_many_arguments)]
fn attempt(
    view: &ServerView,
    cfg: &AttackConfig,
    tl: &TwoLayer,
    c: &Col<f64>,
    b: usize,
    free: &[usize],
    mean: &[f64],
    tol: f64,
) -> Result<std::result::Result<Attempt, String>> {
    let t0 = std::time::Instant::now();
    let d = view.input_dim();
    // starts: the prior image plus noise, blank coordinates 0
    let norm = mean.iter().map(|v| v * v).sum::<f64>().sqrt();
    let scale = if norm > 0.0 {
        norm / (d as f64).sqrt()
    } else {
        cfg.prior.map_or(1.0, |p| p.std)
    };
    let mut rng = salted(cfg.seed, Salt::JointStarts);
    let x0 = Mat::from_fn(b, d, |_, j| {
        let n: f64 = StandardNormal.sample(&mut rng);
        if free.contains(&j) {
            mean[j] + START_NOISE * scale * n
        } else {
            0.0
        }
    });
    let (counts, off) = label_counts(tl, c, &x0);
    let total: usize = counts.iter().sum();
    if total != b {
        return Ok(Err(format!(
            "the label counts read off the output-bias gradient at the starts, {counts:?}, sum \
             to {total}, not B = {b} (largest distance from an integer {off:.2})"
        )));
    }
    let labels: Vec<usize> = counts
        .iter()
        .enumerate()
        .flat_map(|(k, &n)| std::iter::repeat_n(k, n))
        .collect();
    let mlp = view.model()?;
    let grad = view.gradient()?;
    let fit = fit(tl, c, &labels, x0, free, STEPS, STOP_FRACTION * tol);
    let closure = certificate::closure_in(view.dtype, &mlp, &grad, &fit.x, None)
        .map(|(per, all, _)| (per, all));
    let loss_closure =
        certificate::loss_closure(view.dtype, &mlp, &grad, &fit.x, &fit.r, Some(Loss::Ce));
    Ok(Ok(Attempt {
        fit,
        counts,
        closure,
        loss_closure,
        seconds: t0.elapsed().as_secs_f64(),
    }))
}

/// After the exact route on rank-deficient inputs (`zero_coordinates` blank in every
/// sample, the rank at the inputs' limit): the labelled joint fit of all B samples, B as
/// the route read it or, when nothing told it, the best `batch_candidates` (up to
/// `B_TRIES` of them); its samples replace the route's when the batch closes.
pub fn run(
    ctx: &Context<'_>,
    cfg: &AttackConfig,
    zero_coordinates: &[usize],
    rec: &mut Reconstruction,
) -> Result<()> {
    let (view, sub) = (ctx.view, ctx.sub);
    let d = view.input_dim();
    let known = rec.batch_estimated > sub.batch;
    let at_limit = sub.batch + zero_coordinates.len() > d;
    if zero_coordinates.is_empty()
        || !(known || at_limit)
        || rec.samples.len() >= rec.batch_estimated
    {
        return Ok(());
    }
    let free: Vec<usize> = (0..d).filter(|c| !zero_coordinates.contains(c)).collect();
    let b_max = if known {
        rec.batch_estimated
    } else {
        sub.batch + 1
    };
    if let Some(why) = refusal(view, cfg, b_max, free.len()) {
        rec.diagnostics.defended.joint.joint_skipped = Some(true);
        rec.notes.push(format!(
            "the labelled joint fit of every layer's equations is not run: {why}"
        ));
        return Ok(());
    }
    let mean = cfg.prior_image.as_deref().unwrap_or(&[]);
    if mean.len() != d {
        return Err(Error::Shape(format!(
            "the prior image has {} values, the inputs {d} coordinates",
            mean.len()
        )));
    }
    let tl = TwoLayer::new(view, &[(1.0, 1.0), (1.0, 1.0)])?;
    let c = view.upper[0]
        .bias
        .clone()
        .unwrap_or_else(|| Col::zeros(view.outputs()));
    let sizes: Vec<usize> = if known {
        vec![rec.batch_estimated]
    } else {
        let prior = Mat::from_fn(1, d, |_, j| if free.contains(&j) { mean[j] } else { 0.0 });
        let cand = batch_candidates(&tl, &c, &prior, sub.batch + 1..=MAX_UNKNOWNS / free.len());
        let shown: Vec<String> = cand
            .iter()
            .take(3)
            .map(|(b, o)| format!("{b} ({o:.2})"))
            .collect();
        rec.diagnostics.defended.joint.joint_batch_candidates =
            Some(cand.iter().take(B_TRIES).map(|p| p.0).collect::<Vec<_>>());
        rec.notes.push(format!(
            "B is not told by an exact sample; the sizes whose label counts B (softmax at the \
             prior image - O_c) round best (largest distance from an integer): {}",
            if shown.is_empty() {
                "none within 0.25".into()
            } else {
                shown.join(", ")
            }
        ));
        cand.into_iter().take(B_TRIES).map(|p| p.0).collect()
    };
    let mlp = view.model()?;
    let u = view.dtype.epsilon() / 2.0;
    let mut tried = Vec::new();
    for b in sizes {
        let tol = CLOSURE_FACTOR * u * (certificate::path_length(&mlp, b) as f64).sqrt();
        let at = match attempt(view, cfg, &tl, &c, b, &free, mean, tol)? {
            Ok(at) => at,
            Err(why) => {
                tried.push(format!("B = {b}: not run, {why}"));
                continue;
            }
        };
        let closure_value = at.closure.as_ref().map_or(f64::NAN, |c| c.1);
        let dd = &mut rec.diagnostics.defended;
        dd.joint.joint_batch = Some(b);
        dd.joint.joint_label_counts = Some(at.counts.clone());
        dd.joint.joint_steps = Some(at.fit.steps);
        dd.joint.joint_start_closure = Some(at.fit.start);
        dd.joint.joint_fit_closure = Some(at.fit.end);
        dd.joint.joint_closure = Some(closure_value);
        dd.joint.joint_seconds = Some(at.seconds);
        let how = format!(
            "B = {b}, Levenberg-Marquardt in the inputs with R tied to them by cross-entropy and \
             the label counts {:?} read off the output-bias gradient, from the prior mean image \
             plus {:.0} % noise; {} steps, relative closure {:.1e} -> {:.1e}, {:.1} s",
            at.counts,
            100.0 * START_NOISE,
            at.fit.steps,
            at.fit.start,
            at.fit.end,
            at.seconds
        );
        // free residuals could park a wrong sample at r = 0: the loss's own must close too
        if closure_value <= tol && at.loss_closure.is_some_and(|v| v <= tol) {
            dd.joint.joint_accepted = Some(true);
            accept(ctx, cfg, rec, at, b, tol, &how)?;
            return Ok(());
        }
        let why = if at.fit.stalled {
            "it stalled (no damped step lowers the objective): a local minimum, the start \
             outside its basin, the label counts or B wrong"
        } else {
            "its step budget ran out"
        };
        tried.push(format!(
            "{how}: closure {closure_value:.1e} > tolerance {tol:.1e}, {why}"
        ));
    }
    rec.diagnostics.defended.joint.joint_accepted = Some(false);
    rec.notes.push(format!(
        "the labelled joint fit of every layer's equations does not reproduce the gradient \
         ({}); none of its samples is kept, and the samples in linear relations stay missing",
        if tried.is_empty() {
            "no batch size to try".into()
        } else {
            tried.join("; ")
        }
    ));
    Ok(())
}

/// The fit closed: its samples replace the route's, certified by the batch closure.
fn accept(
    ctx: &Context<'_>,
    cfg: &AttackConfig,
    rec: &mut Reconstruction,
    at: Attempt,
    b: usize,
    tol: f64,
    how: &str,
) -> Result<()> {
    let (view, sub) = (ctx.view, ctx.sub);
    let d = view.input_dim();
    let k = view.outputs();
    let (per, all) = at.closure.unwrap_or_default();
    let jf = at.fit;
    let samples: Vec<Sample> = (0..b)
        .map(|i| {
            // the certificate below (batch closure) is what vouches for these
            Candidate {
                x: (0..d).map(|j| jf.x[(i, j)]).collect(),
                residual: Some(jf.end),
                stage: Stage::Joint,
                label: Some(jf.labels[i]),
                output_residual: Some((0..k).map(|j| jf.r[(i, j)]).collect()),
                claim: Claim::None,
            }
            .judge()
        })
        .collect();
    let mut cert =
        certificate::certify_with(view, sub, &ctx.model, &ctx.scale, &samples, &[], cfg.loss)?;
    cert.found = b;
    cert.batch = b;
    cert.closure_residual = Some(all);
    cert.layers = per
        .into_iter()
        .enumerate()
        .map(|(layer, residual)| crate::attack::evidence::LayerClosure { layer, residual })
        .collect();
    cert.closure_tolerance = tol;
    cert.loss_closure_residual = at.loss_closure;
    cert.split_residual = None;
    cert.split_tolerance = None;
    cert.part_certified = false;
    cert.certified = true;
    let mut spans = 0;
    for e in &mut cert.samples {
        // the own test alone: certify's split test cannot hold with B above the rank
        let own = e.span_residual <= e.floor;
        spans += usize::from(own);
        let span = format!(
            "span residual {:.1e} {} its rounding floor {:.1e}",
            e.span_residual,
            if own { "under" } else { "above" },
            e.floor
        );
        e.exact = true;
        e.why = if own {
            format!("{span} (outside the span of the others); batch closure holds")
        } else {
            format!(
                "{span}: in a linear relation with other samples, no span test singles it \
                 out; the labelled joint fit's batch reproduces every layer's gradient to \
                 {all:.1e} (tolerance {tol:.1e})"
            )
        };
    }
    cert.why = format!(
        "all {b} samples from the labelled joint fit ({spans} also pass their own span test); \
         the batch reproduces every layer's gradient to {all:.1e} (tolerance {tol:.1e})"
    );
    rec.notes.push(format!(
        "the labelled joint fit of every layer's equations recovered all {b} samples ({how}); \
         the batch reproduces the gradient to {all:.1e} (tolerance {tol:.1e}): exact up to the \
         order of the samples"
    ));
    rec.batch_estimated = b;
    rec.samples = samples;
    verdict::certify(rec, cert);
    Ok(())
}

#[cfg(test)]
#[path = "labelled_tests.rs"]
mod tests;
