//! GPT-2's whole stack run forward in f64 on whole sequences: the final hidden states
//! the LM head's last-token completion reads (docs/DESIGN.md, "Text: the last token").
//! One block's weights are read at a time, so memory stays at one block whatever the depth.

use faer::{Mat, MatRef};

use super::TextError;
use super::causal::causal_attention;
use super::config::TextConfig;
use super::gpt2::{LayerNorm, Names, add_bias, normalise_rows};
use super::llama::{Llama, rms_norm_rows};
use super::tensors::Tensors;

/// The stack's output for a set of sequences, rows stacked sequence after sequence.
pub(crate) struct FinalStates {
    /// Before ln_f's gain and shift: (x - mean) / sqrt(var + eps) (rows x d).
    pub normalised: Mat<f64>,
    /// ln_f's output, what the LM head multiplies (rows x d).
    pub hidden: Mat<f64>,
    /// First row of each sequence.
    pub starts: Vec<usize>,
}

/// One Conv1D (weight in x out, bias out) of block `l`.
fn conv1d(
    weights: &Tensors,
    names: &Names,
    l: usize,
    which: &str,
    rows: usize,
    cols: usize,
) -> Result<(Mat<f64>, Vec<f64>), TextError> {
    Ok((
        weights.matrix(&names.block(l, &format!("{which}.weight")), rows, cols)?,
        weights.vector(&names.block(l, &format!("{which}.bias")), cols)?,
    ))
}

fn layer_norm(
    weights: &Tensors,
    name_weight: &str,
    name_bias: &str,
    d: usize,
    eps: f64,
) -> Result<LayerNorm, TextError> {
    Ok(LayerNorm {
        gamma: weights.vector(name_weight, d)?,
        beta: weights.vector(name_bias, d)?,
        eps,
    })
}

/// Causal self-attention of one sequence (rows of q: n x heads*hd; k, v: n x
/// kv_heads*hd), heads concatenated, into rows `r0 .. r0 + n` of `out`: position i is
/// the search's extension of the prefix 0..i by itself ([`causal_attention`]).
#[allow(clippy::too_many_arguments)]
fn attention(
    q: MatRef<'_, f64>,
    k: MatRef<'_, f64>,
    v: MatRef<'_, f64>,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    r0: usize,
    out: &mut Mat<f64>,
) {
    for i in 0..q.nrows() {
        let a = causal_attention(
            k.subrows(0, i),
            v.subrows(0, i),
            q.subrows(i, 1),
            k.subrows(i, 1),
            v.subrows(i, 1),
            heads,
            kv_heads,
            hd,
        );
        out.subrows_mut(r0 + i, 1).copy_from(&a);
    }
}

/// First row of each sequence in the stacked rows, and the row count.
fn stacking(sequences: &[Vec<u32>]) -> (Vec<usize>, usize) {
    let mut starts = Vec::with_capacity(sequences.len());
    let mut rows = 0;
    for s in sequences {
        starts.push(rows);
        rows += s.len();
    }
    (starts, rows)
}

/// Run the stack on `sequences` (each non-empty, within the model's positions).
pub(crate) fn final_states(
    cfg: &TextConfig,
    weights: &Tensors,
    names: &Names,
    wte: &Mat<f64>,
    wpe: &Mat<f64>,
    sequences: &[Vec<u32>],
    progress: &mut dyn FnMut(&str),
) -> Result<FinalStates, TextError> {
    let d = cfg.hidden;
    let (starts, rows) = stacking(sequences);
    let mut x = Mat::<f64>::zeros(rows, d);
    for (s, &r0) in sequences.iter().zip(&starts) {
        for (p, &t) in s.iter().enumerate() {
            for j in 0..d {
                x[(r0 + p, j)] = wte[(t as usize, j)] + wpe[(p, j)];
            }
        }
    }
    let eps = cfg.layer_norm_eps;
    for l in 0..cfg.layers {
        let ln = |which: &str| {
            layer_norm(
                weights,
                &names.block(l, &format!("{which}.weight")),
                &names.block(l, &format!("{which}.bias")),
                d,
                eps,
            )
        };
        let (w_attn, b_attn) = conv1d(weights, names, l, "attn.c_attn", d, 3 * d)?;
        let (w_proj, b_proj) = conv1d(weights, names, l, "attn.c_proj", d, d)?;
        let mut a = x.clone();
        ln("ln_1")?.apply_rows(&mut a);
        let mut qkv = &a * &w_attn;
        add_bias(&mut qkv, &b_attn);
        let mut att = Mat::<f64>::zeros(rows, d);
        let hd = d / cfg.heads;
        for (s, &r0) in sequences.iter().zip(&starts) {
            let rows = qkv.subrows(r0, s.len());
            let (q, k, v) = (
                rows.subcols(0, d),
                rows.subcols(d, d),
                rows.subcols(2 * d, d),
            );
            attention(q, k, v, cfg.heads, cfg.heads, hd, r0, &mut att);
        }
        let mut o = &att * &w_proj;
        add_bias(&mut o, &b_proj);
        x += &o;
        let (w_fc, b_fc) = conv1d(weights, names, l, "mlp.c_fc", d, cfg.ffn)?;
        let (w_out, b_out) = conv1d(weights, names, l, "mlp.c_proj", cfg.ffn, d)?;
        let mut m = x.clone();
        ln("ln_2")?.apply_rows(&mut m);
        let mut f = &m * &w_fc;
        add_bias(&mut f, &b_fc);
        for j in 0..f.ncols() {
            for i in 0..f.nrows() {
                f[(i, j)] = cfg.activation.apply(f[(i, j)]);
            }
        }
        let mut y = &f * &w_out;
        add_bias(&mut y, &b_out);
        x += &y;
        progress(&format!(
            "text: last token: block {} of {}",
            l + 1,
            cfg.layers
        ));
    }
    let ln_f = layer_norm(
        weights,
        &format!("{}ln_f.weight", names.prefix),
        &format!("{}ln_f.bias", names.prefix),
        d,
        eps,
    )?;
    let mut normalised = x;
    normalise_rows(&mut normalised, eps);
    let hidden = Mat::from_fn(rows, d, |i, j| {
        normalised[(i, j)] * ln_f.gamma[j] + ln_f.beta[j]
    });
    Ok(FinalStates {
        normalised,
        hidden,
        starts,
    })
}

/// LLaMA's stack on `sequences`: RMSNorm, q/k/v, rotary positions, grouped-query causal
/// attention, o_proj, RMSNorm, SwiGLU (down(silu(gate x) * up x)); then the final
/// RMSNorm (`normalised` = x / rms(x), `hidden` its product with the gain).
pub(crate) fn llama_final_states(
    model: &Llama,
    weights: &Tensors,
    prefix: &str,
    sequences: &[Vec<u32>],
    progress: &mut dyn FnMut(&str),
) -> Result<FinalStates, TextError> {
    let cfg = &model.cfg;
    let (d, hd) = (cfg.hidden, cfg.head_dim);
    let (qd, kv) = (cfg.heads * hd, cfg.kv_heads * hd);
    let eps = cfg.layer_norm_eps;
    let (starts, rows) = stacking(sequences);
    let mut x = Mat::<f64>::zeros(rows, d);
    let mut positions = vec![0; rows];
    for (s, &r0) in sequences.iter().zip(&starts) {
        for (p, &t) in s.iter().enumerate() {
            positions[r0 + p] = p;
            for j in 0..d {
                x[(r0 + p, j)] = model.embed[(t as usize, j)];
            }
        }
    }
    let name = |l: usize, rest: &str| format!("{prefix}layers.{l}.{rest}");
    // Linear weights are out x in: x W^T
    let lin =
        |l: usize, rest: &str, out: usize, inp: usize| weights.matrix(&name(l, rest), out, inp);
    for l in 0..cfg.layers {
        let mut a = x.clone();
        rms_norm_rows(
            &mut a,
            &weights.vector(&name(l, "input_layernorm.weight"), d)?,
            eps,
        );
        let mut q = &a * lin(l, "self_attn.q_proj.weight", qd, d)?.transpose();
        let mut k = &a * lin(l, "self_attn.k_proj.weight", kv, d)?.transpose();
        let v = &a * lin(l, "self_attn.v_proj.weight", kv, d)?.transpose();
        model.rope_rows(&mut q, cfg.heads, &positions);
        model.rope_rows(&mut k, cfg.kv_heads, &positions);
        let mut att = Mat::<f64>::zeros(rows, qd);
        for (s, &r0) in sequences.iter().zip(&starts) {
            let n = s.len();
            attention(
                q.subrows(r0, n),
                k.subrows(r0, n),
                v.subrows(r0, n),
                cfg.heads,
                cfg.kv_heads,
                hd,
                r0,
                &mut att,
            );
        }
        x += &att * lin(l, "self_attn.o_proj.weight", d, qd)?.transpose();
        let mut m = x.clone();
        rms_norm_rows(
            &mut m,
            &weights.vector(&name(l, "post_attention_layernorm.weight"), d)?,
            eps,
        );
        let gate = &m * lin(l, "mlp.gate_proj.weight", cfg.ffn, d)?.transpose();
        let up = &m * lin(l, "mlp.up_proj.weight", cfg.ffn, d)?.transpose();
        let act = Mat::from_fn(rows, cfg.ffn, |i, j| {
            let g = gate[(i, j)];
            g / (1.0 + (-g).exp()) * up[(i, j)]
        });
        x += &act * lin(l, "mlp.down_proj.weight", d, cfg.ffn)?.transpose();
        progress(&format!(
            "text: last token: block {} of {}",
            l + 1,
            cfg.layers
        ));
    }
    let mut normalised = x;
    rms_norm_rows(&mut normalised, &vec![1.0; d], eps);
    let gain = weights.vector(&format!("{prefix}norm.weight"), d)?;
    let hidden = Mat::from_fn(rows, d, |i, j| normalised[(i, j)] * gain[j]);
    Ok(FinalStates {
        normalised,
        hidden,
        starts,
    })
}
