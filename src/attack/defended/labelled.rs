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
//! labels' multiset read off O_c: count_k = sum_i softmax_k(x_i) - B O_c[k]. The fit
//! finds the batch up to the order of its samples; it is kept only when the batch
//! reproduces every layer's gradient to the certificate's closure tolerance.

use faer::linalg::solvers::Solve;
use faer::{Col, Mat};
use rand_distr::{Distribution, StandardNormal};

use super::alternating::TwoLayer;
use crate::attack::exact::certificate::{self, CLOSURE_FACTOR};
use crate::attack::reconstruction::{Reconstruction, Sample, Stage};
use crate::attack::subspace::Subspace;
use crate::attack::{AttackConfig, ServerView};
use crate::model::Loss;
use crate::rng::{Salt, salted};
use crate::{Error, Result};

/// Levenberg-Marquardt steps at most (digits B = 64 converges in 17).
pub const STEPS: usize = 30;
/// Damping increases tried per step before the fit counts as stalled.
pub const TRIES: usize = 8;
/// Start noise, relative to the prior image's root-mean-square entry (measured on
/// digits B = 64: 0.1 reaches 64/64).
pub const START_NOISE: f64 = 0.1;
/// Largest number of unknowns (B x free coordinates) solved densely.
pub const MAX_UNKNOWNS: usize = 6000;
/// The fit stops once its relative closure is this fraction of the tolerance.
pub const STOP_FRACTION: f64 = 0.1;

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
    let (b, d) = x0.shape();
    let k = tl.a.nrows();
    let nf = free.len();
    let nx = b * nf;
    let full = |p: usize| (p / nf) * d + free[p % nf];
    let obs2 = tl.ow.squared_norm_l2()
        + tl.ob.squared_norm_l2()
        + tl.oa.squared_norm_l2()
        + tl.oc.squared_norm_l2();
    let rel = |f: f64| (f / obs2.max(f64::MIN_POSITIVE)).sqrt();
    let objective = |xx: &Mat<f64>| {
        let (r, _) = ce_residuals(tl, c, labels, xx);
        tl.weighted_norm2(&tl.residual(&tl.point(xx, &r)))
    };
    let mut xc = x0;
    let mut f = objective(&xc);
    let start = rel(f);
    let mut lambda = 1e-4;
    let (mut done, mut stalled) = (0, false);
    while done < steps && rel(f) > stop {
        done += 1;
        let (r, tb) = ce_residuals(tl, c, labels, &xc);
        let pt = tl.point(&xc, &r);
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
        let mut moved = false;
        for _ in 0..TRIES {
            let mut a = nc.clone();
            for p in 0..nx {
                a[(p, p)] *= 1.0 + lambda;
            }
            let sol = a.partial_piv_lu().solve(&rhs);
            let mut cand = xc.clone();
            for p in 0..nx {
                cand[(p / nf, free[p % nf])] += sol[p];
            }
            let fc = objective(&cand);
            if fc.is_finite() && fc < f {
                (xc, f) = (cand, fc);
                lambda = (lambda / 3.0f64).max(1e-12);
                moved = true;
                break;
            }
            lambda *= 8.0;
        }
        if !moved {
            stalled = true;
            break;
        }
    }
    let (r, _) = ce_residuals(tl, c, labels, &xc);
    JointFit {
        x: xc,
        r,
        labels: labels.to_vec(),
        steps: done,
        start,
        end: rel(f),
        stalled,
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

/// After the exact route on rank-deficient inputs (`zero_coordinates` blank in every
/// sample, the batch `rec.batch_estimated` larger than the rank): the labelled joint
/// fit of all B samples; its samples replace the route's when the batch closes.
pub fn run(
    view: &ServerView,
    cfg: &AttackConfig,
    sub: &Subspace,
    zero_coordinates: &[usize],
    rec: &mut Reconstruction,
) -> Result<()> {
    let b = rec.batch_estimated;
    if zero_coordinates.is_empty() || b <= sub.batch || rec.samples.len() >= b {
        return Ok(());
    }
    let d = view.input_dim();
    let free: Vec<usize> = (0..d).filter(|c| !zero_coordinates.contains(c)).collect();
    if let Some(why) = refusal(view, cfg, b, free.len()) {
        rec.diagnostics
            .defended
            .insert("joint_skipped".into(), true.into());
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
    let t0 = std::time::Instant::now();
    let tl = TwoLayer::new(view, &[(1.0, 1.0), (1.0, 1.0)])?;
    let c = view.upper[0]
        .bias
        .clone()
        .unwrap_or_else(|| Col::zeros(view.outputs()));
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
        if zero_coordinates.contains(&j) {
            0.0
        } else {
            mean[j] + START_NOISE * scale * n
        }
    });
    let (counts, off) = label_counts(&tl, &c, &x0);
    let total: usize = counts.iter().sum();
    let dd = &mut rec.diagnostics.defended;
    dd.insert("joint_label_counts".into(), counts.clone().into());
    dd.insert("joint_label_count_offset".into(), off.into());
    if total != b {
        rec.notes.push(format!(
            "the labelled joint fit is not run: the label counts read off the output-bias \
             gradient at the starts, {counts:?}, sum to {total}, not B = {b} (largest distance \
             from an integer {off:.2})"
        ));
        return Ok(());
    }
    let labels: Vec<usize> = counts
        .iter()
        .enumerate()
        .flat_map(|(k, &n)| std::iter::repeat_n(k, n))
        .collect();
    let mlp = view.model()?;
    let grad = view.gradient()?;
    let u = view.dtype.epsilon() / 2.0;
    let tol = CLOSURE_FACTOR * u * (certificate::path_length(&mlp, b) as f64).sqrt();
    let jf = fit(&tl, &c, &labels, x0, &free, STEPS, STOP_FRACTION * tol);
    let closure = certificate::closure_in(view.dtype, &mlp, &grad, &jf.x, None);
    let loss_closure =
        certificate::loss_closure(view.dtype, &mlp, &grad, &jf.x, &jf.r, Some(Loss::Ce));
    let closure_value = closure.as_ref().map_or(f64::NAN, |c| c.1);
    let closed = closure_value <= tol;
    let seconds = t0.elapsed().as_secs_f64();
    let dd = &mut rec.diagnostics.defended;
    dd.insert("joint_steps".into(), jf.steps.into());
    dd.insert("joint_start_closure".into(), jf.start.into());
    dd.insert("joint_fit_closure".into(), jf.end.into());
    dd.insert("joint_closure".into(), closure_value.into());
    dd.insert("joint_accepted".into(), closed.into());
    dd.insert("joint_seconds".into(), seconds.into());
    let how = format!(
        "Levenberg-Marquardt in the inputs with R tied to them by cross-entropy and the label \
         counts {counts:?} read off the output-bias gradient, from the prior mean image plus \
         {:.0} % noise; {} steps, relative closure {:.1e} -> {:.1e}, {seconds:.1} s",
        100.0 * START_NOISE,
        jf.steps,
        jf.start,
        jf.end
    );
    let Some((per, all, _)) = closure.filter(|_| closed) else {
        let why = if jf.stalled {
            "it stalled (no damped step lowers the objective): a local minimum, the start \
             outside its basin or the label counts wrong"
        } else {
            "its step budget ran out"
        };
        rec.notes.push(format!(
            "the labelled joint fit of every layer's equations ({how}) does not reproduce the \
             gradient (closure {closure_value:.1e} > tolerance {tol:.1e}): {why}; none of its \
             samples is kept and the {} samples in linear relations stay missing",
            b - rec.samples.len()
        ));
        return Ok(());
    };
    let k = view.outputs();
    let samples: Vec<Sample> = (0..b)
        .map(|i| Sample {
            x: (0..d).map(|j| jf.x[(i, j)]).collect(),
            residual: Some(jf.end),
            exact: true,
            stage: Stage::Joint,
            label: Some(jf.labels[i]),
            output_residual: Some((0..k).map(|j| jf.r[(i, j)]).collect()),
        })
        .collect();
    let mut cert = certificate::certify(view, sub, &samples, &[], cfg.loss)?;
    cert.found = b;
    cert.batch = b;
    cert.closure_residual = Some(all);
    cert.layers = per
        .into_iter()
        .enumerate()
        .map(|(layer, residual)| crate::attack::evidence::LayerClosure { layer, residual })
        .collect();
    cert.closure_tolerance = tol;
    cert.loss_closure_residual = loss_closure;
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
    rec.samples = samples;
    certificate::apply(rec, cert);
    Ok(())
}

#[cfg(test)]
mod tests {
    use faer::Mat;
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};

    use super::*;
    use crate::Dtype;
    use crate::attack::Method;
    use crate::model::{Activation, Init, InitConfig, Mlp, Targets};

    /// A two-layer net with `d` inputs, `m` neurons and 3 classes, and a batch whose
    /// last two coordinates are 0 in every sample, row 7 (when B = 8) a mixture of rows 0-2.
    fn case(act: Activation, d: usize, m: usize, b: usize) -> (ServerView, Mat<f64>, Vec<usize>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let k = 3;
        let model: Mlp<f64> = InitConfig {
            input_dim: d,
            width: m,
            hidden: 16,
            depth: 1,
            outputs: k,
            init: Init::TorchDefault,
            activation: act,
            prior_mean: 0.0,
            prior_sq_norm: d as f64,
            prior_centred_sq_norm: d as f64,
        }
        .build(&mut rng)
        .unwrap();
        let mut x = Mat::from_fn(b, d, |_, j| {
            if j < d - 2 {
                StandardNormal.sample(&mut rng)
            } else {
                0.0
            }
        });
        if b == 8 {
            for j in 0..d {
                x[(7, j)] = 0.5 * x[(0, j)] + 0.3 * x[(1, j)] + 0.2 * x[(2, j)];
            }
        }
        let y: Vec<usize> = (0..b).map(|i| i % k).collect();
        let g = model
            .gradient(x.as_ref(), &Targets::Classes(y.clone()), Loss::Ce)
            .unwrap();
        let view = ServerView::from_memory(&model, &g, Dtype::F64).unwrap();
        (view, x, y)
    }

    /// dr_i/dx_i of every smooth activation against central differences (truncation
    /// ~h^2, rounding ~eps/h: 1e-7 of the derivative's size leaves room for both), and
    /// no sample's residual moving with another's input.
    #[test]
    fn residual_derivatives_match_central_differences() {
        for act in [
            Activation::Tanh,
            Activation::Sigmoid,
            Activation::Gelu,
            Activation::Silu,
            Activation::Softplus,
        ] {
            let (view, x, y) = case(act, 5, 30, 3);
            let tl = TwoLayer::new(&view, &[(1.0, 1.0), (1.0, 1.0)]).unwrap();
            let c = view.upper[0].bias.clone().unwrap();
            let (_, t) = ce_residuals(&tl, &c, &y, &x);
            let h = 1e-5;
            for i in 0..3 {
                let size = t[i].norm_l2();
                for j in 0..5 {
                    let (mut xp, mut xm) = (x.clone(), x.clone());
                    xp[(i, j)] += h;
                    xm[(i, j)] -= h;
                    let fd = (ce_residuals(&tl, &c, &y, &xp).0 - ce_residuals(&tl, &c, &y, &xm).0)
                        * (0.5 / h);
                    for i2 in 0..3 {
                        for kk in 0..3 {
                            let want = if i2 == i { t[i][(kk, j)] } else { 0.0 };
                            let err = (fd[(i2, kk)] - want).abs();
                            assert!(
                                err <= 1e-7 * size,
                                "{act} x[{i},{j}] -> r[{i2},{kk}]: {err:e}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// At the client's inputs sum_i softmax(x_i) - B O_c is the label histogram exactly
    /// (up to rounding); at other inputs the reading is off.
    #[test]
    fn label_counts_at_the_truth_are_the_histogram() {
        let (view, x, _) = case(Activation::Tanh, 8, 400, 8);
        let tl = TwoLayer::new(&view, &[(1.0, 1.0), (1.0, 1.0)]).unwrap();
        let c = view.upper[0].bias.clone().unwrap();
        let (counts, off) = label_counts(&tl, &c, &x);
        assert_eq!(counts, vec![3, 3, 2]);
        assert!(off < 1e-12, "{off:e}");
        let (_, off) = label_counts(&tl, &c, &(&x * 0.0));
        assert!(off > 1e-6, "{off:e}");
    }

    /// The route on B = 8 inputs of rank 7 (two blank coordinates, one linear relation):
    /// the span search finds the 4 samples outside the relation; with a prior image the
    /// labelled joint fit recovers all 8 to 1e-8 with their labels, certified by the
    /// batch closure; without one the report says why it did not run.
    #[test]
    fn the_joint_fit_recovers_samples_in_a_linear_relation() {
        let (view, x, y) = case(Activation::Tanh, 8, 400, 8);
        let mut cfg = AttackConfig::new(Method::Span, 1);
        cfg.loss = Some(Loss::Ce);
        cfg.search.max_starts = 60;
        let rec = crate::attack::exact::route::attack(&view, &cfg).unwrap();
        assert_eq!(rec.samples.len(), 4, "{:?}", rec.notes);
        assert!(
            rec.notes
                .iter()
                .any(|n| n.contains("needs a public prior mean image")),
            "{:?}",
            rec.notes
        );
        let mean: Vec<f64> = (0..8).map(|j| x.col(j).iter().sum::<f64>() / 8.0).collect();
        cfg.prior_image = Some(mean);
        let rec = crate::attack::exact::route::attack(&view, &cfg).unwrap();
        let m = crate::metrics::evaluate(&x, &rec.samples, None, 1e-8, Some(&y)).unwrap();
        assert_eq!(
            m.recovered_fraction, 1.0,
            "{:e} {:?}",
            m.max_rel_error, rec.notes
        );
        assert_eq!(m.label_accuracy, Some(1.0));
        assert!(
            rec.samples
                .iter()
                .all(|s| s.stage == Stage::Joint && s.exact)
        );
        let cert = rec.certificate.as_ref().unwrap();
        assert!(cert.certified, "{}", cert.why);
        assert_eq!(
            rec.samples
                .iter()
                .map(|s| (s.x[6], s.x[7]))
                .collect::<Vec<_>>(),
            vec![(0.0, 0.0); 8]
        );
    }
}
