//! The row space of one input projection's gradient (docs/DESIGN.md, "Text: the span
//! of an input projection"): G~ = [dW; db] ((d+1) x n_out) = sum_t x~_t (x) delta_t, so
//! its row space is span{x~_t}, x~_t = (x_t, 1), the inputs that carried a gradient.

use faer::{Mat, MatRef};

use super::TextError;
use crate::Dtype;
use crate::attack::subspace::ROUNDING_FACTOR;

/// A true input's distance from the computed span is at most ||E|| / sigma_r (Wedin),
/// E the rounding of G~; the client's accumulation in its dtype is covered by the same
/// factor as the rank floor (`subspace::ROUNDING_FACTOR`).
pub const TAU_FACTOR: f64 = ROUNDING_FACTOR;

/// A candidate's threshold must stay this far below the distance of a random input,
/// sqrt((D - rank) / D) (D the dimension the inputs live in): false inputs measured at
/// 0.15 of that level (GPT-2 small, block 1, B = 32), so 0.01 leaves a factor 15.
pub const MARGIN: f64 = 0.01;

/// One candidate's test: its distance from the span and its own threshold.
#[derive(Clone, Copy, Debug)]
pub struct Test {
    pub distance: f64,
    pub tau: f64,
}

/// The span of one layer's inputs, read at the gradient's own rounding floor.
#[derive(Clone, Debug)]
pub struct RowSpan {
    /// Rows of G~ (d + 1).
    pub dim: usize,
    /// The dimension the inputs can span: d for a LayerNorm's outputs augmented with 1
    /// (they lie in the hyperplane ((x - beta) / gamma) . 1 = 0), d + 1 otherwise.
    pub effective_dim: usize,
    /// U_r Sigma_r^-1 ((d+1) x rank): a candidate's own tilt (see `test`).
    weighted: Mat<f64>,
    /// Number of singular values above `floor`.
    pub rank: usize,
    /// Orthonormal basis of the complement ((d+1) x (d+1-rank)).
    pub complement: Mat<f64>,
    /// Orthonormal basis of the span ((d+1) x rank).
    pub basis: Mat<f64>,
    pub sigma: Vec<f64>,
    /// The rounding edge e = u rms(G~) (sqrt(rows) + sqrt(cols)): the spectral norm of
    /// G~'s rounding error.
    pub edge: f64,
    /// Singular values above ROUNDING_FACTOR * edge are signal.
    pub floor: f64,
    /// The worst case of a candidate's threshold: TAU_FACTOR * edge / sigma_rank.
    pub tau: f64,
    /// ||G~||_F, for the certificate's residuals.
    pub fro: f64,
}

impl RowSpan {
    /// The span of `g` ((d+1) x n_out, the weight gradient with the bias gradient as its
    /// last row), computed in f64, with the floor of the gradient's storage `dtype`.
    pub fn of(
        g: MatRef<'_, f64>,
        dtype: Dtype,
        layer: &str,
        effective_dim: usize,
    ) -> Result<Self, TextError> {
        let (rows, cols) = (g.nrows(), g.ncols());
        let fro = g.norm_l2();
        if fro == 0.0 {
            return Err(TextError::NoSignal {
                layer: layer.to_string(),
            });
        }
        // U must be a full basis of R^rows: a wide g's thin SVD gives it; a tall one
        // (an output projection, (d+1) x d) needs the full SVD
        let (uu, sigma) = if rows <= cols {
            let svd = g
                .thin_svd()
                .map_err(|e| TextError::Numerical(format!("SVD of {layer}'s gradient: {e:?}")))?;
            (
                svd.U().to_owned(),
                svd.S()
                    .column_vector()
                    .iter()
                    .copied()
                    .collect::<Vec<f64>>(),
            )
        } else {
            let svd = g
                .svd()
                .map_err(|e| TextError::Numerical(format!("SVD of {layer}'s gradient: {e:?}")))?;
            (
                svd.U().to_owned(),
                svd.S()
                    .column_vector()
                    .iter()
                    .copied()
                    .collect::<Vec<f64>>(),
            )
        };
        let u = dtype.epsilon() / 2.0;
        let edge = u
            * (fro / ((rows * cols) as f64).sqrt())
            * ((rows as f64).sqrt() + (cols as f64).sqrt());
        let svd_err = sigma[0] * rows.max(cols) as f64 * f64::EPSILON;
        let floor = (ROUNDING_FACTOR * edge).max(svd_err);
        let rank = cliff_rank(&sigma, floor);
        if rank == 0 {
            return Err(TextError::NoSignal {
                layer: layer.to_string(),
            });
        }
        let basis = uu.subcols(0, rank).to_owned();
        let complement = uu.subcols(rank, rows - rank).to_owned();
        let tau = TAU_FACTOR * edge.max(svd_err) / sigma[rank - 1];
        let weighted = Mat::from_fn(rows, rank, |i, j| basis[(i, j)] / sigma[j]);
        Ok(RowSpan {
            dim: rows,
            effective_dim: effective_dim.min(rows),
            weighted,
            rank,
            complement,
            basis,
            sigma,
            edge,
            floor,
            tau,
            fro,
        })
    }

    /// True when the span fills the space the inputs live in: every input is in it and
    /// nothing can be tested.
    pub fn is_full(&self) -> bool {
        self.rank >= self.effective_dim
    }

    /// The largest threshold that still tells inputs apart (`MARGIN`).
    pub fn max_tau(&self) -> f64 {
        if self.is_full() {
            return 0.0;
        }
        let k = (self.effective_dim - self.rank) as f64;
        MARGIN * (k / self.effective_dim as f64).sqrt()
    }

    /// Each row's distance and own threshold. A true input x~ = U c tilts off the
    /// computed span by about ||N^T E V Sigma^-1 c|| <= ||E|| ||Sigma^-1 U^T x~||, so its
    /// threshold is TAU_FACTOR * edge * ||Sigma_r^-1 U_r^T x~|| / ||x~|| (at most `tau`):
    /// small for inputs carried by strong directions, large only along weak ones.
    pub fn test(&self, x: MatRef<'_, f64>) -> Vec<Test> {
        let p = x * self.complement.as_ref();
        let w = x * self.weighted.as_ref();
        (0..x.nrows())
            .map(|i| {
                let num: f64 = (0..p.ncols()).map(|j| p[(i, j)] * p[(i, j)]).sum();
                let den: f64 = (0..x.ncols()).map(|j| x[(i, j)] * x[(i, j)]).sum();
                let tilt: f64 = (0..w.ncols()).map(|j| w[(i, j)] * w[(i, j)]).sum();
                if den > 0.0 {
                    Test {
                        distance: (num / den).sqrt(),
                        tau: (TAU_FACTOR * self.edge * (tilt / den).sqrt())
                            .max(self.evaluation_floor()),
                    }
                } else {
                    Test {
                        distance: 1.0,
                        tau: 0.0,
                    }
                }
            })
            .collect()
    }

    /// What computing a candidate's distance costs in f64 (its input from the weights,
    /// then the projection over `dim` coordinates: about sqrt(dim) eps), with the same
    /// allowance `TAU_FACTOR`: under a float64 gradient a true input's distance can sit
    /// here, above its Wedin threshold.
    pub fn evaluation_floor(&self) -> f64 {
        TAU_FACTOR * (self.dim as f64).sqrt() * f64::EPSILON
    }

    /// A candidate passes: within its own threshold, and that threshold discriminates.
    pub fn accepts(&self, t: Test) -> bool {
        t.distance <= t.tau && t.tau <= self.max_tau()
    }

    /// The ratio of the last signal singular value to the first noise one (the cliff).
    pub fn cliff(&self) -> f64 {
        match self.sigma.get(self.rank) {
            Some(&next) if next > 0.0 => self.sigma[self.rank - 1] / next,
            _ => f64::INFINITY,
        }
    }

    /// ||G~ - P G~||_F / ||G~||_F with P = Q Q^T, Q an orthonormal basis of the inputs' span:
    /// how much of the gradient the recovered inputs leave unexplained.
    pub fn unexplained(&self, g: MatRef<'_, f64>, q: MatRef<'_, f64>) -> f64 {
        if q.ncols() == 0 {
            return 1.0;
        }
        let coef = q.transpose() * g;
        let resid = g - q * &coef;
        resid.norm_l2() / self.fro
    }
}

/// A rounding error's singular values may stand a little above the floor estimate (the
/// client's accumulation is not counted exactly): the rank is read at the largest ratio
/// sigma_i / sigma_(i+1) among the i whose next value sigma_(i+1) is within this factor
/// of the floor (the cliff nearest the floor).
pub const NEAR_FLOOR: f64 = 10.0;

/// The rank: the largest drop sigma_i / sigma_(i+1) with sigma_i above `floor` and
/// sigma_(i+1) under `NEAR_FLOOR` times it (a value past the end counts as 0).
pub(crate) fn cliff_rank(sigma: &[f64], floor: f64) -> usize {
    let above = sigma.iter().filter(|&&s| s > floor).count();
    let mut best = (above, 0.0);
    for i in 1..=above {
        let next = sigma.get(i).copied().unwrap_or(0.0);
        if next > NEAR_FLOOR * floor {
            continue;
        }
        let ratio = if next > 0.0 {
            sigma[i - 1] / next
        } else {
            f64::INFINITY
        };
        if ratio > best.1 {
            best = (i, ratio);
        }
    }
    best.0
}

/// An orthonormal basis ((d+1) x k) of the span of the rows of `x`, dropping directions
/// below 1e-10 of the largest (the rows are exact f64 inputs, not rounded data).
pub(crate) fn orthonormal_rows(x: MatRef<'_, f64>) -> Mat<f64> {
    let xt = x.transpose().to_owned();
    let svd = match xt.thin_svd() {
        Ok(s) => s,
        Err(_) => return Mat::zeros(x.ncols(), 0),
    };
    let s: Vec<f64> = svd.S().column_vector().iter().copied().collect();
    let keep = s.iter().filter(|&&v| v > s[0] * 1e-10).count();
    svd.U().subcols(0, keep).to_owned()
}
