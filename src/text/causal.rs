//! What the sequence search needs of a causal model: one position at a time, with the
//! prefix's keys and values cached.

use std::ops::Range;

use faer::{Mat, MatRef};

/// The first block at one position for a set of candidate tokens: the attention's
/// queries, keys and values (keys as cached, i.e. after any rotary embedding).
pub(crate) struct Step {
    pub q: Mat<f64>,
    pub k: Mat<f64>,
    pub v: Mat<f64>,
}

/// A causal transformer whose first block the search runs.
pub(crate) trait Causal {
    /// Width of one cached key or value row.
    fn kv_width(&self) -> usize;
    /// q, k, v of `tokens` at position `p`: they depend on the token and p alone.
    fn step(&self, tokens: &[u32], p: usize) -> Step;
    /// The first block's input-projection input, as its span is tested (augmented with
    /// 1 when the projection has a bias), of `tokens` at `p`.
    fn block0_input(&self, tokens: &[u32], p: usize) -> Mat<f64>;
    /// The first block's attention output (its output projection's input), as tested
    /// (augmented with 1 when that projection has a bias), at the new position for the
    /// candidates `rows` of `step` after a prefix with cached `keys`, `values`.
    fn extend(
        &self,
        keys: MatRef<'_, f64>,
        values: MatRef<'_, f64>,
        step: &Step,
        rows: Range<usize>,
    ) -> Mat<f64>;
    /// The first block's MLP input (its first projection's input, as tested: augmented
    /// with 1 when that projection has a bias) of `tokens` at `p`, given their
    /// attention outputs `attn` as [`extend`](Self::extend) returned them: the norm of
    /// the residual stream after the attention, which holds the token itself.
    fn mlp_input(&self, tokens: &[u32], p: usize, attn: MatRef<'_, f64>) -> Mat<f64>;
}

/// Causal attention of each candidate (rows of q, k, v) at the position after a prefix
/// with `keys`, `values` (p x kv_heads*hd): softmax(q K^T / sqrt(hd)) V per head over the
/// prefix and the candidate itself. Query head h reads key/value head h / (heads / kv_heads).
#[allow(clippy::too_many_arguments)]
pub(crate) fn causal_attention(
    keys: MatRef<'_, f64>,
    values: MatRef<'_, f64>,
    q: MatRef<'_, f64>,
    k: MatRef<'_, f64>,
    v: MatRef<'_, f64>,
    heads: usize,
    kv_heads: usize,
    hd: usize,
) -> Mat<f64> {
    let scale = 1.0 / (hd as f64).sqrt();
    let (t, p) = (q.nrows(), keys.nrows());
    let group = heads / kv_heads;
    let mut attn = Mat::<f64>::zeros(t, heads * hd);
    for h in 0..heads {
        let c = h * hd;
        let kc = (h / group) * hd;
        let qh = q.subcols(c, hd);
        let k_self = k.subcols(kc, hd);
        let v_self = v.subcols(kc, hd);
        let mut s = if p > 0 {
            qh * keys.subcols(kc, hd).transpose()
        } else {
            Mat::zeros(t, 0)
        };
        let mut w_self = vec![0.0; t];
        for i in 0..t {
            let own: f64 = (0..hd).map(|j| qh[(i, j)] * k_self[(i, j)]).sum::<f64>() * scale;
            let mut mx = own;
            for j in 0..p {
                s[(i, j)] *= scale;
                mx = mx.max(s[(i, j)]);
            }
            let mut z = (own - mx).exp();
            for j in 0..p {
                s[(i, j)] = (s[(i, j)] - mx).exp();
                z += s[(i, j)];
            }
            for j in 0..p {
                s[(i, j)] /= z;
            }
            w_self[i] = (own - mx).exp() / z;
        }
        let mut out = if p > 0 {
            &s * values.subcols(kc, hd)
        } else {
            Mat::zeros(t, hd)
        };
        for i in 0..t {
            for j in 0..hd {
                out[(i, j)] += w_self[i] * v_self[(i, j)];
            }
        }
        attn.subcols_mut(c, hd).copy_from(&out);
    }
    attn
}
