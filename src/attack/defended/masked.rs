//! Pruning and top-k, last stage: masked least squares on the gradient as received
//! (docs/DESIGN.md, "Defended gradients: pruning"). The completed first layer is exact
//! on the observed entries only; the samples the exact route did not certify are
//! refitted on every layer's observed (non-zero) entries, the pruned ones left free,
//! with the certified samples held.

use faer::Mat;

use super::unrolled::{LocalFit, STEPS, start_targets};
use crate::Result;
use crate::attack::{AttackConfig, Reconstruction, ServerView, Stage};
use crate::model::Loss;

/// Largest number of input unknowns (free samples x d) the dense fit takes on.
pub const MAX_UNKNOWNS: usize = 1024;

/// Refit the samples of `rec` not marked exact on the observed entries of `view`
/// (one hidden layer), in all d coordinates, or when that exceeds `MAX_UNKNOWNS`, in
/// the row space of the completed first layer `completed` (its first d columns).
/// Unchanged when nothing is to refit.
pub fn refine(
    view: &ServerView,
    cfg: &AttackConfig,
    mut rec: Reconstruction,
    completed: &Mat<f64>,
) -> Result<Reconstruction> {
    let b = rec.samples.len();
    let held: Vec<bool> = rec.samples.iter().map(|s| s.exact).collect();
    let free = held.iter().filter(|h| !**h).count();
    let d = view.input_dim();
    let k = view.outputs();
    if free == 0 || view.depth() != 1 || view.first.bias.is_none() {
        return Ok(rec);
    }
    let basis = if free * d <= MAX_UNKNOWNS {
        Mat::from_fn(d, d, |i, j| f64::from(i == j))
    } else {
        super::unrolled::row_space(&completed.subcols(0, d).to_owned(), rec.batch_estimated)?
    };
    let t0 = std::time::Instant::now();
    let loss = cfg.loss.unwrap_or(Loss::Ce);
    let x0 = Mat::from_fn(b, d, |i, j| rec.samples[i].x[j]);
    let labels: Vec<Option<usize>> = rec.samples.iter().map(|s| s.label).collect();
    let y0 = start_targets(loss, &labels, k);
    let nb = basis.ncols();
    let fit = LocalFit::with_basis(view, 1, 0.0, loss, basis)?
        .masked()
        .fit(&x0, &y0, &held, STEPS)?;
    if !(fit.objective < fit.start) {
        return Ok(rec);
    }
    for (i, s) in rec.samples.iter_mut().enumerate() {
        if !held[i] {
            s.x = fit.input(i);
            s.stage = Stage::Likelihood;
            s.residual = Some(fit.objective.sqrt());
            if loss == Loss::Ce {
                s.label = fit.label(i);
            }
            s.output_residual = Some(fit.output_residual(i));
        }
    }
    let dg = &mut rec.diagnostics.defended;
    dg.masked.masked_iterations = Some(fit.iterations);
    dg.masked.masked_start = Some(fit.start);
    dg.masked.masked_objective = Some(fit.objective);
    dg.masked.masked_seconds = Some(t0.elapsed().as_secs_f64());
    rec.notes.push(format!(
        "refitted {free} samples on the observed entries of every layer ({nb} directions \
         each), {} held (weighted residual per entry {:.3e} -> {:.3e}, {} iterations, {:.1} s)",
        b - free,
        fit.start,
        fit.objective,
        fit.iterations,
        t0.elapsed().as_secs_f64()
    ));
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::defense::Defense;

    /// On a pruned gradient the masked fit from a start 1 % off lands on the batch
    /// (its observed entries are exact), while reading the pruned entries as zeros
    /// moves it away from the truth.
    #[test]
    fn masked_fit_recovers_a_pruned_batch() {
        let (out, view) = super::super::defended_round(vec![Defense::Prune(0.5)], 2, 128);
        let x = out.batch.x.clone();
        let (b, d) = x.shape();
        let x0 = super::super::one_percent_off(&x);
        let labels = out.batch.labels.clone().unwrap();
        let y0 = Mat::from_fn(b, 10, |i, j| f64::from(labels[i] == j));
        let eye = Mat::from_fn(d, d, |i, j| f64::from(i == j));
        let err = |m: &Mat<f64>| (m - &x).norm_l2() / x.norm_l2();
        let fit = LocalFit::with_basis(&view, 1, 0.0, Loss::Ce, eye.clone())
            .unwrap()
            .masked();
        let masked = fit.fit(&x0, &y0, &[], STEPS).unwrap();
        let plain = LocalFit::with_basis(&view, 1, 0.0, Loss::Ce, eye)
            .unwrap()
            .fit(&x0, &y0, &[], STEPS)
            .unwrap();
        eprintln!(
            "start {:e} masked {:e} zeros {:e}",
            err(&x0),
            err(&masked.x),
            err(&plain.x)
        );
        assert!(err(&masked.x) < 1e-8, "{:e}", err(&masked.x));
        assert!(err(&plain.x) > 1e-3, "{:e}", err(&plain.x));
    }
}
