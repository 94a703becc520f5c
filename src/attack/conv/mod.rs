//! The attack on a convolutional client (docs/DESIGN.md, "Convolutional models"):
//! the fully connected head's exact route recovers and certifies the features
//! h_i = phi(x_i) and the labels ([`head`]); below them each conv layer's equations in
//! its input ([`equations`]) give the pixels as far as the gradient determines them
//! ([`pixels`]).

pub mod equations;
pub mod head;
pub mod pixels;
#[cfg(test)]
mod probe;
pub mod tv;

use serde::Serialize;

use super::params::AttackConfig;
use super::precision;
use super::reconstruction::Reconstruction;
use super::view::ServerView;
use crate::model::cnn::{Cnn, CnnGradient, ModelSpec, Tensors};
use crate::{Dtype, Result};

pub use head::Head;
pub use pixels::{Fill, LayerSolve, PixelOptions, Pixels};

/// The exact route, passed in by the caller (`attack::run`).
pub type Inner = fn(&ServerView, &AttackConfig) -> Result<Reconstruction>;

/// What the server holds about a CNN: the model (BatchNorm folded), the gradient
/// mapped onto it, the head, and the head's view at the working precision.
#[derive(Clone)]
pub struct ConvProblem {
    pub cnn: Cnn<f64>,
    pub grad: CnnGradient<f64>,
    pub head: Head,
    pub view: ServerView,
}

impl ConvProblem {
    /// From a description, the model's and the gradient's named tensors, the gradient's
    /// storage dtype and, if known, the precision it was computed in (otherwise detected
    /// from the head's gradient values, as for MLP files).
    pub fn new(
        spec: &ModelSpec,
        model: &Tensors,
        grad: &Tensors,
        storage: Dtype,
        precision: Option<Dtype>,
    ) -> Result<ConvProblem> {
        let (cnn, folds) = Cnn::from_spec(spec, model)?;
        let grad = CnnGradient::from_tensors(&cnn, &folds, grad)?;
        Self::from_parts(cnn, grad, storage, precision)
    }

    /// From a model and gradient held in memory (simulation).
    pub fn from_parts(
        cnn: Cnn<f64>,
        grad: CnnGradient<f64>,
        storage: Dtype,
        precision: Option<Dtype>,
    ) -> Result<ConvProblem> {
        let head = Head::split(&cnn, &grad)?;
        let mut view = head.view(storage)?;
        view.dtype = match precision {
            Some(p) => p,
            None => precision::detect(
                &view.first.grad_weight,
                view.first.grad_bias.as_ref(),
                storage,
            )?,
        };
        Ok(ConvProblem {
            cnn,
            grad,
            head,
            view,
        })
    }

    /// The features h_i = phi(x_i) of a batch, computed with the server's model
    /// (truth for evaluation), B x d.
    pub fn features(&self, x: &faer::Mat<f64>) -> Result<faer::Mat<f64>> {
        let mut fw = self.cnn.forward(x)?;
        Ok(std::mem::replace(
            &mut fw.outputs[self.head.start - 1],
            faer::Mat::zeros(0, 0),
        ))
    }
}

/// What the attack on a CNN found.
#[derive(Clone, Debug, Serialize)]
pub struct ConvReconstruction {
    /// The head's reconstruction: its samples are the features h_i (with labels).
    pub features: Reconstruction,
    /// The PyTorch name of the head's first Linear layer.
    pub head_layer: String,
    /// d of the features, the head's first-layer width m, and min(m, d + 1).
    pub feature_dim: usize,
    pub head_width: usize,
    pub batch_limit: usize,
}

/// Attack the problem with `inner` (the exact route) on its head.
/// A prior image given for the pixels is not the head's (feature) prior: the head's
/// route runs without it.
pub fn attack(p: &ConvProblem, cfg: &AttackConfig, inner: Inner) -> Result<ConvReconstruction> {
    let mut head_cfg = cfg.clone();
    if head_cfg
        .prior_image
        .as_ref()
        .is_some_and(|v| v.len() != p.head.feature_dim())
    {
        head_cfg.prior_image = None;
    }
    let features = inner(&p.view, &head_cfg)?;
    Ok(ConvReconstruction {
        features,
        head_layer: p.cnn.names[p.head.params_below].clone(),
        feature_dim: p.head.feature_dim(),
        head_width: p.head.model.width(),
        batch_limit: p.head.batch_limit(),
    })
}
