//! Baselines users compare against, both gradient matching from a random start:
//! [`dlg`] (Zhu, Liu & Han 2019: squared distance, L-BFGS, soft labels) and [`ig`]
//! (Geiping et al. 2020: cosine distance, total-variation prior for images, Adam,
//! box constraint). Both optimise candidate inputs X (B x d) and label parameters
//! (see [`matching::LabelModel`]) through [`matching::GradientMap`], whose derivative
//! is the gradient of the gradient (docs/DESIGN.md).

pub mod matching;
mod tv;

use faer::Mat;
use rand_distr::{Distribution, StandardNormal};

use crate::attack::exact::floor::direct_floor;
use crate::attack::observer::Progress;
use crate::attack::params::{AttackConfig, Method};
use crate::attack::prior::Prior;
use crate::attack::reconstruction::{BaselineDiagnostics, Reconstruction, Stage};
use crate::attack::subspace;
use crate::attack::verdict::{Candidate, Claim};
use crate::attack::view::ServerView;
use crate::model::{Gradient, Loss, Mlp};
use crate::rng::{Salt, salted};
use crate::{Dtype, Error, Result};
use matching::{GradientMap, LabelModel, combine, dot};

/// Curvature pairs L-BFGS keeps (PyTorch's default history size is 100; 20 suffices here).
pub const LBFGS_MEMORY: usize = 20;
/// DLG stops once ||G - G_obs||^2 / ||G_obs||^2 is at the f64 floor (relative residual 1e-14).
pub const DLG_F_TOL: f64 = 1e-28;
/// Adam step of IG in units of the prior's standard deviation (Geiping et al.: 0.1 on
/// standardised images).
pub const IG_STEP: f64 = 0.1;

/// What both baselines share: the model, the observed gradient, the label model, B.
struct Problem {
    model: Mlp<f64>,
    observed: Gradient<f64>,
    observed_norm: f64,
    labels: LabelModel,
    batch: usize,
    prior: Prior,
    rec: Reconstruction,
}

impl Problem {
    fn new(view: &ServerView, cfg: &AttackConfig, method: Method) -> Result<Self> {
        // Gradient matching needs only B: when it is given, a gradient the subspace stage
        // rejects (e.g. below its noise floor) is still matched.
        let (batch, mut rec) = match (subspace::estimate(view, &cfg.subspace_options()), cfg.batch)
        {
            (Ok(sub), _) => (sub.batch, Reconstruction::from_subspace(method, &sub)),
            (Err(e), Some(b)) if b >= 1 => {
                let mut rec = Reconstruction {
                    method,
                    batch_estimated: b,
                    samples: Vec::new(),
                    singular_values: Vec::new(),
                    rank_threshold: f64::NAN,
                    rank_rule: None,
                    notes: Vec::new(),
                    diagnostics: Default::default(),
                    certificate: None,
                };
                rec.notes.push(format!(
                    "subspace stage: {e}; matching with the given batch size {b}"
                ));
                (b, rec)
            }
            (Err(e), _) => return Err(e),
        };
        let model = view.model()?;
        let observed = view.gradient()?;
        let observed_norm = observed.norm();
        let loss = cfg.loss.unwrap_or(if model.output_dim() >= 2 {
            Loss::Ce
        } else {
            Loss::Mse
        });
        if cfg.loss.is_none() {
            rec.notes.push(format!(
                "the loss was not given: matched gradients of {loss}"
            ));
        }
        Ok(Problem {
            model,
            observed,
            observed_norm,
            labels: LabelModel::for_loss(loss),
            batch,
            prior: cfg.prior.unwrap_or_default(),
            rec,
        })
    }

    fn dims(&self) -> (usize, usize, usize) {
        (self.batch, self.model.input_dim(), self.model.output_dim())
    }

    /// Split a flat parameter vector into X (B x d) and Lambda (B x K).
    fn unpack(&self, theta: &[f64]) -> (Mat<f64>, Mat<f64>) {
        let (b, d, k) = self.dims();
        (
            Mat::from_fn(b, d, |i, j| theta[i * d + j]),
            Mat::from_fn(b, k, |i, j| theta[b * d + i * k + j]),
        )
    }

    fn pack(&self, ax: &Mat<f64>, al: &Mat<f64>) -> Vec<f64> {
        let (b, d, k) = self.dims();
        let mut v = Vec::with_capacity(b * (d + k));
        v.extend(
            (0..b)
                .flat_map(|i| (0..d).map(move |j| (i, j)))
                .map(|(i, j)| ax[(i, j)]),
        );
        v.extend(
            (0..b)
                .flat_map(|i| (0..k).map(move |j| (i, j)))
                .map(|(i, j)| al[(i, j)]),
        );
        v
    }

    /// A seeded random start: inputs from the prior (inside its box), label logits N(0, 1).
    fn start(&self, rng: &mut impl rand::Rng) -> Vec<f64> {
        let (b, d, k) = self.dims();
        let p = &self.prior;
        let mut v = Vec::with_capacity(b * (d + k));
        for _ in 0..b * d {
            let z: f64 = StandardNormal.sample(rng);
            v.push((p.mean + p.std * z).clamp(p.min, p.max));
        }
        for _ in 0..b * k {
            let z: f64 = StandardNormal.sample(rng);
            v.push(if self.labels == LabelModel::FreeBce {
                0.5 + 0.25 * z
            } else {
                z
            });
        }
        v
    }

    fn map(&self) -> GradientMap<'_> {
        GradientMap {
            model: &self.model,
            labels: self.labels,
        }
    }

    /// ||G - G_obs||^2 / ||G_obs||^2 and its gradient in theta.
    fn squared_distance(&self, theta: &[f64]) -> Result<(f64, Vec<f64>)> {
        let (x, lam) = self.unpack(theta);
        let (g, tape) = self.map().eval(&x, &lam)?;
        let s = 1.0 / (self.observed_norm * self.observed_norm).max(f64::MIN_POSITIVE);
        let mut diff = g;
        crate::model::ops::axpy(&mut diff, -1.0, &self.observed);
        let f = s * dot(&diff, &diff);
        crate::model::ops::for_each_layer_scale(&mut diff, 2.0 * s);
        let (ax, al) = self.map().vjp(&tape, &diff);
        Ok((f, self.pack(&ax, &al)))
    }

    /// 1 - cos(G, G_obs) and its gradient in theta.
    fn cosine_distance(&self, theta: &[f64]) -> Result<(f64, Vec<f64>)> {
        let (x, lam) = self.unpack(theta);
        let (g, tape) = self.map().eval(&x, &lam)?;
        let gn = g.norm().max(f64::MIN_POSITIVE);
        let on = self.observed_norm.max(f64::MIN_POSITIVE);
        let cos = dot(&g, &self.observed) / (gn * on);
        // d(1 - cos)/dG = -(G_obs / (|G| |G_obs|) - cos G / |G|^2)
        let adj = combine(-1.0 / (gn * on), &self.observed, cos / (gn * gn), &g);
        let (ax, al) = self.map().vjp(&tape, &adj);
        Ok((1.0 - cos, self.pack(&ax, &al)))
    }

    /// Relative residual ||G - G_obs|| / ||G_obs|| of a candidate.
    fn relative_residual(&self, theta: &[f64]) -> Result<f64> {
        let (x, lam) = self.unpack(theta);
        let (g, _) = self.map().eval(&x, &lam)?;
        let diff = combine(1.0, &g, -1.0, &self.observed);
        Ok(diff.norm() / self.observed_norm.max(f64::MIN_POSITIVE))
    }

    /// The samples of a final candidate.
    fn finish(mut self, theta: &[f64], stage: Stage, dtype: Dtype) -> Result<Reconstruction> {
        let (x, lam) = self.unpack(theta);
        let residual = self.relative_residual(theta)?;
        let (b, d, k) = self.dims();
        for i in 0..b {
            let label = (self.labels == LabelModel::SoftCe).then(|| {
                (0..k)
                    .max_by(|&a, &c| lam[(i, a)].total_cmp(&lam[(i, c)]))
                    .unwrap_or(0)
            });
            self.rec.samples.push(
                Candidate {
                    x: (0..d).map(|j| x[(i, j)]).collect(),
                    residual: Some(residual),
                    stage,
                    label,
                    output_residual: None,
                    claim: Claim::Residual {
                        residual,
                        floor: direct_floor(dtype),
                    },
                }
                .judge(),
            );
        }
        if let Some(b) = &mut self.rec.diagnostics.baseline {
            b.gradient_residual = residual;
        }
        Ok(self.rec)
    }
}

fn check_budget(iters: usize, restarts: usize) -> Result<()> {
    if iters == 0 || restarts == 0 {
        return Err(Error::Empty(
            "the baselines need at least one iteration and one start",
        ));
    }
    Ok(())
}

/// Deep Leakage from Gradients: minimise ||G(X, Lambda) - G_obs||^2 by L-BFGS from a
/// seeded random start (best of `restarts`).
pub fn dlg(view: &ServerView, cfg: &AttackConfig) -> Result<Reconstruction> {
    let o = &cfg.baseline;
    check_budget(o.dlg_iters, o.restarts)?;
    let mut prob = Problem::new(view, cfg, Method::Dlg)?;
    let mut rng = salted(cfg.seed, Salt::Dlg);
    let opts = crate::numerics::lbfgs::LbfgsOptions {
        max_iters: o.dlg_iters,
        memory: LBFGS_MEMORY,
        f_tol: DLG_F_TOL,
    };
    let progress = Progress::begin(
        cfg.observer.as_ref(),
        "dlg",
        (o.dlg_iters * o.restarts) as u64,
    );
    let stop = std::cell::Cell::new(false);
    let mut best: Option<crate::numerics::lbfgs::Minimum> = None;
    let (mut iters, mut evals) = (0, 0);
    for r in 0..o.restarts {
        let x0 = prob.start(&mut rng);
        // the observer's stop ends the minimisation at its next evaluation
        let m = crate::numerics::lbfgs::minimize(
            |t| {
                if stop.get() {
                    return Err(Error::Cancelled);
                }
                prob.squared_distance(t)
            },
            x0,
            &opts,
            |i, f| {
                let done = (r * o.dlg_iters + i) as u64;
                stop.set(progress.advance(done, Some(f)).is_err());
            },
        )?;
        iters += m.iters;
        evals += m.evals;
        if best.as_ref().is_none_or(|b| m.f < b.f) {
            best = Some(m);
        }
        if best.as_ref().is_some_and(|b| b.f <= DLG_F_TOL) || cfg.cancel.is_cancelled() {
            break;
        }
    }
    drop(progress);
    let best = best.ok_or_else(|| Error::Param {
        name: "restarts",
        reason: "must be at least 1".into(),
    })?;
    prob.rec.diagnostics.baseline = Some(BaselineDiagnostics {
        objective: best.f,
        iterations: iters,
        evaluations: Some(evals),
        gradient_residual: f64::NAN,
    });
    prob.finish(&best.x, Stage::Dlg, view.dtype)
}

/// Adam's moment decays (Kingma & Ba's defaults) and the denominator's floor.
const ADAM_BETA1: f64 = 0.9;
const ADAM_BETA2: f64 = 0.999;
const ADAM_EPS: f64 = 1e-8;

/// Inverting Gradients: minimise 1 - cos(G, G_obs) + tv_weight TV(X) by Adam with
/// Geiping et al.'s step decay (x0.1 at 3/8, 5/8, 7/8 of the budget), projecting the
/// inputs onto the prior's box after every step; best of `restarts`.
pub fn ig(view: &ServerView, cfg: &AttackConfig) -> Result<Reconstruction> {
    let o = &cfg.baseline;
    check_budget(o.ig_iters, o.ig_restarts)?;
    let mut prob = Problem::new(view, cfg, Method::Ig)?;
    let (b, d, _) = prob.dims();
    let image = o.image.filter(|s| s.len() == d);
    if image.is_none() {
        prob.rec
            .notes
            .push("inputs are not images: no total-variation prior".into());
    }
    let mut rng = salted(cfg.seed, Salt::Ig);
    let progress = Progress::begin(
        cfg.observer.as_ref(),
        "ig",
        (o.ig_iters * o.ig_restarts) as u64,
    );
    let p = prob.prior;
    let step_x = IG_STEP
        * if p.std > 0.0 && p.std.is_finite() {
            p.std
        } else {
            1.0
        };
    let mut best: Option<(f64, Vec<f64>)> = None;
    for r in 0..o.ig_restarts {
        let mut theta = prob.start(&mut rng);
        let (mut m, mut v) = (vec![0.0; theta.len()], vec![0.0; theta.len()]);
        let mut run_best: Option<(f64, Vec<f64>)> = None;
        for t in 1..=o.ig_iters {
            let (mut f, mut g) = prob.cosine_distance(&theta)?;
            if let Some(shape) = image {
                let (tvf, tvg) = tv::total_variation(&theta[..b * d], b, shape);
                f += o.tv_weight * tvf;
                g.iter_mut()
                    .zip(&tvg)
                    .for_each(|(gi, ti)| *gi += o.tv_weight * ti);
            }
            if run_best.as_ref().is_none_or(|(bf, _)| f < *bf) {
                run_best = Some((f, theta.clone()));
            }
            let frac = t as f64 / o.ig_iters as f64;
            let decay = [3.0 / 8.0, 5.0 / 8.0, 7.0 / 8.0]
                .iter()
                .filter(|&&c| frac > c)
                .fold(1.0, |a, _| a * 0.1);
            let (c1, c2) = (
                1.0 - ADAM_BETA1.powi(t as i32),
                1.0 - ADAM_BETA2.powi(t as i32),
            );
            for (i, gi) in g.iter().enumerate() {
                m[i] = ADAM_BETA1 * m[i] + (1.0 - ADAM_BETA1) * gi;
                v[i] = ADAM_BETA2 * v[i] + (1.0 - ADAM_BETA2) * gi * gi;
                let lr = decay * if i < b * d { step_x } else { IG_STEP };
                theta[i] -= lr * (m[i] / c1) / ((v[i] / c2).sqrt() + ADAM_EPS);
                if i < b * d {
                    theta[i] = theta[i].clamp(p.min, p.max);
                }
            }
            progress.advance((r * o.ig_iters + t) as u64, Some(f))?;
            if cfg.cancel.is_cancelled() {
                break;
            }
        }
        let rb = run_best.expect("at least one iteration");
        if best.as_ref().is_none_or(|(bf, _)| rb.0 < *bf) {
            best = Some(rb);
        }
    }
    drop(progress);
    let (f, theta) = best.ok_or_else(|| Error::Param {
        name: "restarts",
        reason: "must be at least 1".into(),
    })?;
    prob.rec.diagnostics.baseline = Some(BaselineDiagnostics {
        objective: f,
        iterations: o.ig_iters * o.ig_restarts,
        evaluations: None,
        gradient_residual: f64::NAN,
    });
    prob.finish(&theta, Stage::Ig, view.dtype)
}
