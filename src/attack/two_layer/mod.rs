//! Two-layer nets: the weighted gradient equations solved by alternating exact least
//! squares in the full input space (docs/DESIGN.md, "Defended gradients: maximum
//! likelihood").
//!
//! With Z = X W^T + 1 b^T, D = act'(Z), H = act(Z) (B x m) and the output layer (A, c),
//! the observed gradient is
//!
//! ```text
//! O_W = Delta^T X,  O_b = Delta^T 1,  O_A = R^T H,  O_c = R^T 1,   Delta = D o (R A)
//! ```
//!
//! plus known error. For fixed X every equation is linear in R (an R-step over all
//! four tensors, weighted by 1 / variance); for fixed Delta, O_W = Delta^T X is linear
//! in X (the X-step, in all d coordinates, not only the estimated row space). The truth
//! is a fixed point; under noise the fixed point is the least-squares fit of both
//! halves. Each step costs O(B m d + m (BK)^2).

// `!(x > 0.0)` is deliberate throughout: it also rejects NaN.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

use faer::linalg::solvers::Solve;
use faer::{Col, Mat};

use crate::attack::ServerView;
use crate::{Error, Result};

pub mod gauss_newton;

/// The two-layer problem.
pub struct TwoLayer {
    pub(super) act: crate::model::Activation,
    pub(super) w: Mat<f64>,
    pub(super) b: Col<f64>,
    pub(super) a: Mat<f64>,
    pub(super) ow: Mat<f64>,
    pub(super) ob: Col<f64>,
    pub(super) oa: Mat<f64>,
    pub(super) oc: Col<f64>,
    /// Weights 1/variance of (O_W, O_b, O_A, O_c).
    pub(super) weights: [f64; 4],
}

/// Outcome of the iteration.
#[derive(Clone, Debug)]
pub struct Fit {
    pub x: Mat<f64>,
    pub r: Mat<f64>,
    pub iterations: usize,
    /// Weighted squared residual per entry at the end.
    pub objective: f64,
}

impl TwoLayer {
    /// From the view (one hidden layer with a first-layer bias) and the per-layer
    /// (weight, bias) weights.
    pub fn new(view: &ServerView, weights: &[(f64, f64)]) -> Result<Self> {
        if view.depth() != 1 || weights.len() != 2 {
            return Err(Error::Needs {
                what: "the alternating fit",
                needs: "one hidden layer",
            });
        }
        let b = view.first.bias.clone().ok_or_else(|| Error::Needs {
            what: "the alternating fit",
            needs: "a first-layer bias",
        })?;
        let m = view.width();
        let k = view.outputs();
        Ok(TwoLayer {
            act: view.activation,
            w: view.first.weight.to_mat()?,
            b,
            a: view.upper[0].weight.clone(),
            ow: view.first.grad_weight.to_mat()?,
            ob: view
                .first
                .grad_bias
                .clone()
                .unwrap_or_else(|| Col::zeros(m)),
            oa: view.upper_grad[0].weight.clone(),
            oc: view.upper_grad[0]
                .bias
                .clone()
                .unwrap_or_else(|| Col::zeros(k)),
            weights: [weights[0].0, weights[0].1, weights[1].0, weights[1].1],
        })
    }

    pub(super) fn pre(&self, x: &Mat<f64>) -> Mat<f64> {
        let mut z = x * self.w.transpose();
        for j in 0..z.ncols() {
            for i in 0..z.nrows() {
                z[(i, j)] += self.b[j];
            }
        }
        z
    }

    /// The R-step: weighted least squares for R (B x K) at fixed X.
    pub(super) fn r_step(&self, x: &Mat<f64>, z: &Mat<f64>) -> Result<Mat<f64>> {
        let (bsz, m) = z.shape();
        let k = self.a.nrows();
        let [ww, wb, wa, wc] = self.weights;
        let d1 = Mat::from_fn(bsz, m, |i, j| self.act.d1(z[(i, j)]));
        let h = Mat::from_fn(bsz, m, |i, j| self.act.eval(z[(i, j)]));
        // a_(i,k) = d1_i o A_k as the columns of an m x BK matrix
        let acat = Mat::from_fn(m, bsz * k, |j, c| d1[(c / k, j)] * self.a[(c % k, j)]);
        let ga = acat.transpose() * &acat;
        let xx = x * x.transpose();
        let hh = &h * h.transpose();
        let n = bsz * k;
        let nm = Mat::from_fn(n, n, |p, q| {
            let (i, kk) = (p / k, p % k);
            let (i2, k2) = (q / k, q % k);
            let same = f64::from(kk == k2);
            ww * ga[(p, q)] * (xx[(i, i2)] + 0.0)
                + wb * ga[(p, q)]
                + wa * same * hh[(i, i2)]
                + wc * same
        });
        // right-hand side
        let owx = &self.ow * x.transpose(); // m x B
        let oah = &self.oa * h.transpose(); // K x B
        let rhs = Col::from_fn(n, |p| {
            let (i, kk) = (p / k, p % k);
            let mut s = 0.0;
            for j in 0..m {
                s += acat[(j, p)] * (ww * owx[(j, i)] + wb * self.ob[j]);
            }
            s + wa * oah[(kk, i)] + wc * self.oc[kk]
        });
        // the bias coordinate's 1 in x~ . x~' : (x . x' + 1) for the weight part is
        // split as ww (x . x') + wb (1), matching O_W and O_b
        let sol = nm.partial_piv_lu().solve(&rhs);
        if !sol.norm_l2().is_finite() {
            return Err(Error::Numerical(
                "the R-step's normal equations are singular".into(),
            ));
        }
        Ok(Mat::from_fn(bsz, k, |i, kk| sol[i * k + kk]))
    }

    /// Delta = act'(Z) o (R A), B x m.
    fn delta(&self, z: &Mat<f64>, r: &Mat<f64>) -> Mat<f64> {
        let ra = r * &self.a;
        Mat::from_fn(z.nrows(), z.ncols(), |i, j| {
            self.act.d1(z[(i, j)]) * ra[(i, j)]
        })
    }

    /// The X-step: least squares O_W = Delta^T X at fixed Delta.
    fn x_step(&self, delta: &Mat<f64>) -> Result<Mat<f64>> {
        let g = delta * delta.transpose();
        let rhs = delta * &self.ow;
        let x = g.partial_piv_lu().solve(&rhs);
        if !x.norm_l2().is_finite() {
            return Err(Error::Numerical(
                "the X-step's normal equations are singular".into(),
            ));
        }
        Ok(x)
    }

    /// Weighted squared residual per entry.
    pub fn objective(&self, x: &Mat<f64>, r: &Mat<f64>) -> f64 {
        let z = self.pre(x);
        let delta = self.delta(&z, r);
        let h = Mat::from_fn(z.nrows(), z.ncols(), |i, j| self.act.eval(z[(i, j)]));
        let [ww, wb, wa, wc] = self.weights;
        let ew = (&self.ow - delta.transpose() * x).squared_norm_l2();
        let ones = Col::from_fn(delta.nrows(), |_| 1.0);
        let eb = (&self.ob - delta.transpose() * &ones).squared_norm_l2();
        let ea = (&self.oa - r.transpose() * &h).squared_norm_l2();
        let ec = (&self.oc - r.transpose() * &ones).squared_norm_l2();
        let entries = (self.ow.nrows() * (self.ow.ncols() + 1)
            + self.oa.nrows() * (self.oa.ncols() + 1)) as f64;
        (ww * ew + wb * eb + wa * ea + wc * ec) / entries
    }

    /// Alternate R- and X-steps from `x0` until X moves by less than `tol` (relative)
    /// or `iterations` are spent; the best objective seen is kept.
    pub fn fit(&self, x0: &Mat<f64>, iterations: usize, tol: f64) -> Result<Fit> {
        let mut x = x0.clone();
        let mut r = self.r_step(&x, &self.pre(&x))?;
        let mut best = (self.objective(&x, &r), x.clone(), r.clone());
        let mut it = 0;
        while it < iterations {
            it += 1;
            let z = self.pre(&x);
            let xn = self.x_step(&self.delta(&z, &r))?;
            let moved = (&xn - &x).norm_l2() / x.norm_l2().max(f64::MIN_POSITIVE);
            x = xn;
            r = self.r_step(&x, &self.pre(&x))?;
            let f = self.objective(&x, &r);
            if f < best.0 {
                best = (f, x.clone(), r.clone());
            }
            if moved <= tol {
                break;
            }
        }
        Ok(Fit {
            x: best.1,
            r: best.2,
            iterations: it,
            objective: best.0,
        })
    }
}

impl TwoLayer {
    /// Starting inputs for `q` samples the exact route did not find: the residual
    /// gradient O~ - sum_found delta_i x~_i^T has rank q; its rows divided by their bias
    /// entry are affine combinations of the missing inputs, each dominated by one
    /// sample on many neurons. For q = 1 its top right singular vector is the input.
    pub fn fill_missing(&self, x: &Mat<f64>, r: &Mat<f64>, q: usize, seed: u64) -> Vec<Vec<f64>> {
        use rand::SeedableRng;
        use rand_distr::{Distribution, StandardNormal};
        let (m, d) = self.ow.shape();
        let n = d + 1;
        let (rw, rb) = if x.nrows() == 0 {
            (self.ow.clone(), self.ob.clone())
        } else {
            let delta = self.delta(&self.pre(x), r);
            let ones = Col::from_fn(x.nrows(), |_| 1.0);
            (
                &self.ow - delta.transpose() * x,
                &self.ob - delta.transpose() * &ones,
            )
        };
        let res = Mat::from_fn(m, n, |j, k| if k < d { rw[(j, k)] } else { rb[j] });
        // randomized range finder for the top q right singular vectors
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x0f11_1a55);
        let p = (q + 6).min(n);
        let omega = Mat::<f64>::from_fn(n, p, |_, _| StandardNormal.sample(&mut rng));
        let mut y = &res * &omega;
        for _ in 0..2 {
            let qy = y.qr().compute_thin_Q();
            let z = res.transpose() * &qy;
            let qz = z.qr().compute_thin_Q();
            y = &res * &qz;
        }
        let qy = y.qr().compute_thin_Q();
        let bt = res.transpose() * &qy; // n x p
        let Ok(svd) = bt.thin_svd() else {
            return Vec::new();
        };
        let v = svd.U().subcols(0, q.min(p)).to_owned(); // n x q
        let to_x = |xt: Col<f64>| -> Option<Vec<f64>> {
            let last = xt[d];
            (last.abs() > 1e-12 * xt.norm_l2()).then(|| (0..d).map(|k| xt[k] / last).collect())
        };
        if q == 1 {
            return to_x(v.col(0).to_owned()).into_iter().collect();
        }
        let rv = &res * &v; // m x q: row j's coordinates in the top-q row space
        let mut rows: Vec<(f64, usize)> = (0..m)
            .map(|j| {
                let xt = &v * rv.row(j).transpose();
                (xt[d].abs() / xt.norm_l2().max(f64::MIN_POSITIVE), j)
            })
            .collect();
        rows.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut out: Vec<Vec<f64>> = Vec::new();
        for (_, j) in rows {
            if out.len() == q {
                break;
            }
            let xt = &v * rv.row(j).transpose();
            if let Some(xc) = to_x(xt) {
                let far = out.iter().all(|o| {
                    let num: f64 = o.iter().zip(&xc).map(|(a, b)| (a - b).powi(2)).sum();
                    let den: f64 = o.iter().map(|a| a * a).sum();
                    num > 0.01 * den
                });
                if far {
                    out.push(xc);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attack::defended::likelihood::ErrorModel;
    use crate::attack::{AttackConfig, Method};
    use crate::defense::Defense;
    use crate::simulate::{self, SimConfig};

    /// Under known noise the truth scores about 1 per entry, and the alternating fit
    /// started at the truth stays within the noise's reach of it.
    #[test]
    fn fit_from_the_truth_stays_at_the_noise_level() {
        let cfg = SimConfig {
            batch: 4,
            width: 1024,
            init: crate::model::Init::TorchDefault,
            defenses: vec![Defense::NoiseRel(1e-3)],
            attack: AttackConfig::new(Method::Dlg, 1),
            ..SimConfig::default()
        };
        let mut cfg = cfg;
        cfg.attack.baseline.dlg_iters = 1;
        cfg.attack.baseline.restarts = 1;
        let out = simulate::run(&cfg).unwrap();
        let mut view =
            crate::attack::ServerView::from_memory(&out.model, &out.gradient, crate::Dtype::F64)
                .unwrap();
        view.noise_std = out.report.defense.as_ref().unwrap().noise_std;
        view.defenses = cfg.defenses.clone();
        let errors = ErrorModel::of(&view, &out.gradient).unwrap();
        let tl = TwoLayer::new(&view, &errors.weights()).unwrap();
        let x = out.batch.x.clone();
        let r0 = tl.r_step(&x, &tl.pre(&x)).unwrap();
        let f_truth = tl.objective(&x, &r0);
        let fit = tl.fit(&x, 50, 1e-14).unwrap();
        let err = (&fit.x - &x).norm_l2() / x.norm_l2();
        eprintln!(
            "truth {f_truth} fit {} after {} error {err:e}",
            fit.objective, fit.iterations
        );
        assert!(f_truth < 1.2 && fit.objective <= f_truth && err < 1e-2);
    }
}
