//! Text: a client's sentences from one transformer gradient (docs/DESIGN.md, "Text").
//!
//! The pipeline, one module per stage: [`config`] and the model's tensors ->
//! [`span`] (the row space of the first block's input projection, at the gradient's
//! floor) -> [`filter`] (the tokens whose input lies in it, per position) ->
//! [`search`] (prefixes extended through the first block's causal attention, kept when
//! the attention output and the MLP input lie in the spans of their projections'
//! gradients) -> [`certificate`] (the recovered inputs explain every tested gradient) ->
//! [`completion`] (an LM head's last tokens from ln_f's gradient) -> [`TextReport`].
//!
//! ```no_run
//! use std::path::Path;
//! let report = gradleak::text::attack(
//!     Path::new("model_dir"),          // config.json + model.safetensors (save_pretrained)
//!     Path::new("gradient.safetensors"), // {parameter name: gradient}
//!     &gradleak::text::TextParams::default(),
//! )?;
//! for s in &report.sequences {
//!     println!("{} {:?}", s.exact, s.text);
//! }
//! # Ok::<(), gradleak::text::TextError>(())
//! ```

pub mod assemble;
pub mod bench;
pub(crate) mod bert;
pub(crate) mod causal;
pub mod certificate;
pub mod completion;
pub mod config;
pub mod context;
pub mod encoder;
pub mod filter;
pub(crate) mod forward;
pub(crate) mod gpt2;
pub(crate) mod llama;
pub mod lora;
pub(crate) mod model;
pub mod search;
pub mod span;
pub(crate) mod tensors;
pub mod tokenizer;
mod verify;

pub use model::Support;
use model::block0_inputs;
pub(crate) use model::{Loaded, Model};
pub use verify::verify;

use std::path::{Path, PathBuf};
use std::time::Instant;

use faer::Mat;

use self::certificate::LayerCheck;
use self::config::{Arch, Head, TextConfig};
use self::span::RowSpan;
use self::tokenizer::{Decoder, GPT2_VOCAB};
use crate::Dtype;

/// What can go wrong in the text route.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("{}: not a model folder (expected config.json and model.safetensors from save_pretrained)", path.display())]
    NotAModelFolder { path: PathBuf },
    #[error("{}: no {what} file", path.display())]
    Missing { path: PathBuf, what: &'static str },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Config { path: PathBuf, reason: String },
    #[error("{}: the {role} has no tensor '{name}' (is it of this model?)", path.display())]
    MissingTensor {
        path: PathBuf,
        role: &'static str,
        name: String,
    },
    #[error("{}: tensor '{name}' has shape {got:?}, the config says {expected:?}", path.display())]
    Shape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("the gradient of {layer} is zero: nothing to reconstruct")]
    NoSignal { layer: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("numerical failure: {0}")]
    Numerical(String),
    #[error(transparent)]
    Read(#[from] crate::Error),
}

/// Options of the text attack.
#[derive(Clone, Debug, Default)]
pub struct TextParams {
    /// A `tokenizer.json` to decode with; GPT-2's embedded BPE when None and the
    /// vocabulary is GPT-2's.
    pub tokenizer: Option<PathBuf>,
}

/// One recovered sequence.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RecoveredSequence {
    pub ids: Vec<u32>,
    pub text: Option<String>,
    /// Vouched for by the certificate, token for token.
    pub exact: bool,
    /// Largest distance of its positions' second-block inputs from the span.
    pub max_distance: f64,
}

/// Seconds per stage (wall).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct StageSeconds {
    pub load: f64,
    pub span: f64,
    pub filter: f64,
    pub search: f64,
    pub certificate: f64,
    /// The LM head's last tokens (a forward through the whole stack).
    pub completion: f64,
}

/// Per-position summary of the token filter.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FilterStep {
    pub position: usize,
    pub tokens: usize,
    pub max_distance: f64,
    pub min_rejected: f64,
}

/// The attack's result: sequences, the certificate's evidence and per-stage figures.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TextReport {
    pub arch: config::Arch,
    pub head: Head,
    pub hidden: usize,
    pub vocab: usize,
    /// Storage precision of the gradient.
    pub storage: Dtype,
    /// The precision the gradient was computed in, which sets the floors: f64 storage
    /// whose values are all exact f32 numbers is f32.
    pub dtype: Dtype,
    /// Every sequence recovered, and the recovered inputs explain both blocks' gradients.
    pub certified: bool,
    pub sequences: Vec<RecoveredSequence>,
    pub layers: Vec<LayerCheck>,
    pub token_filter: Vec<FilterStep>,
    /// The distinct tokens that passed the filter at some position (the batch's token
    /// bag), given when the attention output's span is full and sequences cannot be
    /// searched.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub token_bag: Vec<u32>,
    /// The batch's tokens and longest length from the embeddings' gradients (no span
    /// needed; absent when the file lacks them or a tied LM head fills every row).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub support: Option<Support>,
    pub search: Vec<search::SearchStep>,
    /// LM head: each sequence is returned without its last token (no block sees it, and
    /// the completion did not run or did not pass).
    pub last_token_missing: bool,
    /// LM head: the last tokens from ln_f's and the output embedding's gradients.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion: Option<completion::Completion>,
    /// The encoder route's figures (BERT; there is no prefix search).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encoder: Option<encoder::EncoderStats>,
    pub seconds: StageSeconds,
    pub notes: Vec<String>,
}

impl TextReport {
    /// A report with nothing recovered yet: the model's figures and the notes so far.
    pub(crate) fn empty(
        cfg: &TextConfig,
        storage: Dtype,
        dtype: Dtype,
        notes: Vec<String>,
    ) -> Self {
        TextReport {
            arch: cfg.arch,
            head: cfg.head,
            hidden: cfg.hidden,
            vocab: cfg.vocab,
            storage,
            dtype,
            certified: false,
            sequences: Vec::new(),
            layers: Vec::new(),
            token_filter: Vec::new(),
            token_bag: Vec::new(),
            support: None,
            search: Vec::new(),
            last_token_missing: false,
            completion: None,
            encoder: None,
            seconds: StageSeconds::default(),
            notes,
        }
    }

    /// One JSON line per sequence: `{"ids": [...], "text": "...", "exact": bool}`.
    pub fn to_jsonl(&self) -> String {
        let mut s = String::new();
        for q in &self.sequences {
            let line = serde_json::json!({"ids": q.ids, "text": q.text, "exact": q.exact});
            s.push_str(&line.to_string());
            s.push('\n');
        }
        s
    }
}

/// The attack on the files a server holds: `model_dir` (config.json, model.safetensors)
/// and `gradient` (safetensors of parameter name -> gradient).
pub fn attack(
    model_dir: &Path,
    gradient: &Path,
    params: &TextParams,
) -> Result<TextReport, TextError> {
    attack_with_progress(model_dir, gradient, params, &mut |_| {})
}

/// [`attack`] returning the report as a JSON string (for the Python package).
pub fn attack_json(
    model_dir: &Path,
    gradient: &Path,
    tokenizer: Option<&Path>,
) -> Result<String, TextError> {
    let params = TextParams {
        tokenizer: tokenizer.map(Path::to_path_buf),
    };
    let r = attack(model_dir, gradient, &params)?;
    serde_json::to_string(&r).map_err(|e| TextError::Numerical(format!("report: {e}")))
}

/// [`attack`], telling `progress` one line per stage.
pub fn attack_with_progress(
    model_dir: &Path,
    gradient: &Path,
    params: &TextParams,
    progress: &mut dyn FnMut(&str),
) -> Result<TextReport, TextError> {
    let t0 = Instant::now();
    let mut seconds = StageSeconds::default();
    let mut notes = Vec::new();
    let cfg = TextConfig::read(model_dir)?;
    let decoder = match &params.tokenizer {
        Some(p) => Some(Decoder::from_file(p)?),
        None if cfg.vocab == GPT2_VOCAB => Some(Decoder::gpt2()?),
        None => {
            notes.push(format!(
                "no tokenizer given and the vocabulary ({}) is not GPT-2's: ids only",
                cfg.vocab
            ));
            None
        }
    };
    if let Some(Decoder::ByteLevel(t) | Decoder::WordPiece(t)) = &decoder
        && t.len() > cfg.vocab
    {
        return Err(TextError::Tokenizer(format!(
            "the tokenizer has {} tokens, the model's vocabulary {}",
            t.len(),
            cfg.vocab
        )));
    }
    if cfg.arch == Arch::Bert {
        return encoder::attack(model_dir, gradient, cfg, decoder.as_ref(), notes, progress);
    }
    if lora::is_lora(tensors::Tensors::open(gradient, "gradient")?.names()) {
        return lora::attack(model_dir, gradient, cfg, decoder.as_ref(), notes, progress);
    }
    let Loaded {
        model,
        g0,
        g_out,
        out_dim,
        g_mlp,
        support,
        storage,
        dtype,
    } = Loaded::read_with(model_dir, gradient, cfg)?;
    let d = model.cfg().hidden;
    let head = model.cfg().head;
    let vocab = model.cfg().vocab;
    let causal = model.causal();
    seconds.load = t0.elapsed().as_secs_f64();
    progress(&format!(
        "text: read the model (d = {d}, vocab {vocab}) and the gradient ({dtype}) in {:.1} s",
        seconds.load
    ));

    let t = Instant::now();
    // both projections are fed by a norm: a LayerNorm's outputs, augmented, span d
    // dimensions of R^(d+1); an RMSNorm's all of R^d
    let span0 = RowSpan::of(g0.as_ref(), dtype, "block 0 input projection", d)?;
    let span_out = RowSpan::of(g_out.as_ref(), dtype, "block 0 attention output", out_dim)?;
    let span_mlp = RowSpan::of(g_mlp.as_ref(), dtype, "block 0 MLP input", d)?;
    seconds.span = t.elapsed().as_secs_f64();
    progress(&format!(
        "text: spans: block 0 input rank {} of {} (tau {:.1e}), attention output rank {} (tau {:.1e}), MLP input rank {} (tau {:.1e}) in {:.1} s",
        span0.rank,
        span0.dim,
        span0.tau,
        span_out.rank,
        span_out.tau,
        span_mlp.rank,
        span_mlp.tau,
        seconds.span
    ));
    let mut report = TextReport {
        support: support.clone(),
        ..TextReport::empty(model.cfg(), storage, dtype, notes)
    };
    for (name, s) in [
        ("block 0's input projection", &span0),
        ("block 0's attention output projection", &span_out),
    ] {
        if s.is_full() {
            report.notes.push(format!(
                "{name}'s gradient has full rank {}: the batch has at least {} distinct inputs there, so its span contains every input and cannot tell true from false; no sequence can be vouched for",
                s.rank, s.effective_dim
            ));
        }
    }
    if span0.is_full() {
        if let Some(sup) = &support {
            report.notes.push(support_note(sup));
            report.token_bag = sup.tokens.clone();
        }
        report.seconds = seconds;
        return Ok(report);
    }

    let t = Instant::now();
    let mut positions = model.filter(&span0);
    if let Some(sup) = &support {
        // a token whose embedding row has no gradient is in no non-pad position
        let mut dropped = 0;
        for p in positions.iter_mut() {
            let before = p.tokens.len();
            p.tokens.retain(|t| sup.tokens.binary_search(t).is_ok());
            dropped += before - p.tokens.len();
        }
        if let Some(n) = sup.longest {
            positions.truncate(n);
        }
        if dropped > 0 {
            report.notes.push(format!(
                "the token embedding's gradient is zero on {dropped} (position, token) pairs that passed the span test: they are not in the batch and were dropped"
            ));
        }
    }
    // LLaMA: one bag for every position (block 0 sees no position)
    let every = matches!(model, Model::Llama(_));
    let max_positions = model.cfg().positions;
    seconds.filter = t.elapsed().as_secs_f64();
    report.token_filter = positions
        .iter()
        .map(|p| FilterStep {
            position: p.position,
            tokens: p.tokens.len(),
            max_distance: p.max_distance,
            min_rejected: p.min_rejected,
        })
        .collect();
    progress(&format!(
        "text: token filter: {} positions, {} to {} tokens each, in {:.1} s",
        positions.len(),
        positions.iter().map(|p| p.tokens.len()).min().unwrap_or(0),
        positions.iter().map(|p| p.tokens.len()).max().unwrap_or(0),
        seconds.filter
    ));
    if span_out.is_full() {
        if let Some(sup) = &support {
            report.notes.push(support_note(sup));
            report.token_bag = sup.tokens.clone();
            report.seconds = seconds;
            return Ok(report);
        }
        let bag: std::collections::BTreeSet<u32> = positions
            .iter()
            .flat_map(|p| p.tokens.iter().copied())
            .collect();
        report.notes.push(format!(
            "what is still identifiable: block 0's span (rank {}) gives the bag of {} distinct tokens of the batch (every token passing the filter at some position; report.token_bag), and that the longest sequence has {} tokens; their order is not identified by a span test",
            span0.rank,
            bag.len(),
            positions.len()
        ));
        report.token_bag = bag.into_iter().collect();
        report.seconds = seconds;
        return Ok(report);
    }

    let t = Instant::now();
    let tokens_at = |p: usize| -> Option<&[u32]> {
        if every {
            (p < max_positions).then(|| positions[0].tokens.as_slice())
        } else {
            positions.get(p).map(|pt| pt.tokens.as_slice())
        }
    };
    // the MLP input holds the token itself next to the attention's mix of the prefix: a
    // second test, and the sharper one on a trained model (DESIGN); a full span tests nothing
    let mlp_test = (!span_mlp.is_full()).then_some(&span_mlp);
    if mlp_test.is_none() {
        report.notes.push(format!(
            "block 0's MLP input projection has full rank {}: the search tests the attention output alone",
            span_mlp.rank
        ));
    }
    let trie = search::search(causal, &span_out, mlp_test, tokens_at, |s| {
        progress(&format!(
            "text: position {}: {} prefixes x tokens = {} candidates, {} kept ({:.1} s)",
            s.position,
            s.prefixes,
            s.candidates,
            s.accepted,
            t.elapsed().as_secs_f64()
        ))
    });
    seconds.search = t.elapsed().as_secs_f64();
    let repeats: usize = trie.steps.iter().map(|s| s.repeats).sum();
    if repeats > 0 {
        report.notes.push(format!(
            "{repeats} candidate extensions gave exactly the attention output of a node already on their prefix (a token repeated so that attention cannot tell: LLaMA's first block sees no position); they are not kept, so a sequence with such a run of repeats is returned shorter"
        ));
    }
    if trie.overflow {
        report.notes.push(format!(
            "more prefixes passed the attention-output test than its rank ({}): the test does not discriminate here",
            span_out.rank
        ));
    }

    let t = Instant::now();
    // block 0's inputs: the distinct (token, position) pairs of the recovered prefixes
    let mut pairs: Vec<(usize, u32)> = trie.nodes.iter().map(|n| (n.position, n.token)).collect();
    pairs.sort_unstable();
    pairs.dedup();
    let x0 = block0_inputs(causal, &pairs, span0.dim);
    let x1 = Mat::from_fn(trie.nodes.len(), span_out.dim, |i, j| {
        trie.nodes[i].input[j]
    });
    let u = dtype.epsilon() / 2.0;
    let c0 = certificate::check(
        "block 0 input projection",
        &span0,
        g0.as_ref(),
        &x0,
        u,
        false,
    );
    let c1 = certificate::check(
        "block 0 attention output",
        &span_out,
        g_out.as_ref(),
        &x1,
        u,
        true,
    );
    let c2 = mlp_test.map(|m| {
        let x2 = Mat::from_fn(trie.nodes.len(), m.dim, |i, j| trie.nodes[i].mlp_input[j]);
        certificate::check("block 0 MLP input", m, g_mlp.as_ref(), &x2, u, true)
    });
    let layers_passed = c0.passed && c1.passed && c2.as_ref().is_none_or(|c| c.passed);
    seconds.certificate = t.elapsed().as_secs_f64();
    let leaves = trie.leaves();
    let mut sequences: Vec<Vec<u32>> = leaves.iter().map(|&l| trie.sequence(l)).collect();
    let mut complete = head != Head::LanguageModel;
    if !complete {
        let t = Instant::now();
        if layers_passed && !trie.overflow {
            let weights = tensors::Tensors::open(&model_dir.join("model.safetensors"), "model")?;
            let grads = tensors::Tensors::open(gradient, "gradient")?;
            let done = match &model {
                Model::Gpt2(m) => {
                    let names = gpt2::Names {
                        prefix: m.names_prefix.clone(),
                    };
                    completion::complete(m, &weights, &grads, &names, &sequences, u, progress)
                }
                Model::Llama(m) => completion::complete_llama(
                    m, &weights, &grads, &m.prefix, &sequences, u, progress,
                ),
            };
            match done {
                Ok(c) => {
                    if c.passed {
                        for (s, &y) in sequences.iter_mut().zip(&c.tokens) {
                            s.push(y);
                        }
                        complete = true;
                    } else {
                        report.notes.push(format!(
                            "language-model head: the last tokens proposed by the final norm's gradient leave {:.1e} of it unexplained (tolerance {:.1e}) and {:.1e} of the output embedding's rows ({:.1e}): each sequence is returned without its last token and not marked exact",
                            c.unexplained, c.tolerance, c.rows_unexplained, c.rows_tolerance
                        ));
                    }
                    report.completion = Some(c);
                }
                Err(e) => report.notes.push(format!(
                    "language-model head: the last-token completion failed ({e}); each sequence is returned without its last token and not marked exact"
                )),
            }
        } else {
            report.notes.push(
                "language-model head: the prefixes are not certified, so the last tokens were not completed; each sequence is returned without its last token and not marked exact".into(),
            );
        }
        seconds.completion = t.elapsed().as_secs_f64();
        report.last_token_missing = !complete;
    }
    let mut accounted = true;
    if let Some(sup) = &support {
        let found: std::collections::BTreeSet<u32> = trie.nodes.iter().map(|n| n.token).collect();
        let longest = trie.nodes.iter().map(|n| n.position + 1).max().unwrap_or(0);
        let missing = sup.tokens.iter().filter(|t| !found.contains(t)).count();
        if missing > 0 || sup.longest.is_some_and(|l| l != longest) {
            accounted = false;
            report.notes.push(format!(
                "the embeddings' gradients name {} distinct tokens and a longest sequence of {}; the recovered sequences leave {missing} of those tokens out and reach {longest} positions",
                sup.tokens.len(),
                sup.longest.map_or("?".to_string(), |l| l.to_string()),
            ));
        }
    }
    report.certified = layers_passed && !trie.overflow && complete && accounted;
    for (&leaf, ids) in leaves.iter().zip(sequences) {
        let max_distance = trie
            .path(leaf)
            .iter()
            .map(|&n| trie.nodes[n].distance)
            .fold(0.0, f64::max);
        report.sequences.push(RecoveredSequence {
            text: decoder.as_ref().and_then(|dec| dec.decode(&ids)),
            ids,
            exact: report.certified,
            max_distance,
        });
    }
    progress(&format!(
        "text: {} sequences, certified: {} (unexplained {:.1e} / {:.1e}, tolerance {:.1e}) in {:.1} s",
        report.sequences.len(),
        report.certified,
        c0.unexplained,
        c1.unexplained,
        c1.tolerance,
        t0.elapsed().as_secs_f64()
    ));
    report.layers = [Some(c0), Some(c1), c2].into_iter().flatten().collect();
    report.search = trie.steps;
    report.seconds = seconds;
    Ok(report)
}

/// What the embeddings' gradients identify when no span can order the tokens.
fn support_note(sup: &Support) -> String {
    format!(
        "what is still identifiable: the token embedding's gradient is nonzero on exactly the batch's {} distinct tokens (report.token_bag){}; their order is not identified by a span test",
        sup.tokens.len(),
        sup.longest
            .map(|l| format!(
                ", and the position embedding's on the first {l} positions (the longest sequence)"
            ))
            .unwrap_or_default()
    )
}
