//! The model families the route reads and the two gradients it needs, loaded once.

use std::path::Path;

use faer::Mat;

use super::TextError;
use super::causal::Causal;
use super::config::{Arch, TextConfig};
use super::filter;
use super::gpt2::{Gpt2, Names};
use super::llama::{self, Llama};
use super::span::RowSpan;
use super::tensors::Tensors;
use crate::Dtype;

/// The first block's inputs (rows, as tested) of distinct (position, token) pairs.
pub(crate) fn block0_inputs(model: &dyn Causal, pairs: &[(usize, u32)], width: usize) -> Mat<f64> {
    let mut x = Mat::<f64>::zeros(pairs.len(), width);
    for (i, &(p, tok)) in pairs.iter().enumerate() {
        let row = model.block0_input(&[tok], p);
        x.row_mut(i).copy_from(row.row(0));
    }
    x
}

/// The model families the route reads.
pub(crate) enum Model {
    Gpt2(Box<Gpt2>),
    Llama(Box<Llama>),
}

impl Model {
    pub fn cfg(&self) -> &TextConfig {
        match self {
            Model::Gpt2(m) => &m.cfg,
            Model::Llama(m) => &m.cfg,
        }
    }

    pub fn causal(&self) -> &dyn Causal {
        match self {
            Model::Gpt2(m) => m.as_ref(),
            Model::Llama(m) => m.as_ref(),
        }
    }

    /// The token filter: GPT-2 per position (positions 0, 1, ... until none passes);
    /// LLaMA once, the bag of tokens, at position 0 standing for every position.
    pub fn filter(&self, span0: &RowSpan) -> Vec<filter::PositionTokens> {
        match self {
            Model::Gpt2(m) => {
                let f = filter::TokenFilter::new(m.embeddings(), span0);
                let mut positions = Vec::new();
                for p in 0..m.cfg.positions {
                    let pt = f.at(p);
                    if pt.tokens.is_empty() {
                        break;
                    }
                    positions.push(pt);
                }
                positions
            }
            Model::Llama(m) => vec![filter::bag(m.as_ref(), span0)],
        }
    }
}

/// What the embeddings' gradients say without any span: which tokens and positions
/// the batch uses (a row of an embedding's gradient is a sum over the batch's uses of
/// that row, and exactly zero when there is none).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Support {
    /// The distinct tokens of the batch's non-pad positions, ascending.
    pub tokens: Vec<u32>,
    /// The length of the longest sequence (nonzero rows of the position embedding's
    /// gradient), where the model has learned positions.
    pub longest: Option<usize>,
}

/// [`Support`] from the gradient file, when it holds the embedding's gradient and the
/// head does not reuse it (a tied LM head adds a term to every row).
fn support(
    grads: &Tensors,
    cfg: &TextConfig,
    wte: &str,
    wpe: Option<&str>,
) -> Result<Option<Support>, TextError> {
    let usable = cfg.head != super::config::Head::LanguageModel || !cfg.tied_embeddings;
    if !usable || !grads.names().any(|n| n == wte) {
        return Ok(None);
    }
    let tokens = grads.nonzero_rows(wte, cfg.vocab, cfg.hidden)?;
    let longest = match wpe {
        Some(w) if grads.names().any(|n| n == w) => grads
            .nonzero_rows(w, cfg.positions, cfg.hidden)?
            .last()
            .map(|&p| p as usize + 1),
        _ => None,
    };
    Ok(Some(Support { tokens, longest }))
}

/// The model and the two gradients the attack reads.
pub(crate) struct Loaded {
    pub model: Model,
    /// G~ of the first block's input projection (c_attn; q/k/v) and of its attention
    /// output projection (c_proj; o_proj): rows = input coordinates, plus the bias row
    /// where the projection has a bias.
    pub g0: Mat<f64>,
    pub g_out: Mat<f64>,
    /// The dimension the output projection's inputs can span (its rank at most).
    pub out_dim: usize,
    /// G~ of the first block's MLP input projection (c_fc; gate and up side by side):
    /// rows = input coordinates (plus the bias row for GPT-2).
    pub g_mlp: Mat<f64>,
    /// The batch's distinct tokens, read off the rows of the token embedding's gradient
    /// that are not zero (only the batch's tokens receive one), where that gradient
    /// is in the file and the head does not reuse the embedding.
    pub support: Option<Support>,
    /// Storage precision of the gradient.
    pub storage: Dtype,
    /// The precision it was computed in (f32 values in f64 storage are f32).
    pub dtype: Dtype,
}

impl Loaded {
    pub fn read(model_dir: &Path, gradient: &Path) -> Result<Self, TextError> {
        Self::read_with(model_dir, gradient, TextConfig::read(model_dir)?)
    }

    pub(crate) fn read_with(
        model_dir: &Path,
        gradient: &Path,
        cfg: TextConfig,
    ) -> Result<Self, TextError> {
        let weights = Tensors::open(&model_dir.join("model.safetensors"), "model")?;
        let grads = Tensors::open(gradient, "gradient")?;
        let d = cfg.hidden;
        match cfg.arch {
            Arch::Gpt2 => {
                let names =
                    Names::detect(weights.names()).ok_or_else(|| TextError::MissingTensor {
                        path: model_dir.join("model.safetensors"),
                        role: "model",
                        name: "wte.weight".into(),
                    })?;
                let model = Gpt2::load(cfg, &weights, &names)?;
                let (w0, b0) = (
                    names.block(0, "attn.c_attn.weight"),
                    names.block(0, "attn.c_attn.bias"),
                );
                let (wo, bo) = (
                    names.block(0, "attn.c_proj.weight"),
                    names.block(0, "attn.c_proj.bias"),
                );
                let storage = grads.dtype(&w0)?;
                let g0 = grads.augmented(&w0, &b0, d, 3 * d)?;
                // (d + 1) x d; its columns are the residual stream's gradients, which are
                // mean-free (every path back into it leaves through a LayerNorm), so the
                // rank is at most d - 1 whatever the inputs
                let g_out = grads.augmented(&wo, &bo, d, d)?;
                let g_mlp = grads.augmented(
                    &names.block(0, "mlp.c_fc.weight"),
                    &names.block(0, "mlp.c_fc.bias"),
                    d,
                    model.cfg.ffn,
                )?;
                let dtype = working_dtype(&g0, storage)?;
                let support = support(&grads, &model.cfg, &names.wte(), Some(&names.wpe()))?;
                Ok(Loaded {
                    model: Model::Gpt2(Box::new(model)),
                    support,
                    g0,
                    g_out,
                    out_dim: d - 1,
                    g_mlp,
                    storage,
                    dtype,
                })
            }
            Arch::Bert => Err(TextError::Unsupported(
                "a BERT is read by the encoder route (text::encoder), not as a causal model".into(),
            )),
            Arch::Llama => {
                let prefix = llama::detect_prefix(weights.names()).ok_or_else(|| {
                    TextError::MissingTensor {
                        path: model_dir.join("model.safetensors"),
                        role: "model",
                        name: "embed_tokens.weight".into(),
                    }
                })?;
                let (qd, kv) = (cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim);
                let model = Llama::load(cfg, &weights, &prefix)?;
                let name = |l: usize, w: &str| format!("{prefix}layers.{l}.self_attn.{w}.weight");
                let storage = grads.dtype(&name(0, "q_proj"))?;
                // [dWq^T | dWk^T | dWv^T]: d x (qd + 2 kv), rows = input coordinates
                let g = |l: usize| -> Result<Mat<f64>, TextError> {
                    let q = grads.matrix(&name(l, "q_proj"), qd, d)?;
                    let k = grads.matrix(&name(l, "k_proj"), kv, d)?;
                    let v = grads.matrix(&name(l, "v_proj"), kv, d)?;
                    Ok(Mat::from_fn(d, qd + 2 * kv, |i, j| {
                        if j < qd {
                            q[(j, i)]
                        } else if j < qd + kv {
                            k[(j - qd, i)]
                        } else {
                            v[(j - qd - kv, i)]
                        }
                    }))
                };
                let g0 = g(0)?;
                let dtype = working_dtype(&g0, storage)?;
                // dWo^T: qd x d, rows = the attention output's coordinates
                let o = grads.matrix(&name(0, "o_proj"), d, qd)?;
                let ffn = model.cfg.ffn;
                let mlp =
                    |w: &str| grads.matrix(&format!("{prefix}layers.0.mlp.{w}.weight"), ffn, d);
                let (gate, up) = (mlp("gate_proj")?, mlp("up_proj")?);
                // [dW_gate^T | dW_up^T]: d x 2 ffn
                let g_mlp = Mat::from_fn(d, 2 * ffn, |i, j| {
                    if j < ffn {
                        gate[(j, i)]
                    } else {
                        up[(j - ffn, i)]
                    }
                });
                let support = support(
                    &grads,
                    &model.cfg,
                    &format!("{prefix}embed_tokens.weight"),
                    None,
                )?;
                Ok(Loaded {
                    support,
                    g0,
                    g_out: o.transpose().to_owned(),
                    out_dim: qd,
                    g_mlp,
                    model: Model::Llama(Box::new(model)),
                    storage,
                    dtype,
                })
            }
        }
    }
}

/// The precision the first block's gradient was computed in (`attack::precision::detect`:
/// f64 storage whose entries are all exact f32 numbers was computed in f32).
pub(crate) fn working_dtype(g0: &Mat<f64>, storage: Dtype) -> Result<Dtype, TextError> {
    Ok(crate::attack::precision::detect(
        &crate::attack::Rows::Memory(g0.clone()),
        None,
        storage,
    )?)
}
