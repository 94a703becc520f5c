//! Safetensors in and out. Written files use PyTorch's `nn.Sequential` names
//! (`0.weight`, `0.bias`, `2.weight`, ...); read files are matched to layers by
//! structure ([`super::layout`]).
//!
//! Files are memory-mapped. Small tensors are converted to f64 matrices; the
//! first layer of a large model can stay mapped as a [`MappedMatrix`] and be read
//! in row blocks, so an attack never holds a second copy of a large gradient.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use faer::{Col, Mat};
use memmap2::Mmap;
use safetensors::{Dtype as StDtype, SafeTensors};

use super::layout::{Layout, TensorIndex};
mod write;

pub use write::{OutTensor, write_batch, write_gradient, write_model, write_tensors};

use crate::model::{Activation, Dense, Gradient, Mlp};
use crate::{Dtype, Error, Result};

/// An open, validated safetensors file.
pub struct TensorFile {
    path: PathBuf,
    map: Arc<Mmap>,
    /// name -> (dtype, shape, absolute byte range in the file)
    index: BTreeMap<String, (StDtype, Vec<usize>, Range<usize>)>,
    /// The header's free-form `__metadata__` (e.g. `activation`).
    metadata: BTreeMap<String, String>,
}

/// A 2-D float tensor (bf16, f16, f32, f64) that stays in the mapped file; rows are read on demand.
#[derive(Clone)]
pub struct MappedMatrix {
    map: Arc<Mmap>,
    bytes: Range<usize>,
    rows: usize,
    cols: usize,
    dtype: Dtype,
    name: String,
}

fn dtype_of(path: &Path, name: &str, dt: StDtype) -> Result<Dtype> {
    match dt {
        StDtype::BF16 => Ok(Dtype::Bf16),
        StDtype::F16 => Ok(Dtype::F16),
        StDtype::F32 => Ok(Dtype::F32),
        StDtype::F64 => Ok(Dtype::F64),
        other => Err(Error::format(
            path,
            format!("tensor '{name}' has dtype {other:?}; gradleak reads BF16, F16, F32 and F64"),
        )),
    }
}

fn read_value(bytes: &[u8], dtype: Dtype, k: usize) -> f64 {
    match dtype {
        Dtype::Bf16 => {
            let b: [u8; 2] = bytes[2 * k..2 * k + 2].try_into().expect("2 bytes");
            half::bf16::from_le_bytes(b).to_f64()
        }
        Dtype::F16 => {
            let b: [u8; 2] = bytes[2 * k..2 * k + 2].try_into().expect("2 bytes");
            half::f16::from_le_bytes(b).to_f64()
        }
        Dtype::F32 => {
            let b: [u8; 4] = bytes[4 * k..4 * k + 4].try_into().expect("4 bytes");
            f32::from_le_bytes(b) as f64
        }
        Dtype::F64 => {
            let b: [u8; 8] = bytes[8 * k..8 * k + 8].try_into().expect("8 bytes");
            f64::from_le_bytes(b)
        }
    }
}

impl TensorFile {
    /// Map and validate a file: the header must parse and every tensor's byte range
    /// must match its dtype and shape and lie inside the file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: the file is opened read-only; gradleak never writes to a file it maps,
        // and files it writes are replaced by rename, never modified in place.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let (header_len, meta) = SafeTensors::read_metadata(&map)
            .map_err(|e| Error::format(&path, format!("not a valid safetensors file ({e})")))?;
        // also validates offsets against the buffer
        SafeTensors::deserialize(&map)
            .map_err(|e| Error::format(&path, format!("not a valid safetensors file ({e})")))?;
        let start = 8 + header_len;
        let mut index = BTreeMap::new();
        for (name, info) in meta.tensors() {
            let (a, b) = info.data_offsets;
            index.insert(name, (info.dtype, info.shape.clone(), start + a..start + b));
        }
        let metadata = meta
            .metadata()
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok(TensorFile {
            path,
            map: Arc::new(map),
            index,
            metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Names of the tensors, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// A value of the header's `__metadata__`.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Shape of a tensor.
    pub fn shape(&self, name: &str) -> Result<&[usize]> {
        self.index
            .get(name)
            .map(|(_, s, _)| s.as_slice())
            .ok_or_else(|| Error::format(&self.path, format!("no tensor named '{name}'")))
    }

    /// The storage dtype of a float tensor.
    pub fn dtype(&self, name: &str) -> Result<Dtype> {
        let (dt, _, _) = self
            .index
            .get(name)
            .ok_or_else(|| Error::format(&self.path, format!("no tensor named '{name}'")))?;
        dtype_of(&self.path, name, *dt)
    }

    /// A 2-D float tensor left in the mapped file.
    pub fn mapped(&self, name: &str) -> Result<MappedMatrix> {
        let (dt, shape, bytes) = self
            .index
            .get(name)
            .ok_or_else(|| Error::format(&self.path, format!("no tensor named '{name}'")))?;
        let dtype = dtype_of(&self.path, name, *dt)?;
        if shape.len() != 2 {
            return Err(Error::Shape(format!(
                "{}: tensor '{name}' has shape {shape:?}, expected a matrix",
                self.path.display()
            )));
        }
        Ok(MappedMatrix {
            map: self.map.clone(),
            bytes: bytes.clone(),
            rows: shape[0],
            cols: shape[1],
            dtype,
            name: name.to_string(),
        })
    }

    /// All values of a float tensor, flattened in row-major order, as f64.
    /// Fails on NaN or Inf.
    pub fn values(&self, name: &str) -> Result<(Vec<usize>, Vec<f64>)> {
        let (dt, shape, bytes) = self
            .index
            .get(name)
            .ok_or_else(|| Error::format(&self.path, format!("no tensor named '{name}'")))?;
        let data = &self.map[bytes.clone()];
        let n: usize = shape.iter().product();
        let v: Vec<f64> = match dt {
            StDtype::BF16 | StDtype::F16 | StDtype::F32 | StDtype::F64 => {
                let dtype = dtype_of(&self.path, name, *dt)?;
                (0..n).map(|k| read_value(data, dtype, k)).collect()
            }
            StDtype::I64 => (0..n)
                .map(|k| i64::from_le_bytes(data[8 * k..8 * k + 8].try_into().expect("8")) as f64)
                .collect(),
            StDtype::I32 => (0..n)
                .map(|k| i32::from_le_bytes(data[4 * k..4 * k + 4].try_into().expect("4")) as f64)
                .collect(),
            other => {
                return Err(Error::format(
                    &self.path,
                    format!("tensor '{name}' has unsupported dtype {other:?}"),
                ));
            }
        };
        if v.iter().any(|x| !x.is_finite()) {
            return Err(Error::NonFinite(format!(
                "tensor '{name}' of {}",
                self.path.display()
            )));
        }
        Ok((shape.clone(), v))
    }

    /// A 2-D tensor as an f64 matrix (a 1-D tensor of length n becomes n x 1).
    pub fn matrix(&self, name: &str) -> Result<Mat<f64>> {
        let (shape, v) = self.values(name)?;
        let (r, c) = match shape.as_slice() {
            [r, c] => (*r, *c),
            [n] => (*n, 1),
            s => {
                return Err(Error::Shape(format!(
                    "{}: tensor '{name}' has shape {s:?}, expected 1-D or 2-D",
                    self.path.display()
                )));
            }
        };
        Ok(Mat::from_fn(r, c, |i, j| v[i * c + j]))
    }

    /// A 1-D tensor as a column.
    pub fn vector(&self, name: &str) -> Result<Col<f64>> {
        let (shape, v) = self.values(name)?;
        if shape.len() != 1 {
            return Err(Error::Shape(format!(
                "{}: tensor '{name}' has shape {shape:?}, expected a vector",
                self.path.display()
            )));
        }
        Ok(Col::from_fn(v.len(), |i| v[i]))
    }

    /// Indices of the Linear layers, read from the `N.weight` names in order.
    pub fn layer_indices(&self) -> Result<Vec<usize>> {
        let mut idx: Vec<usize> = Vec::new();
        for name in self.index.keys() {
            let Some((prefix, suffix)) = name.rsplit_once('.') else {
                return Err(Error::format(
                    &self.path,
                    format!("unexpected tensor name '{name}'"),
                ));
            };
            if suffix != "weight" && suffix != "bias" {
                return Err(Error::format(
                    &self.path,
                    format!("unexpected tensor name '{name}' (expected N.weight / N.bias)"),
                ));
            }
            let n: usize = prefix.parse().map_err(|_| {
                Error::format(
                    &self.path,
                    format!("unexpected tensor name '{name}' (expected N.weight / N.bias)"),
                )
            })?;
            if suffix == "weight" {
                idx.push(n);
            } else if !self.index.contains_key(&format!("{n}.weight")) {
                return Err(Error::format(
                    &self.path,
                    format!("'{name}' without '{n}.weight'"),
                ));
            }
        }
        idx.sort_unstable();
        if idx.is_empty() {
            return Err(Error::format(
                &self.path,
                "no layer weights ('0.weight', ...)",
            ));
        }
        Ok(idx)
    }

    /// The storage dtype shared by every tensor of a model or gradient file.
    pub fn common_dtype(&self) -> Result<Dtype> {
        let mut dt = None;
        for name in self.index.keys() {
            let d = self.dtype(name)?;
            if dt.is_some_and(|x| x != d) {
                return Err(Error::format(&self.path, "tensors of mixed dtypes"));
            }
            dt = Some(d);
        }
        dt.ok_or_else(|| Error::format(&self.path, "the file holds no tensors"))
    }
}

impl MappedMatrix {
    pub fn nrows(&self) -> usize {
        self.rows
    }
    pub fn ncols(&self) -> usize {
        self.cols
    }
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn row_bytes(&self, rows: &Range<usize>) -> Range<usize> {
        let w = self.dtype.bytes() * self.cols;
        self.bytes.start + rows.start * w..self.bytes.start + rows.end * w
    }

    /// Rows `rows` as an f64 matrix. Fails on NaN or Inf.
    pub fn block(&self, rows: Range<usize>) -> Result<Mat<f64>> {
        assert!(rows.end <= self.rows, "row block out of range");
        let data = &self.map[self.row_bytes(&rows)];
        let c = self.cols;
        let mut bad = false;
        let m = Mat::from_fn(rows.len(), c, |i, j| {
            let v = read_value(data, self.dtype, i * c + j);
            bad |= !v.is_finite();
            v
        });
        if bad {
            return Err(Error::NonFinite(format!("tensor '{}'", self.name)));
        }
        Ok(m)
    }

    /// Tell the kernel the pages of these rows are no longer needed, so a streaming
    /// pass over a large tensor does not keep it resident.
    pub fn release(&self, rows: Range<usize>) {
        let r = self.row_bytes(&rows);
        let page = 4096;
        let start = r.start / page * page;
        let end = r.end.min(self.map.len());
        if end > start {
            // SAFETY: the map is a read-only private file mapping; after DONTNEED the
            // pages are read again from the file on the next access, so the bytes
            // any live slice sees do not change.
            unsafe {
                let _ = self.map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    start,
                    end - start,
                );
            }
        }
    }

    /// The whole tensor as an f64 matrix.
    pub fn to_mat(&self) -> Result<Mat<f64>> {
        self.block(0..self.rows)
    }
}

impl TensorIndex for TensorFile {
    fn path(&self) -> &Path {
        TensorFile::path(self)
    }
    fn tensor_names(&self) -> Vec<&str> {
        self.names().collect()
    }
    fn tensor_shape(&self, name: &str) -> Result<&[usize]> {
        self.shape(name)
    }
    fn is_float(&self, name: &str) -> bool {
        self.dtype(name).is_ok()
    }
}

/// Layer tensors keyed by name, as PyTorch's `nn.Sequential.state_dict()` names them:
/// Linear layer l is module 2l (activations sit at the odd indices).
pub fn layer_name(l: usize, part: &str) -> String {
    format!("{}.{part}", 2 * l)
}

/// The layers named by `layout`, as f64.
pub fn dense_layers(file: &TensorFile, layout: &Layout) -> Result<Vec<Dense<f64>>> {
    layout
        .layers
        .iter()
        .map(|l| {
            Ok(Dense {
                weight: file.matrix(&l.weight)?,
                bias: l.bias.as_deref().map(|b| file.vector(b)).transpose()?,
            })
        })
        .collect()
}

/// The file's tensors as layers; buffers and other tensors are ignored (the float
/// dtype shared by the layers is returned).
fn layers_from(file: &TensorFile) -> Result<(Vec<Dense<f64>>, Dtype)> {
    let layout = Layout::of(file, None)?;
    let dtype = layer_dtype(file, &layout)?;
    Ok((dense_layers(file, &layout)?, dtype))
}

/// The storage dtype shared by the tensors of `layout`.
pub fn layer_dtype(file: &TensorFile, layout: &Layout) -> Result<Dtype> {
    let mut dt = None;
    for l in &layout.layers {
        for n in std::iter::once(&l.weight).chain(&l.bias) {
            let d = file.dtype(n)?;
            if dt.is_some_and(|x| x != d) {
                return Err(Error::format(file.path(), "layer tensors of mixed dtypes"));
            }
            dt = Some(d);
        }
    }
    dt.ok_or_else(|| Error::format(file.path(), "the file holds no layers"))
}

/// Read a model (all layers, as f64) and its storage dtype.
pub fn read_model(path: impl AsRef<Path>, activation: Activation) -> Result<(Mlp<f64>, Dtype)> {
    let file = TensorFile::open(path)?;
    let (layers, dtype) = layers_from(&file)?;
    let mlp = Mlp::new(layers, activation).map_err(|e| match e {
        Error::Shape(s) => Error::Shape(format!("{}: {s}", file.path().display())),
        other => other,
    })?;
    Ok((mlp, dtype))
}

/// Read a gradient and check it has the model's shapes.
pub fn read_gradient(path: impl AsRef<Path>, model: &Mlp<f64>) -> Result<(Gradient<f64>, Dtype)> {
    let file = TensorFile::open(path)?;
    let (layers, dtype) = layers_from(&file)?;
    check_like(file.path(), &layers, model)?;
    Ok((Gradient { layers }, dtype))
}

/// Check that gradient layers have the model's shapes.
pub fn check_like(path: &Path, layers: &[Dense<f64>], model: &Mlp<f64>) -> Result<()> {
    if layers.len() != model.layers.len() {
        return Err(Error::Shape(format!(
            "{}: {} layers in the gradient, {} in the model",
            path.display(),
            layers.len(),
            model.layers.len()
        )));
    }
    for (l, (g, w)) in layers.iter().zip(&model.layers).enumerate() {
        if g.weight.shape() != w.weight.shape() {
            return Err(Error::Shape(format!(
                "{}: layer {l} weight gradient is {:?}, the model's weight is {:?}",
                path.display(),
                g.weight.shape(),
                w.weight.shape()
            )));
        }
        if g.bias.as_ref().map(|b| b.nrows()) != w.bias.as_ref().map(|b| b.nrows()) {
            return Err(Error::Shape(format!(
                "{}: layer {l} bias gradient does not match the model's bias",
                path.display()
            )));
        }
    }
    Ok(())
}

/// A client's batch as held in `batch.safetensors`: `x` (B x d) and optional `y`
/// (class indices, or values B or B x K).
pub struct BatchFile {
    pub x: Mat<f64>,
    pub y: Option<Mat<f64>>,
    pub y_is_integer: bool,
    pub dtype: Dtype,
}

/// Read `x` and `y` from a batch file.
pub fn read_batch(path: impl AsRef<Path>) -> Result<BatchFile> {
    let file = TensorFile::open(path)?;
    if !file.contains("x") {
        return Err(Error::format(file.path(), "no tensor named 'x'"));
    }
    if file.shape("x")?.len() != 2 {
        return Err(Error::Shape(format!(
            "{}: 'x' must be B x d",
            file.path().display()
        )));
    }
    let dtype = file.dtype("x")?;
    let x = file.matrix("x")?;
    let (y, y_is_integer) = if file.contains("y") {
        let (dt, _, _) = &file.index["y"];
        let y = file.matrix("y")?;
        if y.nrows() != x.nrows() {
            return Err(Error::Shape(format!(
                "{}: 'y' has {} rows, 'x' has {}",
                file.path().display(),
                y.nrows(),
                x.nrows()
            )));
        }
        (Some(y), matches!(dt, StDtype::I64 | StDtype::I32))
    } else {
        (None, false)
    };
    Ok(BatchFile {
        x,
        y,
        y_is_integer,
        dtype,
    })
}
