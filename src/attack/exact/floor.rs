//! When a residual counts as exact, and how far noise can lift it: the one place
//! these rules are written (docs/DESIGN.md, "Span search" and "Noise").
//!
//! Two residuals are judged, with two factors, because they amplify rounding
//! differently:
//! * the span residual F of the exact route (search, pattern search, refinement) is a
//!   sine of an angle between column spaces, so rounding is amplified by the
//!   condition number kappa of G~ ([`exact_floor`]);
//! * a direct residual of the gradient equations (`analytic`, the baselines' final
//!   gradient match) is a relative difference of the gradient itself: no kappa, and
//!   a smaller factor ([`direct_floor`]).

use faer::Col;

use crate::attack::blocks::Side;
use crate::attack::subspace::Subspace;
use crate::attack::view::ServerView;
use crate::{Dtype, Result};

/// A zero counts as exact when F <= EXACT_FACTOR * eps(dtype) * kappa, kappa = sigma_1 / sigma_B:
/// rounding the gradient to its dtype perturbs G~ by ~eps ||G~||, which tilts its
/// column space by up to ~eps kappa (Wedin's theorem); the factor covers the client's
/// own accumulated rounding. Measured F at the truth: 1-3 eps on all twelve PyTorch
/// fixtures (f32 and f64), well inside the floor; wrong inputs give F > 1e-4.
pub const EXACT_FACTOR: f64 = 200.0;

/// A direct relative residual of the gradient equations counts as exact below
/// DIRECT_FACTOR * eps(dtype): the gradient's own rounding gives about eps/2 per
/// entry, amplified by at most a few units by the sums (no conditioning enters).
pub const DIRECT_FACTOR: f64 = 100.0;

/// Multiple of the noise's tilt of the column space under which a zero is accepted.
/// Gaussian noise of sd sigma has spectral norm ~ sigma (sqrt m + sqrt(d+1)), which tilts
/// the B-dimensional column space by at most that over sigma_B (Wedin); a true sample's
/// F is below this bound, a wrong input's F stays O(1e-1) and above (docs/DESIGN.md,
/// "Noise").
pub const NOISE_ACCEPT: f64 = 1.0;

/// The exact floor of the span residual F for this gradient (see [`EXACT_FACTOR`]).
pub fn exact_floor(view: &ServerView, sub: &Subspace) -> f64 {
    let s = &sub.singular_values;
    let kappa = s[0] / s[sub.batch - 1].max(f64::MIN_POSITIVE);
    EXACT_FACTOR * view.dtype.epsilon() * kappa
}

/// The exact floor of a direct relative residual in `dtype` (see [`DIRECT_FACTOR`]).
pub fn direct_floor(dtype: Dtype) -> f64 {
    DIRECT_FACTOR * dtype.epsilon()
}

/// The largest F a true sample can have under noise of sd `noise` per gradient entry
/// (0 when no noise is known).
pub fn noise_floor(view: &ServerView, sub: &Subspace, noise: Option<f64>) -> f64 {
    let Some(sd) = noise else { return 0.0 };
    let edge = (view.width() as f64).sqrt() + ((view.input_dim() + 1) as f64).sqrt();
    NOISE_ACCEPT * sd * edge / sub.singular_values[sub.batch - 1].max(f64::MIN_POSITIVE)
}

/// Multiple of the per-sample rounding floor u (1 + amp_i) a true sample's F stays under
/// (measured at recovered true samples: F / (u (1 + amp_i)) = 5.3-6.0 on photos25-gelu-bce-deep, f32,
/// and up to 42 on the demo's digits in f64 (zeros polished by the seeding rounds); a wrong
/// zero planted inside the old global floor sits at 1e5 u (1 + amp_i)).
pub const SAMPLE_FACTOR: f64 = 100.0;
/// What the pattern search adds to a pattern's own floor for F's evaluation in f64,
/// EVAL_FACTOR u_64 (1 + amp_i): true f64 samples measured F / (u (1 + amp_i)) up to 1.5e3
/// (docs/DESIGN.md, "Certificate"), and true ReLU patterns of digits B = 16, m = 1024 up to
/// 3.4e-14 against own floors 1.5e-14 to 1.8e-14, which left 6 of 16 patterns kept. Next to
/// a float32 gradient's floor (u = 6e-8) the term is nothing.
pub const EVAL_FACTOR: f64 = 2e3;
/// Per-column squared norms of G~ (d+1), for the rounding amplification.
pub struct RoundingScale {
    colsq: Vec<f64>,
    /// Unit roundoff u = eps / 2 of the gradient's dtype.
    pub u: f64,
}

impl RoundingScale {
    pub fn new(view: &ServerView) -> Result<Self> {
        let n = view.input_dim() + 1;
        let mut colsq = vec![0.0; n];
        view.for_each_block(Side::Gradient, |_, a, b| {
            for (k, c) in colsq.iter_mut().take(n - 1).enumerate() {
                *c += a.col(k).squared_norm_l2();
            }
            colsq[n - 1] += b.map_or(0.0, |b| b.squared_norm_l2());
        })?;
        Ok(RoundingScale {
            colsq,
            u: view.dtype.epsilon() / 2.0,
        })
    }

    /// amp = sqrt(sum_k colsq_k w_k^2 / 3), w = V Sigma^-1 Q^T s^: the expected F that
    /// rounding each entry of G~ (uniformly within u |g|) gives the unit signal s^.
    pub fn amplification(&self, sub: &Subspace, shat: &Col<f64>) -> f64 {
        let a = sub.q.transpose() * shat;
        let b = sub.batch;
        let a = Col::from_fn(b, |k| a[k] / sub.singular_values[k].max(f64::MIN_POSITIVE));
        let w = &sub.v * &a;
        let s: f64 = self
            .colsq
            .iter()
            .zip(w.iter())
            .map(|(c, w)| c * w * w)
            .sum();
        (s / 3.0).sqrt()
    }

    pub fn floor(&self, amp: f64) -> f64 {
        SAMPLE_FACTOR * self.u * (1.0 + amp)
    }
}

#[cfg(test)]
mod tests {
    use super::super::signal::{Neurons, SignalModel};
    use super::super::testing::case;
    use super::super::zero::best_residual;
    use super::*;
    use crate::attack::subspace;
    use crate::model::Activation;

    /// F is at the rounding floor at every true sample and far from it elsewhere.
    #[test]
    fn span_residual_is_zero_at_the_truth_only() {
        let (view, x, _) = case(Activation::Tanh, 1, 3, 8);
        let sub = subspace::estimate(&view, &Default::default()).unwrap();
        let model = SignalModel::new(&view, &sub).unwrap();
        let all = Neurons::all(&sub.q);
        let floor = exact_floor(&view, &sub);
        for i in 0..3 {
            let xi: Vec<f64> = (0..x.ncols()).map(|j| x[(i, j)]).collect();
            let (f, _) = best_residual(&model, &all, &model.coords.c_of_x(&xi)).unwrap();
            assert!(f <= floor, "sample {i}: F = {f:e} > floor {floor:e}");
            // the midpoint of two samples, and a perturbed sample, are not zeros
            let xj: Vec<f64> = (0..x.ncols())
                .map(|j| 0.5 * (x[(i, j)] + x[((i + 1) % 3, j)]))
                .collect();
            let (fm, _) = best_residual(&model, &all, &model.coords.c_of_x(&xj)).unwrap();
            assert!(fm > 1e-4, "midpoint {i}: F = {fm:e}");
            let xp: Vec<f64> = xi
                .iter()
                .enumerate()
                .map(|(j, v)| v + 0.01 * (j as f64).cos())
                .collect();
            let (fp, _) = best_residual(&model, &all, &model.coords.c_of_x(&xp)).unwrap();
            assert!(fp > 1e3 * floor, "perturbed {i}: F = {fp:e}");
        }
    }
}
