//! Rank-deficient inputs (docs/DESIGN.md, "Rank-deficient inputs"): input coordinates
//! that are zero in every sample show as zero columns of G~ and cap its rank at
//! d + 1 - (their number). When the rank reaches that cap the batch may hold more
//! samples than the rank; the found samples' cross-entropy residuals then give B,
//! and the report says which samples the first layer cannot separate and why.

use faer::{Col, Mat};

use super::labels;
use super::signal::{Neurons, SignalModel};
use super::zero::Zero;
use crate::Result;
use crate::attack::params::AttackConfig;
use crate::attack::reconstruction::Reconstruction;
use crate::attack::subspace::{RankRule, Subspace};
use crate::attack::view::{BLOCK_ROWS, ServerView};
use crate::model::Loss;

/// A row of V (orthonormal columns, entries ~ 1/sqrt(d)) this small marks a candidate
/// zero column of G~; the candidate is then checked entry by entry.
pub const ZERO_ROW: f64 = 1e-8;
/// The batch sizes read off different samples must agree with one integer to this
/// relative tolerance (each is exact up to the span residual of its sample).
pub const BATCH_TOL: f64 = 1e-6;

/// What the first layer says about the inputs' rank.
#[derive(Clone, Debug, Default)]
pub struct InputRank {
    /// Input coordinates zero in every sample (zero columns of G~).
    pub zero_coordinates: Vec<usize>,
    /// d + 1 minus their number: the largest rank the inputs can reach.
    pub limit: usize,
    /// A forced (`--batch`) size above the limit, set by [`cap`].
    pub forced: Option<usize>,
}

impl InputRank {
    /// The estimated rank sits at the cap: the batch may be larger than it.
    pub fn limits(&self, sub: &Subspace) -> bool {
        !self.zero_coordinates.is_empty() && sub.batch >= self.limit
    }
}

/// Input coordinates that are zero in every sample: zero columns of the augmented
/// first-layer gradient. Only on an undefended gradient (pruning and top-k zero
/// entries whatever the inputs; noise leaves none).
pub fn input_rank(view: &ServerView, sub: &Subspace) -> Result<InputRank> {
    let d = view.input_dim();
    let mut rank = InputRank {
        zero_coordinates: Vec::new(),
        limit: d + 1,
        forced: None,
    };
    if !view.defenses.is_empty() || view.noise_std.is_some_and(|s| s > 0.0) {
        return Ok(rank);
    }
    // only the directions above the floor: a forced size brings noise directions in
    let signal = (0..sub.batch)
        .take_while(|&k| sub.singular_values[k] > sub.threshold)
        .count();
    let mut cand: Vec<usize> = (0..d)
        .filter(|&c| {
            (0..signal)
                .map(|k| sub.v[(c, k)].powi(2))
                .sum::<f64>()
                .sqrt()
                <= ZERO_ROW
        })
        .collect();
    let m = view.width();
    let mut start = 0;
    while start < m && !cand.is_empty() {
        let end = (start + BLOCK_ROWS).min(m);
        let g = view.augmented_gradient_block(start..end)?;
        cand.retain(|&c| (0..g.nrows()).all(|j| g[(j, c)] == 0.0));
        start = end;
    }
    rank.limit = d + 1 - cand.len();
    rank.zero_coordinates = cand;
    Ok(rank)
}

/// The absolute output residual of an exactly found sample from its dual vector,
/// exact whatever the other samples are (the least squares of `labels` over the found
/// samples alone is biased, even in sign, when others are missing): with s = M(c) r in
/// the column space, w = V Sigma^-1 Q^T s gives G~ w = s = Delta^T X~ w, so
/// X~ w = beta e_i with beta = c . Sigma^-1 Q^T s, and the true signal is s / beta.
pub fn absolute_residual(sub: &Subspace, model: &SignalModel, z: &Zero) -> Col<f64> {
    let all = Neurons::all(&sub.q);
    let s = model.signal_matrix(&z.c, &all.rows) * &z.r;
    let qs = sub.q.transpose() * &s;
    let beta: f64 = (0..sub.batch)
        .map(|a| z.c[a] * qs[a] / sub.singular_values[a])
        .sum();
    Col::from_fn(z.r.nrows(), |j| z.r[j] / beta)
}

/// B read off the exactly found samples' output residuals under cross-entropy,
/// B r_i = softmax(f(x_i)) - e_{y_i}, with the absolute r_i of [`absolute_residual`].
/// `None` without a cross-entropy loss, without an exact sample, or when the samples
/// disagree.
pub fn batch_from_residuals(
    view: &ServerView,
    model: &SignalModel,
    found: &[(Col<f64>, Col<f64>)],
    cfg: &AttackConfig,
) -> Result<Option<usize>> {
    if !matches!(cfg.loss, Some(Loss::Ce) | None) || view.outputs() < 2 || found.is_empty() {
        return Ok(None);
    }
    let d = view.input_dim();
    let x = Mat::from_fn(found.len(), d, |i, j| model.coords.x_of_c(&found[i].0)[j]);
    let net = view.model()?;
    let fw = net.forward(x.as_ref())?;
    let out = fw.output();
    let k = view.outputs();
    let mut sizes = Vec::with_capacity(found.len());
    for (i, (_, r)) in found.iter().enumerate() {
        let y = (0..k).min_by(|&a, &b| r[a].total_cmp(&r[b])).unwrap_or(0);
        let mx = (0..k)
            .map(|j| out[(i, j)])
            .fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = (0..k).map(|j| (out[(i, j)] - mx).exp()).collect();
        let sum: f64 = e.iter().sum();
        let num: f64 = (0..k)
            .map(|j| (e[j] / sum - f64::from(j == y)).powi(2))
            .sum::<f64>()
            .sqrt();
        sizes.push(num / r.norm_l2());
    }
    let b = sizes[0].round();
    let agree = b >= 1.0 && sizes.iter().all(|s| (s - b).abs() <= BATCH_TOL * b) && b.is_finite();
    Ok(agree.then_some(b as usize))
}

/// Before the search: a forced batch size above the inputs' cap would bring noise
/// directions into V; search in the capped subspace instead (the forced size is kept
/// in `rank.forced`).
pub fn cap(sub: &mut Subspace, rank: &mut InputRank) {
    if sub.rule != RankRule::Forced || rank.zero_coordinates.is_empty() || sub.batch <= rank.limit {
        return;
    }
    rank.forced = Some(sub.batch);
    let keep = rank.limit;
    sub.batch = keep;
    sub.v = sub.v.subcols(0, keep).to_owned();
    sub.q = sub.q.subcols(0, keep).to_owned();
}

/// After the search: zero coordinates set to exactly 0, and when the rank sits at
/// the inputs' cap, the batch size from the residuals (or the forced one) and a note
/// on which samples the first layer cannot separate.
pub fn apply(
    view: &ServerView,
    sub: &Subspace,
    model: &SignalModel,
    zeros: &[Zero],
    cfg: &AttackConfig,
    rank: &InputRank,
    rec: &mut Reconstruction,
) -> Result<()> {
    let forced = rank.forced;
    let nz = rank.zero_coordinates.len();
    if nz == 0 {
        return Ok(());
    }
    for s in &mut rec.samples {
        for &c in &rank.zero_coordinates {
            s.x[c] = 0.0;
        }
    }
    rec.diagnostics.zero_input_coordinates = Some(nz);
    rec.diagnostics.input_rank_limit = Some(rank.limit);
    rec.notes.push(format!(
        "{nz} input coordinates are zero in every sample (zero columns of the first-layer \
         gradient): reconstructed as 0"
    ));
    if forced.is_none() && !rank.limits(sub) {
        return Ok(());
    }
    // the exact samples' absolute residuals and labels from their dual vectors
    let mut found = Vec::new();
    for (z, smp) in zeros.iter().zip(rec.samples.iter_mut()) {
        if z.accepted {
            let r = absolute_residual(sub, model, z);
            smp.output_residual = Some(r.iter().copied().collect());
            smp.label = labels::assign(cfg.loss, std::slice::from_ref(&r), view.outputs())[0];
            found.push((z.c.clone(), r));
        }
    }
    let from_residuals = batch_from_residuals(view, model, &found, cfg)?;
    let batch = forced.or(from_residuals).filter(|&b| b > sub.batch);
    let found = rec.samples.len();
    let d = view.input_dim();
    let head = format!(
        "the first-layer rank {} is the most the inputs allow ({d} coordinates + bias - {nz} \
         zero ones)",
        sub.batch
    );
    match batch {
        Some(b) => {
            let source = if forced.is_some() {
                "given by --batch"
            } else {
                "read off the found samples' cross-entropy residuals"
            };
            rec.batch_estimated = b;
            rec.diagnostics.batch_from_residuals = from_residuals;
            rec.notes.push(format!(
                "{head}, and the batch has {b} samples ({source}): the inputs obey {} linear \
                 relations. The {found} found samples each lie outside the span of the others; \
                 the {} missing ones are linear combinations of one another, so their signals \
                 are not in the first layer's column space one by one and the span search \
                 cannot separate them (with free output residuals a joint solve of every \
                 layer's equations reaches them only from within about 1 % of the truth; with \
                 cross-entropy labels tied in, from a prior mean image: the labelled joint fit)",
                b - sub.batch,
                b.saturating_sub(found)
            ));
        }
        None => rec.notes.push(format!(
            "{head}: the batch may be larger than the rank, and nothing found tells its size \
             (cross-entropy residuals of an exact sample would)"
        )),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testing::deficient_case;
    use crate::attack::params::{AttackConfig, Method};
    use crate::attack::subspace::RankRule;
    use crate::model::{Activation, Loss};

    /// d = 8 inputs whose last two coordinates are 0 in every sample, B = 8: x~ spans
    /// at most 7 dimensions, and x_7 = 0.5 x_0 + 0.3 x_1 + 0.2 x_2 makes the one linear
    /// relation. The rank is 7; samples 3..6 lie outside the span of the others and
    /// must be recovered to 1e-8 with exact zeros in the blank coordinates, B = 8 read
    /// off their cross-entropy residuals, and 0, 1, 2, 7 reported as not separable.
    #[test]
    fn blank_coordinates_cap_the_rank_and_the_residuals_give_the_batch() {
        let (d, b) = (8, 8);
        let (view, x, y) = deficient_case(Activation::Tanh, d, 400, b);
        let mut cfg = AttackConfig::new(Method::Span, 1);
        cfg.loss = Some(Loss::Ce);
        cfg.search.max_starts = 60;
        let rec = crate::attack::exact::route::attack(&view, &cfg).unwrap();
        assert_eq!(rec.rank_rule, Some(RankRule::Threshold));
        assert_eq!(rec.diagnostics.zero_input_coordinates, Some(2));
        assert_eq!(rec.diagnostics.input_rank_limit, Some(7));
        assert_eq!(rec.batch_estimated, 8, "{:?}", rec.notes);
        assert_eq!(rec.diagnostics.batch_from_residuals, Some(8));
        let mut found: Vec<usize> = Vec::new();
        for s in &rec.samples {
            assert_eq!((s.x[6], s.x[7]), (0.0, 0.0));
            let (i, err) = (0..b)
                .map(|i| {
                    let e: f64 = (0..d).map(|j| (s.x[j] - x[(i, j)]).powi(2)).sum();
                    let n: f64 = (0..d).map(|j| x[(i, j)].powi(2)).sum();
                    (i, (e / n).sqrt())
                })
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .unwrap();
            assert!(err < 1e-8, "sample {i}: {err:e}");
            assert_eq!(s.label, Some(y[i]));
            found.push(i);
        }
        found.sort_unstable();
        assert_eq!(found, vec![3, 4, 5, 6], "{:?}", rec.notes);
        assert!(
            rec.notes.iter().any(|n| n.contains("4 missing")),
            "{:?}",
            rec.notes
        );
        // told B = 8, the search stays in the 7 dimensions the inputs span
        let mut told = cfg.clone();
        told.batch = Some(8);
        let rec = crate::attack::exact::route::attack(&view, &told).unwrap();
        assert_eq!(rec.batch_estimated, 8);
        assert_eq!(rec.samples.len(), 4, "{:?}", rec.notes);
    }
}
