//! A convolutional model folder (`model.json` + `model.safetensors`, what
//! `gradleak.export_model` writes) and gradient files with PyTorch's parameter names.

use std::path::Path;

use super::layout::strip;
use super::safetensors::{OutTensor, TensorFile, write_tensors};
use crate::model::cnn::{ModelSpec, Tensors};
use crate::{Dtype, Error, Result};

/// File names inside a model folder.
pub const DESCRIPTION: &str = "model.json";
pub const PARAMETERS: &str = "model.safetensors";

/// Whether `dir` is a model folder (has a `model.json`).
pub fn is_model_dir(dir: &Path) -> bool {
    dir.is_dir() && dir.join(DESCRIPTION).is_file()
}

/// Every float tensor of a safetensors file by name (wrapper prefixes such as
/// `module.` stripped), and the widest storage dtype among them.
pub fn read_tensors(path: &Path) -> Result<(Tensors, Dtype)> {
    let f = TensorFile::open(path)?;
    let mut out = Tensors::new();
    let mut dtype: Option<Dtype> = None;
    let names: Vec<String> = f.names().map(str::to_string).collect();
    for name in names {
        let Ok(dt) = f.dtype(&name) else {
            continue; // integer tensors (BatchNorm's num_batches_tracked)
        };
        dtype = Some(dtype.map_or(dt, |d| d.max(dt)));
        out.insert(strip(&name).to_string(), f.values(&name)?);
    }
    let dtype = dtype.ok_or_else(|| Error::format(path, "no float tensors"))?;
    Ok((out, dtype))
}

/// A model folder: its description and parameters (with their storage dtype).
pub fn read_model_dir(dir: &Path) -> Result<(ModelSpec, Tensors, Dtype)> {
    let json_path = dir.join(DESCRIPTION);
    let text = std::fs::read_to_string(&json_path).map_err(|e| Error::io(&json_path, e))?;
    let spec = ModelSpec::from_json(&text)?;
    let (t, dtype) = read_tensors(&dir.join(PARAMETERS))?;
    Ok((spec, t, dtype))
}

/// Named tensors to a safetensors file in `dtype` (atomically).
pub fn write_named(path: &Path, t: &Tensors, dtype: Dtype) -> Result<()> {
    let out: Vec<OutTensor> = t
        .iter()
        .map(|(name, (shape, values))| OutTensor {
            name: name.clone(),
            shape: shape.clone(),
            values: values.clone(),
        })
        .collect();
    write_tensors(path, &out, dtype)
}

/// Write a model folder (description + parameters); the folder is created.
pub fn write_model_dir(dir: &Path, spec: &ModelSpec, t: &Tensors, dtype: Dtype) -> Result<()> {
    super::ensure_dir(dir)?;
    write_named(&dir.join(PARAMETERS), t, dtype)?;
    super::write_atomic(&dir.join(DESCRIPTION), spec.to_json()?.as_bytes())
}
