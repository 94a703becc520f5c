//! The law of the projected first-layer weight rows: estimated from the m rows, or
//! the server's own initialisation law projected onto the batch subspace
//! (docs/DESIGN.md, "Moments"). Whitening with it makes the rows about N(0, I).

use faer::{Col, Mat, MatRef, Side};
use serde::Serialize;

use crate::{Error, Result};

/// Where the law of the projected weight rows came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LawSource {
    /// Sample mean and covariance of the m projected rows.
    Estimated,
    /// The server's own initialisation law, projected.
    Known,
}

/// Gaussian law N(mean, L L^T) of the projected weight rows V^T w~_j.
#[derive(Clone, Debug)]
pub struct Law {
    pub mean: Col<f64>,
    /// Lower Cholesky factor L of the covariance.
    pub chol: Mat<f64>,
    pub source: LawSource,
}

/// The server's law for the augmented first-layer rows w~_j = (w_j, b_j).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum WeightLaw {
    /// Independent coordinates: weights (0, weight_sd^2), bias (bias_mean, bias_sd^2).
    /// Only the first two moments are used; PyTorch's uniform init fits here too.
    Diagonal {
        weight_sd: f64,
        bias_mean: f64,
        bias_sd: f64,
    },
    /// w ~ N(0, weight_sd^2 I), b = -xbar (1 . w) + N(0, bias_sd^2) (`--init centred`).
    Centred {
        weight_sd: f64,
        xbar: f64,
        bias_sd: f64,
    },
}

impl WeightLaw {
    /// The first-layer law of a server initialisation (see [`Init`](crate::model::Init)).
    pub fn of_init(cfg: &crate::model::InitConfig) -> WeightLaw {
        use crate::model::Init;
        let d = cfg.input_dim as f64;
        match cfg.init {
            Init::Gaussian => {
                let s = 1.0 / (cfg.prior_sq_norm + 1.0).sqrt();
                WeightLaw::Diagonal {
                    weight_sd: s,
                    bias_mean: 0.0,
                    bias_sd: s,
                }
            }
            Init::Centred => WeightLaw::Centred {
                weight_sd: 1.0 / cfg.prior_centred_sq_norm.max(f64::MIN_POSITIVE).sqrt(),
                xbar: cfg.prior_mean,
                bias_sd: 1.0,
            },
            // U(-1/sqrt d, 1/sqrt d) has variance 1 / (3 d)
            Init::TorchDefault => {
                let s = 1.0 / (3.0 * d).sqrt();
                WeightLaw::Diagonal {
                    weight_sd: s,
                    bias_mean: 0.0,
                    bias_sd: s,
                }
            }
            Init::KaimingNormal => WeightLaw::Diagonal {
                weight_sd: (2.0 / d).sqrt(),
                bias_mean: 0.0,
                bias_sd: 0.0,
            },
        }
    }

    /// The law of V^T w~ for an orthonormal V ((d+1) x B).
    pub fn project(&self, v: MatRef<'_, f64>) -> Result<Law> {
        let (n, b) = v.shape();
        let d = n - 1;
        let last = Col::from_fn(b, |k| v[(d, k)]);
        let (mean, cov) = match *self {
            WeightLaw::Diagonal {
                weight_sd,
                bias_mean,
                bias_sd,
            } => {
                let top = v.subrows(0, d);
                let cov = (top.transpose() * top) * faer::Scale(weight_sd * weight_sd)
                    + (&last * last.transpose()) * faer::Scale(bias_sd * bias_sd);
                (&last * faer::Scale(bias_mean), cov)
            }
            WeightLaw::Centred {
                weight_sd,
                xbar,
                bias_sd,
            } => {
                let mv = Mat::from_fn(b, d, |k, c| v[(c, k)] - xbar * last[k]);
                let cov = (&mv * mv.transpose()) * faer::Scale(weight_sd * weight_sd)
                    + (&last * last.transpose()) * faer::Scale(bias_sd * bias_sd);
                (Col::zeros(b), cov)
            }
        };
        Law::from_moments(mean, cov, LawSource::Known)
    }
}

impl Law {
    fn from_moments(mean: Col<f64>, cov: Mat<f64>, source: LawSource) -> Result<Law> {
        let chol = cov
            .llt(Side::Lower)
            .map_err(|_| {
                Error::Numerical(
                    "the projected weight rows have a singular covariance: the server's weights do not span the batch subspace"
                        .into(),
                )
            })?
            .L()
            .to_owned();
        Ok(Law { mean, chol, source })
    }

    /// Sample mean and covariance of the projected rows (m x B).
    pub fn estimate(rows: MatRef<'_, f64>) -> Result<Law> {
        let (m, b) = rows.shape();
        if m < 2 * b {
            return Err(Error::TooFewNeurons { neurons: m, dim: b });
        }
        let mean = Col::from_fn(b, |k| (0..m).map(|j| rows[(j, k)]).sum::<f64>() / m as f64);
        let centred = Mat::from_fn(m, b, |j, k| rows[(j, k)] - mean[k]);
        let cov = (centred.transpose() * &centred) * faer::Scale(1.0 / m as f64);
        Law::from_moments(mean, cov, LawSource::Estimated)
    }

    /// Relative Frobenius distance of the covariances and of the means (in units of
    /// the covariance scale) between two laws.
    pub fn gap(&self, other: &Law) -> (f64, f64) {
        let c1 = &self.chol * self.chol.transpose();
        let c2 = &other.chol * other.chol.transpose();
        let scale = c2.norm_l2();
        (
            (&c1 - &c2).norm_l2() / scale,
            (&self.mean - &other.mean).norm_l2() / scale.sqrt(),
        )
    }
}
