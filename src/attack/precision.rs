//! The precision a gradient was computed in, read off its values.
//!
//! A float32 gradient stored as float64 (`.double()`, numpy) keeps float32's 24-bit
//! mantissa: the low 29 bits of every entry are zero. Attacking it at float64's floor
//! misreads rounding as signal (rank, floors and certificate all sit on the unit
//! roundoff), so the attack works at the coarsest precision that holds every entry
//! of the first layer's gradient.

use faer::Col;

use super::view::{BLOCK_ROWS, Rows};
use crate::{Dtype, Result};

/// Precisions tried below the storage one, coarsest first (a gradient that fits a
/// coarser type is attacked at the coarser, looser floor).
const CANDIDATES: [Dtype; 3] = [Dtype::Bf16, Dtype::F16, Dtype::F32];

/// The coarsest precision coarser than `storage` holding every entry of `rows` and
/// `bias`, or `storage` itself. Streams over `rows` and stops as soon as no candidate
/// is left (at once for a genuine float64 gradient).
pub fn detect(rows: &Rows, bias: Option<&Col<f64>>, storage: Dtype) -> Result<Dtype> {
    let mut alive: Vec<Dtype> = CANDIDATES.into_iter().filter(|c| *c < storage).collect();
    let mut any_nonzero = false;
    let mut keep = |v: f64, alive: &mut Vec<Dtype>| {
        any_nonzero |= v != 0.0;
        alive.retain(|c| c.holds(v));
    };
    if let Some(b) = bias {
        for &v in b.iter() {
            keep(v, &mut alive);
        }
    }
    let m = rows.nrows();
    let mut start = 0;
    while start < m && !alive.is_empty() {
        let r = start..(start + BLOCK_ROWS).min(m);
        let block = rows.block(r.clone())?;
        for j in 0..block.ncols() {
            for &v in block.col(j).iter() {
                keep(v, &mut alive);
            }
        }
        rows.release(r.clone());
        start = r.end;
    }
    // an all-zero gradient fits every type and says nothing
    Ok(match alive.first() {
        Some(&c) if any_nonzero => c,
        _ => storage,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use faer::Mat;

    #[test]
    fn float32_values_in_float64_storage_are_float32() {
        let f32s = Mat::from_fn(5, 3, |i, j| {
            ((i * 3 + j) as f32 * 0.137 + 0.01).sin() as f64
        });
        let f64s = Mat::from_fn(5, 3, |i, j| ((i * 3 + j) as f64 * 0.137 + 0.01).sin());
        let r32 = Rows::Memory(f32s);
        assert_eq!(detect(&r32, None, Dtype::F64).unwrap(), Dtype::F32);
        assert_eq!(detect(&r32, None, Dtype::F32).unwrap(), Dtype::F32);
        assert_eq!(
            detect(&Rows::Memory(f64s), None, Dtype::F64).unwrap(),
            Dtype::F64
        );
        let half = Mat::from_fn(4, 2, |i, j| {
            half::f16::from_f64(((i + 7 * j) as f64 * 0.3).cos()).to_f64()
        });
        assert_eq!(
            detect(&Rows::Memory(half), None, Dtype::F32).unwrap(),
            Dtype::F16
        );
        assert_eq!(
            detect(&Rows::Memory(Mat::zeros(3, 3)), None, Dtype::F64).unwrap(),
            Dtype::F64
        );
    }
}
