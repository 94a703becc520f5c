//! Starts for the joint fit when one sample is missing: two close samples can leave
//! one shallow zero of the span residual between them, and the span search returns a
//! mixture (docs/DESIGN.md, "Defended gradients: maximum likelihood").

use faer::Mat;

use crate::Result;
use crate::attack::two_layer::TwoLayer;

/// Gauss-Newton steps a candidate start gets before the starts are compared.
pub const PROBE_STEPS: usize = 4;
/// Relative size of the perturbation that splits a found sample in two.
pub const SPLIT: f64 = 0.05;

/// A weighted residual per entry this low is what the noise itself leaves (1 at the
/// truth, by the error model's weights): a start that reaches it is taken at once.
pub const AT_THE_NOISE: f64 = 1.05;

/// `x0` holds B samples, the last of them a seed for a missing one when `seeded`.
/// Candidates: `x0` itself, and for every found sample i, x0 with sample i replaced by
/// x_i + e and the last row by x_i - e (e a seeded random direction of size SPLIT
/// ||x_i||). Each gets PROBE_STEPS steps; the first to reach AT_THE_NOISE, else the
/// lowest objective's start, is returned.
pub fn best_split(tl: &TwoLayer, x0: Mat<f64>, seeded: bool, seed: u64) -> Result<Mat<f64>> {
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};
    let (b, d) = x0.shape();
    let found = if seeded { b - 1 } else { b };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x5911_7000);
    let score = |x: &Mat<f64>| -> Result<f64> { Ok(tl.refine(x, PROBE_STEPS)?.objective) };
    let mut best: Option<(f64, Mat<f64>)> = None;
    for i in 0..found {
        let e: Vec<f64> = (0..d).map(|_| StandardNormal.sample(&mut rng)).collect();
        let en = e
            .iter()
            .map(|v| v * v)
            .sum::<f64>()
            .sqrt()
            .max(f64::MIN_POSITIVE);
        let xn = (0..d).map(|c| x0[(i, c)].powi(2)).sum::<f64>().sqrt();
        let t = SPLIT * xn / en;
        let mut cand = if seeded {
            x0.clone()
        } else {
            Mat::from_fn(b + 1, d, |p, c| if p < b { x0[(p, c)] } else { 0.0 })
        };
        let last = cand.nrows() - 1;
        for c in 0..d {
            let xi = x0[(i, c)];
            cand[(i, c)] = xi + t * e[c];
            cand[(last, c)] = xi - t * e[c];
        }
        if cand.nrows() != b {
            continue;
        }
        let f = score(&cand)?;
        if f <= AT_THE_NOISE {
            return Ok(cand);
        }
        if best.as_ref().is_none_or(|b| f < b.0) {
            best = Some((f, cand));
        }
    }
    // x0 itself last: scored only when no split reached the noise
    let f0 = score(&x0)?;
    Ok(match best {
        Some((f, cand)) if f < f0 => cand,
        _ => x0,
    })
}
