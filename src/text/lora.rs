//! LoRA fine-tuning (docs/DESIGN.md, "Text: LoRA"): only the adapters have gradients.
//!
//! peft's adapter on block 0's c_attn adds s B A x to the projection (A: r x d, B:
//! 3d x r, B = 0 at the start). Its gradients are dA = s B^T G^T and dB = s G^T A^T
//! with G = sum_t x_t (x) delta_t, so dA = 0 while B = 0, and the rows of
//! dB^T = s sum_t (A x_t) (x) delta_t span {A x_t}: the inputs seen through A, in R^r.
//! When the distinct inputs are fewer than r that span is a proper subspace and the
//! token filter runs in it; at r or more it is all of R^r and nothing is identified.

use std::path::Path;
use std::time::Instant;

use faer::Mat;

use super::certificate;
use super::config::TextConfig;
use super::gpt2::{Gpt2, Names};
use super::span::RowSpan;
use super::tensors::Tensors;
use super::tokenizer::Decoder;
use super::{FilterStep, RecoveredSequence, StageSeconds, TextError, TextReport};

/// The file peft's `save_pretrained` writes the adapter weights to.
pub const ADAPTER_FILE: &str = "adapter_model.safetensors";

/// The gradient holds LoRA adapters (peft's names: `...lora_A.<adapter>.weight`).
pub(crate) fn is_lora<'a>(mut names: impl Iterator<Item = &'a str>) -> bool {
    names.any(|n| n.contains(".lora_A.") || n.contains(".lora_B."))
}

/// The one tensor whose name holds `part` and ends in `.weight`.
fn find(t: &Tensors, part: &str) -> Option<String> {
    t.names()
        .find(|n| n.contains(part) && n.ends_with(".weight"))
        .map(str::to_string)
}

/// The screen passes candidates within this multiple of tau (or `SCREEN_MIN`); their
/// distances are then computed directly (as `filter::TokenFilter::at`).
const SCREEN_FACTOR: f64 = 10.0;
const SCREEN_MIN: f64 = 1e-6;

/// z_tp = A LN_1(e_t + w_p) from products taken once: with C the centring,
/// z_tp = (y_t + A (gamma * C w_p)) / sigma_tp + A beta, y_t = A (gamma * C e_t), and
/// sigma_tp^2 = (||C e_t||^2 + 2 C e_t . C w_p + ||C w_p||^2) / d + eps. A position costs
/// O(V (d + r)) instead of O(V d r).
struct Screen<'a> {
    model: &'a Gpt2,
    /// C e_t (V x d).
    ce: Mat<f64>,
    ee: Vec<f64>,
    /// y_t (V x r).
    y: Mat<f64>,
    /// A beta.
    ab: Vec<f64>,
    /// A gamma-scaled (r x d): row k is A_k * gamma.
    ag: Mat<f64>,
}

impl<'a> Screen<'a> {
    fn new(model: &'a Gpt2, a: &Mat<f64>) -> Self {
        let d = model.hidden();
        let (gamma, beta) = (&model.ln_1.gamma, &model.ln_1.beta);
        let mut ce = model.wte.clone();
        super::filter::centre_rows(&mut ce);
        let ee = (0..ce.nrows())
            .map(|i| (0..d).map(|j| ce[(i, j)] * ce[(i, j)]).sum())
            .collect();
        let ag = Mat::from_fn(a.nrows(), d, |k, j| a[(k, j)] * gamma[j]);
        let y = &ce * ag.transpose();
        let ab = (0..a.nrows())
            .map(|k| (0..d).map(|j| a[(k, j)] * beta[j]).sum())
            .collect();
        Screen {
            model,
            ce,
            ee,
            y,
            ab,
            ag,
        }
    }

    /// Every token's relative distance from `span` at position `p`.
    fn distances(&self, span: &RowSpan, p: usize) -> Vec<f64> {
        let d = self.model.hidden();
        let eps = self.model.ln_1.eps;
        let mut cw: Vec<f64> = (0..d).map(|j| self.model.wpe[(p, j)]).collect();
        let m = cw.iter().sum::<f64>() / d as f64;
        cw.iter_mut().for_each(|x| *x -= m);
        let ww: f64 = cw.iter().map(|x| x * x).sum();
        let cw_col = faer::Col::from_fn(d, |j| cw[j]);
        let ew = &self.ce * &cw_col;
        let bw = &self.ag * &cw_col;
        let r = self.y.ncols();
        let v = self.y.nrows();
        let z = Mat::from_fn(v, r, |t, k| {
            let s = ((self.ee[t] + 2.0 * ew[t] + ww) / d as f64 + eps).sqrt();
            (self.y[(t, k)] + bw[k]) / s + self.ab[k]
        });
        span.test(z.as_ref())
            .into_iter()
            .map(|t| t.distance)
            .collect()
    }
}

/// The attack on a GPT-2 whose only gradients are LoRA adapters'.
pub(crate) fn attack(
    model_dir: &Path,
    gradient: &Path,
    cfg: TextConfig,
    decoder: Option<&Decoder>,
    notes: Vec<String>,
    progress: &mut dyn FnMut(&str),
) -> Result<TextReport, TextError> {
    let t0 = Instant::now();
    let mut seconds = StageSeconds::default();
    if cfg.arch != super::config::Arch::Gpt2 {
        return Err(TextError::Unsupported(format!(
            "LoRA gradients of a {:?} model (the LoRA route reads GPT-2)",
            cfg.arch
        )));
    }
    let weights = Tensors::open(&model_dir.join("model.safetensors"), "model")?;
    let names = Names::detect(weights.names()).ok_or_else(|| TextError::MissingTensor {
        path: model_dir.join("model.safetensors"),
        role: "model",
        name: "wte.weight".into(),
    })?;
    let model = Gpt2::load(cfg, &weights, &names)?;
    let (d, vocab) = (model.cfg.hidden, model.cfg.vocab);
    let grads = Tensors::open(gradient, "gradient")?;
    let site = "h.0.attn.c_attn.lora_B";
    let b_name = find(&grads, site).ok_or_else(|| {
        TextError::Unsupported(
            "LoRA gradients without an adapter on block 0's attn.c_attn: the route reads that layer's adapter".into(),
        )
    })?;
    let adapters = Tensors::open(&model_dir.join(ADAPTER_FILE), "adapter")?;
    let a_name =
        find(&adapters, "h.0.attn.c_attn.lora_A").ok_or_else(|| TextError::MissingTensor {
            path: model_dir.join(ADAPTER_FILE),
            role: "adapter",
            name: "transformer.h.0.attn.c_attn.lora_A.weight".into(),
        })?;
    let r = adapters.shape(&a_name)?.first().copied().unwrap_or(0);
    let a = adapters.matrix(&a_name, r, d)?;
    let storage = grads.dtype(&b_name)?;
    // dB is 3d x r; its transpose's rows are the r coordinates of A x
    let db = grads.matrix(&b_name, 3 * d, r)?;
    let g = db.transpose().to_owned();
    let dtype = super::model::working_dtype(&g, storage)?;
    seconds.load = t0.elapsed().as_secs_f64();

    let t = Instant::now();
    let span = RowSpan::of(g.as_ref(), dtype, "block 0 LoRA adapter", r)?;
    seconds.span = t.elapsed().as_secs_f64();
    progress(&format!(
        "text: LoRA rank {r}: block 0's adapter gradient has rank {} (tau {:.1e}) in {:.1} s",
        span.rank, span.tau, seconds.span
    ));
    let mut report = TextReport::empty(&model.cfg, storage, dtype, notes);
    report.notes.push(format!(
        "LoRA (rank {r}): only the adapters have gradients; block 0's lora_B gradient spans the inputs seen through lora_A, in R^{r}, so at most {} distinct inputs can be told apart",
        r - 1
    ));
    if span.is_full() {
        report.notes.push(format!(
            "block 0's adapter gradient has full rank {r}: the batch has at least {r} distinct (token, position) inputs, so every projected input lies in its span and nothing is identified"
        ));
        report.seconds = seconds;
        return Ok(report);
    }

    let t = Instant::now();
    let screen = Screen::new(&model, &a);
    let at = a.transpose().to_owned();
    let mut positions: Vec<(Vec<u32>, Mat<f64>)> = Vec::new();
    for p in 0..model.cfg.positions {
        // screen the vocabulary with z_tp built from per-token products, then test the
        // survivors' z computed directly
        let s = screen.distances(&span, p);
        let cut = (SCREEN_FACTOR * span.tau).max(SCREEN_MIN);
        let near: Vec<u32> = (0..vocab as u32)
            .filter(|&t| s[t as usize] <= cut)
            .collect();
        let mut min_rejected = s
            .iter()
            .copied()
            .filter(|&x| x > cut)
            .fold(f64::INFINITY, f64::min);
        let (mut tokens, mut rows, mut dist) = (Vec::new(), Vec::new(), Vec::new());
        if !near.is_empty() {
            let z = model.ln_input(&near, p) * &at;
            for (i, test) in span.test(z.as_ref()).into_iter().enumerate() {
                if span.accepts(test) {
                    tokens.push(near[i]);
                    rows.push(z.row(i).iter().copied().collect::<Vec<f64>>());
                    dist.push(test.distance);
                } else {
                    min_rejected = min_rejected.min(test.distance);
                }
            }
        }
        if tokens.is_empty() {
            break;
        }
        report.token_filter.push(FilterStep {
            position: p,
            tokens: tokens.len(),
            max_distance: dist.iter().copied().fold(0.0, f64::max),
            min_rejected,
        });
        let z = Mat::from_fn(rows.len(), r, |i, j| rows[i][j]);
        positions.push((tokens, z));
    }
    seconds.filter = t.elapsed().as_secs_f64();
    progress(&format!(
        "text: LoRA token filter: {} positions in {:.1} s",
        positions.len(),
        seconds.filter
    ));

    let t = Instant::now();
    let n: usize = positions.iter().map(|(tk, _)| tk.len()).sum();
    let inputs = Mat::from_fn(n, r, |i, j| {
        let (mut i, mut k) = (i, 0);
        while i >= positions[k].0.len() {
            i -= positions[k].0.len();
            k += 1;
        }
        positions[k].1[(i, j)]
    });
    let u = dtype.epsilon() / 2.0;
    let check = certificate::check("block 0 LoRA adapter", &span, g.as_ref(), &inputs, u, true);
    seconds.certificate = t.elapsed().as_secs_f64();
    let single = positions.iter().all(|(tk, _)| tk.len() == 1);
    if single && !positions.is_empty() {
        // one token per position: one sequence (B = 1, or B identical sequences)
        let ids: Vec<u32> = positions.iter().map(|(tk, _)| tk[0]).collect();
        let complete = model.cfg.head != super::config::Head::LanguageModel;
        if !complete {
            report.last_token_missing = true;
            report.notes.push(
                "language-model head: the last position predicts nothing, so its input carries no gradient; the sequence is recovered without its last token and not marked exact".into(),
            );
        }
        report.certified = check.passed && complete;
        report.sequences.push(RecoveredSequence {
            text: decoder.and_then(|dec| dec.decode(&ids)),
            ids,
            exact: report.certified,
            max_distance: check.max_distance,
        });
    } else {
        let bag: std::collections::BTreeSet<u32> = positions
            .iter()
            .flat_map(|(tk, _)| tk.iter().copied())
            .collect();
        report.notes.push(format!(
            "what is identified: per position, the tokens whose input lies in the span ({n} pairs over {} positions, report.token_filter; their tokens in report.token_bag): every true pair, possibly cross pairs (block 0's inputs are nearly additive in token and position), and, with {} dimensions of R^{r} left off the span, possibly false ones; some position holds more than one token, and block 0's adapter does not order sequences",
            positions.len(),
            r - span.rank
        ));
        report.token_bag = bag.into_iter().collect();
    }
    progress(&format!(
        "text: LoRA: {} sequences, certified: {} (unexplained {:.1e}, tolerance {:.1e}) in {:.1} s",
        report.sequences.len(),
        report.certified,
        check.unexplained,
        check.tolerance,
        t0.elapsed().as_secs_f64()
    ));
    report.layers = vec![check];
    report.seconds = seconds;
    Ok(report)
}
