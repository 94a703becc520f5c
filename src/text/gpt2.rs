//! GPT-2's embeddings and first block's attention, run forward in f64 for candidate
//! inputs (docs/DESIGN.md, "Text: sequences from the attention output"). Only what the
//! attack needs: the first block's LayerNorm and its c_attn projection.

use faer::{Mat, MatRef};

use std::ops::Range;

use super::TextError;
use super::causal::{Causal, Step, causal_attention};
use super::config::TextConfig;
use super::tensors::Tensors;

/// A LayerNorm's gain and shift.
#[derive(Clone, Debug)]
pub(crate) struct LayerNorm {
    pub gamma: Vec<f64>,
    pub beta: Vec<f64>,
    pub eps: f64,
}

impl LayerNorm {
    /// (x - mean) / sqrt(var + eps) * gamma + beta, row by row, in place.
    pub fn apply_rows(&self, x: &mut Mat<f64>) {
        normalise_rows(x, self.eps);
        for i in 0..x.nrows() {
            for j in 0..x.ncols() {
                x[(i, j)] = x[(i, j)] * self.gamma[j] + self.beta[j];
            }
        }
    }
}

/// (x - mean) / sqrt(var + eps), row by row, in place: LayerNorm without gain or shift.
pub(crate) fn normalise_rows(x: &mut Mat<f64>, eps: f64) {
    let d = x.ncols() as f64;
    for i in 0..x.nrows() {
        let mean = (0..x.ncols()).map(|j| x[(i, j)]).sum::<f64>() / d;
        let var = (0..x.ncols())
            .map(|j| (x[(i, j)] - mean).powi(2))
            .sum::<f64>()
            / d;
        let inv = 1.0 / (var + eps).sqrt();
        for j in 0..x.ncols() {
            x[(i, j)] = (x[(i, j)] - mean) * inv;
        }
    }
}

/// What the filter reads of a model with learned positions: the token and position
/// embeddings (the position rows with anything added to every position, e.g. BERT's
/// token type 0) and the LayerNorm feeding the first block's input projection.
#[derive(Clone, Copy)]
pub(crate) struct Embeddings<'a> {
    pub wte: &'a Mat<f64>,
    pub wpe: &'a Mat<f64>,
    pub ln: &'a LayerNorm,
}

impl Embeddings<'_> {
    pub fn hidden(&self) -> usize {
        self.wte.ncols()
    }

    /// The first block's input (LN(wte[t] + wpe[p]), 1) of `tokens` at `p`.
    pub fn input(&self, tokens: &[u32], p: usize) -> Mat<f64> {
        let mut x = Mat::from_fn(tokens.len(), self.hidden(), |i, j| {
            self.wte[(tokens[i] as usize, j)] + self.wpe[(p, j)]
        });
        self.ln.apply_rows(&mut x);
        augment(x.as_ref())
    }
}

/// The weights of GPT-2 the attack reads, as f64.
pub(crate) struct Gpt2 {
    pub cfg: TextConfig,
    /// Token embeddings (V x d).
    pub wte: Mat<f64>,
    /// Position embeddings (P x d).
    pub wpe: Mat<f64>,
    pub ln_1: LayerNorm,
    /// c_attn: d x 3d (Conv1D: in x out) and its bias.
    pub attn_w: Mat<f64>,
    pub attn_b: Vec<f64>,
    /// attn.c_proj stacked with its bias ((d + 1) x d): the augmented attention output
    /// times it is the block's attention contribution.
    pub proj: Mat<f64>,
    pub ln_2: LayerNorm,
    /// The parameter names' prefix (see [`Names`]).
    pub names_prefix: String,
}

/// Names of GPT-2's parameters under a prefix (`transformer.` for the heads, empty for
/// a bare `GPT2Model`).
pub(crate) struct Names {
    pub prefix: String,
}

impl Names {
    pub fn wte(&self) -> String {
        format!("{}wte.weight", self.prefix)
    }
    pub fn wpe(&self) -> String {
        format!("{}wpe.weight", self.prefix)
    }
    pub fn block(&self, l: usize, rest: &str) -> String {
        format!("{}h.{l}.{rest}", self.prefix)
    }
    /// Find the prefix from the name of the token embedding.
    pub fn detect<'a>(names: impl Iterator<Item = &'a str>) -> Option<Self> {
        for n in names {
            if let Some(p) = n.strip_suffix("wte.weight") {
                return Some(Names {
                    prefix: p.to_string(),
                });
            }
        }
        None
    }
}

impl Gpt2 {
    pub fn load(cfg: TextConfig, weights: &Tensors, names: &Names) -> Result<Self, TextError> {
        let (d, v) = (cfg.hidden, cfg.vocab);
        if cfg.layers < 2 {
            return Err(TextError::Unsupported(format!(
                "a GPT-2 with {} layer: the attack reads the first block, which must not be the last (there only the pooled position has a gradient)",
                cfg.layers
            )));
        }
        let ln = |l: usize, which: &str| -> Result<LayerNorm, TextError> {
            Ok(LayerNorm {
                gamma: weights.vector(&names.block(l, &format!("{which}.weight")), d)?,
                beta: weights.vector(&names.block(l, &format!("{which}.bias")), d)?,
                eps: cfg.layer_norm_eps,
            })
        };
        Ok(Gpt2 {
            wte: weights.matrix(&names.wte(), v, d)?,
            wpe: weights.matrix(&names.wpe(), cfg.positions, d)?,
            ln_1: ln(0, "ln_1")?,
            attn_w: weights.matrix(&names.block(0, "attn.c_attn.weight"), d, 3 * d)?,
            attn_b: weights.vector(&names.block(0, "attn.c_attn.bias"), 3 * d)?,
            proj: {
                let w = weights.matrix(&names.block(0, "attn.c_proj.weight"), d, d)?;
                let b = weights.vector(&names.block(0, "attn.c_proj.bias"), d)?;
                Mat::from_fn(d + 1, d, |i, j| if i < d { w[(i, j)] } else { b[j] })
            },
            ln_2: ln(0, "ln_2")?,
            names_prefix: names.prefix.clone(),
            cfg,
        })
    }

    pub fn hidden(&self) -> usize {
        self.cfg.hidden
    }

    /// What the token filter reads: wte, wpe and ln_1.
    pub fn embeddings(&self) -> Embeddings<'_> {
        Embeddings {
            wte: &self.wte,
            wpe: &self.wpe,
            ln: &self.ln_1,
        }
    }

    /// The residual stream wte[t] + wpe[p] (T x d) for `tokens` at position `p`.
    pub fn embed(&self, tokens: &[u32], p: usize) -> Mat<f64> {
        Mat::from_fn(tokens.len(), self.hidden(), |i, j| {
            self.wte[(tokens[i] as usize, j)] + self.wpe[(p, j)]
        })
    }

    /// The first block's c_attn input LN_1(wte[t] + wpe[p]) for `tokens` at `p`.
    pub fn ln_input(&self, tokens: &[u32], p: usize) -> Mat<f64> {
        let mut x = self.embed(tokens, p);
        self.ln_1.apply_rows(&mut x);
        x
    }
}

impl Causal for Gpt2 {
    fn kv_width(&self) -> usize {
        self.hidden()
    }

    fn step(&self, tokens: &[u32], p: usize) -> Step {
        let d = self.hidden();
        let a = self.ln_input(tokens, p);
        let mut qkv = &a * &self.attn_w;
        add_bias(&mut qkv, &self.attn_b);
        Step {
            q: qkv.subcols(0, d).to_owned(),
            k: qkv.subcols(d, d).to_owned(),
            v: qkv.subcols(2 * d, d).to_owned(),
        }
    }

    fn block0_input(&self, tokens: &[u32], p: usize) -> Mat<f64> {
        augment(self.ln_input(tokens, p).as_ref())
    }

    /// The attention output at the new position (c_proj's input), augmented, for the
    /// candidate tokens `rows` of `step` after a prefix whose keys and values are `keys`,
    /// `values`.
    fn extend(
        &self,
        keys: MatRef<'_, f64>,
        values: MatRef<'_, f64>,
        step: &Step,
        rows: Range<usize>,
    ) -> Mat<f64> {
        let heads = self.cfg.heads;
        let hd = self.hidden() / heads;
        let attn = causal_attention(
            keys,
            values,
            step.q.subrows(rows.start, rows.len()),
            step.k.subrows(rows.start, rows.len()),
            step.v.subrows(rows.start, rows.len()),
            heads,
            heads,
            hd,
        );
        augment(attn.as_ref())
    }

    fn mlp_input(&self, tokens: &[u32], p: usize, attn: MatRef<'_, f64>) -> Mat<f64> {
        self.mlp_input_of(tokens, p, attn)
    }
}

impl Gpt2 {
    /// (LN_2(wte[t] + wpe[p] + [a, 1] [W_o; b_o]), 1): c_fc's input.
    fn mlp_input_of(&self, tokens: &[u32], p: usize, attn: MatRef<'_, f64>) -> Mat<f64> {
        let mut r = self.embed(tokens, p);
        r += attn * &self.proj;
        self.ln_2.apply_rows(&mut r);
        augment(r.as_ref())
    }
}

pub(crate) fn add_bias(x: &mut Mat<f64>, b: &[f64]) {
    for j in 0..x.ncols() {
        for i in 0..x.nrows() {
            x[(i, j)] += b[j];
        }
    }
}

/// Rows augmented with the bias coordinate: (x, 1).
pub(crate) fn augment(x: MatRef<'_, f64>) -> Mat<f64> {
    let d = x.ncols();
    Mat::from_fn(x.nrows(), d + 1, |i, j| if j < d { x[(i, j)] } else { 1.0 })
}
