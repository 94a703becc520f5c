//! The fully connected head of a CNN as the MLP the exact route attacks: from the
//! first Linear layer on, `Linear, act, ..., Linear`, whose input is the flattened
//! conv feature h_i = phi(x_i) (docs/DESIGN.md, "Convolutional models").

use crate::Dtype;
use crate::attack::view::ServerView;
use crate::model::cnn::{Cnn, CnnGradient, Layer};
use crate::model::{Activation, Dense, Gradient, Mlp};
use crate::{Error, Result};

/// The head: its MLP and gradient, where it starts, and how many parameter layers of
/// the CNN lie below it.
#[derive(Clone, Debug)]
pub struct Head {
    /// Runtime layer index of the head's first Linear.
    pub start: usize,
    /// Parameter layers (convs, and Linears before the head) below the head.
    pub params_below: usize,
    pub model: Mlp<f64>,
    pub gradient: Gradient<f64>,
}

impl Head {
    /// Split `cnn` (and its gradient) at the first Linear layer.
    pub fn split(cnn: &Cnn<f64>, grad: &CnnGradient<f64>) -> Result<Head> {
        if grad.params.len() != cnn.params().count() {
            return Err(Error::Shape(format!(
                "the gradient has {} parameter layers, the model {}",
                grad.params.len(),
                cnn.params().count()
            )));
        }
        let start = cnn
            .layers
            .iter()
            .position(|l| matches!(l, Layer::Linear(_)))
            .ok_or_else(|| Error::Unsupported("the model has no Linear layer to attack".into()))?;
        let params_below = cnn.layers[..start]
            .iter()
            .filter(|l| l.param().is_some())
            .count();
        let mut dense: Vec<Dense<f64>> = Vec::new();
        let mut act: Option<Activation> = None;
        let mut expect_linear = true;
        for (l, layer) in cnn.layers.iter().enumerate().skip(start) {
            match (layer, expect_linear) {
                (Layer::Linear(d), _) => {
                    if !expect_linear {
                        act.get_or_insert(Activation::Identity);
                        if act != Some(Activation::Identity) {
                            return Err(mixed(l));
                        }
                    }
                    dense.push(d.clone());
                    expect_linear = false;
                }
                (Layer::Act(a), false) => {
                    if act.is_some_and(|b| b != *a) {
                        return Err(mixed(l));
                    }
                    act = Some(*a);
                    expect_linear = true;
                }
                _ => {
                    return Err(Error::Unsupported(format!(
                        "layer {l} of the fully connected head is not a Linear layer or one activation \
                         between Linear layers; gradleak attacks a head `Linear, act, ..., Linear`"
                    )));
                }
            }
        }
        let gradient = Gradient {
            layers: grad.params[params_below..].to_vec(),
        };
        let model = Mlp::new(dense, act.unwrap_or(Activation::Identity))?;
        Ok(Head {
            start,
            params_below,
            model,
            gradient,
        })
    }

    /// The server's view of the head: the exact route's input.
    pub fn view(&self, dtype: Dtype) -> Result<ServerView> {
        ServerView::from_memory(&self.model, &self.gradient, dtype)
    }

    /// Feature dimension d (the head's input).
    pub fn feature_dim(&self) -> usize {
        self.model.input_dim()
    }

    /// The largest batch the head's first layer can separate, min(m, d + 1).
    pub fn batch_limit(&self) -> usize {
        self.model.width().min(self.feature_dim() + 1)
    }
}

fn mixed(l: usize) -> Error {
    Error::Unsupported(format!(
        "layer {l}: the fully connected head mixes activations; gradleak needs the same one after every hidden Linear"
    ))
}
