//! `--method refine`: Levenberg-Marquardt on the projected gradient equations (3)
//! of docs/DESIGN.md for all samples at once, with free output residuals R
//! (docs/DESIGN.md, "Refinement"):
//!
//! ```text
//! G~ V = sum_i s(c_i, r_i) c_i^T   on a subsample of neurons,
//! ```
//!
//! unknowns t_i (c_i = c0 + N t_i) and r_i (absolute: the scale is fixed by G~).
//! Starts: the tensor method's estimates when it returns any, otherwise the span
//! search's zeros. Each result is then checked on every neuron with the span residual.

use faer::{Col, Mat};

use super::context::Context;
use super::floor::exact_floor;
use super::labels;
use super::problem::SpanProblem;
use super::route::{record, to_samples};
use super::search;
use super::signal::{Neurons, SignalModel};
use super::subsample::{self, Subsample};
use super::zero::{Zero, best_residual, pack, unpack};
use crate::Result;
use crate::attack::moment as tensor;
use crate::attack::params::{AttackConfig, Method, RefineOptions};
use crate::attack::reconstruction::{Reconstruction, Stage};
use crate::attack::subspace::{self, Subspace};
use crate::attack::view::ServerView;
use crate::numerics::lm::{self, LmOptions, Problem};
use crate::rng::{Salt, salted};

/// Neurons per unknown of one sample: each neuron gives B equations, so this many
/// makes the joint system NEURONS_PER_UNKNOWN times overdetermined.
pub const NEURONS_PER_UNKNOWN: usize = 8;
pub const MIN_NEURONS: usize = 256;
/// Largest joint system solved densely (B (B - 1 + K) unknowns); beyond it each
/// sample is refined on its own span residual.
pub const MAX_JOINT_UNKNOWNS: usize = 1500;
pub const JOINT_ITERATIONS: usize = 50;

/// The joint problem on `rows`.
pub struct JointProblem<'a> {
    pub model: &'a SignalModel,
    pub rows: Vec<usize>,
    /// Rows of G~ V on `rows`, n x B, divided by `scale`.
    pub target: Mat<f64>,
    pub scale: f64,
}

impl JointProblem<'_> {
    fn unpack(&self, u: &Col<f64>) -> (Vec<Col<f64>>, Vec<Col<f64>>) {
        let (b, nb, k) = (self.model.batch(), self.model.dims(), self.model.k);
        let per = nb + k;
        (0..b)
            .map(|i| {
                let (t, r) = unpack(self.model, u.subrows(i * per, per));
                (self.model.coords.c_of_t(&t), r * self.scale)
            })
            .unzip()
    }

    /// Pack samples (c_i, absolute r_i) into unknowns.
    pub fn pack(&self, c: &[Col<f64>], r: &[Col<f64>]) -> Col<f64> {
        let per = self.model.dims() + self.model.k;
        let mut u = Col::zeros(c.len() * per);
        for (i, (c, r)) in c.iter().zip(r).enumerate() {
            let r = Col::from_fn(r.nrows(), |j| r[j] / self.scale);
            let ui = pack(self.model, c, &r);
            u.subrows_mut(i * per, per).copy_from(&ui);
        }
        u
    }
}

impl Problem for JointProblem<'_> {
    fn residual(&self, u: &Col<f64>) -> Option<Col<f64>> {
        let (c, r) = self.unpack(u);
        let b = self.model.batch();
        let mut e = self.target.clone();
        for i in 0..b {
            let s = self.model.signal_matrix(&c[i], &self.rows) * &r[i];
            e -= &s * c[i].transpose() * (1.0 / self.scale);
        }
        let n = self.rows.len();
        let out = Col::from_fn(n * b, |idx| e[(idx % n, idx / n)]);
        let finite = out.iter().all(|v| v.is_finite());
        finite.then_some(out)
    }

    fn jacobian(&self, u: &Col<f64>) -> Option<(Col<f64>, Mat<f64>)> {
        let e = self.residual(u)?;
        let (c, r) = self.unpack(u);
        let (b, nb, k) = (self.model.batch(), self.model.dims(), self.model.k);
        let n = self.rows.len();
        let per = nb + k;
        let mut j = Mat::zeros(n * b, b * per);
        for i in 0..b {
            let (s, dt, m) = self.model.signal_and_dt(&c[i], &r[i], &self.rows);
            // e = target - sum_i s_i c_i^T / scale; column (row a, coordinate q) -> a + q n
            for kk in 0..nb {
                let nk = self.model.coords.n.col(kk);
                for q in 0..b {
                    for a in 0..n {
                        j[(a + q * n, i * per + kk)] =
                            -(dt[(a, kk)] * c[i][q] + s[a] * nk[q]) / self.scale;
                    }
                }
            }
            for kk in 0..k {
                for q in 0..b {
                    for a in 0..n {
                        // r is stored divided by scale
                        j[(a + q * n, i * per + nb + kk)] = -m[(a, kk)] * c[i][q];
                    }
                }
            }
        }
        Some((e, j))
    }
}

/// Refine `starts` (coordinates c_i with unit-direction r_i) jointly, then check
/// each on every neuron. Returns the zeros that are exact, plus all with their residual.
pub fn polish(
    view: &ServerView,
    sub: &Subspace,
    model: &SignalModel,
    starts: &[Zero],
    opts: &RefineOptions,
    seed: u64,
) -> Vec<Zero> {
    let (m, b, k) = (model.width(), model.batch(), model.k);
    let floor = exact_floor(view, sub);
    let all = Neurons::all(&sub.q);
    // every candidate is judged (and per-sample refined) on all neurons, undeflated
    let full = SpanProblem {
        model,
        neurons: &all,
        found: Vec::new(),
        rho: 1.0,
        bound: None,
        signals: None,
    };
    let check = |c: &Col<f64>, r: &Col<f64>| -> Zero {
        let f = full
            .span_residual(&pack(model, c, r))
            .unwrap_or(f64::INFINITY);
        let nr = r.norm_l2().max(f64::MIN_POSITIVE);
        Zero {
            c: c.clone(),
            r: r * (1.0 / nr),
            residual: f,
            accepted: f <= floor,
        }
    };
    if starts.len() != b || b * (b - 1 + k) > MAX_JOINT_UNKNOWNS {
        // per-sample refinement on the span residual
        return starts
            .iter()
            .map(|z| {
                let u0 = pack(model, &z.c, &z.r);
                let opts = LmOptions {
                    max_iterations: JOINT_ITERATIONS,
                    target: 0.0,
                    stall: 1e-3,
                };
                let u = lm::solve(&full, u0.clone(), &opts).map_or(u0, |r| r.u);
                let (t, r) = unpack(model, u.as_ref());
                check(&model.coords.c_of_t(&t), &r)
            })
            .collect();
    }
    let order = Subsample::new(m, &mut salted(seed, Salt::RefineNeurons));
    let n = subsample::size(opts.neurons, NEURONS_PER_UNKNOWN, MIN_NEURONS, b - 1 + k, m);
    let rows = order.first(n);
    let target = Mat::from_fn(n, b, |a, q| sub.q[(rows[a], q)] * sub.singular_values[q]);
    let scale = target.norm_l2().max(f64::MIN_POSITIVE);
    let target = target * (1.0 / scale);
    let prob = JointProblem {
        model,
        rows,
        target,
        scale,
    };
    let r_abs = labels::output_residuals(sub, model, starts);
    let c: Vec<Col<f64>> = starts.iter().map(|z| z.c.clone()).collect();
    let u0 = prob.pack(&c, &r_abs);
    let opts = LmOptions {
        max_iterations: JOINT_ITERATIONS,
        target: 0.0,
        stall: 1e-6,
    };
    let u = lm::solve(&prob, u0.clone(), &opts).map_or(u0, |r| r.u);
    let (c, r) = prob.unpack(&u);
    c.iter().zip(&r).map(|(c, r)| check(c, r)).collect()
}

pub fn attack(view: &ServerView, cfg: &AttackConfig) -> Result<Reconstruction> {
    let sub = subspace::estimate(view, &cfg.subspace_options())?;
    let mut rec = Reconstruction::from_subspace(Method::Refine, &sub);
    let ctx = Context::new(view, &sub, cfg.seed)?;
    let model = &ctx.model;
    let all = Neurons::all(&sub.q);
    // starts: the tensor method's estimates, else the span search's zeros
    let tensor_starts: Vec<Zero> = tensor::attack_on(view, cfg, &sub)
        .map(|t| {
            t.samples
                .iter()
                .filter_map(|s| {
                    let c = model.coords.c_of_x(&s.x);
                    best_residual(model, &all, &c).map(|(f, r)| Zero {
                        c,
                        r,
                        residual: f,
                        accepted: false,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let (starts, origin) = if tensor_starts.len() == sub.batch {
        (tensor_starts, "tensor")
    } else {
        let (z, stats) = search::search_in(&ctx, cfg, &[], Vec::new(), cfg.search.seconds)?;
        record(&mut rec, &stats, z.len());
        (z, "span")
    };
    rec.notes.push(format!(
        "refine started from {} {origin} estimates",
        starts.len()
    ));
    let zeros: Vec<Zero> = polish(view, &sub, model, &starts, &cfg.refine, cfg.seed)
        .into_iter()
        .filter(|z| z.accepted)
        .collect();
    rec.samples = to_samples(view, &sub, model, &zeros, cfg, Stage::Refine);
    let cert = super::certificate::certify_with(
        view,
        &sub,
        model,
        &ctx.scale,
        &rec.samples,
        &[],
        cfg.loss,
    )?;
    crate::attack::verdict::certify(&mut rec, cert);
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Dtype;
    use crate::model::{Activation, Init, InitConfig, Loss, Targets};
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};

    /// The joint Jacobian against central differences (truncation h^2, rounding eps/h).
    #[test]
    fn joint_jacobian_matches_finite_differences() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let (d, m, b, k) = (5, 200, 3, 2);
        let model = InitConfig {
            input_dim: d,
            width: m,
            hidden: 8,
            depth: 1,
            outputs: k,
            init: Init::TorchDefault,
            activation: Activation::Tanh,
            prior_mean: 0.0,
            prior_sq_norm: d as f64,
            prior_centred_sq_norm: d as f64,
        }
        .build(&mut rng)
        .unwrap();
        let x = faer::Mat::from_fn(b, d, |_, _| StandardNormal.sample(&mut rng));
        let g = model
            .gradient(x.as_ref(), &Targets::Classes(vec![0, 1, 0]), Loss::Ce)
            .unwrap();
        let view = ServerView::from_memory(&model, &g, Dtype::F64).unwrap();
        let sub = subspace::estimate(&view, &Default::default()).unwrap();
        let sm = SignalModel::new(&view, &sub).unwrap();
        let rows: Vec<usize> = (0..50).collect();
        let target = Mat::from_fn(50, b, |a, q| sub.q[(a, q)] * sub.singular_values[q]);
        let prob = JointProblem {
            model: &sm,
            rows,
            target,
            scale: 0.7,
        };
        let u = Col::from_fn(b * (b - 1 + k), |q| 0.3 * ((q as f64) * 0.9).sin());
        let (_, j) = prob.jacobian(&u).unwrap();
        let h = 1e-6;
        for q in 0..u.nrows() {
            let mut p = u.clone();
            p[q] += h;
            let mut mm = u.clone();
            mm[q] -= h;
            let fd = (prob.residual(&p).unwrap() - prob.residual(&mm).unwrap()) * (0.5 / h);
            let err = (&fd - j.col(q)).norm_l2();
            assert!(err <= 1e-7 * j.norm_l2(), "column {q}: {err:e}");
        }
    }
}
