//! GPT-2's whole stack run forward in f64 on whole sequences: the final hidden states
//! the LM head's last-token completion reads (docs/DESIGN.md, "Text: the last token").
//! One block's weights are read at a time, so memory stays at one block whatever the depth.

use faer::Mat;

use super::TextError;
use super::config::TextConfig;
use super::gpt2::{LayerNorm, Names, add_bias};
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

/// (x - mean) / sqrt(var + eps), row by row.
fn normalise_rows(x: &Mat<f64>, eps: f64) -> Mat<f64> {
    let d = x.ncols() as f64;
    let mut out = x.clone();
    for i in 0..x.nrows() {
        let mean = (0..x.ncols()).map(|j| x[(i, j)]).sum::<f64>() / d;
        let var = (0..x.ncols())
            .map(|j| (x[(i, j)] - mean).powi(2))
            .sum::<f64>()
            / d;
        let inv = 1.0 / (var + eps).sqrt();
        for j in 0..x.ncols() {
            out[(i, j)] = (x[(i, j)] - mean) * inv;
        }
    }
    out
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

/// Causal self-attention of one sequence's rows `r0 .. r0 + n` of `qkv` (rows x 3d),
/// heads concatenated (rows x d).
fn attention(qkv: &Mat<f64>, r0: usize, n: usize, heads: usize, out: &mut Mat<f64>) {
    let d = qkv.ncols() / 3;
    let hd = d / heads;
    let scale = 1.0 / (hd as f64).sqrt();
    for h in 0..heads {
        let q = qkv.subrows(r0, n).subcols(h * hd, hd);
        let k = qkv.subrows(r0, n).subcols(d + h * hd, hd);
        let v = qkv.subrows(r0, n).subcols(2 * d + h * hd, hd);
        let mut s = q * k.transpose();
        for i in 0..n {
            let mx = (0..=i).map(|j| s[(i, j)] * scale).fold(f64::MIN, f64::max);
            let mut z = 0.0;
            for j in 0..n {
                let w = if j <= i {
                    (s[(i, j)] * scale - mx).exp()
                } else {
                    0.0
                };
                s[(i, j)] = w;
                z += w;
            }
            for j in 0..=i {
                s[(i, j)] /= z;
            }
        }
        let o = &s * v;
        out.subrows_mut(r0, n).subcols_mut(h * hd, hd).copy_from(&o);
    }
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
    let mut starts = Vec::with_capacity(sequences.len());
    let mut rows = 0;
    for s in sequences {
        starts.push(rows);
        rows += s.len();
    }
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
        for (s, &r0) in sequences.iter().zip(&starts) {
            attention(&qkv, r0, s.len(), cfg.heads, &mut att);
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
    let normalised = normalise_rows(&x, eps);
    let hidden = Mat::from_fn(rows, d, |i, j| {
        normalised[(i, j)] * ln_f.gamma[j] + ln_f.beta[j]
    });
    Ok(FinalStates {
        normalised,
        hidden,
        starts,
    })
}
