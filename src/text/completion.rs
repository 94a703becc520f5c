//! LM head: each sequence's last token, which no block sees, from the final LayerNorm's
//! gradient and the output embedding's (docs/DESIGN.md, "Text: the last token").
//!
//! With the prefixes P_b known, the whole forward is known: the final states h_bt, the
//! softmax p_bt, and every target but the last, y_b. The loss is (1/N) sum CE over the
//! N = sum_b |P_b| predicted positions, dL/dh_bt = W^T (p_bt - e_y) / N (W the output
//! embedding). The unknown targets enter ln_f's gradient only through their own term:
//!
//! ```text
//! r_beta  = -N (G_beta  - known_beta)  = sum_b W[y_b]
//! r_gamma = -N (G_gamma - known_gamma) = sum_b W[y_b] (.) n_b
//! ```
//!
//! (n_b ln_f's normalised input at the last prefix position), exactly, whatever the
//! rest of the network; and the output embedding's rows outside the prefixes' tokens
//! (a tied embedding's input rows also carry the input path) hold -h_b / N at the row
//! of y_b. The rows propose, the 2d equations of ln_f decide and certify.

use faer::linalg::solvers::Solve;
use faer::{Mat, Side};

use super::TextError;
use super::certificate::RESIDUAL_FACTOR;
use super::config::TextConfig;
use super::forward::{FinalStates, final_states, llama_final_states};
use super::gpt2::{Gpt2, Names};
use super::llama::Llama;
use super::tensors::Tensors;

/// What the completion found and the evidence for it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Completion {
    /// The last token of each prefix, in the prefixes' order.
    pub tokens: Vec<u32>,
    /// How each was chosen: "row" (the output embedding's row) or "final_norm" (the
    /// final norm's equations).
    pub chosen_by: Vec<&'static str>,
    /// ||r - sum_b col(b, y_b)|| / ||r||, r = (r_gamma, r_beta).
    pub unexplained: f64,
    pub tolerance: f64,
    /// The same with the best single change of one sequence's token (how far the
    /// nearest alternative is).
    pub runner_up: f64,
    /// Largest unexplained output-embedding row outside the prefixes' tokens, relative
    /// to the larger of the row's own size ||N G_W(v)|| and the largest |h_b|.
    pub rows_unexplained: f64,
    pub rows_tolerance: f64,
    pub passed: bool,
}

/// The column of (sequence b, token v) in the final norm's equations: (W[v] (.) n_b,
/// W[v]), the second half only where the norm has a shift (LayerNorm, not RMSNorm).
fn column(w: &Mat<f64>, v: usize, n: &[f64], shift: bool) -> Vec<f64> {
    let d = n.len();
    let mut c = vec![0.0; if shift { 2 * d } else { d }];
    for j in 0..d {
        c[j] = w[(v, j)] * n[j];
        if shift {
            c[d + j] = w[(v, j)];
        }
    }
    c
}

/// What the completion reads of an LM head: the output embedding W (V x d), the name
/// of its gradient, and the final norm's gain and (LayerNorm) shift gradients.
pub(crate) struct OutputHead<'a> {
    pub cfg: &'a TextConfig,
    pub w: &'a Mat<f64>,
    pub w_grad: String,
    pub g_gamma: Vec<f64>,
    pub g_beta: Option<Vec<f64>>,
}

fn norm(x: &[f64]) -> f64 {
    x.iter().map(|v| v * v).sum::<f64>().sqrt()
}

fn check_count(cfg: &TextConfig, prefixes: &[Vec<u32>]) -> Result<(), TextError> {
    if prefixes.is_empty() || prefixes.len() > cfg.hidden {
        return Err(TextError::Unsupported(format!(
            "last-token completion of {} prefixes (needs 1 to d = {})",
            prefixes.len(),
            cfg.hidden
        )));
    }
    Ok(())
}

/// The output embedding: the token embedding when tied (None: the caller's own, and
/// the gradient under `tied_name`), else `lm_head.weight`.
fn output_embedding(
    cfg: &TextConfig,
    weights: &Tensors,
    tied_name: String,
) -> Result<(Option<Mat<f64>>, String), TextError> {
    if cfg.tied_embeddings {
        return Ok((None, tied_name));
    }
    let n = "lm_head.weight".to_string();
    Ok((Some(weights.matrix(&n, cfg.vocab, cfg.hidden)?), n))
}

/// Complete `prefixes` (the search's leaves, each non-empty) of a GPT-2 LM-head model.
/// `u`: the gradient's unit roundoff.
#[allow(clippy::too_many_arguments)]
pub(crate) fn complete(
    model: &Gpt2,
    weights: &Tensors,
    grads: &Tensors,
    names: &Names,
    prefixes: &[Vec<u32>],
    u: f64,
    progress: &mut dyn FnMut(&str),
) -> Result<Completion, TextError> {
    let cfg: &TextConfig = &model.cfg;
    check_count(cfg, prefixes)?;
    let d = cfg.hidden;
    let (w_out, w_grad) = output_embedding(cfg, weights, names.wte())?;
    let lnf = |s: &str| format!("{}ln_f.{s}", names.prefix);
    let head = OutputHead {
        cfg,
        w: w_out.as_ref().unwrap_or(&model.wte),
        w_grad,
        g_gamma: grads.vector(&lnf("weight"), d)?,
        g_beta: Some(grads.vector(&lnf("bias"), d)?),
    };
    let states = final_states(
        cfg, weights, names, &model.wte, &model.wpe, prefixes, progress,
    )?;
    solve(&head, states, grads, prefixes, u, progress)
}

/// The same for a LLaMA-style model (final RMSNorm: the gain's d equations only).
pub(crate) fn complete_llama(
    model: &Llama,
    weights: &Tensors,
    grads: &Tensors,
    prefix: &str,
    prefixes: &[Vec<u32>],
    u: f64,
    progress: &mut dyn FnMut(&str),
) -> Result<Completion, TextError> {
    let cfg: &TextConfig = &model.cfg;
    check_count(cfg, prefixes)?;
    let d = cfg.hidden;
    let (w_out, w_grad) = output_embedding(cfg, weights, format!("{prefix}embed_tokens.weight"))?;
    let head = OutputHead {
        cfg,
        w: w_out.as_ref().unwrap_or(&model.embed),
        w_grad,
        g_gamma: grads.vector(&format!("{prefix}norm.weight"), d)?,
        g_beta: None,
    };
    let states = llama_final_states(model, weights, prefix, prefixes, progress)?;
    solve(&head, states, grads, prefixes, u, progress)
}

/// The completion proper, on the stack's final states.
fn solve(
    head: &OutputHead<'_>,
    states: FinalStates,
    grads: &Tensors,
    prefixes: &[Vec<u32>],
    u: f64,
    progress: &mut dyn FnMut(&str),
) -> Result<Completion, TextError> {
    let (cfg, w) = (head.cfg, head.w);
    let (d, vocab) = (cfg.hidden, cfg.vocab);
    let tied = cfg.tied_embeddings;
    let shift = head.g_beta.is_some();
    let FinalStates {
        normalised,
        hidden,
        starts,
    } = states;
    let rows = hidden.nrows();
    let n_pred = rows as f64;
    // dL/dz for every row with its known target; the last row of each prefix without
    let mut dz = &hidden * w.transpose();
    for i in 0..rows {
        let mx = (0..vocab).map(|v| dz[(i, v)]).fold(f64::MIN, f64::max);
        let mut z = 0.0;
        for v in 0..vocab {
            let e = (dz[(i, v)] - mx).exp();
            dz[(i, v)] = e;
            z += e;
        }
        for v in 0..vocab {
            dz[(i, v)] /= z * n_pred;
        }
    }
    let mut last = Vec::with_capacity(prefixes.len());
    for (s, &r0) in prefixes.iter().zip(&starts) {
        for (t, &y) in s.iter().skip(1).enumerate() {
            dz[(r0 + t, y as usize)] -= 1.0 / n_pred;
        }
        last.push(r0 + s.len() - 1);
    }
    progress("text: last token: softmax of every prefix position");
    let dh = &dz * w;
    let width = if shift { 2 * d } else { d };
    let mut r = vec![0.0; width];
    let mut scale = vec![0.0; width];
    for j in 0..d {
        let (mut kg, mut kb) = (0.0, 0.0);
        for i in 0..rows {
            kg += dh[(i, j)] * normalised[(i, j)];
            kb += dh[(i, j)];
        }
        r[j] = -n_pred * (head.g_gamma[j] - kg);
        scale[j] = n_pred * head.g_gamma[j];
        if let Some(g_beta) = &head.g_beta {
            r[d + j] = -n_pred * (g_beta[j] - kb);
            scale[d + j] = n_pred * g_beta[j];
        }
    }
    let r_norm = norm(&r);
    // the client's rounding is relative to what it summed, N G, not to the small r
    let tolerance = RESIDUAL_FACTOR * u * norm(&scale).max(r_norm) / r_norm.max(f64::MIN_POSITIVE);

    // the output embedding's rows: -N R_v = -N (G_W - dz^T H)_v (the known terms'
    // output path removed), as the columns of a d x V matrix
    // and each row's size as the client summed it, ||N G_W[v]||, which its rounding scales with
    let (rhs, row_scale) = {
        let g_w = grads.matrix(&head.w_grad, vocab, d)?;
        let out_path = dz.transpose() * &hidden;
        let scale: Vec<f64> = (0..vocab)
            .map(|v| n_pred * (0..d).map(|j| g_w[(v, j)].powi(2)).sum::<f64>().sqrt())
            .collect();
        (
            Mat::from_fn(d, vocab, |j, v| -n_pred * (g_w[(v, j)] - out_path[(v, j)])),
            scale,
        )
    };
    drop(dz);
    let mut input_rows = vec![false; vocab];
    if tied {
        for s in prefixes {
            for &t in s {
                input_rows[t as usize] = true;
            }
        }
    }
    let b = prefixes.len();
    let h_last = Mat::from_fn(b, d, |i, j| hidden[(last[i], j)]);
    let n_last: Vec<Vec<f64>> = last
        .iter()
        .map(|&row| (0..d).map(|j| normalised[(row, j)]).collect())
        .collect();
    let gram = &h_last * h_last.transpose();
    let llt = gram.llt(Side::Lower).map_err(|_| {
        TextError::Numerical("the final states of the prefixes are linearly dependent".into())
    })?;
    // a clean row v holds sum_{b: y_b = v} h_b: coefficients C = Gram^-1 H_last (-N R^T)
    let coef = llt.solve(&h_last * &rhs);
    let fit_residual = |v: usize| -> f64 {
        (0..d)
            .map(|j| {
                let p: f64 = (0..b).map(|i| h_last[(i, j)] * coef[(i, v)]).sum();
                (p - rhs[(j, v)]).powi(2)
            })
            .sum::<f64>()
            .sqrt()
    };
    let mut best: Vec<Option<(usize, f64)>> = vec![None; b];
    for v in (0..vocab).filter(|&v| !input_rows[v]) {
        for (i, slot) in best.iter_mut().enumerate() {
            let c = coef[(i, v)];
            if c > 0.5 && slot.is_none_or(|(_, bc)| c > bc) {
                *slot = Some((v, c));
            }
        }
    }
    let mut tokens: Vec<Option<usize>> = best
        .iter()
        .map(|s| {
            s.and_then(|(v, _)| (fit_residual(v) <= 0.1 * norm(&column_of(&rhs, v))).then_some(v))
        })
        .collect();
    let mut chosen_by: Vec<&'static str> = tokens
        .iter()
        .map(|t| if t.is_some() { "row" } else { "final_norm" })
        .collect();
    progress(&format!(
        "text: last token: {} of {b} from the output embedding's rows",
        tokens.iter().filter(|t| t.is_some()).count()
    ));

    // the rest from ln_f's equations, over the prefixes' tokens (whose rows are not clean)
    let mut e = r.clone();
    let sub = |e: &mut Vec<f64>, v: usize, n: &[f64], sign: f64| {
        for (ej, cj) in e.iter_mut().zip(column(w, v, n, shift)) {
            *ej -= sign * cj;
        }
    };
    for (i, t) in tokens.iter().enumerate() {
        if let Some(v) = *t {
            sub(&mut e, v, &n_last[i], 1.0);
        }
    }
    let pool: Vec<usize> = if tied {
        (0..vocab).filter(|&v| input_rows[v]).collect()
    } else {
        (0..vocab).collect()
    };
    // ||e - column(v, n)||, without building the column (the pool can be the vocabulary)
    let dist = |e: &[f64], v: usize, n: &[f64]| -> f64 {
        let mut s = 0.0;
        for j in 0..d {
            s += (e[j] - w[(v, j)] * n[j]).powi(2);
            if shift {
                s += (e[d + j] - w[(v, j)]).powi(2);
            }
        }
        s.sqrt()
    };
    while tokens.iter().any(Option::is_none) {
        let mut pick: Option<(usize, usize, f64)> = None;
        for i in (0..b).filter(|&i| tokens[i].is_none()) {
            for &v in &pool {
                let s = dist(&e, v, &n_last[i]);
                if pick.is_none_or(|(_, _, bs)| s < bs) {
                    pick = Some((i, v, s));
                }
            }
        }
        let Some((i, v, _)) = pick else {
            return Err(TextError::Numerical("no candidate for a last token".into()));
        };
        sub(&mut e, v, &n_last[i], 1.0);
        tokens[i] = Some(v);
    }
    let mut tokens: Vec<usize> = tokens.into_iter().flatten().collect();
    // one sweep of single changes over the pool and the rows' proposals: take any that
    // lowers the residual; the nearest alternative is the evidence of uniqueness
    let mut runner_up = f64::INFINITY;
    for i in 0..b {
        sub(&mut e, tokens[i], &n_last[i], -1.0);
        let cur = dist(&e, tokens[i], &n_last[i]);
        let mut alt = (f64::INFINITY, tokens[i]);
        for &v in pool.iter().chain(best[i].as_ref().map(|(v, _)| v)) {
            if v != tokens[i] {
                let s = dist(&e, v, &n_last[i]);
                if s < alt.0 {
                    alt = (s, v);
                }
            }
        }
        if alt.0 < cur {
            runner_up = runner_up.min(cur);
            tokens[i] = alt.1;
            chosen_by[i] = "final_norm";
        } else {
            runner_up = runner_up.min(alt.0);
        }
        sub(&mut e, tokens[i], &n_last[i], 1.0);
    }
    let unexplained = norm(&e) / r_norm;
    // rows outside the prefixes' tokens must hold exactly the chosen targets' states
    let h_max = (0..b)
        .map(|i| (0..d).map(|j| h_last[(i, j)].powi(2)).sum::<f64>().sqrt())
        .fold(0.0, f64::max);
    let mut rows_unexplained: f64 = 0.0;
    for v in (0..vocab).filter(|&v| !input_rows[v]) {
        let s: f64 = (0..d)
            .map(|j| {
                let chosen: f64 = (0..b)
                    .filter(|&i| tokens[i] == v)
                    .map(|i| h_last[(i, j)])
                    .sum();
                (rhs[(j, v)] - chosen).powi(2)
            })
            .sum();
        let scale = row_scale[v].max(h_max).max(f64::MIN_POSITIVE);
        rows_unexplained = rows_unexplained.max(s.sqrt() / scale);
    }
    let rows_tolerance = RESIDUAL_FACTOR * u;
    let passed = unexplained <= tolerance && rows_unexplained <= rows_tolerance;
    Ok(Completion {
        tokens: tokens.iter().map(|&v| v as u32).collect(),
        chosen_by,
        unexplained,
        tolerance,
        runner_up: runner_up / r_norm,
        rows_unexplained,
        rows_tolerance,
        passed,
    })
}

fn column_of(m: &Mat<f64>, j: usize) -> Vec<f64> {
    (0..m.nrows()).map(|i| m[(i, j)]).collect()
}
