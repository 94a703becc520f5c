//! What the server holds: the model it sent and the gradient it got back.
//!
//! The first layer (the large part) can stay memory-mapped and is read in row
//! blocks; everything above it is small and held as f64.

use std::ops::Range;
use std::path::Path;

use faer::{Col, Mat};

use crate::io::safetensors::{MappedMatrix, check_like};
use crate::model::{Activation, Dense, Gradient, Mlp};
use crate::{Dtype, Error, Result};

/// Rows of an m x n first-layer matrix, in memory or mapped from a file.
#[derive(Clone)]
pub enum Rows {
    Memory(Mat<f64>),
    Mapped(MappedMatrix),
}

impl Rows {
    pub fn nrows(&self) -> usize {
        match self {
            Rows::Memory(m) => m.nrows(),
            Rows::Mapped(m) => m.nrows(),
        }
    }
    pub fn ncols(&self) -> usize {
        match self {
            Rows::Memory(m) => m.ncols(),
            Rows::Mapped(m) => m.ncols(),
        }
    }
    /// Rows `r` as an f64 matrix.
    pub fn block(&self, r: Range<usize>) -> Result<Mat<f64>> {
        match self {
            Rows::Memory(m) => Ok(m.subrows(r.start, r.len()).to_owned()),
            Rows::Mapped(m) => m.block(r),
        }
    }
    /// Done with rows `r` for now (drops mapped pages from memory).
    pub fn release(&self, r: Range<usize>) {
        if let Rows::Mapped(m) = self {
            m.release(r)
        }
    }
    /// The whole matrix in memory.
    pub fn to_mat(&self) -> Result<Mat<f64>> {
        match self {
            Rows::Memory(m) => Ok(m.clone()),
            Rows::Mapped(m) => m.to_mat(),
        }
    }
}

/// The first Linear layer and its gradient.
#[derive(Clone)]
pub struct FirstLayer {
    /// W, m x d.
    pub weight: Rows,
    /// b, m.
    pub bias: Option<Col<f64>>,
    /// dL/dW, m x d.
    pub grad_weight: Rows,
    /// dL/db, m.
    pub grad_bias: Option<Col<f64>>,
}

/// Everything an honest-but-curious server knows after one round.
#[derive(Clone)]
pub struct ServerView {
    pub activation: Activation,
    /// Storage precision of the gradient (sets the rank threshold and what "exact" means).
    pub dtype: Dtype,
    pub first: FirstLayer,
    /// Layers above the first (weights the server chose).
    pub upper: Vec<Dense<f64>>,
    /// Their gradients.
    pub upper_grad: Vec<Dense<f64>>,
    /// Standard deviation of noise known to be in each gradient entry (defences), if any.
    pub noise_std: Option<f64>,
    /// The defences the client is known to apply (their public parameters only).
    pub defenses: Vec<crate::defense::Defense>,
}

/// Rows per block when streaming over the first layer.
pub const BLOCK_ROWS: usize = 2048;

impl ServerView {
    /// A view on a model and gradient held in memory (simulation).
    pub fn from_memory(model: &Mlp<f64>, grad: &Gradient<f64>, dtype: Dtype) -> Result<Self> {
        check_like(Path::new("<gradient>"), &grad.layers, model)?;
        for (l, g) in grad.layers.iter().enumerate() {
            if !g.is_finite() {
                return Err(Error::NonFinite(format!("gradient of layer {l}")));
            }
        }
        Ok(ServerView {
            activation: model.activation,
            dtype,
            first: FirstLayer {
                weight: Rows::Memory(model.layers[0].weight.clone()),
                bias: model.layers[0].bias.clone(),
                grad_weight: Rows::Memory(grad.layers[0].weight.clone()),
                grad_bias: grad.layers[0].bias.clone(),
            },
            upper: model.layers[1..].to_vec(),
            upper_grad: grad.layers[1..].to_vec(),
            noise_std: None,
            defenses: Vec::new(),
        })
    }

    /// A view on safetensors files: the first layer stays mapped; layers matched by
    /// structure, the precision detected ([`ServerView::open`] says what it found).
    pub fn from_files(model: &Path, gradient: &Path, activation: Activation) -> Result<Self> {
        Self::open(model, gradient, activation, &Default::default()).map(|(v, _)| v)
    }

    /// A view from its parts, without defences or known noise.
    pub(crate) fn from_parts(
        activation: Activation,
        dtype: Dtype,
        first: FirstLayer,
        upper: Vec<Dense<f64>>,
        upper_grad: Vec<Dense<f64>>,
    ) -> Self {
        ServerView {
            activation,
            dtype,
            first,
            upper,
            upper_grad,
            noise_std: None,
            defenses: Vec::new(),
        }
    }

    /// Check that the layers' shapes chain and the gradient has the model's shapes.
    pub(crate) fn check_shapes(&self) -> Result<()> {
        self.check()
    }

    fn check(&self) -> Result<()> {
        let m = self.width();
        for (what, b) in [
            ("bias", &self.first.bias),
            ("bias gradient", &self.first.grad_bias),
        ] {
            if let Some(b) = b
                && b.nrows() != m
            {
                return Err(Error::Shape(format!(
                    "first-layer {what} has {} entries, expected {m}",
                    b.nrows()
                )));
            }
        }
        if self.first.bias.is_some() != self.first.grad_bias.is_some() {
            return Err(Error::Shape(
                "the model and the gradient disagree on the first-layer bias".into(),
            ));
        }
        let mut fan_in = m;
        for (l, (w, g)) in self.upper.iter().zip(&self.upper_grad).enumerate() {
            if w.inputs() != fan_in {
                return Err(Error::Shape(format!(
                    "layer {} takes {} inputs, the layer below gives {fan_in}",
                    l + 1,
                    w.inputs()
                )));
            }
            if w.weight.shape() != g.weight.shape()
                || w.bias.as_ref().map(|b| b.nrows()) != g.bias.as_ref().map(|b| b.nrows())
            {
                return Err(Error::Shape(format!(
                    "layer {}: gradient and weight shapes differ",
                    l + 1
                )));
            }
            fan_in = w.outputs();
        }
        Ok(())
    }

    /// Input dimension d.
    pub fn input_dim(&self) -> usize {
        self.first.weight.ncols()
    }
    /// First-layer width m.
    pub fn width(&self) -> usize {
        self.first.weight.nrows()
    }
    /// Output dimension K.
    pub fn outputs(&self) -> usize {
        self.upper.last().map_or(self.width(), |l| l.outputs())
    }
    /// Number of hidden layers.
    pub fn depth(&self) -> usize {
        self.upper.len()
    }

    /// The whole model in memory.
    pub fn model(&self) -> Result<Mlp<f64>> {
        let mut layers = vec![Dense {
            weight: self.first.weight.to_mat()?,
            bias: self.first.bias.clone(),
        }];
        layers.extend(self.upper.iter().cloned());
        Mlp::new(layers, self.activation)
    }

    /// The whole gradient in memory.
    pub fn gradient(&self) -> Result<Gradient<f64>> {
        let mut layers = vec![Dense {
            weight: self.first.grad_weight.to_mat()?,
            bias: self.first.grad_bias.clone(),
        }];
        layers.extend(self.upper_grad.iter().cloned());
        Ok(Gradient { layers })
    }

    /// Augmented first-layer gradient rows [g_W, g_b] for neurons `r` (len x (d+1));
    /// without a bias the last column is zero.
    pub fn augmented_gradient_block(&self, r: Range<usize>) -> Result<Mat<f64>> {
        augment(
            self.first.grad_weight.block(r.clone())?,
            self.first.grad_bias.as_ref(),
            r,
        )
    }

    /// Augmented first-layer weight rows [W, b] for neurons `r`.
    pub fn augmented_weight_block(&self, r: Range<usize>) -> Result<Mat<f64>> {
        augment(
            self.first.weight.block(r.clone())?,
            self.first.bias.as_ref(),
            r,
        )
    }
}

fn augment(w: Mat<f64>, b: Option<&Col<f64>>, r: Range<usize>) -> Result<Mat<f64>> {
    let (n, d) = w.shape();
    Ok(Mat::from_fn(n, d + 1, |i, j| {
        if j < d {
            w[(i, j)]
        } else {
            b.map_or(0.0, |b| b[r.start + i])
        }
    }))
}
