//! How good a reconstruction is: one-to-one Hungarian matching on relative L2
//! error, then per-sample relative error, cosine and PSNR (docs/DESIGN.md, "Metrics").

use faer::Mat;
use pathfinding::prelude::{Matrix, kuhn_munkres_min};
use serde::Serialize;

use crate::attack::Sample;
use crate::{Error, Result};

/// Default tolerance on relative error for "recovered".
pub const DEFAULT_TOL: f64 = 1e-3;

/// Relative error a missing sample counts as in the summary (the error of guessing zero).
pub const MISSING_ERROR: f64 = 1.0;

/// PSNR in dB at or above which a reconstructed image counts as leaked (recognisable).
pub const LEAK_PSNR_DB: f64 = 20.0;

/// Relative error at or below which a reconstructed non-image sample counts as leaked.
pub const LEAK_REL_ERROR: f64 = 0.1;

/// Scale from relative error to the integer costs of the assignment solver; errors
/// below 1/COST_SCALE tie, which cannot change which samples count as recovered.
const COST_SCALE: f64 = 1e12;

/// One true sample and what it was matched with.
#[derive(Clone, Debug, Serialize)]
pub struct SampleMetrics {
    /// Row of the truth.
    pub truth: usize,
    /// Index into the reconstruction's samples, or None when missing.
    pub matched: Option<usize>,
    pub rel_error: Option<f64>,
    pub cosine: Option<f64>,
    /// Peak signal-to-noise ratio in dB, for data with a known range.
    pub psnr: Option<f64>,
    pub recovered: bool,
    pub label_true: Option<usize>,
    pub label_recovered: Option<usize>,
}

/// Summary over the batch.
#[derive(Clone, Debug, Serialize)]
pub struct Metrics {
    pub per_sample: Vec<SampleMetrics>,
    /// Median relative error over all true samples (missing ones count as MISSING_ERROR).
    pub median_rel_error: f64,
    pub max_rel_error: f64,
    /// Share of true samples recovered within `tol`.
    pub recovered_fraction: f64,
    pub tol: f64,
    pub missing: usize,
    /// Reconstructed samples not matched to any truth.
    pub unmatched: usize,
    pub label_accuracy: Option<f64>,
    pub mean_psnr: Option<f64>,
}

impl Metrics {
    /// Share of true samples an attacker got recognisably: PSNR >= [`LEAK_PSNR_DB`]
    /// for images, relative error <= [`LEAK_REL_ERROR`] otherwise. Missing samples
    /// did not leak. This is the audit's "recovers a sample", independent of `tol`.
    pub fn leaked_fraction(&self, image: bool) -> f64 {
        let leaked = self
            .per_sample
            .iter()
            .filter(|s| {
                if image {
                    s.psnr.is_some_and(|p| p >= LEAK_PSNR_DB)
                } else {
                    s.rel_error.is_some_and(|e| e <= LEAK_REL_ERROR)
                }
            })
            .count();
        leaked as f64 / self.per_sample.len().max(1) as f64
    }
}

fn rel_error(truth: &[f64], rec: &[f64]) -> f64 {
    let num: f64 = truth.iter().zip(rec).map(|(a, b)| (a - b) * (a - b)).sum();
    let den: f64 = truth.iter().map(|a| a * a).sum();
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let ab: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let aa: f64 = a.iter().map(|x| x * x).sum();
    let bb: f64 = b.iter().map(|x| x * x).sum();
    ab / (aa * bb).sqrt().max(f64::MIN_POSITIVE)
}

fn psnr(a: &[f64], b: &[f64], range: (f64, f64)) -> f64 {
    let mse: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>() / a.len() as f64;
    let r = range.1 - range.0;
    10.0 * (r * r / mse.max(1e-300)).log10()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Match reconstructed samples to the truth (B x d) and score them.
pub fn evaluate(
    truth: &Mat<f64>,
    samples: &[Sample],
    range: Option<(f64, f64)>,
    tol: f64,
    true_labels: Option<&[usize]>,
) -> Result<Metrics> {
    let (b, d) = truth.shape();
    let rows: Vec<Vec<f64>> = (0..b)
        .map(|i| (0..d).map(|j| truth[(i, j)]).collect())
        .collect();
    for (k, s) in samples.iter().enumerate() {
        if s.x.len() != d {
            return Err(Error::Shape(format!(
                "reconstruction {k} has {} values, the truth {d}",
                s.x.len()
            )));
        }
        if s.x.iter().any(|v| !v.is_finite()) {
            return Err(Error::NonFinite(format!("reconstruction {k}")));
        }
    }
    let r = samples.len();
    let err: Vec<Vec<f64>> = rows
        .iter()
        .map(|t| samples.iter().map(|s| rel_error(t, &s.x)).collect())
        .collect();
    let cost = |e: f64| (e.min(1e6) * COST_SCALE) as i64;
    // truth -> sample index
    let mut assign: Vec<Option<usize>> = vec![None; b];
    if r > 0 {
        if b <= r {
            let w = Matrix::from_fn(b, r, |(i, k)| cost(err[i][k]));
            let (_, a) = kuhn_munkres_min(&w);
            for (i, k) in a.into_iter().enumerate() {
                assign[i] = Some(k);
            }
        } else {
            let w = Matrix::from_fn(r, b, |(k, i)| cost(err[i][k]));
            let (_, a) = kuhn_munkres_min(&w);
            for (k, i) in a.into_iter().enumerate() {
                assign[i] = Some(k);
            }
        }
    }
    let mut per = Vec::with_capacity(b);
    for i in 0..b {
        let m = assign[i].map(|k| {
            let s = &samples[k];
            (
                k,
                err[i][k],
                cosine(&rows[i], &s.x),
                range.map(|rg| psnr(&rows[i], &s.x, rg)),
                s.label,
            )
        });
        per.push(SampleMetrics {
            truth: i,
            matched: m.map(|t| t.0),
            rel_error: m.map(|t| t.1),
            cosine: m.map(|t| t.2),
            psnr: m.and_then(|t| t.3),
            recovered: m.is_some_and(|t| t.1 <= tol),
            label_true: true_labels.map(|l| l[i]),
            label_recovered: m.and_then(|t| t.4),
        });
    }
    let mut errs: Vec<f64> = per
        .iter()
        .map(|p| p.rel_error.unwrap_or(MISSING_ERROR))
        .collect();
    let max = errs.iter().copied().fold(0.0, f64::max);
    let label_accuracy = match true_labels {
        Some(_) if samples.iter().any(|s| s.label.is_some()) => Some(
            per.iter()
                .filter(|p| p.label_recovered.is_some() && p.label_recovered == p.label_true)
                .count() as f64
                / b as f64,
        ),
        _ => None,
    };
    let psnrs: Vec<f64> = per.iter().filter_map(|p| p.psnr).collect();
    Ok(Metrics {
        recovered_fraction: per.iter().filter(|p| p.recovered).count() as f64 / b as f64,
        missing: per.iter().filter(|p| p.matched.is_none()).count(),
        unmatched: r.saturating_sub(b),
        median_rel_error: median(&mut errs),
        max_rel_error: max,
        tol,
        label_accuracy,
        mean_psnr: (!psnrs.is_empty()).then(|| psnrs.iter().sum::<f64>() / psnrs.len() as f64),
        per_sample: per,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(x: Vec<f64>, label: Option<usize>) -> Sample {
        crate::attack::verdict::Candidate {
            x,
            residual: None,
            stage: crate::attack::Stage::Span,
            label,
            output_residual: None,
            claim: crate::attack::verdict::Claim::None,
        }
        .judge()
    }

    #[test]
    fn matching_is_one_to_one_and_order_free() {
        let truth = Mat::from_fn(3, 2, |i, j| (i * 2 + j + 1) as f64);
        // rows: (1,2), (3,4), (5,6); reconstructions shuffled, one slightly off
        let recs = vec![
            sample(vec![5.0, 6.0], Some(2)),
            sample(vec![1.0, 2.0], Some(0)),
            sample(vec![3.0, 4.5], Some(0)),
        ];
        let m = evaluate(&truth, &recs, Some((0.0, 10.0)), 1e-3, Some(&[0, 1, 2])).unwrap();
        assert_eq!(
            m.per_sample.iter().map(|p| p.matched).collect::<Vec<_>>(),
            vec![Some(1), Some(2), Some(0)]
        );
        assert_eq!(m.recovered_fraction, 2.0 / 3.0);
        let e = 0.5 / 5.0;
        assert!((m.max_rel_error - e).abs() < 1e-15);
        assert_eq!(m.median_rel_error, 0.0);
        assert_eq!(m.label_accuracy, Some(2.0 / 3.0));
        assert!(m.per_sample[0].psnr.unwrap() > 250.0);
    }

    #[test]
    fn one_truth_never_counts_twice_and_missing_is_counted() {
        let truth = Mat::from_fn(2, 2, |i, j| (i * 2 + j + 1) as f64);
        // the single reconstruction equals truth 0; truth 1 is missing
        let recs = vec![sample(vec![1.0, 2.0], None)];
        let m = evaluate(&truth, &recs, None, 1e-3, None).unwrap();
        assert_eq!(m.missing, 1);
        assert_eq!(m.recovered_fraction, 0.5);
        assert_eq!(m.max_rel_error, MISSING_ERROR);
        // two copies of the same reconstruction cannot both claim truth 0
        let recs = vec![sample(vec![1.0, 2.0], None), sample(vec![1.0, 2.0], None)];
        let m = evaluate(&truth, &recs, None, 1e-3, None).unwrap();
        assert_eq!(m.recovered_fraction, 0.5);
    }

    #[test]
    fn nan_is_rejected() {
        let truth = Mat::from_fn(1, 2, |_, _| 1.0);
        assert!(
            evaluate(
                &truth,
                &[sample(vec![f64::NAN, 1.0], None)],
                None,
                1e-3,
                None
            )
            .is_err()
        );
    }
}
