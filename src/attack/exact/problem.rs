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
        let ns = s.norm_l2();
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
        let ns = s.norm_l2();
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
        let shat = &s * (1.0 / ns);
        let e0 = self.neurons.perp(&shat);
        let sj = shat.transpose() * &js; // 1 x nu
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
    use super::super::zero::best_residual;
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

    /// The analytic Jacobian (with deflation) against central differences:
    /// truncation O(h^2) ~ 1e-12 and rounding eps/h ~ 1e-10 relative to ||J||.
    #[test]
    fn span_jacobian_matches_finite_differences() {
        for depth in [1, 2] {
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
            };
            let (_, j) = prob.jacobian(&u).unwrap();
            let h = 1e-6;
            let scale = j.norm_l2();
            let tol = if depth == 1 { 1e-7 } else { 1e-5 }; // deeper nets: FD inside the model
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
}
