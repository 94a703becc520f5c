//! Claimed sequences checked with the attack's certificate.

use std::path::Path;

use faer::Mat;

use super::TextError;
use super::certificate::{self, LayerCheck};
use super::config::Head;
use super::model::{Loaded, block0_inputs};
use super::span::RowSpan;

/// Check claimed sequences against the gradient with the attack's certificate: both
/// blocks' inputs of `sequences` computed from the model, then the certificate's checks.
/// Returns the three layers' checks (block 0's input, attention output and MLP input); a
/// sequence with a wrong token fails the last two.
pub fn verify(
    model_dir: &Path,
    gradient: &Path,
    sequences: &[Vec<u32>],
) -> Result<Vec<LayerCheck>, TextError> {
    let cfg = super::config::TextConfig::read(model_dir)?;
    if cfg.arch == super::config::Arch::Bert {
        return super::encoder::verify(model_dir, gradient, cfg, sequences);
    }
    let loaded = Loaded::read_with(model_dir, gradient, cfg)?;
    let cfg = loaded.model.cfg();
    let model = loaded.model.causal();
    let d = cfg.hidden;
    if let Some(&bad) = sequences
        .iter()
        .flatten()
        .find(|&&t| t as usize >= cfg.vocab)
    {
        return Err(TextError::Unsupported(format!(
            "token id {bad} is outside the vocabulary ({})",
            cfg.vocab
        )));
    }
    let span0 = RowSpan::of(
        loaded.g0.as_ref(),
        loaded.dtype,
        "block 0 input projection",
        d,
    )?;
    let span_out = RowSpan::of(
        loaded.g_out.as_ref(),
        loaded.dtype,
        "block 0 attention output",
        loaded.out_dim,
    )?;
    let mut pairs = std::collections::BTreeSet::new();
    let span_mlp = RowSpan::of(loaded.g_mlp.as_ref(), loaded.dtype, "block 0 MLP input", d)?;
    // each prefix's attention output and MLP input
    let mut prefixes: std::collections::BTreeMap<Vec<u32>, (Vec<f64>, Vec<f64>)> =
        Default::default();
    // the last position of a sequence carries no gradient under a language-model head
    let drop_last = usize::from(cfg.head == Head::LanguageModel);
    let kv = model.kv_width();
    for seq in sequences {
        let n = seq.len().saturating_sub(drop_last).min(cfg.positions);
        let mut keys = Mat::<f64>::zeros(0, kv);
        let mut values = Mat::<f64>::zeros(0, kv);
        for p in 0..n {
            pairs.insert((p, seq[p]));
            let step = model.step(&seq[p..=p], p);
            let x = model.extend(keys.as_ref(), values.as_ref(), &step, 0..1);
            let m = model.mlp_input(&seq[p..=p], p, x.as_ref());
            prefixes.insert(
                seq[..=p].to_vec(),
                (
                    (0..x.ncols()).map(|j| x[(0, j)]).collect(),
                    (0..m.ncols()).map(|j| m[(0, j)]).collect(),
                ),
            );
            keys = stack(&keys, step.k.as_ref());
            values = stack(&values, step.v.as_ref());
        }
    }
    let pairs: Vec<_> = pairs.into_iter().collect();
    let x0 = block0_inputs(model, &pairs, span0.dim);
    let rows: Vec<&(Vec<f64>, Vec<f64>)> = prefixes.values().collect();
    let x1 = Mat::from_fn(rows.len(), span_out.dim, |i, j| rows[i].0[j]);
    let x2 = Mat::from_fn(rows.len(), span_mlp.dim, |i, j| rows[i].1[j]);
    let u = loaded.dtype.epsilon() / 2.0;
    Ok(vec![
        certificate::check(
            "block 0 input projection",
            &span0,
            loaded.g0.as_ref(),
            &x0,
            u,
            false,
        ),
        certificate::check(
            "block 0 attention output",
            &span_out,
            loaded.g_out.as_ref(),
            &x1,
            u,
            true,
        ),
        certificate::check(
            "block 0 MLP input",
            &span_mlp,
            loaded.g_mlp.as_ref(),
            &x2,
            u,
            true,
        ),
    ])
}

fn stack(a: &Mat<f64>, b: faer::MatRef<'_, f64>) -> Mat<f64> {
    Mat::from_fn(a.nrows() + b.nrows(), a.ncols(), |i, j| {
        if i < a.nrows() {
            a[(i, j)]
        } else {
            b[(i - a.nrows(), j)]
        }
    })
}
