//! Output residuals and labels of recovered samples (docs/DESIGN.md, "Labels").
//!
//! The search finds each r_i up to scale. The scale and sign follow from (1) in the
//! projected form G~ V = sum_i alpha_i s^_i c_i^T, linear least squares in the B
//! scalars alpha_i. With the absolute r_i = dL/df(x_i):
//! * ce: B r_i = softmax(f(x_i)) - onehot(y_i): the label is the one negative entry;
//! * bce (K = 1): B r_i = sigmoid(f) - y: the label is 1 exactly when r_i < 0;
//! * mse: no label (r_i = 2 (f - y) / (BK) gives the target only with f).

use faer::linalg::solvers::Solve;
use faer::{Col, Mat, Side};

use super::signal::{Neurons, SignalModel};
use super::zero::Zero;
use crate::attack::subspace::Subspace;
use crate::model::Loss;

/// Cross-entropy residuals sum to zero; accept |sum| up to this share of sum |r|
/// when inferring the loss (f32 rounding leaves ~1e-6).
pub const CE_SUM_TOL: f64 = 1e-3;

/// Absolute output residuals r_i (K values each), in the order of `zeros`.
pub fn output_residuals(sub: &Subspace, model: &SignalModel, zeros: &[Zero]) -> Vec<Col<f64>> {
    let nz = zeros.len();
    if nz == 0 {
        return Vec::new();
    }
    let all = Neurons::all(&sub.q);
    let gv = sub.projected_gradient();
    let s: Vec<Col<f64>> = zeros
        .iter()
        .map(|z| model.signal_matrix(&z.c, &all.rows) * &z.r)
        .collect();
    let a = Mat::from_fn(nz, nz, |i, k| {
        (s[i].transpose() * &s[k]) * (zeros[i].c.transpose() * &zeros[k].c)
    });
    let rhs = Col::from_fn(nz, |i| s[i].transpose() * (&gv * &zeros[i].c));
    let alpha = match a.llt(Side::Lower) {
        Ok(ch) => ch.solve(&rhs),
        Err(_) => a.partial_piv_lu().solve(&rhs),
    };
    zeros
        .iter()
        .enumerate()
        .map(|(i, z)| &z.r * alpha[i])
        .collect()
}

/// The label rule of `loss` (or, without a known loss, cross-entropy when every
/// residual has its signature: entries summing to zero, exactly one negative).
pub fn assign(loss: Option<Loss>, residuals: &[Col<f64>], k: usize) -> Vec<Option<usize>> {
    let ce = |r: &Col<f64>| (0..r.nrows()).min_by(|&a, &b| r[a].total_cmp(&r[b]));
    match loss {
        Some(Loss::Ce) => residuals.iter().map(ce).collect(),
        Some(Loss::Bce) if k == 1 => residuals
            .iter()
            .map(|r| Some(usize::from(r[0] < 0.0)))
            .collect(),
        Some(_) => vec![None; residuals.len()],
        None => {
            let looks_ce = k >= 2
                && !residuals.is_empty()
                && residuals.iter().all(|r| {
                    let sum: f64 = r.iter().sum();
                    let l1: f64 = r.iter().map(|v| v.abs()).sum();
                    let neg = r.iter().filter(|&&v| v < 0.0).count();
                    l1 > 0.0 && sum.abs() <= CE_SUM_TOL * l1 && neg == 1
                });
            if looks_ce {
                residuals.iter().map(ce).collect()
            } else {
                vec![None; residuals.len()]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// softmax - onehot, scaled by 1/B: the rule returns the one-hot class, with the
    /// loss given and inferred.
    #[test]
    fn cross_entropy_rule_recovers_the_class() {
        let logits = [[0.3, -1.2, 2.0, 0.1], [1.5, 0.2, -0.3, 0.0]];
        let y = [2usize, 3];
        let rs: Vec<Col<f64>> = logits
            .iter()
            .zip(y)
            .map(|(l, y)| {
                let e: Vec<f64> = l.iter().map(|v: &f64| v.exp()).collect();
                let s: f64 = e.iter().sum();
                Col::from_fn(4, |k| (e[k] / s - f64::from(k == y)) / 2.0)
            })
            .collect();
        assert_eq!(assign(Some(Loss::Ce), &rs, 4), vec![Some(2), Some(3)]);
        assert_eq!(assign(None, &rs, 4), vec![Some(2), Some(3)]);
        // mse-like residuals (sum not zero) give no label without a loss
        let other = vec![Col::from_fn(4, |k| k as f64 - 1.0)];
        assert_eq!(assign(None, &other, 4), vec![None]);
    }

    #[test]
    fn binary_rule() {
        let rs = vec![Col::from_fn(1, |_| -0.2), Col::from_fn(1, |_| 0.3)];
        assert_eq!(assign(Some(Loss::Bce), &rs, 1), vec![Some(1), Some(0)]);
        assert_eq!(assign(Some(Loss::Mse), &rs, 1), vec![None, None]);
    }
}
