//! The gradient a candidate batch would produce, and the derivative of that gradient
//! with respect to the candidate inputs and label parameters: a vector-Jacobian
//! product through the backward pass (reverse over reverse), written out in
//! docs/DESIGN.md, "Gradient of the gradient".

use faer::{Col, Mat, MatRef};

use crate::model::{Dense, Forward, Gradient, Loss, Mlp};
use crate::{Error, Result};

/// How the candidate's label parameters Lambda (B x K) give the output residual r.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LabelModel {
    /// Cross-entropy against soft labels softmax(Lambda_i): r_i = (softmax(f_i) - softmax(Lambda_i)) / B.
    SoftCe,
    /// Mean squared error against free targets: r = 2 (f - Lambda) / (B K).
    FreeMse,
    /// Binary cross-entropy against free targets: r = (sigmoid(f) - Lambda) / (B K).
    FreeBce,
    /// The output residual itself: r = Lambda (no loss needed; the refinement of
    /// `attack::defended::likelihood`).
    Free,
}

impl LabelModel {
    pub fn for_loss(loss: Loss) -> Self {
        match loss {
            Loss::Ce => LabelModel::SoftCe,
            Loss::Mse => LabelModel::FreeMse,
            Loss::Bce => LabelModel::FreeBce,
        }
    }
}

fn softmax(row: impl Iterator<Item = f64> + Clone) -> Vec<f64> {
    let mx = row.clone().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = row.map(|v| (v - mx).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

fn sigmoid(z: f64) -> f64 {
    crate::model::Activation::Sigmoid.eval(z)
}

/// J_softmax(p) v = p * (v - <p, v>), row by row.
fn softmax_jvp(p: &[f64], v: &[f64]) -> Vec<f64> {
    let pv: f64 = p.iter().zip(v).map(|(a, b)| a * b).sum();
    p.iter().zip(v).map(|(a, b)| a * (b - pv)).collect()
}

/// Everything the VJP needs from one evaluation.
pub struct Tape {
    x: Mat<f64>,
    labels: Mat<f64>,
    fw: Forward<f64>,
    /// dL/dz of every layer (B x out).
    deltas: Vec<Mat<f64>>,
}

/// The map (X, Lambda) -> gradient of the model at that candidate batch.
pub struct GradientMap<'a> {
    pub model: &'a Mlp<f64>,
    pub labels: LabelModel,
}

impl GradientMap<'_> {
    /// Output residual r (B x K) of outputs `f` and label parameters `lam`.
    fn residual(&self, f: MatRef<'_, f64>, lam: MatRef<'_, f64>) -> Mat<f64> {
        let (b, k) = f.shape();
        match self.labels {
            LabelModel::SoftCe => {
                let mut r = Mat::zeros(b, k);
                for i in 0..b {
                    let p = softmax((0..k).map(|j| f[(i, j)]));
                    let q = softmax((0..k).map(|j| lam[(i, j)]));
                    for j in 0..k {
                        r[(i, j)] = (p[j] - q[j]) / b as f64;
                    }
                }
                r
            }
            LabelModel::FreeMse => Mat::from_fn(b, k, |i, j| {
                2.0 * (f[(i, j)] - lam[(i, j)]) / (b * k) as f64
            }),
            LabelModel::FreeBce => Mat::from_fn(b, k, |i, j| {
                (sigmoid(f[(i, j)]) - lam[(i, j)]) / (b * k) as f64
            }),
            LabelModel::Free => lam.to_owned(),
        }
    }

    /// (adj f, adj Lambda) from adj r.
    fn residual_vjp(&self, tape: &Tape, adj_r: &Mat<f64>) -> (Mat<f64>, Mat<f64>) {
        let f = tape.fw.output();
        let lam = &tape.labels;
        let (b, k) = f.shape();
        match self.labels {
            LabelModel::SoftCe => {
                let (mut af, mut al) = (Mat::zeros(b, k), Mat::zeros(b, k));
                for i in 0..b {
                    let v: Vec<f64> = (0..k).map(|j| adj_r[(i, j)] / b as f64).collect();
                    let jp = softmax_jvp(&softmax((0..k).map(|j| f[(i, j)])), &v);
                    let jq = softmax_jvp(&softmax((0..k).map(|j| lam[(i, j)])), &v);
                    for j in 0..k {
                        af[(i, j)] = jp[j];
                        al[(i, j)] = -jq[j];
                    }
                }
                (af, al)
            }
            LabelModel::FreeMse => {
                let c = 2.0 / (b * k) as f64;
                (
                    Mat::from_fn(b, k, |i, j| c * adj_r[(i, j)]),
                    Mat::from_fn(b, k, |i, j| -c * adj_r[(i, j)]),
                )
            }
            LabelModel::FreeBce => {
                let c = 1.0 / (b * k) as f64;
                (
                    Mat::from_fn(b, k, |i, j| {
                        let s = sigmoid(f[(i, j)]);
                        c * s * (1.0 - s) * adj_r[(i, j)]
                    }),
                    Mat::from_fn(b, k, |i, j| -c * adj_r[(i, j)]),
                )
            }
            LabelModel::Free => (Mat::zeros(b, k), adj_r.clone()),
        }
    }

    /// The gradient at candidate inputs `x` (B x d) and label parameters `labels` (B x K).
    pub fn eval(&self, x: &Mat<f64>, labels: &Mat<f64>) -> Result<(Gradient<f64>, Tape)> {
        if labels.shape() != (x.nrows(), self.model.output_dim()) {
            return Err(Error::Shape(format!(
                "label parameters are {} x {}, expected {} x {}",
                labels.nrows(),
                labels.ncols(),
                x.nrows(),
                self.model.output_dim()
            )));
        }
        let fw = self.model.forward(x.as_ref())?;
        let r = self.residual(fw.output().as_ref(), labels.as_ref());
        let bw = self.model.backward(x.as_ref(), &fw, r.as_ref())?;
        let tape = Tape {
            x: x.clone(),
            labels: labels.clone(),
            fw,
            deltas: bw.deltas,
        };
        Ok((bw.gradient, tape))
    }

    /// Vector-Jacobian product: given adj = dPhi/dG for a scalar Phi of the gradient,
    /// return (dPhi/dX, dPhi/dLambda) at the taped candidate.
    pub fn vjp(&self, tape: &Tape, adj: &Gradient<f64>) -> (Mat<f64>, Mat<f64>) {
        let layers = &self.model.layers;
        let n = layers.len();
        let act = self.model.activation;
        let fw = &tape.fw;
        let input = |l: usize| {
            if l == 0 {
                tape.x.as_ref()
            } else {
                fw.post[l - 1].as_ref()
            }
        };
        let b = tape.x.nrows();
        // 1. adjoints of delta_l and of the layer inputs a_l from G_l = (delta_l^T a_l, delta_l^T 1)
        let mut adj_delta: Vec<Mat<f64>> = Vec::with_capacity(n);
        let mut adj_a: Vec<Mat<f64>> = Vec::with_capacity(n);
        for l in 0..n {
            let Dense {
                weight: aw,
                bias: ab,
            } = &adj.layers[l];
            let mut ad = input(l) * aw.transpose();
            if let Some(ab) = ab {
                for j in 0..ad.ncols() {
                    for i in 0..b {
                        ad[(i, j)] += ab[j];
                    }
                }
            }
            adj_a.push(&tape.deltas[l] * aw);
            adj_delta.push(ad);
        }
        // 2. up the backward pass: delta_l = (delta_{l+1} W_{l+1}) * act'(z_l)
        let mut adj_z: Vec<Mat<f64>> = fw
            .pre
            .iter()
            .map(|z| Mat::zeros(z.nrows(), z.ncols()))
            .collect();
        for l in 0..n - 1 {
            let z = &fw.pre[l];
            let e = &tape.deltas[l + 1] * &layers[l + 1].weight;
            let ad = &adj_delta[l];
            let adj_e = Mat::from_fn(b, z.ncols(), |i, j| ad[(i, j)] * act.d1(z[(i, j)]));
            adj_z[l] += Mat::from_fn(b, z.ncols(), |i, j| {
                ad[(i, j)] * e[(i, j)] * act.d2(z[(i, j)])
            });
            adj_delta[l + 1] += &adj_e * layers[l + 1].weight.transpose();
        }
        // 3. the residual map
        let (adj_f, adj_labels) = self.residual_vjp(tape, &adj_delta[n - 1]);
        adj_z[n - 1] += &adj_f;
        // 4. down the forward pass: z_l = a_l W_l^T + b_l, a_{l+1} = act(z_l)
        for l in (0..n).rev() {
            let az = &adj_z[l] * &layers[l].weight;
            adj_a[l] += &az;
            if l > 0 {
                let z = &fw.pre[l - 1];
                let aa = &adj_a[l];
                let add = Mat::from_fn(b, z.ncols(), |i, j| aa[(i, j)] * act.d1(z[(i, j)]));
                adj_z[l - 1] += &add;
            }
        }
        (adj_a.swap_remove(0), adj_labels)
    }
}

/// <a, b> over every parameter.
pub fn dot(a: &Gradient<f64>, b: &Gradient<f64>) -> f64 {
    let mut s = 0.0;
    for (x, y) in a.layers.iter().zip(&b.layers) {
        let (r, c) = x.weight.shape();
        for j in 0..c {
            for i in 0..r {
                s += x.weight[(i, j)] * y.weight[(i, j)];
            }
        }
        if let (Some(u), Some(v)) = (&x.bias, &y.bias) {
            s += u.iter().zip(v.iter()).map(|(p, q)| p * q).sum::<f64>();
        }
    }
    s
}

/// alpha a + beta b, over every parameter.
pub fn combine(alpha: f64, a: &Gradient<f64>, beta: f64, b: &Gradient<f64>) -> Gradient<f64> {
    Gradient {
        layers: a
            .layers
            .iter()
            .zip(&b.layers)
            .map(|(x, y)| Dense {
                weight: faer::Scale(alpha) * &x.weight + faer::Scale(beta) * &y.weight,
                bias: match (&x.bias, &y.bias) {
                    (Some(u), Some(v)) => {
                        Some(Col::from_fn(u.nrows(), |i| alpha * u[i] + beta * v[i]))
                    }
                    _ => None,
                },
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Activation;

    fn model(act: Activation, depth: usize, k: usize) -> Mlp<f64> {
        crate::model::init::tiny_model(act, depth, k, 11)
    }

    /// d/dt <A, G(X + t dX, Lambda + t dL)> at t = 0 by central differences against
    /// <vjp(A), (dX, dL)>. The step h = 1e-5 gives truncation O(h^2) ~ 1e-10 and roundoff
    /// ~ eps |<A, G>| / h ~ 1e-11 relative: 1e-6 relative only breaks on a wrong term.
    #[test]
    fn vjp_matches_finite_differences() {
        for act in [Activation::Tanh, Activation::Gelu, Activation::Sigmoid] {
            for (labels, k) in [
                (LabelModel::SoftCe, 4),
                (LabelModel::FreeMse, 2),
                (LabelModel::FreeBce, 3),
                (LabelModel::Free, 2),
            ] {
                for depth in [1, 2] {
                    let m = model(act, depth, k);
                    let map = GradientMap { model: &m, labels };
                    let x = Mat::from_fn(3, 5, |i, j| ((i * 5 + j) as f64 * 0.37).sin());
                    let lam = Mat::from_fn(3, k, |i, j| ((i * 3 + j) as f64 * 0.91).cos());
                    let dx = Mat::from_fn(3, 5, |i, j| ((i + 2 * j) as f64 * 1.3).cos());
                    let dl = Mat::from_fn(3, k, |i, j| ((2 * i + j) as f64 * 0.7).sin());
                    let (g, tape) = map.eval(&x, &lam).unwrap();
                    // a fixed arbitrary adjoint shaped like the gradient
                    let mut adj = g.clone();
                    crate::model::ops::for_each_tensor(&mut adj, |v| {
                        for (t, e) in v.iter_mut().enumerate() {
                            *e = ((t as f64) * 0.618).sin();
                        }
                    });
                    let (ax, al) = map.vjp(&tape, &adj);
                    let an: f64 = (0..3)
                        .map(|i| (0..5).map(|j| ax[(i, j)] * dx[(i, j)]).sum::<f64>())
                        .sum::<f64>()
                        + (0..3)
                            .map(|i| (0..k).map(|j| al[(i, j)] * dl[(i, j)]).sum::<f64>())
                            .sum::<f64>();
                    let h = 1e-5;
                    let at = |t: f64| {
                        let xt = &x + faer::Scale(t) * &dx;
                        let lt = &lam + faer::Scale(t) * &dl;
                        dot(&adj, &map.eval(&xt, &lt).unwrap().0)
                    };
                    let fd = (at(h) - at(-h)) / (2.0 * h);
                    assert!(
                        (fd - an).abs() <= 1e-6 * an.abs().max(fd.abs()).max(1e-8),
                        "{act} {labels:?} depth {depth}: vjp {an} vs fd {fd}"
                    );
                }
            }
        }
    }
}
