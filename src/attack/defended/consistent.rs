//! Quantisation, last stage: a consistent estimate (docs/DESIGN.md, "Defended
//! gradients: quantisation"). After `quantize:BITS` every received entry is its true
//! value rounded to a grid of known step q per tensor, so the batch's gradient lies in
//! the box |g - O| <= q / 2 entry by entry. The least-squares fit (which reads the
//! rounding error as Gaussian) leaves some entries outside their box; Levenberg-Marquardt
//! on the distances to the boxes moves it to a batch every entry of whose gradient
//! rounds to what was received.

use faer::Mat;

use super::unrolled::{LocalFit, STEPS, col_major, start_targets};
use crate::Result;
use crate::attack::verdict;
use crate::attack::{AttackConfig, Reconstruction, ServerView, Stage};
use crate::defense::Defense;
use crate::model::Loss;

/// Largest number of input unknowns (B x d) the dense fit takes on.
pub const MAX_UNKNOWNS: usize = 1024;

/// Half the grid step of a tensor quantised to `bits` (its ends are exact).
fn half_step(values: impl Iterator<Item = f64>, bits: u32) -> f64 {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| {
        (l.min(v), h.max(v))
    });
    if !(hi > lo) {
        return 0.0;
    }
    0.5 * (hi - lo) / (2f64.powi(bits as i32) - 1.0)
}

/// Refit all samples of `rec` to the rounding boxes of a quantised, noise-free
/// gradient (one hidden layer). Unchanged otherwise, or when the least-squares fit is
/// already consistent.
pub fn refine(
    view: &ServerView,
    cfg: &AttackConfig,
    mut rec: Reconstruction,
) -> Result<Reconstruction> {
    let Some(bits) = view.defenses.iter().find_map(|d| match d {
        Defense::Quantize(b) => Some(*b),
        _ => None,
    }) else {
        return Ok(rec);
    };
    let b = rec.samples.len();
    let d = view.input_dim();
    let k = view.outputs();
    if b == 0
        || b != rec.batch_estimated
        || view.depth() != 1
        || view.noise_std.is_some_and(|s| s > 0.0)
        || view.defenses.len() != 1
        || b * d > MAX_UNKNOWNS
    {
        return Ok(rec);
    }
    let t0 = std::time::Instant::now();
    let gw = view.first.grad_weight.to_mat()?;
    let hb = |c: &Option<faer::Col<f64>>| {
        c.as_ref()
            .map_or(0.0, |c| half_step(c.iter().copied(), bits))
    };
    let half = [
        half_step(col_major(&gw), bits),
        hb(&view.first.grad_bias),
        half_step(col_major(&view.upper_grad[0].weight), bits),
        hb(&view.upper_grad[0].bias),
    ];
    let loss = cfg.loss.unwrap_or(Loss::Ce);
    let x0 = Mat::from_fn(b, d, |i, j| rec.samples[i].x[j]);
    let labels: Vec<Option<usize>> = rec.samples.iter().map(|s| s.label).collect();
    let y0 = start_targets(loss, &labels, k);
    let eye = Mat::from_fn(d, d, |i, j| f64::from(i == j));
    let fit = LocalFit::with_basis(view, 1, 0.0, loss, eye)?
        .binned(half)
        .fit(&x0, &y0, &[], STEPS)?;
    if !(fit.objective < fit.start) {
        return Ok(rec);
    }
    for (i, s) in rec.samples.iter_mut().enumerate() {
        s.x = fit.input(i);
        s.stage = Stage::Likelihood;
        verdict::withdraw(s);
        if loss == Loss::Ce {
            s.label = fit.label(i);
        }
        s.output_residual = Some(fit.output_residual(i));
    }
    let dg = &mut rec.diagnostics.defended;
    dg.consistent.consistent_iterations = Some(fit.iterations);
    dg.consistent.consistent_start = Some(fit.start);
    dg.consistent.consistent_objective = Some(fit.objective);
    dg.consistent.consistent_seconds = Some(t0.elapsed().as_secs_f64());
    rec.notes.push(format!(
        "moved the {b} samples into the rounding boxes (squared distance to the boxes per \
         entry {:.3e} -> {:.3e}, {} iterations)",
        fit.start, fit.objective, fit.iterations
    ));
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// quantize:8: the true batch lies in every rounding box (distance 0, the bins are
    /// the right ones), and the fit from a start 1 % off ends in the boxes, closer.
    #[test]
    fn the_truth_is_consistent_and_the_fit_gets_there() {
        let (out, view) = super::super::defended_round(vec![Defense::Quantize(8)], 2, 128);
        let x = out.batch.x.clone();
        let (b, d) = x.shape();
        let labels = out.batch.labels.clone().unwrap();
        let y = Mat::from_fn(b, 10, |i, j| f64::from(labels[i] == j));
        let h = |m: &Mat<f64>| half_step(col_major(m), 8);
        let hb = |c: &Option<faer::Col<f64>>| half_step(c.as_ref().unwrap().iter().copied(), 8);
        let half = [
            h(&view.first.grad_weight.to_mat().unwrap()),
            hb(&view.first.grad_bias),
            h(&view.upper_grad[0].weight),
            hb(&view.upper_grad[0].bias),
        ];
        let eye = Mat::from_fn(d, d, |i, j| f64::from(i == j));
        let fit = LocalFit::with_basis(&view, 1, 0.0, Loss::Ce, eye)
            .unwrap()
            .binned(half);
        assert_eq!(fit.fit(&x, &y, &[], 0).unwrap().start, 0.0);
        let x0 = super::super::one_percent_off(&x);
        let got = fit.fit(&x0, &y, &[], STEPS).unwrap();
        let err = |m: &Mat<f64>| (m - &x).norm_l2() / x.norm_l2();
        eprintln!(
            "start {:e} ({:e}) end {:e} ({:e})",
            err(&x0),
            got.start,
            err(&got.x),
            got.objective
        );
        assert!(got.start > 0.0 && got.objective < 1e-12 * got.start);
        assert!(err(&got.x) < 0.5 * err(&x0), "{:e}", err(&got.x));
    }
}
