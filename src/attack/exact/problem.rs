//! One sample's least-squares problem in the span search: the span residual F as a
//! vector, with deflation of the zeros already found (docs/DESIGN.md, "Span search").

// `!(x > 0.0)` is deliberate throughout: it also rejects NaN.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

use faer::{Col, Mat};

use super::signal::{Neurons, SignalModel};
use super::zero::unpack;
use crate::numerics::lm::Problem;

/// One sample's problem: unknowns u = (t, r), residual P_perp s / ||s||, times the
/// deflation factor prod_i (1 + rho^2 / ||t - t_i||^2) of the zeros already found.
pub struct SpanProblem<'a> {
    pub model: &'a SignalModel,
    pub neurons: &'a Neurons,
    pub found: Vec<Col<f64>>,
    pub rho: f64,
    /// Plausible region: ||x - mean|| / sqrt(d) <= radius.
    pub bound: Option<(f64, f64)>,
    /// Orthonormal basis U_f (on `neurons`' rows) of the found samples' signals: the
    /// residual is then P_perp s / ||(I - U_f U_f^T) s||, which is zero at the missing
    /// samples only (docs/DESIGN.md, "Seeding by demixing": deflation in signal space).
    pub signals: Option<Mat<f64>>,
}

impl SpanProblem<'_> {
    /// (t, r) of the unknowns u.
    pub fn split(&self, u: &Col<f64>) -> (Col<f64>, Col<f64>) {
        unpack(self.model, u.as_ref())
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

    /// The part of s off the found signals (s itself without them).
    fn off_found(&self, s: &Col<f64>) -> Col<f64> {
        match &self.signals {
            None => s.clone(),
            Some(uf) => {
                let a = uf.transpose() * s;
                s - uf * &a
            }
        }
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
        let ns = self.off_found(&s).norm_l2();
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
        let p = self.off_found(&s);
        let ns = p.norm_l2();
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
        // d||p|| = p^T J / ||p|| (p is already off the found signals)
        let phat = &p * (1.0 / ns);
        let e0 = self.neurons.perp(&s) * (1.0 / ns);
        let sj = phat.transpose() * &js; // 1 x nu
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

#[cfg(test)]
mod tests {
    use super::super::testing::case;
    use super::super::zero::{best_residual, unpack};
    use super::*;
    use crate::attack::subspace;
    use crate::model::Activation;

    fn truth_u(model: &SignalModel, x: &Mat<f64>, i: usize, all: &Neurons) -> Col<f64> {
        let xi: Vec<f64> = (0..x.ncols()).map(|j| x[(i, j)]).collect();
        let c = model.coords.c_of_x(&xi);
        let (_, r) = best_residual(model, all, &c).unwrap();
        let t = model.coords.t_of_c(&c);
        let nb = model.dims();
        Col::from_fn(nb + model.k, |q| if q < nb { t[q] } else { r[q - nb] })
    }

    /// Orthonormal basis of sample i's true signal on all neurons.
    fn signal_basis(model: &SignalModel, x: &Mat<f64>, i: usize, all: &Neurons) -> Mat<f64> {
        let u = truth_u(model, x, i, all);
        let (t, r) = unpack(model, u.as_ref());
        let s = model.signal_matrix(&model.coords.c_of_t(&t), &all.rows) * &r;
        let ns = s.norm_l2();
        Mat::from_fn(s.nrows(), 1, |j, _| s[j] / ns)
    }

    /// The analytic Jacobian (with deflation in t and in signal space) against central
    /// differences: truncation O(h^2) ~ 1e-12 and rounding eps/h ~ 1e-10 relative to ||J||.
    #[test]
    fn span_jacobian_matches_finite_differences() {
        for (depth, with_signals) in [(1, false), (2, false), (1, true)] {
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
                signals: with_signals.then(|| signal_basis(&model, &x, 1, &all)),
            };
            let (_, j) = prob.jacobian(&u).unwrap();
            let h = 1e-6;
            let scale = j.norm_l2();
            let tol = 1e-7; // deeper nets: forward-mode derivative, as exact as the closed form
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

    /// Deflation in signal space: with sample 0's signal as found, F normalised by the
    /// part of s off it is still at the rounding floor at the missing samples, but has
    /// no zero at sample 0 itself: approaching it, P_perp s and (I - U_f U_f^T) s both
    /// shrink like the step (J dt), so their ratio stays O(1) while the plain F -> 0.
    /// (Deflation by a factor 1 + rho^2 / ||t - t_0||^2 in t instead leaves a ring of
    /// local minima at ||t - t_0|| ~ rho, which caught most seeds of the later rounds.)
    #[test]
    fn signal_deflation_removes_the_found_zero_only() {
        let (view, x, _) = case(Activation::Tanh, 1, 3, 7);
        let sub = subspace::estimate(&view, &Default::default()).unwrap();
        let model = SignalModel::new(&view, &sub).unwrap();
        let all = Neurons::all(&sub.q);
        let floor = super::super::floor::exact_floor(&view, &sub);
        let prob = SpanProblem {
            model: &model,
            neurons: &all,
            found: Vec::new(),
            rho: 0.0,
            bound: None,
            signals: Some(signal_basis(&model, &x, 0, &all)),
        };
        let deflated = |u: &Col<f64>| prob.residual(u).unwrap().norm_l2();
        for i in [1, 2] {
            let f = deflated(&truth_u(&model, &x, i, &all));
            assert!(
                f <= floor,
                "missing sample {i}: deflated F {f:e} > {floor:e}"
            );
        }
        let u0 = truth_u(&model, &x, 0, &all);
        for h in [1e-2, 1e-4, 1e-6] {
            let mut u = u0.clone();
            for q in 0..model.dims() {
                u[q] += h * ((q as f64) * 1.3 + 0.4).sin();
            }
            let plain = prob.span_residual(&u).unwrap();
            let f = deflated(&u);
            assert!(plain < 10.0 * h, "step {h:e}: plain F {plain:e}");
            assert!(f > 1e-2, "step {h:e}: deflated F {f:e} (plain {plain:e})");
        }
    }
}
