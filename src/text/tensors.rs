//! Named tensors of a model folder or a gradient file, read as f64 with their shapes checked.

use std::path::Path;

use faer::Mat;

use super::TextError;
use crate::Dtype;
use crate::io::safetensors::TensorFile;

/// One safetensors file of `{name: tensor}` (a model's weights or its gradient).
pub(crate) struct Tensors {
    file: TensorFile,
    /// What the file is, for messages ("model", "gradient").
    role: &'static str,
}

impl Tensors {
    pub fn open(path: &Path, role: &'static str) -> Result<Self, TextError> {
        if !path.exists() {
            return Err(TextError::Missing {
                path: path.to_path_buf(),
                what: role,
            });
        }
        Ok(Tensors {
            file: TensorFile::open(path)?,
            role,
        })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.file.names()
    }

    /// The storage precision of tensor `name`.
    pub fn dtype(&self, name: &str) -> Result<Dtype, TextError> {
        self.require(name)?;
        Ok(self.file.dtype(name)?)
    }

    /// The shape of tensor `name`.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>, TextError> {
        self.require(name)?;
        Ok(self.file.shape(name)?.to_vec())
    }

    fn require(&self, name: &str) -> Result<(), TextError> {
        if self.file.contains(name) {
            Ok(())
        } else {
            Err(TextError::MissingTensor {
                path: self.file.path().to_path_buf(),
                role: self.role,
                name: name.to_string(),
            })
        }
    }

    fn values(&self, name: &str, shape: &[usize]) -> Result<Vec<f64>, TextError> {
        self.require(name)?;
        let got = self.file.shape(name)?.to_vec();
        if got != shape {
            return Err(TextError::Shape {
                path: self.file.path().to_path_buf(),
                name: name.to_string(),
                expected: shape.to_vec(),
                got,
            });
        }
        let (_, v) = self.file.values(name)?;
        Ok(v)
    }

    /// A rows x cols tensor.
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Mat<f64>, TextError> {
        let v = self.values(name, &[rows, cols])?;
        Ok(Mat::from_fn(rows, cols, |i, j| v[i * cols + j]))
    }

    /// The rows of the rows x cols tensor `name` that hold a nonzero entry, read in
    /// blocks from the mapped file (an embedding gradient is V x d: 150 MB in f32).
    pub fn nonzero_rows(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Vec<u32>, TextError> {
        let got = self.shape(name)?;
        if got != [rows, cols] {
            return Err(TextError::Shape {
                path: self.file.path().to_path_buf(),
                name: name.to_string(),
                expected: vec![rows, cols],
                got,
            });
        }
        let m = self.file.mapped(name)?;
        let mut out = Vec::new();
        const BLOCK: usize = 4096;
        for start in (0..rows).step_by(BLOCK) {
            let r = start..(start + BLOCK).min(rows);
            let b = m.block(r.clone())?;
            for i in 0..b.nrows() {
                if (0..cols).any(|j| b[(i, j)] != 0.0) {
                    out.push((start + i) as u32);
                }
            }
            m.release(r);
        }
        Ok(out)
    }

    /// A vector of length n.
    pub fn vector(&self, name: &str, n: usize) -> Result<Vec<f64>, TextError> {
        self.values(name, &[n])
    }

    /// The augmented gradient G~ = [dW; db] ((d+1) x n) of a Conv1D layer (weight d x n).
    pub fn augmented(
        &self,
        weight: &str,
        bias: &str,
        d: usize,
        n: usize,
    ) -> Result<Mat<f64>, TextError> {
        let w = self.values(weight, &[d, n])?;
        let b = self.values(bias, &[n])?;
        Ok(Mat::from_fn(d + 1, n, |i, j| {
            if i < d { w[i * n + j] } else { b[j] }
        }))
    }
}
