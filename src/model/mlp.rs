//! The client's network: Linear layers with an activation between them, and its
//! exact forward and backward pass (see docs/DESIGN.md, "Setting").

use faer::{Col, Mat, MatRef};

use super::{Activation, Loss, Targets};
use crate::{Error, Real, Result};

/// One Linear layer: `weight` is out x in (PyTorch's layout), `bias` has `out` entries.
#[derive(Clone, Debug, PartialEq)]
pub struct Dense<T: Real> {
    pub weight: Mat<T>,
    pub bias: Option<Col<T>>,
}

impl<T: Real> Dense<T> {
    pub fn inputs(&self) -> usize {
        self.weight.ncols()
    }
    pub fn outputs(&self) -> usize {
        self.weight.nrows()
    }

    /// A copy in another precision (rounding when narrowing).
    pub fn cast<U: Real>(&self) -> Dense<U> {
        Dense {
            weight: cast_mat(self.weight.as_ref()),
            bias: self
                .bias
                .as_ref()
                .map(|b| Col::from_fn(b.nrows(), |i| U::from_f64(b[i].to_f64()))),
        }
    }

    /// Every entry is finite.
    pub fn is_finite(&self) -> bool {
        mat_is_finite(self.weight.as_ref())
            && self
                .bias
                .as_ref()
                .is_none_or(|b| b.iter().all(|v| v.to_f64().is_finite()))
    }
}

/// Cast a matrix to another precision.
pub fn cast_mat<T: Real, U: Real>(m: MatRef<'_, T>) -> Mat<U> {
    Mat::from_fn(m.nrows(), m.ncols(), |i, j| U::from_f64(m[(i, j)].to_f64()))
}

/// All entries finite.
pub fn mat_is_finite<T: Real>(m: MatRef<'_, T>) -> bool {
    (0..m.ncols()).all(|j| (0..m.nrows()).all(|i| m[(i, j)].to_f64().is_finite()))
}

/// dL/d output, `shape`, must be B x K: a row per sample of the batch, a column per output.
pub(crate) fn check_output_residuals(
    shape: (usize, usize),
    batch: usize,
    outputs: usize,
) -> Result<()> {
    if shape != (batch, outputs) {
        return Err(Error::Shape(format!(
            "output residuals are {} x {}, expected {batch} x {outputs}",
            shape.0, shape.1
        )));
    }
    Ok(())
}

/// A multi-layer perceptron `Linear, act, Linear, act, ..., Linear`.
///
/// `layers.len() - 1` hidden layers; the same activation after each hidden layer,
/// none after the last.
#[derive(Clone, Debug, PartialEq)]
pub struct Mlp<T: Real> {
    pub layers: Vec<Dense<T>>,
    pub activation: Activation,
}

/// The gradient of the mean loss with respect to every parameter, shaped like the model.
#[derive(Clone, Debug, PartialEq)]
pub struct Gradient<T: Real> {
    pub layers: Vec<Dense<T>>,
}

impl<T: Real> Gradient<T> {
    pub fn cast<U: Real>(&self) -> Gradient<U> {
        Gradient {
            layers: self.layers.iter().map(Dense::cast).collect(),
        }
    }

    /// Euclidean norm over all parameters.
    pub fn norm(&self) -> f64 {
        self.layers
            .iter()
            .map(|l| {
                let w: f64 = l.weight.squared_norm_l2().to_f64();
                let b: f64 = l
                    .bias
                    .as_ref()
                    .map_or(0.0, |b| b.squared_norm_l2().to_f64());
                w + b
            })
            .sum::<f64>()
            .sqrt()
    }

    /// Total number of entries.
    pub fn len(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.weight.nrows() * l.weight.ncols() + l.bias.as_ref().map_or(0, |b| b.nrows()))
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Everything the forward pass computed, kept for the backward pass.
#[derive(Clone, Debug)]
pub struct Forward<T: Real> {
    /// Pre-activations of each layer, B x out (the last one is the output).
    pub pre: Vec<Mat<T>>,
    /// Activations of each hidden layer, B x out.
    pub post: Vec<Mat<T>>,
}

impl<T: Real> Forward<T> {
    /// The network's output, B x K.
    pub fn output(&self) -> &Mat<T> {
        self.pre.last().expect("an Mlp has at least one layer")
    }
}

/// What the backward pass returns besides the gradient.
#[derive(Clone, Debug)]
pub struct Backward<T: Real> {
    pub gradient: Gradient<T>,
    /// dL/dz of every layer, B x out: `deltas[0]` holds the first-layer signals
    /// delta_ij of equation (1).
    pub deltas: Vec<Mat<T>>,
}

impl<T: Real> Mlp<T> {
    /// A network from its layers; checks that consecutive shapes agree.
    pub fn new(layers: Vec<Dense<T>>, activation: Activation) -> Result<Self> {
        if layers.is_empty() {
            return Err(Error::Shape(
                "a model needs at least one Linear layer".into(),
            ));
        }
        for (l, pair) in layers.windows(2).enumerate() {
            if pair[1].inputs() != pair[0].outputs() {
                return Err(Error::Shape(format!(
                    "layer {} outputs {} values but layer {} takes {}",
                    l,
                    pair[0].outputs(),
                    l + 1,
                    pair[1].inputs()
                )));
            }
        }
        for (l, layer) in layers.iter().enumerate() {
            if let Some(b) = &layer.bias
                && b.nrows() != layer.outputs()
            {
                return Err(Error::Shape(format!(
                    "layer {l}: bias has {} entries, weight has {} rows",
                    b.nrows(),
                    layer.outputs()
                )));
            }
            if !layer.is_finite() {
                return Err(Error::NonFinite(format!("model layer {l}")));
            }
        }
        Ok(Mlp { layers, activation })
    }

    /// Input dimension d.
    pub fn input_dim(&self) -> usize {
        self.layers[0].inputs()
    }
    /// Output dimension K.
    pub fn output_dim(&self) -> usize {
        self.layers.last().expect("non-empty").outputs()
    }
    /// First-layer width m.
    pub fn width(&self) -> usize {
        self.layers[0].outputs()
    }
    /// Number of hidden layers (the CLI's `--depth`).
    pub fn depth(&self) -> usize {
        self.layers.len() - 1
    }

    pub fn cast<U: Real>(&self) -> Mlp<U> {
        Mlp {
            layers: self.layers.iter().map(Dense::cast).collect(),
            activation: self.activation,
        }
    }

    fn check_input(&self, x: MatRef<'_, T>) -> Result<()> {
        if x.ncols() != self.input_dim() {
            return Err(Error::Shape(format!(
                "inputs have {} features, the model takes {}",
                x.ncols(),
                self.input_dim()
            )));
        }
        if !mat_is_finite(x) {
            return Err(Error::NonFinite("inputs".into()));
        }
        Ok(())
    }

    /// Forward pass on a batch `x` (B x d).
    pub fn forward(&self, x: MatRef<'_, T>) -> Result<Forward<T>> {
        self.check_input(x)?;
        let act = self.activation;
        let mut pre = Vec::with_capacity(self.layers.len());
        let mut post: Vec<Mat<T>> = Vec::with_capacity(self.layers.len() - 1);
        for (l, layer) in self.layers.iter().enumerate() {
            let input = if l == 0 { x } else { post[l - 1].as_ref() };
            let mut z = input * layer.weight.transpose();
            if let Some(b) = &layer.bias {
                for j in 0..z.ncols() {
                    let bj = b[j];
                    for i in 0..z.nrows() {
                        z[(i, j)] += bj;
                    }
                }
            }
            if l + 1 < self.layers.len() {
                post.push(Mat::from_fn(z.nrows(), z.ncols(), |i, j| {
                    T::from_f64(act.eval(z[(i, j)].to_f64()))
                }));
            }
            pre.push(z);
        }
        Ok(Forward { pre, post })
    }

    /// Backward pass from the output residuals `dout` = dL/d output (B x K).
    pub fn backward(
        &self,
        x: MatRef<'_, T>,
        fw: &Forward<T>,
        dout: MatRef<'_, T>,
    ) -> Result<Backward<T>> {
        let n = self.layers.len();
        check_output_residuals(dout.shape(), x.nrows(), self.output_dim())?;
        let act = self.activation;
        let mut deltas: Vec<Mat<T>> = vec![Mat::zeros(0, 0); n];
        let mut grads: Vec<Dense<T>> = Vec::with_capacity(n);
        let mut delta = dout.to_owned();
        for l in (0..n).rev() {
            let layer = &self.layers[l];
            let input = if l == 0 { x } else { fw.post[l - 1].as_ref() };
            let gw = delta.transpose() * input;
            let gb = layer.bias.as_ref().map(|_| {
                Col::from_fn(delta.ncols(), |j| {
                    let mut s = T::from_f64(0.0);
                    for i in 0..delta.nrows() {
                        s += delta[(i, j)];
                    }
                    s
                })
            });
            grads.push(Dense {
                weight: gw,
                bias: gb,
            });
            if l > 0 {
                let back = &delta * &layer.weight;
                let z = &fw.pre[l - 1];
                let next = Mat::from_fn(back.nrows(), back.ncols(), |i, j| {
                    back[(i, j)] * T::from_f64(act.d1(z[(i, j)].to_f64()))
                });
                deltas[l] = std::mem::replace(&mut delta, next);
            }
        }
        deltas[0] = delta;
        grads.reverse();
        Ok(Backward {
            gradient: Gradient { layers: grads },
            deltas,
        })
    }

    /// The gradient a client sends: mean `loss` of the batch `x` (B x d) against `targets`.
    pub fn gradient(&self, x: MatRef<'_, T>, targets: &Targets, loss: Loss) -> Result<Gradient<T>> {
        Ok(self.backward_loss(x, targets, loss)?.gradient)
    }

    /// Backward pass for a loss, keeping the per-layer signals.
    pub fn backward_loss(
        &self,
        x: MatRef<'_, T>,
        targets: &Targets,
        loss: Loss,
    ) -> Result<Backward<T>> {
        let fw = self.forward(x)?;
        let out: Mat<f64> = cast_mat(fw.output().as_ref());
        let r: Mat<T> = cast_mat(loss.residual(&out, targets)?.as_ref());
        self.backward(x, &fw, r.as_ref())
    }

    /// Mean loss of the batch.
    pub fn loss(&self, x: MatRef<'_, T>, targets: &Targets, loss: Loss) -> Result<f64> {
        let fw = self.forward(x)?;
        loss.value(&cast_mat(fw.output().as_ref()), targets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(act: Activation, depth: usize, k: usize, seed: u64) -> Mlp<f64> {
        crate::model::init::tiny_model(act, depth, k, seed)
    }

    /// Every entry of the analytic gradient against a central difference of the
    /// loss. The truncation error is O(h^2 * L''') ~ 1e-12 and roundoff ~ eps/h ~ 1e-10,
    /// so 1e-7 relative to the gradient's scale is a bound that only a wrong
    /// derivative breaks.
    #[test]
    fn gradient_matches_finite_differences_for_every_activation_and_loss() {
        let x = Mat::from_fn(3, 5, |i, j| ((i * 5 + j) as f64 * 0.37).sin());
        for act in Activation::ALL {
            for (loss, k, targets) in [
                (Loss::Ce, 4, Targets::Classes(vec![1, 3, 0])),
                (
                    Loss::Mse,
                    2,
                    Targets::Values(Mat::from_fn(3, 2, |i, j| (i + 2 * j) as f64 * 0.3)),
                ),
                (
                    Loss::Bce,
                    1,
                    Targets::Values(Mat::from_fn(3, 1, |i, _| (i % 2) as f64)),
                ),
            ] {
                for depth in [1, 2] {
                    let m = model(act, depth, k, 3);
                    let g = m.gradient(x.as_ref(), &targets, loss).unwrap();
                    let scale = g.norm();
                    let h = 1e-6;
                    for l in 0..m.layers.len() {
                        let (rows, cols) = (m.layers[l].outputs(), m.layers[l].inputs());
                        for (i, j) in [(0, 0), (rows - 1, cols - 1), (rows / 2, cols / 2)] {
                            let mut p = m.clone();
                            p.layers[l].weight[(i, j)] += h;
                            let mut q = m.clone();
                            q.layers[l].weight[(i, j)] -= h;
                            let fd = (p.loss(x.as_ref(), &targets, loss).unwrap()
                                - q.loss(x.as_ref(), &targets, loss).unwrap())
                                / (2.0 * h);
                            let an = g.layers[l].weight[(i, j)];
                            assert!(
                                (fd - an).abs() <= 1e-7 * scale.max(1e-3) + 1e-9,
                                "{act} {loss} depth {depth} layer {l} w({i},{j}): {an} vs {fd}"
                            );
                        }
                        let mut p = m.clone();
                        p.layers[l].bias.as_mut().unwrap()[rows - 1] += h;
                        let mut q = m.clone();
                        q.layers[l].bias.as_mut().unwrap()[rows - 1] -= h;
                        let fd = (p.loss(x.as_ref(), &targets, loss).unwrap()
                            - q.loss(x.as_ref(), &targets, loss).unwrap())
                            / (2.0 * h);
                        let an = g.layers[l].bias.as_ref().unwrap()[rows - 1];
                        assert!(
                            (fd - an).abs() <= 1e-7 * scale.max(1e-3) + 1e-9,
                            "{act} {loss} bias {l}"
                        );
                    }
                }
            }
        }
    }

    /// Equation (1): the first-layer gradient is Delta^T [X, 1].
    #[test]
    fn first_layer_gradient_is_signals_times_inputs() {
        let m = model(Activation::Tanh, 2, 3, 9);
        let x = Mat::from_fn(4, 5, |i, j| ((i * 3 + j) as f64 * 0.21).cos());
        let bw = m
            .backward_loss(x.as_ref(), &Targets::Classes(vec![0, 1, 2, 1]), Loss::Ce)
            .unwrap();
        let d = &bw.deltas[0];
        let gw = d.transpose() * &x;
        let err = (&gw - &bw.gradient.layers[0].weight).norm_l2();
        assert!(err < 1e-14 * gw.norm_l2().max(1.0));
    }

    #[test]
    fn f32_and_f64_agree_to_f32_precision() {
        let m = model(Activation::Gelu, 2, 3, 5);
        let x = Mat::from_fn(3, 5, |i, j| ((i + j) as f64 * 0.5).sin());
        let t = Targets::Classes(vec![0, 2, 1]);
        let g64 = m.gradient(x.as_ref(), &t, Loss::Ce).unwrap();
        let m32: Mlp<f32> = m.cast();
        let x32: Mat<f32> = cast_mat(x.as_ref());
        let g32 = m32
            .gradient(x32.as_ref(), &t, Loss::Ce)
            .unwrap()
            .cast::<f64>();
        for l in 0..3 {
            let e = (&g32.layers[l].weight - &g64.layers[l].weight).norm_l2()
                / g64.layers[l].weight.norm_l2();
            assert!(e < 1e-5, "layer {l}: {e}");
        }
    }

    #[test]
    fn shape_mismatch_is_an_error() {
        let m = model(Activation::Tanh, 1, 2, 1);
        let x = Mat::<f64>::zeros(2, 4);
        assert!(matches!(m.forward(x.as_ref()), Err(Error::Shape(_))));
    }
}
