//! The joint likelihood fit restricted to the estimated row space, for batches whose
//! fit in all d input coordinates is over budget (docs/DESIGN.md, "Defended gradients:
//! the fit in the row space").
//!
//! With V (d x r, orthonormal) the top right singular directions of the observed O_W
//! and x_i = V c_i: Z = X W^T + 1 b^T = C (W V)^T + 1 b^T, and O_W V = Delta^T C + E V,
//! where E V has independent entries of the same variance (V is orthonormal). So the
//! reduced problem is itself a two-layer problem with first-layer weight W V and
//! observed first-layer gradient O_W V (the other tensors unchanged), and the full
//! weighted objective at X = C V^T is the reduced one plus the constant
//! w_W ||O_W (I - V V^T)||^2. B (r + K) unknowns fit the dense Gauss-Newton path.

use faer::Mat;

use crate::Result;
use crate::attack::two_layer::gauss_newton;
use crate::attack::two_layer::{Fit, TwoLayer};

/// Oversampling and power iterations of the randomized range finder for V.
const OVERSAMPLE: usize = 10;
const POWER: usize = 3;
/// Alternating iterations (R-step, then the X-step in all d coordinates) after the
/// reduced fit: the noise tilts the estimated row space, most in its weakest direction.
pub const LIFT_ITERATIONS: usize = 2;
/// The reduced fit replaces the exact route's estimates only when its full weighted
/// objective per entry reaches this (1 at the truth; measured 1.01 for the fit from
/// the truth on photos B = 32, m = 8192, noise-rel:1e-3): a fit that stops above it
/// does not explain the gradient (a wrong or missing sample), and was measured to pull
/// the right samples off (docs/EXPERIMENTS.md).
pub const ACCEPT: f64 = super::split::AT_THE_NOISE;

/// A two-layer problem restricted to the row space V.
pub struct Reduction {
    pub tl: TwoLayer,
    /// d x r, orthonormal columns.
    pub v: Mat<f64>,
    /// w_W ||O_W (I - V V^T)||^2: what the restriction cannot fit.
    pub outside: f64,
}

/// The rank r of the reduced fit when the full joint fit of `b` samples is over budget
/// (`gauss_newton::over_budget`) and the reduced one is dense; None otherwise.
pub fn rank(m: usize, d: usize, k: usize, b: usize) -> Option<usize> {
    (gauss_newton::over_budget(m, d, k, b).is_some()
        && b < d
        && b * (b + k) <= gauss_newton::DENSE_MAX_UNKNOWNS)
        .then_some(b)
}

/// The top `r` right singular directions of `g` (m x d) by a randomized range finder
/// (`oversample` extra columns, `power` power iterations, a seeded Gaussian start).
pub(super) fn range_finder(
    g: &Mat<f64>,
    r: usize,
    oversample: usize,
    power: usize,
    seed: u64,
) -> Result<Mat<f64>> {
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};
    let d = g.ncols();
    let p = (r + oversample).min(d);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let omega = Mat::<f64>::from_fn(d, p, |_, _| StandardNormal.sample(&mut rng));
    let mut y = g * &omega;
    for _ in 0..power {
        let qy = y.qr().compute_thin_Q();
        let qz = (g.transpose() * &qy).qr().compute_thin_Q();
        y = g * &qz;
    }
    let qy = y.qr().compute_thin_Q();
    let bt = g.transpose() * &qy; // d x p, its left singular vectors are g's right ones
    let svd = bt
        .thin_svd()
        .map_err(|_| crate::Error::Numerical("the row space's SVD did not converge".into()))?;
    Ok(svd.U().subcols(0, r.min(p)).to_owned())
}

impl Reduction {
    /// Restrict `tl` to its observed first-layer gradient's top-`r` row space.
    pub fn new(tl: &TwoLayer, r: usize, seed: u64) -> Result<Self> {
        let v = range_finder(&tl.ow, r, OVERSAMPLE, POWER, seed ^ 0x00e5_11ce)?;
        Ok(Self::on(tl, v))
    }

    /// Restrict `tl` to the row space spanned by `v` (d x r, orthonormal).
    pub fn on(tl: &TwoLayer, v: Mat<f64>) -> Self {
        let owv = &tl.ow * &v;
        let outside = tl.weights[0] * (&tl.ow - &owv * v.transpose()).squared_norm_l2();
        Reduction {
            tl: TwoLayer {
                act: tl.act,
                w: &tl.w * &v,
                b: tl.b.clone(),
                a: tl.a.clone(),
                ow: owv,
                ob: tl.ob.clone(),
                oa: tl.oa.clone(),
                oc: tl.oc.clone(),
                weights: tl.weights,
            },
            v,
            outside,
        }
    }

    /// The full problem's objective per entry at X = C V^T, from the reduced one's.
    pub fn full_objective(&self, full: &TwoLayer, reduced: f64) -> f64 {
        (reduced * self.tl.entries() + self.outside) / full.entries()
    }

    /// Coordinates C = X V of inputs in the row space.
    pub fn project(&self, x: &Mat<f64>) -> Mat<f64> {
        x * &self.v
    }

    /// The joint fit of `x_found` (B' x d) and `missing` seeded samples in the row
    /// space, lifted back to d coordinates, then `LIFT_ITERATIONS` alternating steps
    /// on the full problem; the lower full objective is kept. Returns the fit (full
    /// coordinates and objective), how many were seeded, and the start's objective.
    pub fn fit(
        &self,
        full: &TwoLayer,
        x_found: Mat<f64>,
        missing: usize,
        seed: u64,
    ) -> Result<(Fit, usize, f64)> {
        let (fit, filled, start) = super::two_layer_fit::fit_two_layer(
            &self.tl,
            self.project(&x_found),
            missing,
            false,
            seed,
        )?;
        let x = &fit.x * self.v.transpose();
        let lifted = Fit {
            objective: self.full_objective(full, fit.objective),
            x,
            r: fit.r,
            iterations: fit.iterations,
        };
        let start = self.full_objective(full, start);
        let alt = full.fit(&lifted.x, LIFT_ITERATIONS, 0.0)?;
        Ok(if alt.objective < lifted.objective {
            (
                Fit {
                    iterations: lifted.iterations + alt.iterations,
                    ..alt
                },
                filled,
                start,
            )
        } else {
            (lifted, filled, start)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(noise: Option<f64>) -> (Mat<f64>, TwoLayer) {
        crate::attack::defended::testing::two_layer(3, noise)
    }

    /// Under noise, at any X = C V^T and any R the full objective is the reduced one
    /// plus the part of O_W outside the row space: W V, O_W V and the weights are right.
    #[test]
    fn reduced_objective_is_the_full_one_on_the_row_space() {
        let (x, tl) = problem(Some(1e-2));
        let red = Reduction::new(&tl, 3, 1).unwrap();
        let vtv = red.v.transpose() * &red.v;
        let eye = Mat::<f64>::identity(3, 3);
        assert!((&vtv - &eye).norm_l2() < 1e-12);
        let c = Mat::from_fn(3, 3, |i, j| {
            red.project(&x)[(i, j)] + 0.1 * ((i + 2 * j) as f64).sin()
        });
        let xf = &c * red.v.transpose();
        let r = Mat::from_fn(3, tl.a.nrows(), |i, k| 0.05 * ((3 * i + k) as f64).cos());
        let full = tl.objective(&xf, &r);
        let lifted = red.full_objective(&tl, red.tl.objective(&c, &r));
        assert!((full - lifted).abs() <= 1e-10 * full, "{full} {lifted}");
    }

    /// Without noise the truth lies in the estimated row space and is the reduced
    /// problem's global minimum: the fit from 5 % off lands on it, lifted back to d
    /// coordinates.
    #[test]
    fn truth_is_the_reduced_fit_without_noise() {
        let (x, tl) = problem(None);
        let red = Reduction::new(&tl, 3, 1).unwrap();
        let x0 = Mat::from_fn(3, x.ncols(), |i, j| {
            x[(i, j)] * (1.0 + 0.05 * ((5 * i + j) as f64).sin())
        });
        let (fit, filled, _) = red.fit(&tl, x0, 0, 1).unwrap();
        let err = (&fit.x - &x).norm_l2() / x.norm_l2();
        assert_eq!(filled, 0);
        assert!(err < 1e-8, "{err:e} objective {:e}", fit.objective);
    }
}
