//! The model's `config.json`, as Hugging Face `save_pretrained` writes it.

use std::path::Path;

use serde_json::Value;

use super::TextError;

/// The transformer families the text route reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// GPT-2: learned positions, pre-LayerNorm blocks, causal attention, Conv1D weights (in x out).
    Gpt2,
    /// LLaMA-style: RMSNorm, rotary positions after the projection, grouped-query
    /// attention, SwiGLU, no biases.
    Llama,
    /// BERT-style encoder: word + position + token-type embeddings and a LayerNorm,
    /// bidirectional attention, post-LayerNorm blocks, Linear weights (out x in).
    Bert,
}

/// What sits on top of the transformer (from `architectures`); it decides which
/// positions carry a gradient.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Head {
    /// A sequence classifier reading the last non-pad position: every non-pad position
    /// carries a gradient.
    SequenceClassification,
    /// A language-model head: the last position of each sequence predicts nothing, so
    /// its input carries no gradient.
    LanguageModel,
    /// No head named: treated like a classifier.
    Unknown,
}

/// The feed-forward activation (`activation_function`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FfnActivation {
    /// 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): GPT-2's `gelu_new`.
    GeluTanh,
    /// 0.5 x (1 + erf(x / sqrt 2)).
    GeluErf,
    Relu,
}

impl FfnActivation {
    pub(crate) fn apply(self, x: f64) -> f64 {
        match self {
            FfnActivation::GeluTanh => {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
            }
            FfnActivation::GeluErf => 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)),
            FfnActivation::Relu => x.max(0.0),
        }
    }

    /// The derivative of [`apply`](Self::apply).
    pub(crate) fn derivative(self, x: f64) -> f64 {
        match self {
            FfnActivation::GeluTanh => {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                let t = (c * (x + 0.044715 * x * x * x)).tanh();
                0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x)
            }
            FfnActivation::GeluErf => {
                let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
                0.5 * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)) + x * pdf
            }
            FfnActivation::Relu => f64::from(u8::from(x > 0.0)),
        }
    }
}

/// The dimensions and settings the attack needs.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TextConfig {
    pub arch: Arch,
    pub head: Head,
    /// Hidden size d.
    pub hidden: usize,
    pub heads: usize,
    /// Key/value heads (grouped-query attention; = heads for GPT-2).
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Rotary base (LLaMA; 0 for learned positions).
    pub rope_theta: f64,
    pub layers: usize,
    pub vocab: usize,
    /// Number of learned positions.
    pub positions: usize,
    pub ffn: usize,
    pub layer_norm_eps: f64,
    pub activation: FfnActivation,
    pub pad_token_id: Option<u32>,
    /// The LM head reuses the token embedding (`tie_word_embeddings`; transformers'
    /// default: GPT-2 and BERT yes, LLaMA no), so its gradient is dense.
    pub tied_embeddings: bool,
}

fn usize_key(v: &Value, key: &str, path: &Path) -> Result<usize, TextError> {
    v.get(key)
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .ok_or_else(|| TextError::Config {
            path: path.to_path_buf(),
            reason: format!("'{key}' missing or not a non-negative integer"),
        })
}

/// `tie_word_embeddings`, or the architecture's default when the config omits it.
fn tied(v: &Value, default: bool) -> bool {
    v.get("tie_word_embeddings")
        .and_then(Value::as_bool)
        .unwrap_or(default)
}

impl TextConfig {
    /// Read `DIR/config.json`.
    pub fn read(dir: &Path) -> Result<Self, TextError> {
        let path = dir.join("config.json");
        if !dir.is_dir() {
            return Err(TextError::NotAModelFolder {
                path: dir.to_path_buf(),
            });
        }
        let text = std::fs::read_to_string(&path).map_err(|source| TextError::Io {
            path: path.clone(),
            source,
        })?;
        let v: Value = serde_json::from_str(&text).map_err(|e| TextError::Config {
            path: path.clone(),
            reason: format!("not valid JSON ({e})"),
        })?;
        Self::from_json(&v, &path)
    }

    pub(crate) fn from_json(v: &Value, path: &Path) -> Result<Self, TextError> {
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let archs: Vec<String> = v
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let head = if archs
            .iter()
            .any(|a| a.ends_with("LMHeadModel") || a.ends_with("ForCausalLM"))
        {
            Head::LanguageModel
        } else if archs
            .iter()
            .any(|a| a.ends_with("ForSequenceClassification"))
        {
            Head::SequenceClassification
        } else {
            Head::Unknown
        };
        match model_type.as_str() {
            "gpt2" => {
                let hidden = usize_key(v, "n_embd", path)?;
                let heads = usize_key(v, "n_head", path)?;
                if heads == 0 || hidden % heads != 0 {
                    return Err(TextError::Config {
                        path: path.to_path_buf(),
                        reason: format!("n_embd {hidden} is not a multiple of n_head {heads}"),
                    });
                }
                let act = v
                    .get("activation_function")
                    .and_then(Value::as_str)
                    .unwrap_or("gelu_new");
                let activation = match act {
                    "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => FfnActivation::GeluTanh,
                    "gelu" => FfnActivation::GeluErf,
                    "relu" => FfnActivation::Relu,
                    other => {
                        return Err(TextError::Unsupported(format!(
                            "activation_function '{other}' (supported: gelu_new, gelu_pytorch_tanh, gelu, relu)"
                        )));
                    }
                };
                for flag in ["scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"] {
                    if v.get(flag).and_then(Value::as_bool) == Some(true) {
                        return Err(TextError::Unsupported(format!("GPT-2 with {flag} = true")));
                    }
                }
                if v.get("scale_attn_weights").and_then(Value::as_bool) == Some(false) {
                    return Err(TextError::Unsupported(
                        "GPT-2 with scale_attn_weights = false".into(),
                    ));
                }
                let ffn = v
                    .get("n_inner")
                    .and_then(Value::as_u64)
                    .map_or(4 * hidden, |x| x as usize);
                Ok(TextConfig {
                    arch: Arch::Gpt2,
                    head,
                    hidden,
                    heads,
                    kv_heads: heads,
                    head_dim: hidden / heads,
                    rope_theta: 0.0,
                    layers: usize_key(v, "n_layer", path)?,
                    vocab: usize_key(v, "vocab_size", path)?,
                    positions: usize_key(v, "n_positions", path)?,
                    ffn,
                    layer_norm_eps: v
                        .get("layer_norm_epsilon")
                        .and_then(Value::as_f64)
                        .unwrap_or(1e-5),
                    activation,
                    pad_token_id: v
                        .get("pad_token_id")
                        .and_then(Value::as_u64)
                        .map(|x| x as u32),
                    tied_embeddings: tied(v, true),
                })
            }
            "llama" => {
                let hidden = usize_key(v, "hidden_size", path)?;
                let heads = usize_key(v, "num_attention_heads", path)?;
                let kv_heads = v
                    .get("num_key_value_heads")
                    .and_then(Value::as_u64)
                    .map_or(heads, |x| x as usize);
                if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
                    return Err(TextError::Config {
                        path: path.to_path_buf(),
                        reason: format!(
                            "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
                        ),
                    });
                }
                let head_dim = v
                    .get("head_dim")
                    .and_then(Value::as_u64)
                    .map_or(hidden / heads, |x| x as usize);
                if !head_dim.is_multiple_of(2) {
                    return Err(TextError::Config {
                        path: path.to_path_buf(),
                        reason: format!(
                            "head_dim {head_dim} is odd (rotary embeddings need pairs)"
                        ),
                    });
                }
                let act = v
                    .get("hidden_act")
                    .and_then(Value::as_str)
                    .unwrap_or("silu");
                if act != "silu" {
                    return Err(TextError::Unsupported(format!(
                        "LLaMA with hidden_act '{act}' (supported: silu)"
                    )));
                }
                for flag in ["attention_bias", "mlp_bias"] {
                    if v.get(flag).and_then(Value::as_bool) == Some(true) {
                        return Err(TextError::Unsupported(format!("LLaMA with {flag} = true")));
                    }
                }
                let rope = v.get("rope_parameters").or_else(|| v.get("rope_scaling"));
                let rope_type = rope
                    .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                if rope_type != "default" {
                    return Err(TextError::Unsupported(format!(
                        "LLaMA with rope_type '{rope_type}' (supported: default)"
                    )));
                }
                let rope_theta = rope
                    .and_then(|r| r.get("rope_theta"))
                    .or_else(|| v.get("rope_theta"))
                    .and_then(Value::as_f64)
                    .unwrap_or(10000.0);
                Ok(TextConfig {
                    arch: Arch::Llama,
                    head,
                    hidden,
                    heads,
                    kv_heads,
                    head_dim,
                    rope_theta,
                    layers: usize_key(v, "num_hidden_layers", path)?,
                    vocab: usize_key(v, "vocab_size", path)?,
                    positions: usize_key(v, "max_position_embeddings", path)?,
                    ffn: usize_key(v, "intermediate_size", path)?,
                    layer_norm_eps: v
                        .get("rms_norm_eps")
                        .and_then(Value::as_f64)
                        .unwrap_or(1e-6),
                    activation: FfnActivation::Relu,
                    pad_token_id: v
                        .get("pad_token_id")
                        .and_then(Value::as_u64)
                        .map(|x| x as u32),
                    tied_embeddings: tied(v, false),
                })
            }
            "bert" => bert_config(v, path, head),
            "" => Err(TextError::Config {
                path: path.to_path_buf(),
                reason: "no 'model_type'".into(),
            }),
            other => Err(TextError::Unsupported(format!(
                "model_type '{other}' (the text route reads: gpt2, llama, bert)"
            ))),
        }
    }
}

/// A BERT `config.json` (`BertConfig`): absolute positions, one of the GELUs or ReLU.
fn bert_config(v: &Value, path: &Path, head: Head) -> Result<TextConfig, TextError> {
    let hidden = usize_key(v, "hidden_size", path)?;
    let heads = usize_key(v, "num_attention_heads", path)?;
    if heads == 0 || hidden % heads != 0 {
        return Err(TextError::Config {
            path: path.to_path_buf(),
            reason: format!(
                "hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
            ),
        });
    }
    let act = v
        .get("hidden_act")
        .and_then(Value::as_str)
        .unwrap_or("gelu");
    let activation = match act {
        "gelu" => FfnActivation::GeluErf,
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => FfnActivation::GeluTanh,
        "relu" => FfnActivation::Relu,
        other => {
            return Err(TextError::Unsupported(format!(
                "BERT with hidden_act '{other}' (supported: gelu, gelu_new, gelu_pytorch_tanh, relu)"
            )));
        }
    };
    let positions_kind = v
        .get("position_embedding_type")
        .and_then(Value::as_str)
        .unwrap_or("absolute");
    if positions_kind != "absolute" {
        return Err(TextError::Unsupported(format!(
            "BERT with position_embedding_type '{positions_kind}' (supported: absolute)"
        )));
    }
    if v.get("is_decoder").and_then(Value::as_bool) == Some(true) {
        return Err(TextError::Unsupported("BERT with is_decoder = true".into()));
    }
    Ok(TextConfig {
        arch: Arch::Bert,
        head,
        hidden,
        heads,
        kv_heads: heads,
        head_dim: hidden / heads,
        rope_theta: 0.0,
        layers: usize_key(v, "num_hidden_layers", path)?,
        vocab: usize_key(v, "vocab_size", path)?,
        positions: usize_key(v, "max_position_embeddings", path)?,
        ffn: usize_key(v, "intermediate_size", path)?,
        layer_norm_eps: v
            .get("layer_norm_eps")
            .and_then(Value::as_f64)
            .unwrap_or(1e-12),
        activation,
        pad_token_id: v
            .get("pad_token_id")
            .and_then(Value::as_u64)
            .map(|x| x as u32),
        tied_embeddings: tied(v, true),
    })
}
