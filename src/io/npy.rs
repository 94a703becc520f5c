//! NumPy `.npy` arrays (2-D, float32 or float64, C order).

use std::path::Path;

use faer::Mat;
use ndarray::Array2;
use ndarray_npy::{ReadNpyExt, WriteNpyExt};

use super::write_atomic;
use crate::{Error, Result};

/// Read a 2-D float array (f64 or f32) as an f64 matrix; rejects NaN and Inf.
pub fn read_matrix(path: impl AsRef<Path>) -> Result<Mat<f64>> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let arr: Array2<f64> = match Array2::<f64>::read_npy(&bytes[..]) {
        Ok(a) => a,
        Err(_) => Array2::<f32>::read_npy(&bytes[..])
            .map(|a| a.mapv(f64::from))
            .map_err(|e| {
                Error::format(
                    path,
                    format!("expected a 2-D float32/float64 .npy array ({e})"),
                )
            })?,
    };
    if arr.iter().any(|v| !v.is_finite()) {
        return Err(Error::NonFinite(path.display().to_string()));
    }
    Ok(Mat::from_fn(arr.nrows(), arr.ncols(), |i, j| arr[(i, j)]))
}

/// An f64 matrix encoded as a 2-D float64 .npy array.
pub fn matrix_bytes(m: &Mat<f64>) -> Result<Vec<u8>> {
    let arr = Array2::from_shape_fn(m.shape(), |(i, j)| m[(i, j)]);
    let mut buf = Vec::new();
    arr.write_npy(&mut buf)
        .map_err(|e| Error::encode("cannot encode a .npy array".to_string(), e))?;
    Ok(buf)
}

/// Integer labels encoded as a 1-D int64 .npy array.
pub fn labels_bytes(labels: &[i64]) -> Result<Vec<u8>> {
    let arr = ndarray::Array1::from(labels.to_vec());
    let mut buf = Vec::new();
    arr.write_npy(&mut buf)
        .map_err(|e| Error::encode("cannot encode a .npy array".to_string(), e))?;
    Ok(buf)
}

/// Write an f64 matrix as a 2-D float64 .npy array, atomically.
pub fn write_matrix(path: impl AsRef<Path>, m: &Mat<f64>) -> Result<()> {
    write_atomic(path.as_ref(), &matrix_bytes(m)?)
}

/// Write integer labels as a 1-D int64 .npy array, atomically.
pub fn write_labels(path: impl AsRef<Path>, labels: &[i64]) -> Result<()> {
    write_atomic(path.as_ref(), &labels_bytes(labels)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects_garbage() {
        let dir = std::env::temp_dir().join(format!("gradleak-npy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let m = Mat::from_fn(3, 5, |i, j| (i as f64) - 0.25 * j as f64);
        let p = dir.join("a.npy");
        write_matrix(&p, &m).unwrap();
        assert_eq!(read_matrix(&p).unwrap(), m);
        std::fs::write(dir.join("bad.npy"), b"not numpy").unwrap();
        assert!(matches!(
            read_matrix(dir.join("bad.npy")),
            Err(Error::Format { .. })
        ));
        assert!(matches!(
            read_matrix(dir.join("missing.npy")),
            Err(Error::Io { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
