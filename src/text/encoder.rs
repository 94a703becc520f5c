//! The encoder route (BERT; docs/DESIGN.md, "Text: BERT"): block 0's attention is
//! bidirectional, so there is no prefix search. Spans of block 0's per-position layers
//! -> the token filter (block 0's query/key/value span) -> the context of each candidate
//! pair ([`context`](super::context)) -> sequences from the attention equations
//! ([`assemble`]) -> the certificate on every span.

use std::path::Path;
use std::time::Instant;

use faer::Mat;

use super::assemble::{self, Grouping};
use super::bert::{self, Bert, Gradients};
use super::certificate::{self, LayerCheck};
use super::config::{Head, TextConfig};
use super::context::ContextSolver;
use super::filter::{PositionTokens, TokenFilter};
use super::model::working_dtype;
use super::span::RowSpan;
use super::tensors::Tensors;
use super::tokenizer::Decoder;
use super::{FilterStep, RecoveredSequence, StageSeconds, TextError, TextReport};
use crate::Dtype;

/// The encoder stages' figures, in the report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EncoderStats {
    /// Candidate (position, token) pairs: the filter's tokens at each position.
    pub candidates: usize,
    /// Dimension of each candidate's null space searched by Gauss-Newton (r_c - r_x).
    pub family: usize,
    /// Candidates whose context was found (both spans within their thresholds).
    pub accepted: usize,
    /// Candidates that passed the screen (S_h and rows of S_g; docs/DESIGN.md, "Text:
    /// BERT", screen) and had the full system solved.
    pub screened: usize,
    /// Gauss-Newton steps over all candidates on the screen's rows, and on the full system.
    pub screen_steps: usize,
    pub steps: usize,
    /// Smallest distance (the larger of S_h's and S_o's) of a rejected candidate.
    pub rejected_min_distance: f64,
    /// Each accepted pair's grouping evidence.
    pub groupings: Vec<Grouping>,
}

struct Loaded {
    model: Bert,
    grads: Gradients,
    storage: Dtype,
    dtype: Dtype,
}

fn load(model_dir: &Path, gradient: &Path, cfg: TextConfig) -> Result<Loaded, TextError> {
    let weights = Tensors::open(&model_dir.join("model.safetensors"), "model")?;
    let grads = Tensors::open(gradient, "gradient")?;
    let prefix = bert::detect_prefix(weights.names()).ok_or_else(|| TextError::MissingTensor {
        path: model_dir.join("model.safetensors"),
        role: "model",
        name: "embeddings.word_embeddings.weight".into(),
    })?;
    let model = Bert::load(cfg, &weights, &prefix)?;
    let storage = grads.dtype(&format!(
        "{prefix}encoder.layer.0.attention.self.query.weight"
    ))?;
    let g = model.gradients(&grads, &prefix)?;
    let dtype = working_dtype(&g.x, storage)?;
    Ok(Loaded {
        model,
        grads: g,
        storage,
        dtype,
    })
}

/// The five spans: x (block 0 q/k/v), c (attention.output.dense), h (intermediate.dense),
/// g (output.dense), o (block 1 q/k/v). LayerNorm outputs augmented span d dimensions;
/// contexts d + 1, the feed-forward activations ffn + 1.
struct Spans {
    x: RowSpan,
    c: RowSpan,
    h: RowSpan,
    g: RowSpan,
    o: RowSpan,
}

const NAMES: [&str; 5] = [
    "block 0 query/key/value",
    "block 0 attention.output.dense",
    "block 0 intermediate.dense",
    "block 0 output.dense",
    "block 1 query/key/value",
];

fn spans(g: &Gradients, dtype: Dtype, d: usize) -> Result<Spans, TextError> {
    Ok(Spans {
        x: RowSpan::of(g.x.as_ref(), dtype, NAMES[0], d)?,
        c: RowSpan::of(g.c.as_ref(), dtype, NAMES[1], d + 1)?,
        h: RowSpan::of(g.h.as_ref(), dtype, NAMES[2], d)?,
        g: RowSpan::of(g.g.as_ref(), dtype, NAMES[3], g.g.nrows())?,
        o: RowSpan::of(g.o.as_ref(), dtype, NAMES[4], d)?,
    })
}

/// The certificate on every span for claimed sequences: block 0's distinct
/// (position, token) inputs (nearly additive, so no count), and one input per position
/// at attention.output.dense, intermediate.dense and block 1 (as many as the rank).
/// output.dense's span (S_g) gives the search its equations but is not required here:
/// exact f64 inputs measured above their own thresholds there (6.7e-11 against
/// 2.5e-11, the tiny fixture; float32 passes), so it is not vouched for.
fn certify(
    model: &Bert,
    s: &Spans,
    g: &Gradients,
    sequences: &[Vec<u32>],
    u: f64,
) -> Vec<LayerCheck> {
    let mut pairs: Vec<(usize, u32)> = sequences
        .iter()
        .flat_map(|q| q.iter().enumerate().map(|(p, &t)| (p, t)))
        .collect();
    pairs.sort_unstable();
    pairs.dedup();
    let x = model.input_of(&pairs);
    let runs: Vec<bert::Inputs> = sequences.iter().map(|q| model.forward(q)).collect();
    let stack = |pick: fn(&bert::Inputs) -> &Mat<f64>| -> Mat<f64> {
        let n: usize = runs.iter().map(|r| pick(r).nrows()).sum();
        let w = runs.first().map_or(model.hidden() + 1, |r| pick(r).ncols());
        let mut m = Mat::<f64>::zeros(n, w);
        let mut at = 0;
        for r in &runs {
            let p = pick(r);
            m.subrows_mut(at, p.nrows()).copy_from(p);
            at += p.nrows();
        }
        m
    };
    vec![
        certificate::check(NAMES[0], &s.x, g.x.as_ref(), &x, u, false),
        certificate::check(NAMES[1], &s.c, g.c.as_ref(), &stack(|r| &r.c), u, true),
        certificate::check(NAMES[2], &s.h, g.h.as_ref(), &stack(|r| &r.h), u, true),
        certificate::check(NAMES[4], &s.o, g.o.as_ref(), &stack(|r| &r.o), u, true),
    ]
}

/// Check claimed sequences of a BERT against its gradient (see `text::verify`).
pub(crate) fn verify(
    model_dir: &Path,
    gradient: &Path,
    cfg: TextConfig,
    sequences: &[Vec<u32>],
) -> Result<Vec<LayerCheck>, TextError> {
    let vocab = cfg.vocab;
    let positions = cfg.positions;
    let l = load(model_dir, gradient, cfg)?;
    if let Some(&bad) = sequences.iter().flatten().find(|&&t| t as usize >= vocab) {
        return Err(TextError::Unsupported(format!(
            "token id {bad} is outside the vocabulary ({vocab})"
        )));
    }
    if let Some(q) = sequences.iter().find(|q| q.len() > positions) {
        return Err(TextError::Unsupported(format!(
            "a sequence of {} tokens: the model has {positions} positions",
            q.len()
        )));
    }
    let s = spans(&l.grads, l.dtype, l.model.hidden())?;
    Ok(certify(
        &l.model,
        &s,
        &l.grads,
        sequences,
        l.dtype.epsilon() / 2.0,
    ))
}

/// The token filter at positions 0, 1, ... until one passes no token.
fn filter(model: &Bert, span: &RowSpan) -> Vec<PositionTokens> {
    let f = TokenFilter::new(model.embeddings(), span);
    let mut out = Vec::new();
    for p in 0..model.cfg.positions {
        let pt = f.at(p);
        if pt.tokens.is_empty() {
            break;
        }
        out.push(pt);
    }
    out
}

/// The encoder attack; `notes` and `decoder` come from the caller (`text::attack`).
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
    let l = load(model_dir, gradient, cfg)?;
    let model = &l.model;
    let d = model.hidden();
    seconds.load = t0.elapsed().as_secs_f64();
    progress(&format!(
        "text: read the BERT (d = {d}, vocab {}) and the gradient ({}) in {:.1} s",
        model.cfg.vocab, l.dtype, seconds.load
    ));
    let t = Instant::now();
    let s = spans(&l.grads, l.dtype, d)?;
    seconds.span = t.elapsed().as_secs_f64();
    progress(&format!(
        "text: spans: x rank {}, c rank {}, h rank {}, g rank {}, o rank {} of {} in {:.1} s",
        s.x.rank, s.c.rank, s.h.rank, s.g.rank, s.o.rank, s.x.dim, seconds.span
    ));
    let mut report = TextReport::empty(&model.cfg, l.storage, l.dtype, notes);
    for (name, sp) in NAMES.iter().zip([&s.x, &s.c, &s.h, &s.g, &s.o]) {
        if sp.is_full() {
            report.notes.push(format!(
                "{name}'s gradient has full rank {}: the batch has at least {} distinct inputs there, so its span contains every input; no sequence can be vouched for",
                sp.rank, sp.effective_dim
            ));
        }
    }
    if s.x.is_full() {
        report.seconds = seconds;
        return Ok(report);
    }

    let t = Instant::now();
    let positions = filter(model, &s.x);
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
    let bag: std::collections::BTreeSet<u32> = positions
        .iter()
        .flat_map(|p| p.tokens.iter().copied())
        .collect();
    progress(&format!(
        "text: token filter: {} positions, {} distinct tokens, in {:.1} s",
        positions.len(),
        bag.len(),
        seconds.filter
    ));
    if [&s.c, &s.h, &s.g, &s.o].iter().any(|sp| sp.is_full()) {
        report.notes.push(format!(
            "what is still identifiable: block 0's span (rank {}) gives the bag of {} distinct tokens (report.token_bag) and that the longest sequence has {} tokens; their order is not identified by a span test",
            s.x.rank,
            bag.len(),
            positions.len()
        ));
        report.token_bag = bag.into_iter().collect();
        report.seconds = seconds;
        return Ok(report);
    }

    let t = Instant::now();
    let pairs: Vec<(usize, u32)> = positions
        .iter()
        .flat_map(|p| p.tokens.iter().map(move |&tok| (p.position, tok)))
        .collect();
    let solver = ContextSolver::new(model, &s.c, &s.h, &s.g, &s.o, s.x.rank);
    let family = solver.family;
    if !solver.determined() {
        report.notes.push(format!(
            "the contexts are not identified: each candidate's null space has {family} dimensions (attention.output.dense rank {} against intermediate.dense's {} equations and block 0's rank {}) and output.dense's and block 1's spans leave {} equations, so false pairs have exact solutions too. What is still identifiable: block 0's span gives the bag of {} distinct tokens (report.token_bag) and that the longest sequence has {} tokens",
            s.c.rank,
            s.h.complement.ncols() - 1,
            s.x.rank,
            solver.equations(),
            bag.len(),
            positions.len()
        ));
        report.token_bag = bag.into_iter().collect();
        report.seconds = seconds;
        return Ok(report);
    }

    progress(&format!(
        "text: {} candidate pairs, each a Gauss-Newton over a {family}-dimensional null space",
        pairs.len()
    ));
    let xs = model.input_of(&pairs);
    let t_solve = std::time::Instant::now();
    let n_pairs = pairs.len();
    let solved = solver.solve(&pairs, xs.as_ref(), &mut |k| {
        progress(&format!(
            "text: {k} of {n_pairs} candidate pairs solved ({:.0} s)",
            t_solve.elapsed().as_secs_f64()
        ))
    });
    let accepted: Vec<&_> = solved.iter().filter(|s| s.accepted).collect();
    if std::env::var("GRADLEAK_DEBUG_BERT").is_ok() {
        for s in &solved {
            eprintln!(
                "DBG {} {} {} {} {:?} {} {}",
                s.position,
                s.token,
                s.screened,
                s.accepted,
                s.tests.map(|t| format!("{:.2e}/{:.2e}", t.distance, t.tau)),
                s.screen_steps,
                s.steps
            );
        }
    }
    let steps = solved.iter().map(|s| s.steps).sum();
    let screen_steps = solved.iter().map(|s| s.screen_steps).sum();
    let screened = solved.iter().filter(|s| s.screened).count();
    let (seqs, groupings) = assemble::sequences(model, &accepted);
    seconds.search = t.elapsed().as_secs_f64();
    progress(&format!(
        "text: {screened} pairs passed the screen ({screen_steps} Gauss-Newton steps), {} accepted ({steps} steps on the full system), {} sequences grouped in {:.1} s",
        accepted.len(),
        seqs.len(),
        seconds.search
    ));
    let stats = EncoderStats {
        candidates: pairs.len(),
        family,
        accepted: accepted.len(),
        screened,
        screen_steps,
        steps,
        rejected_min_distance: solved
            .iter()
            .filter(|s| !s.accepted)
            .map(|s| s.tests.iter().map(|t| t.distance).fold(0.0, f64::max))
            .fold(f64::INFINITY, f64::min),
        groupings,
    };

    let t = Instant::now();
    let u = l.dtype.epsilon() / 2.0;
    let layers = if seqs.is_empty() {
        Vec::new()
    } else {
        certify(model, &s, &l.grads, &seqs, u)
    };
    seconds.certificate = t.elapsed().as_secs_f64();
    let complete = model.cfg.head != Head::LanguageModel;
    report.certified = !layers.is_empty() && layers.iter().all(|c| c.passed) && complete;
    if !report.certified && !seqs.is_empty() {
        report.notes.push(format!(
            "the {} grouped sequences do not account for every span (per-layer evidence in layers): none is marked exact",
            seqs.len()
        ));
    }
    for ids in seqs {
        let x = model.forward(&ids);
        let max_distance = [(&s.c, &x.c), (&s.h, &x.h), (&s.g, &x.g), (&s.o, &x.o)]
            .iter()
            .flat_map(|(sp, rows)| sp.test(rows.as_ref()))
            .map(|t| t.distance)
            .fold(0.0, f64::max);
        report.sequences.push(RecoveredSequence {
            text: decoder.and_then(|dec| dec.decode(&ids)),
            ids,
            exact: report.certified,
            max_distance,
        });
    }
    progress(&format!(
        "text: {} sequences, certified: {} in {:.1} s",
        report.sequences.len(),
        report.certified,
        t0.elapsed().as_secs_f64()
    ));
    report.layers = layers;
    report.encoder = Some(stats);
    report.seconds = seconds;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// The tiny BERT fixture's true (position, token) pairs, and pairs made of a batch
    /// token at a position where no sequence has it.
    type Pairs = Vec<(usize, u32)>;

    fn pairs(dir: &Path) -> (Pairs, Pairs) {
        let truth: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("truth.json")).unwrap())
                .unwrap();
        let ids: Vec<Vec<u32>> = serde_json::from_value(truth["ids"].clone()).unwrap();
        let mut real: Vec<(usize, u32)> = ids
            .iter()
            .flat_map(|q| q.iter().enumerate().map(|(p, &t)| (p, t)))
            .collect();
        real.sort_unstable();
        real.dedup();
        let tokens: Vec<u32> = real.iter().map(|&(_, t)| t).collect();
        let wrong: Vec<(usize, u32)> = [0usize, 3, 6, 10, 15]
            .iter()
            .flat_map(|&p| tokens.iter().map(move |&t| (p, t)))
            .filter(|pair| !real.contains(pair))
            .step_by(7)
            .take(6)
            .collect();
        (real, wrong)
    }

    #[test]
    fn screen_passes_true_pairs_and_refuses_planted_ones() {
        let dir =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/text/bert-cls-tiny");
        let cfg = TextConfig::read(&dir).unwrap();
        let l = load(&dir, &dir.join("gradient.safetensors"), cfg).unwrap();
        let s = spans(&l.grads, l.dtype, l.model.hidden()).unwrap();
        let solver = ContextSolver::new(&l.model, &s.c, &s.h, &s.g, &s.o, s.x.rank);
        assert!(solver.family > 0 && solver.determined());
        let (real, wrong) = pairs(&dir);
        assert_eq!(wrong.len(), 6);
        let all: Vec<(usize, u32)> = real.iter().chain(&wrong).copied().collect();
        let solved = solver.solve(&all, l.model.input_of(&all).as_ref(), &mut |_| {});
        for s in &solved[..real.len()] {
            assert!(
                s.screened && s.accepted,
                "true pair {:?} refused",
                (s.position, s.token)
            );
        }
        for s in &solved[real.len()..] {
            assert!(
                !s.screened && !s.accepted,
                "planted pair {:?} passed",
                (s.position, s.token)
            );
        }
    }
}
