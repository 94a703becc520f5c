//! Under known noise, before the joint fit in the row space: found samples outside the
//! public prior's box are dropped, and the samples still missing are searched for in the
//! residual gradient, what the others leave unexplained (docs/DESIGN.md, "Defended
//! gradients: the fit in the row space").
//!
//! The wrong zeros the span search keeps under noise are near-mirror images of samples
//! (tanh's act' is even and the PyTorch-default biases are small): on photos in [0, 1]
//! most of their pixels are far outside the box (measured: 2241-2991 of 3072 beyond
//! 0.05 of it, none for the true samples). With the found samples X_f and their best
//! output residuals R_f (the R-step), O - G(X_f, R_f) holds the missing samples'
//! gradient (rank q) plus the found ones' errors and the noise: the exact route on it,
//! at forced batch size q, finds them as it finds any batch.

use faer::{Col, Mat};

use super::reduced::Reduction;
use crate::Result;
use crate::attack::two_layer::TwoLayer;
use crate::attack::verdict;
use crate::attack::view::Rows;
use crate::attack::{AttackConfig, Reconstruction, Sample, ServerView};

/// A coordinate is outside the box when it is more than this fraction of (max - min)
/// beyond it.
pub const BOX_MARGIN: f64 = 0.05;
/// A sample is outside the box when more than this fraction of its coordinates are.
pub const OUTSIDE_FRACTION: f64 = 0.25;

/// Candidates kept after the first greedy round (the later rounds score only these).
pub const SHORTLIST: usize = 8;

/// Fraction of the coordinates of `x` outside the box [min, max] widened by `BOX_MARGIN`.
pub fn outside(x: &[f64], min: f64, max: f64) -> f64 {
    let pad = BOX_MARGIN * (max - min);
    let n = x
        .iter()
        .filter(|&&v| v < min - pad || v > max + pad)
        .count();
    n as f64 / x.len().max(1) as f64
}

/// Drop the samples outside the prior's box, then search the residual gradient for the
/// missing ones; returns how many were dropped, how many were added, and the residual
/// search's other candidates inside the box (for the swap test, `polish`).
pub fn reseek(
    view: &ServerView,
    cfg: &AttackConfig,
    tl: &TwoLayer,
    red: &Reduction,
    rec: &mut Reconstruction,
) -> Result<(usize, usize, Vec<Sample>)> {
    let Some(prior) = cfg.prior.filter(|p| p.min.is_finite() && p.max.is_finite()) else {
        return Ok((0, 0, Vec::new()));
    };
    let inside = |s: &Sample| outside(&s.x, prior.min, prior.max) <= OUTSIDE_FRACTION;
    let before = rec.samples.len();
    rec.samples.retain(inside);
    let dropped = before - rec.samples.len();
    let q = rec.batch_estimated.saturating_sub(rec.samples.len());
    if q == 0 || rec.samples.is_empty() {
        return Ok((dropped, 0, Vec::new()));
    }
    let d = view.input_dim();
    let xf = Mat::from_fn(rec.samples.len(), d, |i, j| rec.samples[i].x[j]);
    let res = residual_view(view, tl, &xf)?;
    // the residual's rank is q plus the found samples' errors (above the noise): its
    // own estimate, and the search returns the found samples again besides the missing
    let mut known = cfg.clone();
    known.batch = None;
    known.noise_std = cfg.noise_std.or(view.noise_std);
    let sub = crate::attack::subspace::estimate(&res, &known.subspace_options())?;
    let found = crate::attack::exact::route::attack_on(&res, &known, &sub)?;
    // found on a residual that holds the other samples' errors: never exact
    let new: Vec<Sample> = found
        .samples
        .into_iter()
        .filter(inside)
        .map(|mut s| {
            verdict::withdraw(&mut s);
            s
        })
        .collect();
    let (added, rest) = choose(red, &rec.samples, new, q)?;
    let n = added.len();
    rec.samples.extend(added);
    Ok((dropped, n, rest))
}

/// The residual search returns the found samples again (the residual holds their
/// errors) besides the missing ones, and near-duplicate images are as close to each
/// other as a found sample's second estimate is to it (measured: relative distance
/// 0.09-0.11 for two missing photos, 0.02-0.31 for repeats), so no distance tells them
/// apart. The likelihood does: q times, the candidate whose addition lowers the weighted
/// objective most (output residuals by the R-step, in the row space of `red`).
/// Returns the chosen candidates and the others.
fn choose(
    red: &Reduction,
    found: &[Sample],
    cands: Vec<Sample>,
    q: usize,
) -> Result<(Vec<Sample>, Vec<Sample>)> {
    if cands.is_empty() {
        return Ok((cands, Vec::new()));
    }
    let rt = &red.tl;
    let d = red.v.nrows();
    let rows = |s: &[&Sample]| red.project(&Mat::from_fn(s.len(), d, |i, j| s[i].x[j]));
    let score = |set: &[&Sample]| -> Result<f64> {
        let c = rows(set);
        Ok(rt.objective(&c, &rt.r_step(&c, &rt.pre(&c))?))
    };
    let mut chosen: Vec<usize> = Vec::new();
    let mut pool: Vec<usize> = (0..cands.len()).collect();
    while chosen.len() < q && !pool.is_empty() {
        let mut scored = Vec::with_capacity(pool.len());
        for &p in &pool {
            let set: Vec<&Sample> = found
                .iter()
                .chain(chosen.iter().chain([&p]).map(|&c| &cands[c]))
                .collect();
            scored.push((score(&set)?, p));
        }
        scored.sort_by(|a, b| a.0.total_cmp(&b.0));
        chosen.push(scored[0].1);
        pool = scored.iter().skip(1).take(SHORTLIST).map(|s| s.1).collect();
    }
    let mut cands: Vec<Option<Sample>> = cands.into_iter().map(Some).collect();
    let picked = chosen.into_iter().filter_map(|c| cands[c].take()).collect();
    Ok((picked, cands.into_iter().flatten().collect()))
}

/// The view of O - G(X_f, R_f): the first-layer and output-layer gradients with the
/// found samples' parts (at their best output residuals) taken out.
pub(crate) fn residual_view(view: &ServerView, tl: &TwoLayer, xf: &Mat<f64>) -> Result<ServerView> {
    let z = tl.pre(xf);
    let r = tl.r_step(xf, &z)?;
    let ra = &r * &tl.a;
    let delta = Mat::from_fn(z.nrows(), z.ncols(), |i, j| {
        tl.act.d1(z[(i, j)]) * ra[(i, j)]
    });
    let h = Mat::from_fn(z.nrows(), z.ncols(), |i, j| tl.act.eval(z[(i, j)]));
    let ones = Col::from_fn(xf.nrows(), |_| 1.0);
    let mut res = view.clone();
    res.first.grad_weight = Rows::Memory(&tl.ow - delta.transpose() * xf);
    if res.first.grad_bias.is_some() {
        res.first.grad_bias = Some(&tl.ob - delta.transpose() * &ones);
    }
    res.upper_grad[0].weight = &tl.oa - r.transpose() * &h;
    if res.upper_grad[0].bias.is_some() {
        res.upper_grad[0].bias = Some(&tl.oc - r.transpose() * &ones);
    }
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The box test counts coordinates beyond the margin only.
    #[test]
    fn outside_counts_beyond_the_margin() {
        let x = [0.0, 1.0, -0.04, 1.04, -0.06, 1.2, 0.5, -1.0];
        assert_eq!(outside(&x, 0.0, 1.0), 3.0 / 8.0);
        assert_eq!(outside(&x, -2.0, 2.0), 0.0);
    }
}
