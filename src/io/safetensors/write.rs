//! Writing safetensors: named f64 values stored as f32 or f64 (atomically).

use std::path::Path;

use faer::{Col, Mat};
use safetensors::Dtype as StDtype;

use super::layer_name;
use crate::io::write_atomic;
use crate::model::{Dense, Gradient, Mlp};
use crate::{Dtype, Error, Real, Result};

/// One tensor to write: name, shape, values in row-major order.
pub struct OutTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f64>,
}

impl OutTensor {
    pub fn matrix<T: Real>(name: impl Into<String>, m: &Mat<T>) -> Self {
        let (r, c) = m.shape();
        let mut values = Vec::with_capacity(r * c);
        for i in 0..r {
            for j in 0..c {
                values.push(m[(i, j)].to_f64());
            }
        }
        OutTensor {
            name: name.into(),
            shape: vec![r, c],
            values,
        }
    }

    pub fn vector<T: Real>(name: impl Into<String>, v: &Col<T>) -> Self {
        OutTensor {
            name: name.into(),
            shape: vec![v.nrows()],
            values: v.iter().map(|x| x.to_f64()).collect(),
        }
    }
}

/// Write float tensors in `dtype` (atomically: temporary file, then rename).
pub fn write_tensors(path: impl AsRef<Path>, tensors: &[OutTensor], dtype: Dtype) -> Result<()> {
    let path = path.as_ref();
    let bufs: Vec<Vec<u8>> = tensors
        .iter()
        .map(|t| match dtype {
            Dtype::Bf16 => t
                .values
                .iter()
                .flat_map(|v| half::bf16::from_f64(*v).to_le_bytes())
                .collect(),
            Dtype::F16 => t
                .values
                .iter()
                .flat_map(|v| half::f16::from_f64(*v).to_le_bytes())
                .collect(),
            Dtype::F32 => t
                .values
                .iter()
                .flat_map(|v| (*v as f32).to_le_bytes())
                .collect(),
            Dtype::F64 => t.values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        })
        .collect();
    let st = match dtype {
        Dtype::Bf16 => StDtype::BF16,
        Dtype::F16 => StDtype::F16,
        Dtype::F32 => StDtype::F32,
        Dtype::F64 => StDtype::F64,
    };
    let views = tensors
        .iter()
        .zip(&bufs)
        .map(|(t, b)| {
            safetensors::tensor::TensorView::new(st, t.shape.clone(), b)
                .map(|v| (t.name.clone(), v))
                .map_err(|e| Error::encode(format!("tensor '{}'", t.name), e))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, None)
        .map_err(|e| Error::encode(format!("cannot serialise {}", path.display()), e))?;
    write_atomic(path, &bytes)
}

fn dense_tensors<T: Real>(layers: &[Dense<T>]) -> Vec<OutTensor> {
    let mut out = Vec::new();
    for (l, layer) in layers.iter().enumerate() {
        out.push(OutTensor::matrix(layer_name(l, "weight"), &layer.weight));
        if let Some(b) = &layer.bias {
            out.push(OutTensor::vector(layer_name(l, "bias"), b));
        }
    }
    out
}

/// Write a model's state_dict.
pub fn write_model<T: Real>(path: impl AsRef<Path>, model: &Mlp<T>) -> Result<()> {
    write_tensors(path, &dense_tensors(&model.layers), T::DTYPE)
}

/// Write a gradient with the model's names.
pub fn write_gradient<T: Real>(path: impl AsRef<Path>, grad: &Gradient<T>) -> Result<()> {
    write_tensors(path, &dense_tensors(&grad.layers), T::DTYPE)
}

/// Write a batch file (`x` in `dtype`, `y` as given).
pub fn write_batch(
    path: impl AsRef<Path>,
    x: &Mat<f64>,
    y: Option<&Mat<f64>>,
    dtype: Dtype,
) -> Result<()> {
    let mut t = vec![OutTensor::matrix("x", x)];
    if let Some(y) = y {
        t.push(OutTensor::matrix("y", y));
    }
    write_tensors(path, &t, dtype)
}
