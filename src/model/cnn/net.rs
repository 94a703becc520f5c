//! The convolutional client: its layers, the forward pass and the exact backward pass
//! of the mean loss (docs/DESIGN.md, "Convolutional models").

use faer::Mat;

use super::kernels::{self, Window};
use super::spec::Shape;
use crate::model::{
    Activation, Dense, Loss, Targets, cast_mat, check_output_residuals, mat_is_finite,
};
use crate::{Error, Real, Result};

/// A convolution: `param.weight` is O x (C*KH*KW), PyTorch's [O, C, KH, KW] flattened
/// row by row; `window` its geometry.
#[derive(Clone, Debug, PartialEq)]
pub struct Conv<T: Real> {
    pub param: Dense<T>,
    pub window: Window,
}

/// One runtime layer (BatchNorm folded away, identities dropped).
#[derive(Clone, Debug, PartialEq)]
pub enum Layer<T: Real> {
    Conv(Conv<T>),
    Act(Activation),
    MaxPool(Window),
    AvgPool(Window),
    Flatten,
    Linear(Dense<T>),
}

impl<T: Real> Layer<T> {
    /// The trainable parameters (conv or Linear), if any.
    pub fn param(&self) -> Option<&Dense<T>> {
        match self {
            Layer::Conv(c) => Some(&c.param),
            Layer::Linear(d) => Some(d),
            _ => None,
        }
    }
    fn param_mut(&mut self) -> Option<&mut Dense<T>> {
        match self {
            Layer::Conv(c) => Some(&mut c.param),
            Layer::Linear(d) => Some(d),
            _ => None,
        }
    }
    fn cast<U: Real>(&self) -> Layer<U> {
        match self {
            Layer::Conv(c) => Layer::Conv(Conv {
                param: c.param.cast(),
                window: c.window,
            }),
            Layer::Act(a) => Layer::Act(*a),
            Layer::MaxPool(w) => Layer::MaxPool(*w),
            Layer::AvgPool(w) => Layer::AvgPool(*w),
            Layer::Flatten => Layer::Flatten,
            Layer::Linear(d) => Layer::Linear(d.cast()),
        }
    }
}

/// A convolutional classifier. `names[k]` is the PyTorch module name of the k-th
/// parameter layer (in forward order); `shapes[l]` is layer l's output shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Cnn<T: Real> {
    pub input: Shape,
    pub layers: Vec<Layer<T>>,
    pub shapes: Vec<Shape>,
    pub names: Vec<String>,
}

/// The gradient of the mean loss: one [`Dense`] per parameter layer, in forward order,
/// shaped like [`Layer::param`].
#[derive(Clone, Debug, PartialEq)]
pub struct CnnGradient<T: Real> {
    pub params: Vec<Dense<T>>,
}

impl<T: Real> CnnGradient<T> {
    pub fn cast<U: Real>(&self) -> CnnGradient<U> {
        CnnGradient {
            params: self.params.iter().map(Dense::cast).collect(),
        }
    }
}

/// Every layer's output on a batch (B rows), and what max pooling kept.
#[derive(Clone, Debug)]
pub struct CnnForward<T: Real> {
    /// `outputs[l]` is layer l's output, B x `len(shapes[l])`.
    pub outputs: Vec<Mat<T>>,
    /// Input index each max-pooling output kept, per layer (empty for other layers).
    pub kept: Vec<Vec<usize>>,
}

/// The backward pass: the gradient and dL/d(output) of every layer.
#[derive(Clone, Debug)]
pub struct CnnBackward<T: Real> {
    pub gradient: CnnGradient<T>,
    /// `deltas[l]` = dL/d `outputs[l]`, B x `len(shapes[l])`.
    pub deltas: Vec<Mat<T>>,
}

impl<T: Real> Cnn<T> {
    pub fn cast<U: Real>(&self) -> Cnn<U> {
        Cnn {
            input: self.input,
            layers: self.layers.iter().map(Layer::cast).collect(),
            shapes: self.shapes.clone(),
            names: self.names.clone(),
        }
    }

    /// Values per input sample, C * H * W.
    pub fn input_dim(&self) -> usize {
        self.input.len()
    }

    /// Classes K.
    pub fn output_dim(&self) -> usize {
        self.shapes.last().map_or(0, |s| s.len())
    }

    /// The parameter layers in forward order.
    pub fn params(&self) -> impl Iterator<Item = &Dense<T>> {
        self.layers.iter().filter_map(Layer::param)
    }

    /// Mutable parameter layers in forward order (finite-difference tests).
    pub fn params_mut(&mut self) -> impl Iterator<Item = &mut Dense<T>> {
        self.layers.iter_mut().filter_map(Layer::param_mut)
    }

    /// Forward pass on a batch x (B x C*H*W, PyTorch's flattening).
    pub fn forward(&self, x: &Mat<T>) -> Result<CnnForward<T>> {
        if x.ncols() != self.input_dim() {
            return Err(Error::Shape(format!(
                "inputs have {} values, the model takes {} ({})",
                x.ncols(),
                self.input_dim(),
                self.input
            )));
        }
        if !mat_is_finite(x.as_ref()) {
            return Err(Error::NonFinite("inputs".into()));
        }
        let mut outputs: Vec<Mat<T>> = Vec::with_capacity(self.layers.len());
        let mut kept = vec![Vec::new(); self.layers.len()];
        for (l, layer) in self.layers.iter().enumerate() {
            let input = if l == 0 { x } else { &outputs[l - 1] };
            let out = match layer {
                Layer::Conv(c) => conv_forward(input, c),
                Layer::Act(a) => Mat::from_fn(input.nrows(), input.ncols(), |i, j| {
                    T::from_f64(a.eval(input[(i, j)].to_f64()))
                }),
                Layer::MaxPool(w) => {
                    let (o, k) = kernels::max_pool(input, w);
                    kept[l] = k;
                    o
                }
                Layer::AvgPool(w) => kernels::avg_pool(input, w),
                Layer::Flatten => input.clone(),
                Layer::Linear(d) => linear_forward(input, d),
            };
            outputs.push(out);
        }
        Ok(CnnForward { outputs, kept })
    }

    /// Backward pass from dL/d logits (B x K).
    pub fn backward(
        &self,
        x: &Mat<T>,
        fw: &CnnForward<T>,
        dout: &Mat<T>,
    ) -> Result<CnnBackward<T>> {
        check_output_residuals(dout.shape(), x.nrows(), self.output_dim())?;
        let n = self.layers.len();
        let mut deltas: Vec<Mat<T>> = vec![Mat::zeros(0, 0); n];
        let mut grads: Vec<Dense<T>> = Vec::new();
        let mut delta = dout.clone();
        for l in (0..n).rev() {
            let input = if l == 0 { x } else { &fw.outputs[l - 1] };
            let below = match &self.layers[l] {
                Layer::Conv(c) => {
                    let (g, dx) = conv_backward(input, c, &delta, l > 0);
                    grads.push(g);
                    dx
                }
                Layer::Linear(d) => {
                    let gw = delta.transpose() * input;
                    let gb = d.bias.as_ref().map(|_| column_sums(&delta));
                    grads.push(Dense {
                        weight: gw,
                        bias: gb,
                    });
                    if l > 0 {
                        &delta * &d.weight
                    } else {
                        Mat::zeros(0, 0)
                    }
                }
                Layer::Act(a) => Mat::from_fn(delta.nrows(), delta.ncols(), |i, j| {
                    delta[(i, j)] * T::from_f64(a.d1(input[(i, j)].to_f64()))
                }),
                Layer::MaxPool(w) => kernels::max_pool_back(&delta, &fw.kept[l], w),
                Layer::AvgPool(w) => kernels::avg_pool_back(&delta, w),
                Layer::Flatten => delta.clone(),
            };
            deltas[l] = std::mem::replace(&mut delta, below);
        }
        grads.reverse();
        Ok(CnnBackward {
            gradient: CnnGradient { params: grads },
            deltas,
        })
    }

    /// Backward pass of the mean `loss` against `targets`, keeping every layer's signal.
    pub fn backward_loss(
        &self,
        x: &Mat<T>,
        targets: &Targets,
        loss: Loss,
    ) -> Result<(CnnForward<T>, CnnBackward<T>)> {
        let fw = self.forward(x)?;
        let out: Mat<f64> = cast_mat(fw.outputs.last().expect("non-empty").as_ref());
        let r: Mat<T> = cast_mat(loss.residual(&out, targets)?.as_ref());
        let bw = self.backward(x, &fw, &r)?;
        Ok((fw, bw))
    }

    /// The gradient a client sends.
    pub fn gradient(&self, x: &Mat<T>, targets: &Targets, loss: Loss) -> Result<CnnGradient<T>> {
        Ok(self.backward_loss(x, targets, loss)?.1.gradient)
    }

    /// Mean loss of the batch.
    pub fn loss(&self, x: &Mat<T>, targets: &Targets, loss: Loss) -> Result<f64> {
        let fw = self.forward(x)?;
        loss.value(
            &cast_mat(fw.outputs.last().expect("non-empty").as_ref()),
            targets,
        )
    }
}

fn column_sums<T: Real>(m: &Mat<T>) -> faer::Col<T> {
    faer::Col::from_fn(m.ncols(), |j| {
        let mut s = T::from_f64(0.0);
        for i in 0..m.nrows() {
            s += m[(i, j)];
        }
        s
    })
}

fn linear_forward<T: Real>(x: &Mat<T>, d: &Dense<T>) -> Mat<T> {
    let mut z = x * d.weight.transpose();
    if let Some(b) = &d.bias {
        for j in 0..z.ncols() {
            for i in 0..z.nrows() {
                z[(i, j)] += b[j];
            }
        }
    }
    z
}

fn conv_forward<T: Real>(x: &Mat<T>, c: &Conv<T>) -> Mat<T> {
    let cols = kernels::im2col(x, &c.window);
    let z = &cols * c.param.weight.transpose();
    let bias: Option<Vec<T>> = c.param.bias.as_ref().map(|b| b.iter().copied().collect());
    kernels::positions_to_rows(&z, x.nrows(), c.window.positions(), bias.as_deref())
}

/// The conv's gradient (dL/dW = dZ^T cols, dL/db = sums of dZ) and, when `below`,
/// dL/d input = col2im(dZ W).
fn conv_backward<T: Real>(
    x: &Mat<T>,
    c: &Conv<T>,
    delta: &Mat<T>,
    below: bool,
) -> (Dense<T>, Mat<T>) {
    let p = c.window.positions();
    let dz = kernels::rows_to_positions(delta, p);
    let cols = kernels::im2col(x, &c.window);
    let gw = dz.transpose() * &cols;
    let gb = c.param.bias.as_ref().map(|_| column_sums(&dz));
    let dx = if below {
        kernels::col2im(&(&dz * &c.param.weight), x.nrows(), &c.window)
    } else {
        Mat::zeros(0, 0)
    };
    (
        Dense {
            weight: gw,
            bias: gb,
        },
        dx,
    )
}
