//! Compression defences, each per tensor (every weight and every bias on its own):
//! magnitude pruning, top-k sparsification, uniform quantisation.

use crate::model::Gradient;
use crate::model::ops::for_each_tensor;

/// Indices of `v` ordered by increasing magnitude (ties by position, so the result
/// is deterministic).
fn by_magnitude(v: &[f64]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].abs().total_cmp(&v[b].abs()).then(a.cmp(&b)));
    idx
}

/// Zero the `n` smallest-magnitude entries.
fn zero_smallest(v: &mut [f64], n: usize) {
    for i in by_magnitude(v).into_iter().take(n) {
        v[i] = 0.0;
    }
}

/// `prune:P`: zero floor(P n) smallest-magnitude entries of every n-entry tensor.
pub fn prune(g: &mut Gradient<f64>, p: f64) {
    for_each_tensor(g, |v| {
        let n = (p * v.len() as f64).floor() as usize;
        zero_smallest(v, n.min(v.len()));
    });
}

/// `topk:K`: keep the K largest-magnitude entries of every tensor (all when n <= K).
pub fn top_k(g: &mut Gradient<f64>, k: usize) {
    for_each_tensor(g, |v| {
        let n = v.len().saturating_sub(k);
        zero_smallest(v, n);
    });
}

/// `quantize:BITS`: round every tensor to 2^BITS evenly spaced levels spanning its
/// own [min, max] (the two ends are kept exactly; a constant tensor is unchanged).
pub fn quantize(g: &mut Gradient<f64>, bits: u32) {
    let levels = 2f64.powi(bits as i32);
    for_each_tensor(g, |v| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if hi.is_nan() || lo.is_nan() || hi <= lo {
            return;
        }
        let step = (hi - lo) / (levels - 1.0);
        for x in v.iter_mut() {
            let q = ((*x - lo) / step).round().clamp(0.0, levels - 1.0);
            *x = if q == levels - 1.0 { hi } else { lo + q * step };
        }
    });
}

/// The values of a tensor, for tests.
#[cfg(test)]
fn values(m: &faer::Mat<f64>) -> Vec<f64> {
    (0..m.ncols())
        .flat_map(|j| (0..m.nrows()).map(move |i| m[(i, j)]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Dense;
    use faer::{Col, Mat};

    /// A known gradient: one 4 x 5 weight with entries -9.5..9.5 (distinct magnitudes
    /// except for sign pairs) and a 4-entry bias.
    fn known() -> Gradient<f64> {
        Gradient {
            layers: vec![Dense {
                weight: Mat::from_fn(4, 5, |i, j| (i * 5 + j) as f64 - 9.5),
                bias: Some(Col::from_fn(4, |i| [0.1, -3.0, 2.0, 0.0][i])),
            }],
        }
    }

    #[test]
    fn prune_zeros_the_smallest_fraction_per_tensor() {
        let mut g = known();
        prune(&mut g, 0.5);
        let w = values(&g.layers[0].weight);
        assert_eq!(w.iter().filter(|&&x| x == 0.0).count(), 10);
        // the survivors are exactly the entries of magnitude >= 5.5
        assert!(w.iter().all(|&x| x == 0.0 || x.abs() >= 5.5));
        let b: Vec<f64> = g.layers[0].bias.as_ref().unwrap().iter().copied().collect();
        assert_eq!(b, vec![0.0, -3.0, 2.0, 0.0]);
        let mut g = known();
        prune(&mut g, 1.0);
        assert_eq!(g.norm(), 0.0);
        let mut g = known();
        prune(&mut g, 0.0);
        assert_eq!(g, known());
    }

    #[test]
    fn top_k_keeps_k_per_tensor() {
        let mut g = known();
        top_k(&mut g, 3);
        let w = values(&g.layers[0].weight);
        let mut kept: Vec<f64> = w.into_iter().filter(|&x| x != 0.0).collect();
        kept.sort_by(f64::total_cmp);
        // |-8.5| = |8.5| tie: the earlier position is dropped first
        assert_eq!(kept, vec![-9.5, 8.5, 9.5]);
        let b = g.layers[0].bias.as_ref().unwrap();
        assert_eq!(b.iter().filter(|&&x| x != 0.0).count(), 3);
        let mut g = known();
        top_k(&mut g, 100);
        assert_eq!(g, known());
    }

    #[test]
    fn quantize_uses_at_most_2_to_the_bits_levels() {
        for bits in [1, 2, 3, 8] {
            let mut g = known();
            quantize(&mut g, bits);
            let w = values(&g.layers[0].weight);
            let mut distinct = w.clone();
            distinct.sort_by(f64::total_cmp);
            distinct.dedup();
            let levels = 2usize.pow(bits);
            assert!(
                distinct.len() <= levels,
                "{bits} bits: {} levels",
                distinct.len()
            );
            assert_eq!(distinct.first(), Some(&-9.5));
            assert_eq!(distinct.last(), Some(&9.5));
            let step = 19.0 / (levels as f64 - 1.0);
            for (a, b) in values(&known().layers[0].weight).iter().zip(&w) {
                assert!(
                    (a - b).abs() <= 0.5 * step + 1e-12,
                    "{bits} bits: {a} -> {b}"
                );
            }
        }
        // 1 bit: every entry goes to an end
        let mut g = known();
        quantize(&mut g, 1);
        assert!(values(&g.layers[0].weight).iter().all(|&x| x.abs() == 9.5));
    }
}
