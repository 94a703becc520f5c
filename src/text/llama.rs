//! A LLaMA-style decoder's embeddings and first block (RMSNorm, rotary positions applied
//! to queries and keys after the projection, grouped-query attention, SwiGLU MLP), in f64.
//! The input projections have no bias and see RMSNorm(e_t): no position, so block 0's
//! q/k/v yield the bag of distinct tokens and the order comes from its attention output
//! (o_proj's input), where RoPE has entered.

use std::ops::Range;

use faer::{Mat, MatRef};

use super::TextError;
use super::causal::{Causal, Step, causal_attention};
use super::config::TextConfig;
use super::tensors::Tensors;

/// RMSNorm: x / sqrt(mean(x^2) + eps) * w, row by row, in place.
pub(crate) fn rms_norm_rows(x: &mut Mat<f64>, w: &[f64], eps: f64) {
    let d = x.ncols() as f64;
    for i in 0..x.nrows() {
        let ms = (0..x.ncols()).map(|j| x[(i, j)] * x[(i, j)]).sum::<f64>() / d;
        let inv = 1.0 / (ms + eps).sqrt();
        for j in 0..x.ncols() {
            x[(i, j)] *= inv * w[j];
        }
    }
}

/// The weights the attack reads, as f64 (Linear weights transposed to in x out).
pub(crate) struct Llama {
    pub cfg: TextConfig,
    pub embed: Mat<f64>,
    pub norm_1: Vec<f64>,
    pub wq: Mat<f64>,
    pub wk: Mat<f64>,
    pub wv: Mat<f64>,
    /// o_proj as in x out (qd x d).
    pub wo: Mat<f64>,
    pub norm_2: Vec<f64>,
    /// The parameter names' prefix (`model.` or empty).
    pub prefix: String,
    /// Rotary frequencies theta^(-2i/hd), i < hd/2.
    inv_freq: Vec<f64>,
}

/// `model.` (the heads) or no prefix (a bare `LlamaModel`).
pub(crate) fn detect_prefix<'a>(names: impl Iterator<Item = &'a str>) -> Option<String> {
    names
        .filter_map(|n| n.strip_suffix("embed_tokens.weight"))
        .map(str::to_string)
        .next()
}

impl Llama {
    pub fn load(cfg: TextConfig, w: &Tensors, prefix: &str) -> Result<Self, TextError> {
        let (d, v) = (cfg.hidden, cfg.vocab);
        let kv = cfg.kv_heads * cfg.head_dim;
        let qd = cfg.heads * cfg.head_dim;
        if cfg.layers < 2 {
            return Err(TextError::Unsupported(format!(
                "a LLaMA model with {} layer: the attack reads the first block, which must not be the last (there only the pooled position has a gradient)",
                cfg.layers
            )));
        }
        let name = |l: usize, rest: &str| format!("{prefix}layers.{l}.{rest}");
        let lin = |l: usize, rest: &str, out: usize, inp: usize| -> Result<Mat<f64>, TextError> {
            Ok(w.matrix(&name(l, rest), out, inp)?.transpose().to_owned())
        };
        let hd = cfg.head_dim;
        let inv_freq = (0..hd / 2)
            .map(|i| cfg.rope_theta.powf(-((2 * i) as f64) / hd as f64))
            .collect();
        Ok(Llama {
            embed: w.matrix(&format!("{prefix}embed_tokens.weight"), v, d)?,
            norm_1: w.vector(&name(0, "input_layernorm.weight"), d)?,
            wq: lin(0, "self_attn.q_proj.weight", qd, d)?,
            wk: lin(0, "self_attn.k_proj.weight", kv, d)?,
            wv: lin(0, "self_attn.v_proj.weight", kv, d)?,
            wo: lin(0, "self_attn.o_proj.weight", d, qd)?,
            norm_2: w.vector(&name(0, "post_attention_layernorm.weight"), d)?,
            inv_freq,
            prefix: prefix.to_string(),
            cfg,
        })
    }

    pub fn hidden(&self) -> usize {
        self.cfg.hidden
    }

    /// RMSNorm_1(e_t) for `tokens` (no position).
    pub fn norm_input(&self, tokens: &[u32]) -> Mat<f64> {
        let mut x = Mat::from_fn(tokens.len(), self.hidden(), |i, j| {
            self.embed[(tokens[i] as usize, j)]
        });
        rms_norm_rows(&mut x, &self.norm_1, self.cfg.layer_norm_eps);
        x
    }

    /// Rotate each head of `x` (rows) to position p: HF's rotate_half convention,
    /// x * cos + (-x2, x1) * sin with angles p * inv_freq repeated over both halves.
    fn rope(&self, x: &mut Mat<f64>, heads: usize, p: usize) {
        self.rope_by(x, heads, |_| p);
    }

    /// [`rope`](Self::rope) with row r at position `positions[r]`.
    pub(crate) fn rope_rows(&self, x: &mut Mat<f64>, heads: usize, positions: &[usize]) {
        self.rope_by(x, heads, |r| positions[r]);
    }

    fn rope_by(&self, x: &mut Mat<f64>, heads: usize, pos: impl Fn(usize) -> usize) {
        let hd = self.cfg.head_dim;
        let half = hd / 2;
        for r in 0..x.nrows() {
            let p = pos(r) as f64;
            for i in 0..half {
                let (s, c) = (p * self.inv_freq[i]).sin_cos();
                for h in 0..heads {
                    let x1 = x[(r, h * hd + i)];
                    let x2 = x[(r, h * hd + half + i)];
                    x[(r, h * hd + i)] = x1 * c - x2 * s;
                    x[(r, h * hd + half + i)] = x2 * c + x1 * s;
                }
            }
        }
    }
}

impl Causal for Llama {
    fn kv_width(&self) -> usize {
        self.cfg.kv_heads * self.cfg.head_dim
    }

    fn step(&self, tokens: &[u32], p: usize) -> Step {
        let x = self.norm_input(tokens);
        let mut q = &x * &self.wq;
        let mut k = &x * &self.wk;
        let v = &x * &self.wv;
        self.rope(&mut q, self.cfg.heads, p);
        self.rope(&mut k, self.cfg.kv_heads, p);
        Step { q, k, v }
    }

    fn block0_input(&self, tokens: &[u32], _p: usize) -> Mat<f64> {
        self.norm_input(tokens)
    }

    fn extend(
        &self,
        keys: MatRef<'_, f64>,
        values: MatRef<'_, f64>,
        step: &Step,
        rows: Range<usize>,
    ) -> Mat<f64> {
        let (a, n) = (rows.start, rows.len());
        // the attention output, o_proj's input (no bias: not augmented)
        causal_attention(
            keys,
            values,
            step.q.subrows(a, n),
            step.k.subrows(a, n),
            step.v.subrows(a, n),
            self.cfg.heads,
            self.cfg.kv_heads,
            self.cfg.head_dim,
        )
    }

    /// RMSNorm_2(e_t + a W_o): gate_proj's and up_proj's input (no bias).
    fn mlp_input(&self, tokens: &[u32], _p: usize, attn: MatRef<'_, f64>) -> Mat<f64> {
        let mut r = Mat::from_fn(tokens.len(), self.hidden(), |i, j| {
            self.embed[(tokens[i] as usize, j)]
        });
        r += attn * &self.wo;
        rms_norm_rows(&mut r, &self.norm_2, self.cfg.layer_norm_eps);
        r
    }
}
