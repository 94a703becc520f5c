//! Maximum likelihood under known noise or quantisation (docs/DESIGN.md, "Defended
//! gradients: maximum likelihood").
//!
//! The server sees O_l = G_l(X, R) + E_l for every layer l, with E_l's entries
//! independent of known variance v_l: Gaussian noise of sd sigma (v = sigma^2) and/or
//! uniform rounding to a step q_l (v = q_l^2 / 12; the step of `quantize:BITS` is
//! (max - min) / (2^BITS - 1) of the observed tensor, whose ends are kept exactly).
//! The (Gaussian) likelihood is maximised by
//!
//! ```text
//! min_{X, R}  sum_l ||G_l(X, R) - O_l||^2 / v_l,
//! ```
//!
//! DLG's objective, weighted, with free output residuals R (no loss needed), started
//! from the exact route's estimates (in the right basin) instead of random inputs.
//! L-BFGS on variables scaled by the Gauss-Newton column norms.

// `!(x > 0.0)` is deliberate throughout: it also rejects NaN.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

use crate::attack::Stage;
use faer::Mat;

use crate::attack::baseline::matching::{GradientMap, LabelModel, dot};
use crate::attack::verdict::{Candidate, Claim};
use crate::attack::{Sample, ServerView};
use crate::defense::Defense;
use crate::model::{Gradient, Mlp};
use crate::numerics::lbfgs::{self, LbfgsOptions};
use crate::{Error, Result};

/// L-BFGS iterations of the refinement: from the exact route's estimates the fit
/// settles within a few hundred (measured on digits B = 8, docs/EXPERIMENTS.md).
pub const ML_ITERATIONS: usize = 150;
/// Curvature pairs L-BFGS keeps.
pub const ML_MEMORY: usize = 20;

/// Variance of the known error in each entry, per layer: (weight, bias).
#[derive(Clone, Debug)]
pub struct ErrorModel {
    pub variance: Vec<(f64, f64)>,
}

impl ErrorModel {
    /// What the server knows of the error in `observed` from the defences' public
    /// parameters; None when no defence adds a known error.
    pub fn of(view: &ServerView, observed: &Gradient<f64>) -> Option<Self> {
        let bits = view.defenses.iter().rev().find_map(|d| match d {
            Defense::Quantize(b) => Some(*b),
            _ => None,
        });
        let noise = view.noise_std.unwrap_or(0.0).powi(2);
        if bits.is_none() && !(noise > 0.0) {
            return None;
        }
        let step2 = |v: &mut dyn Iterator<Item = f64>| -> f64 {
            let Some(b) = bits else { return 0.0 };
            let (lo, hi) = v.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), x| {
                (l.min(x), h.max(x))
            });
            if !(hi > lo) {
                return 0.0;
            }
            let step = (hi - lo) / (2f64.powi(b as i32) - 1.0);
            step * step / 12.0
        };
        let variance = observed
            .layers
            .iter()
            .map(|l| {
                let w = step2(&mut l.weight.col_iter().flat_map(|c| c.iter().copied()));
                let b = l
                    .bias
                    .as_ref()
                    .map_or(0.0, |b| step2(&mut b.iter().copied()));
                (noise + w, noise + b)
            })
            .collect();
        Some(ErrorModel { variance })
    }

    /// Weights 1 / v (a zero variance, e.g. a constant tensor, gets the largest
    /// finite weight of the model).
    pub fn weights(&self) -> Vec<(f64, f64)> {
        let inv = |v: f64| if v > 0.0 { 1.0 / v } else { 0.0 };
        let mx = self
            .variance
            .iter()
            .flat_map(|&(a, b)| [inv(a), inv(b)])
            .fold(0.0, f64::max);
        let w = |v: f64| if v > 0.0 { 1.0 / v } else { mx };
        self.variance.iter().map(|&(a, b)| (w(a), w(b))).collect()
    }
}

/// What the refinement did.
#[derive(Clone, Debug, Default)]
pub struct MlStats {
    pub iterations: usize,
    pub evaluations: usize,
    /// Weighted residual sum_l ||G_l - O_l||^2 / v_l per gradient entry, before and
    /// after (about 1 at the truth when the error model is right).
    pub start_objective: f64,
    pub objective: f64,
}

/// The weighted problem in scaled variables theta = (X / sx, R / sr).
struct Weighted<'a> {
    map: GradientMap<'a>,
    observed: &'a Gradient<f64>,
    weights: Vec<(f64, f64)>,
    entries: f64,
    b: usize,
    d: usize,
    k: usize,
    /// Per-sample input scale and per-(sample, output) residual scale.
    sx: Vec<f64>,
    sr: Mat<f64>,
}

impl Weighted<'_> {
    fn unpack(&self, th: &[f64]) -> (Mat<f64>, Mat<f64>) {
        let (b, d, k) = (self.b, self.d, self.k);
        (
            Mat::from_fn(b, d, |i, j| th[i * d + j] * self.sx[i]),
            Mat::from_fn(b, k, |i, j| th[b * d + i * k + j] * self.sr[(i, j)]),
        )
    }

    fn pack(&self, x: &Mat<f64>, r: &Mat<f64>, scaled: bool) -> Vec<f64> {
        let (b, d, k) = (self.b, self.d, self.k);
        let mut v = Vec::with_capacity(b * (d + k));
        for i in 0..b {
            for j in 0..d {
                v.push(if scaled {
                    x[(i, j)] / self.sx[i]
                } else {
                    x[(i, j)] * self.sx[i]
                });
            }
        }
        for i in 0..b {
            for j in 0..k {
                v.push(if scaled {
                    r[(i, j)] / self.sr[(i, j)]
                } else {
                    r[(i, j)] * self.sr[(i, j)]
                });
            }
        }
        v
    }

    /// Objective per entry and its gradient in theta.
    fn eval(&self, th: &[f64]) -> Result<(f64, Vec<f64>)> {
        let (x, r) = self.unpack(th);
        let (g, tape) = self.map.eval(&x, &r)?;
        let mut diff = g;
        crate::model::ops::axpy(&mut diff, -1.0, self.observed);
        let mut wdiff = diff.clone();
        for (l, layer) in wdiff.layers.iter_mut().enumerate() {
            let (ww, wb) = self.weights[l];
            layer.weight *= faer::Scale(ww);
            if let Some(bb) = &mut layer.bias {
                *bb *= faer::Scale(wb);
            }
        }
        let f = dot(&diff, &wdiff) / self.entries;
        crate::model::ops::for_each_layer_scale(&mut wdiff, 2.0 / self.entries);
        let (ax, ar) = self.map.vjp(&tape, &wdiff);
        // chain rule through the scaling: d/dtheta = d/dX * sx
        Ok((f, self.pack(&ax, &ar, false)))
    }
}

/// Refine `seeds` (inputs with absolute output residuals) jointly by maximum
/// likelihood under `errors`. Samples keep their order; none is marked exact.
pub fn refine(
    view: &ServerView,
    seeds: &[Sample],
    errors: &ErrorModel,
    iterations: usize,
) -> Result<(Vec<Sample>, MlStats)> {
    let model: Mlp<f64> = view.model()?;
    let observed = view.gradient()?;
    let (b, d, k) = (seeds.len(), view.input_dim(), view.outputs());
    if b == 0 {
        return Ok((Vec::new(), MlStats::default()));
    }
    let x0 = Mat::from_fn(b, d, |i, j| seeds[i].x[j]);
    let r0 = Mat::from_fn(b, k, |i, j| {
        seeds[i]
            .output_residual
            .as_ref()
            .and_then(|r| r.get(j).copied())
            .unwrap_or(0.0)
    });
    if x0.norm_l2().is_nan() || r0.norm_l2().is_nan() {
        return Err(Error::NonFinite("the refinement's seeds".into()));
    }
    let weights = errors.weights();
    let (sx, sr) = scales(&model, &x0, &r0, weights[0].0)?;
    let prob = Weighted {
        map: GradientMap {
            model: &model,
            labels: LabelModel::Free,
        },
        observed: &observed,
        weights,
        entries: observed.len() as f64,
        b,
        d,
        k,
        sx,
        sr,
    };
    let th0 = prob.pack(&x0, &r0, true);
    let start_objective = prob.eval(&th0)?.0;
    let opts = LbfgsOptions {
        max_iters: iterations,
        memory: ML_MEMORY,
        f_tol: 0.0,
    };
    let min = lbfgs::minimize(|t| prob.eval(t), th0, &opts, |_, _| {})?;
    let (x, r) = prob.unpack(&min.x);
    let residual = min.f.sqrt();
    let samples = seeds
        .iter()
        .enumerate()
        .map(|(i, s)| {
            Candidate {
                x: (0..d).map(|j| x[(i, j)]).collect(),
                residual: Some(residual),
                stage: Stage::Likelihood,
                label: s.label,
                output_residual: Some((0..k).map(|j| r[(i, j)]).collect()),
                claim: Claim::None,
            }
            .judge()
        })
        .collect();
    Ok((
        samples,
        MlStats {
            iterations: min.iters,
            evaluations: min.evals,
            start_objective,
            objective: min.f,
        },
    ))
}

/// Variable scales from the Gauss-Newton column norms at the seed, weighted by the
/// first layer's weight `w`: an input coordinate of sample i moves the first-layer
/// gradient by about ||delta_i|| (its signal over the neurons); output residual k of
/// sample i by ||x~_i|| ||delta_i^(k)|| (the first layer's signal for a unit residual)
/// and ||a_i|| (the last layer's input).
fn scales(model: &Mlp<f64>, x: &Mat<f64>, r: &Mat<f64>, w: f64) -> Result<(Vec<f64>, Mat<f64>)> {
    let (b, k) = (x.nrows(), model.output_dim());
    let fw = model.forward(x.as_ref())?;
    let bw = model.backward(x.as_ref(), &fw, r.as_ref())?;
    let row_norm = |m: &Mat<f64>, i: usize| m.row(i).iter().map(|v| v * v).sum::<f64>().sqrt();
    let sw = w.sqrt();
    let sx: Vec<f64> = (0..b)
        .map(|i| {
            let n = sw * row_norm(&bw.deltas[0], i);
            if n > 0.0 && n.is_finite() {
                1.0 / n
            } else {
                1.0
            }
        })
        .collect();
    let last_in = |i: usize| {
        fw.post
            .last()
            .map_or_else(|| row_norm(x, i), |a| row_norm(a, i))
    };
    let mut sr = Mat::zeros(b, k);
    for kk in 0..k {
        let unit = Mat::from_fn(b, k, |_, j| f64::from(j == kk));
        let bu = model.backward(x.as_ref(), &fw, unit.as_ref())?;
        for i in 0..b {
            let xn2 = row_norm(x, i).powi(2) + 1.0;
            let n =
                sw * (xn2 * row_norm(&bu.deltas[0], i).powi(2) + last_in(i).powi(2) + 1.0).sqrt();
            sr[(i, kk)] = if n > 0.0 && n.is_finite() {
                1.0 / n
            } else {
                1.0
            };
        }
    }
    Ok((sx, sr))
}
