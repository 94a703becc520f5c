//! A BERT-style encoder's embeddings and first block (Hugging Face `BertModel` layout),
//! in f64, and the four gradients the encoder route reads (docs/DESIGN.md, "Text: BERT").
//! Block 0: x = LN_e(word[t] + pos[p] + type[0]); q, k, v = Linear(x); c = bidirectional
//! attention; h = LN_a(x + W_o c + b_o); g = act(W_i h + b_i); o = LN_b(h + W_f g + b_f),
//! the input of block 1's query, key and value.

use faer::{Mat, MatRef};

use super::TextError;
use super::config::{FfnActivation, TextConfig};
use super::gpt2::{Embeddings, LayerNorm, add_bias, augment};
use super::tensors::Tensors;

/// The weights of block 0 (Linear weights transposed to in x out).
pub(crate) struct Bert {
    pub cfg: TextConfig,
    /// Word embeddings (V x d).
    pub word: Mat<f64>,
    /// Position embeddings plus token type 0 (P x d): what every position adds.
    pub position: Mat<f64>,
    pub ln_e: LayerNorm,
    /// [W_q | W_k | W_v] (d x 3d) and their biases.
    pub qkv_w: Mat<f64>,
    pub qkv_b: Vec<f64>,
    /// attention.output.dense (d x d) and its bias.
    pub wo: Mat<f64>,
    pub bo: Vec<f64>,
    pub ln_a: LayerNorm,
    /// intermediate.dense (d x ffn) and its bias.
    pub wi: Mat<f64>,
    pub bi: Vec<f64>,
    /// output.dense (ffn x d) and its bias.
    pub wf: Mat<f64>,
    pub bf: Vec<f64>,
    pub ln_b: LayerNorm,
}

/// The per-position inputs of block 0's layers and block 1's, one row per position of
/// one sequence (block 0's own input is `input_of`).
pub(crate) struct Inputs {
    /// (c, 1): attention.output.dense input (the heads' contexts, concatenated).
    pub c: Mat<f64>,
    /// (h, 1): intermediate.dense input.
    pub h: Mat<f64>,
    /// (g, 1): output.dense input, g = act(W_i h + b_i).
    pub g: Mat<f64>,
    /// (o, 1): block 1's query, key and value input.
    pub o: Mat<f64>,
}

/// The augmented gradients the route reads, rows = input coordinates plus the bias row.
pub(crate) struct Gradients {
    /// Block 0 query, key, value: (d+1) x 3d.
    pub x: Mat<f64>,
    /// Block 0 attention.output.dense: (d+1) x (d+1), a zero column appended so the
    /// matrix is not taller than wide (a zero column changes no row space).
    pub c: Mat<f64>,
    /// Block 0 intermediate.dense: (d+1) x ffn.
    pub h: Mat<f64>,
    /// Block 0 output.dense: (ffn+1) x d (tall: its span has a full SVD).
    pub g: Mat<f64>,
    /// Block 1 query, key, value: (d+1) x 3d.
    pub o: Mat<f64>,
}

/// `bert.` (the heads) or no prefix (a bare `BertModel`).
pub(crate) fn detect_prefix<'a>(names: impl Iterator<Item = &'a str>) -> Option<String> {
    names
        .filter_map(|n| n.strip_suffix("embeddings.word_embeddings.weight"))
        .map(str::to_string)
        .next()
}

fn layer(prefix: &str, l: usize, rest: &str) -> String {
    format!("{prefix}encoder.layer.{l}.{rest}")
}

/// G~ of Linear layers fed by the same input, side by side: rows = the input's
/// coordinates (dW^T) and the bias gradient as the last row; `pad` zero columns after.
fn stacked(
    grads: &Tensors,
    names: &[String],
    out: usize,
    inp: usize,
    pad: usize,
) -> Result<Mat<f64>, TextError> {
    let mut g = Mat::<f64>::zeros(inp + 1, names.len() * out + pad);
    for (k, name) in names.iter().enumerate() {
        let w = grads.matrix(&format!("{name}.weight"), out, inp)?;
        let b = grads.vector(&format!("{name}.bias"), out)?;
        for j in 0..out {
            for i in 0..inp {
                g[(i, k * out + j)] = w[(j, i)];
            }
            g[(inp, k * out + j)] = b[j];
        }
    }
    Ok(g)
}

impl Bert {
    pub fn load(cfg: TextConfig, w: &Tensors, prefix: &str) -> Result<Self, TextError> {
        let (d, ffn) = (cfg.hidden, cfg.ffn);
        if cfg.layers < 2 {
            return Err(TextError::Unsupported(format!(
                "a BERT with {} layer: the route needs the second block's gradient",
                cfg.layers
            )));
        }
        let emb = |rest: &str| format!("{prefix}embeddings.{rest}");
        let ln = |name: String| -> Result<LayerNorm, TextError> {
            Ok(LayerNorm {
                gamma: w.vector(&format!("{name}.weight"), d)?,
                beta: w.vector(&format!("{name}.bias"), d)?,
                eps: cfg.layer_norm_eps,
            })
        };
        let lin = |rest: &str, out: usize, inp: usize| -> Result<(Mat<f64>, Vec<f64>), TextError> {
            let name = layer(prefix, 0, rest);
            Ok((
                w.matrix(&format!("{name}.weight"), out, inp)?
                    .transpose()
                    .to_owned(),
                w.vector(&format!("{name}.bias"), out)?,
            ))
        };
        let word = w.matrix(&emb("word_embeddings.weight"), cfg.vocab, d)?;
        let pos = w.matrix(&emb("position_embeddings.weight"), cfg.positions, d)?;
        let type_name = emb("token_type_embeddings.weight");
        let types = w.shape(&type_name)?.first().copied().unwrap_or(0).max(1);
        let tt = w.matrix(&type_name, types, d)?;
        let position = Mat::from_fn(cfg.positions, d, |p, j| pos[(p, j)] + tt[(0, j)]);
        let (q, bq) = lin("attention.self.query", d, d)?;
        let (k, bk) = lin("attention.self.key", d, d)?;
        let (v, bv) = lin("attention.self.value", d, d)?;
        let qkv_w = Mat::from_fn(d, 3 * d, |i, j| match j / d {
            0 => q[(i, j)],
            1 => k[(i, j - d)],
            _ => v[(i, j - 2 * d)],
        });
        let qkv_b = [bq, bk, bv].concat();
        let (wo, bo) = lin("attention.output.dense", d, d)?;
        let (wi, bi) = lin("intermediate.dense", ffn, d)?;
        let (wf, bf) = lin("output.dense", d, ffn)?;
        Ok(Bert {
            word,
            position,
            ln_e: ln(emb("LayerNorm"))?,
            qkv_w,
            qkv_b,
            wo,
            bo,
            ln_a: ln(layer(prefix, 0, "attention.output.LayerNorm"))?,
            wi,
            bi,
            wf,
            bf,
            ln_b: ln(layer(prefix, 0, "output.LayerNorm"))?,
            cfg,
        })
    }

    /// The four augmented gradients of block 0 and block 1's input projections.
    pub fn gradients(&self, grads: &Tensors, prefix: &str) -> Result<Gradients, TextError> {
        let (d, ffn) = (self.cfg.hidden, self.cfg.ffn);
        if ffn <= d {
            return Err(TextError::Unsupported(format!(
                "a BERT with intermediate_size {ffn} <= hidden_size {d}: the intermediate layer's gradient cannot hold d + 1 input directions"
            )));
        }
        let qkv = |l: usize| -> Vec<String> {
            ["query", "key", "value"]
                .iter()
                .map(|w| layer(prefix, l, &format!("attention.self.{w}")))
                .collect()
        };
        Ok(Gradients {
            x: stacked(grads, &qkv(0), d, d, 0)?,
            c: stacked(
                grads,
                &[layer(prefix, 0, "attention.output.dense")],
                d,
                d,
                1,
            )?,
            h: stacked(grads, &[layer(prefix, 0, "intermediate.dense")], ffn, d, 0)?,
            g: stacked(grads, &[layer(prefix, 0, "output.dense")], d, ffn, 0)?,
            o: stacked(grads, &qkv(1), d, d, 0)?,
        })
    }

    pub fn hidden(&self) -> usize {
        self.cfg.hidden
    }

    /// What the token filter reads: word, position + type 0, and the embedding LayerNorm.
    pub fn embeddings(&self) -> Embeddings<'_> {
        Embeddings {
            wte: &self.word,
            wpe: &self.position,
            ln: &self.ln_e,
        }
    }

    /// x~ = (x, 1) of each (position, token) pair.
    pub fn input_of(&self, pairs: &[(usize, u32)]) -> Mat<f64> {
        let d = self.hidden();
        let mut x = Mat::from_fn(pairs.len(), d, |i, j| {
            let (p, t) = pairs[i];
            self.word[(t as usize, j)] + self.position[(p, j)]
        });
        self.ln_e.apply_rows(&mut x);
        augment(x.as_ref())
    }

    /// Queries, keys and values (rows x 3d) of inputs x (rows, not augmented).
    pub fn qkv(&self, x: MatRef<'_, f64>) -> Mat<f64> {
        let mut qkv = x * &self.qkv_w;
        add_bias(&mut qkv, &self.qkv_b);
        qkv
    }

    /// h = LN_a(x + W_o c + b_o) (rows).
    pub fn after_attention(&self, x: MatRef<'_, f64>, c: MatRef<'_, f64>) -> Mat<f64> {
        let mut y = c * &self.wo;
        add_bias(&mut y, &self.bo);
        y += x;
        self.ln_a.apply_rows(&mut y);
        y
    }

    /// (g, o): g = act(W_i h + b_i), o = LN_b(h + W_f g + b_f) (rows).
    pub fn feed_forward(&self, h: MatRef<'_, f64>) -> (Mat<f64>, Mat<f64>) {
        let mut g = h * &self.wi;
        add_bias(&mut g, &self.bi);
        apply(&mut g, self.cfg.activation);
        let mut u = &g * &self.wf;
        add_bias(&mut u, &self.bf);
        u += h;
        self.ln_b.apply_rows(&mut u);
        (g, u)
    }

    /// Block 0 over one whole sequence (bidirectional attention over its tokens).
    pub fn forward(&self, tokens: &[u32]) -> Inputs {
        let d = self.hidden();
        let n = tokens.len();
        let pairs: Vec<(usize, u32)> = tokens.iter().enumerate().map(|(p, &t)| (p, t)).collect();
        let xa = self.input_of(&pairs);
        let x = xa.subcols(0, d);
        let qkv = self.qkv(x);
        let c = attention(qkv.as_ref(), self.cfg.heads, d);
        let h = self.after_attention(x, c.as_ref());
        let (g, o) = self.feed_forward(h.as_ref());
        debug_assert_eq!(c.nrows(), n);
        Inputs {
            c: augment(c.as_ref()),
            h: augment(h.as_ref()),
            g: augment(g.as_ref()),
            o: augment(o.as_ref()),
        }
    }
}

/// The activation applied to every entry of `x`.
fn apply(x: &mut Mat<f64>, act: FfnActivation) {
    for j in 0..x.ncols() {
        for i in 0..x.nrows() {
            x[(i, j)] = act.apply(x[(i, j)]);
        }
    }
}

/// Bidirectional attention of one sequence: rows of `qkv` = [q | k | v]; per head h,
/// c^h_p = sum_q softmax_q(q^h_p . k^h_q / sqrt(d_h)) v^h_q.
pub(crate) fn attention(qkv: MatRef<'_, f64>, heads: usize, d: usize) -> Mat<f64> {
    let n = qkv.nrows();
    let hd = d / heads;
    let scale = 1.0 / (hd as f64).sqrt();
    let mut c = Mat::<f64>::zeros(n, d);
    for h in 0..heads {
        let q = qkv.subcols(h * hd, hd);
        let k = qkv.subcols(d + h * hd, hd);
        let v = qkv.subcols(2 * d + h * hd, hd);
        let mut s = q * k.transpose();
        for i in 0..n {
            let mx = (0..n).map(|j| s[(i, j)] * scale).fold(f64::MIN, f64::max);
            let mut z = 0.0;
            for j in 0..n {
                s[(i, j)] = (s[(i, j)] * scale - mx).exp();
                z += s[(i, j)];
            }
            for j in 0..n {
                s[(i, j)] /= z;
            }
        }
        c.subcols_mut(h * hd, hd).copy_from(&s * v);
    }
    c
}
