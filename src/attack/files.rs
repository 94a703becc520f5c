//! A [`ServerView`] on safetensors files: layers matched by structure
//! ([`crate::io::layout`]), the first layer left mapped, the working precision
//! detected from the gradient's values ([`super::precision`]) or given.

use std::path::Path;

use serde::Serialize;

use super::precision;
use super::view::{FirstLayer, Rows, ServerView};
use crate::io::layout::{Layout, Order};
use crate::io::safetensors::{TensorFile, dense_layers, layer_dtype};
use crate::model::Activation;
use crate::{Dtype, Error, Result};

/// How to read the files (all optional).
#[derive(Clone, Debug, Default)]
pub struct ReadOptions {
    /// Layer names in forward order (overrides the structural match).
    pub names: Option<Vec<String>>,
    /// The precision the gradient was computed in (overrides the detection).
    pub precision: Option<Dtype>,
}

/// What reading the files found: kept in the report.
#[derive(Clone, Debug, Serialize)]
pub struct ReadInfo {
    /// Storage dtype of the gradient file.
    pub storage: Dtype,
    /// Storage dtype of the model file.
    pub model_storage: Dtype,
    /// The precision the attack works at (rank threshold, floors, certificate).
    pub precision: Dtype,
    /// "given" (by the caller), "detected" (the values fit a coarser type) or "storage".
    pub precision_rule: &'static str,
    /// The coarsest type holding every first-layer weight of the model.
    pub model_values: Dtype,
    /// Layer names in forward order and how the order was decided.
    pub layers: Vec<String>,
    pub order: Order,
    /// Tensors of either file that are not a layer's weight or bias.
    pub ignored: Vec<String>,
    /// The activation named in the model file's metadata, if any.
    pub activation_in_file: Option<String>,
}

impl ReadInfo {
    /// One line per thing worth telling (ignored tensors, detected precision, order).
    pub fn notes(&self) -> Vec<String> {
        let mut n = Vec::new();
        if self.precision != self.storage {
            n.push(format!(
                "gradient stored as {} but {} ({}): attacked at {}'s rounding floor",
                self.storage,
                self.precision,
                match self.precision_rule {
                    "given" => "given by --precision".to_string(),
                    _ => format!("every first-layer entry is a {} value", self.precision),
                },
                self.precision
            ));
        }
        if self.order == Order::Shapes {
            n.push(format!(
                "layers ordered by their shapes: {}",
                self.layers.join(", ")
            ));
        }
        if !self.ignored.is_empty() {
            n.push(format!(
                "ignored {} tensor(s) that are not a Linear layer's weight or bias: {}",
                self.ignored.len(),
                self.ignored.join(", ")
            ));
        }
        n
    }
}

impl ServerView {
    /// A view on a model and a gradient file (the first layer stays mapped), with
    /// what reading them found.
    pub fn open(
        model: &Path,
        gradient: &Path,
        activation: Activation,
        opts: &ReadOptions,
    ) -> Result<(Self, ReadInfo)> {
        let mf = TensorFile::open(model)?;
        let gf = TensorFile::open(gradient)?;
        let given = opts.names.as_deref();
        let ml = Layout::of(&mf, given)?;
        let gl = ml.like(&gf, given)?;
        let model_storage = layer_dtype(&mf, &ml)?;
        let storage = layer_dtype(&gf, &gl)?;
        let w = mf.mapped(&ml.layers[0].weight)?;
        let gw = gf.mapped(&gl.layers[0].weight)?;
        if (w.nrows(), w.ncols()) != (gw.nrows(), gw.ncols()) {
            return Err(Error::Shape(format!(
                "first-layer weight is {} x {} but its gradient is {} x {}",
                w.nrows(),
                w.ncols(),
                gw.nrows(),
                gw.ncols()
            )));
        }
        let vec =
            |f: &TensorFile, b: &Option<String>| b.as_deref().map(|b| f.vector(b)).transpose();
        let upper = dense_layers(
            &mf,
            &Layout {
                layers: ml.layers[1..].to_vec(),
                ..ml.clone()
            },
        )?;
        let upper_grad = dense_layers(
            &gf,
            &Layout {
                layers: gl.layers[1..].to_vec(),
                ..gl.clone()
            },
        )?;
        let first = FirstLayer {
            bias: vec(&mf, &ml.layers[0].bias)?,
            grad_bias: vec(&gf, &gl.layers[0].bias)?,
            weight: Rows::Mapped(w),
            grad_weight: Rows::Mapped(gw),
        };
        let (precision, precision_rule) = match opts.precision {
            Some(p) => (p, "given"),
            None => {
                let p = precision::detect(&first.grad_weight, first.grad_bias.as_ref(), storage)?;
                (p, if p == storage { "storage" } else { "detected" })
            }
        };
        let model_values = precision::detect(&first.weight, first.bias.as_ref(), model_storage)?;
        let view = ServerView::from_parts(activation, precision, first, upper, upper_grad);
        view.check_shapes()?;
        let mut ignored = ml.ignored.clone();
        ignored.extend(gl.ignored.iter().cloned());
        ignored.sort();
        ignored.dedup();
        let info = ReadInfo {
            storage,
            model_storage,
            precision,
            precision_rule,
            model_values,
            layers: ml.keys(),
            order: ml.order,
            ignored,
            activation_in_file: mf.metadata("activation").map(str::to_string),
        };
        Ok((view, info))
    }
}
