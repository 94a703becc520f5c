//! Stage 1 of every attack: the row space of the augmented first-layer gradient
//! G~ = [g_W, g_b] (m x (d+1)), and the batch size as its numerical rank
//! (docs/DESIGN.md, "Subspace and batch size").

use faer::{Mat, MatRef};
use rand_distr::{Distribution, StandardNormal};

use super::blocks::{Side, aug_squared_norm, aug_t_times_add};
use super::view::ServerView;
use crate::rng::{Salt, salted};
use crate::{Error, Result};

/// G~ is decomposed directly by a thin SVD when its shorter side is at most this
/// (the SVD costs O(m n min(m, n)): 26 s for 4096 x 3073 on our 2-core machine, 0.1 s
/// for 100000 x 65); otherwise by the streaming randomized range finder, which costs
/// a few passes of O(m n k) with k ~ B.
pub const DENSE_MAX_SIDE: usize = 256;

/// Safety factor over the rounding-noise estimate of the trailing singular values.
/// Rounding a rank-B matrix to the dtype perturbs it by about u * rms(G) * (sqrt m + sqrt n)
/// in spectral norm; the factor covers accumulation in the client's own arithmetic.
pub const ROUNDING_FACTOR: f64 = 50.0;

/// Safety factor over the largest singular value of a Gaussian noise matrix,
/// sigma * (sqrt m + sqrt n), when the noise level is known.
pub const NOISE_FACTOR: f64 = 1.2;

/// Power iterations of the randomized range finder. G~ is rank B plus noise at the
/// dtype floor, a spectrum with a cliff, for which one iteration already resolves the
/// range to the floor; each iteration costs two more passes over the gradient.
pub const POWER_ITERATIONS: usize = 1;

/// How the batch size was decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RankRule {
    /// Singular values above the dtype's rounding floor (and the known noise).
    Threshold,
    /// No singular value fell to the floor: the largest ratio gap was taken.
    LargestGap,
    /// The user gave `--batch`.
    Forced,
}

/// The subspace the batch lives in.
#[derive(Clone, Debug)]
pub struct Subspace {
    /// Leading singular values of G~ (as many as were computed), descending.
    pub singular_values: Vec<f64>,
    /// Estimated (or forced) batch size B.
    pub batch: usize,
    /// Orthonormal basis of the row space, (d+1) x B: every x~_i = V c_i.
    pub v: Mat<f64>,
    /// Orthonormal basis of the column space, m x B (span of the neuron signals).
    pub q: Mat<f64>,
    /// Threshold the singular values were compared with.
    pub threshold: f64,
    pub rule: RankRule,
}

impl Subspace {
    /// The projected gradient G~V = Q diag(sigma_1, ..., sigma_B) (m x B): neuron j's
    /// gradient row in the coordinates of V. Every exact route starts from it.
    pub fn projected_gradient(&self) -> Mat<f64> {
        Mat::from_fn(self.q.nrows(), self.batch, |j, k| {
            self.q[(j, k)] * self.singular_values[k]
        })
    }
}

/// Options of the subspace stage.
#[derive(Clone, Copy, Debug, Default)]
pub struct SubspaceOptions {
    /// Force this batch size instead of estimating it.
    pub batch: Option<usize>,
    /// Known noise standard deviation per gradient entry.
    pub noise_std: Option<f64>,
    pub seed: u64,
}

/// Compute the subspace of the view's first-layer gradient.
pub fn estimate(view: &ServerView, opts: &SubspaceOptions) -> Result<Subspace> {
    let (m, n) = (view.width(), view.input_dim() + 1);
    let noise = opts.noise_std.or(view.noise_std);
    let (u, s, v, fro) = if m.min(n) <= DENSE_MAX_SIDE {
        dense_svd(view)?
    } else {
        randomized_svd(view, opts.seed, opts.batch, noise)?
    };
    let threshold = floor(
        view.dtype,
        m,
        n,
        fro,
        s.first().copied().unwrap_or(0.0),
        noise,
    );
    if s.first().is_none_or(|&s0| s0 <= threshold) {
        return Err(Error::NoSignal {
            largest: s.first().copied().unwrap_or(0.0),
            floor: threshold,
        });
    }
    let max_rank = m.min(n);
    let (batch, rule) = match opts.batch {
        Some(b) => {
            if b == 0 || b > s.len() {
                return Err(if b == 0 {
                    Error::Param {
                        name: "batch",
                        reason: "must be at least 1".into(),
                    }
                } else {
                    Error::BatchTooLarge {
                        batch: b,
                        limit: s.len(),
                    }
                });
            }
            (b, RankRule::Forced)
        }
        None => {
            let above = s.iter().take_while(|&&x| x > threshold).count();
            if above < s.len() || s.len() < max_rank {
                (above, RankRule::Threshold)
            } else {
                // every computed value is above the floor: take the sharpest drop
                let k = (0..s.len() - 1)
                    .max_by(|&a, &b| (s[a] / s[a + 1]).total_cmp(&(s[b] / s[b + 1])))
                    .map_or(s.len(), |k| k + 1);
                (k, RankRule::LargestGap)
            }
        }
    };
    if batch >= max_rank && opts.batch.is_none() {
        return Err(Error::FullRank { rank: max_rank });
    }
    Ok(Subspace {
        singular_values: s,
        batch,
        v: v.subcols(0, batch).to_owned(),
        q: u.subcols(0, batch).to_owned(),
        threshold,
        rule,
    })
}

type Svd = (Mat<f64>, Vec<f64>, Mat<f64>, f64);

/// The largest singular value that can still be noise: the dtype's rounding of G~,
/// the f64 SVD's own backward error (s_1 max(m, n) eps, the usual numerical-rank
/// tolerance), and the known noise level, whichever is largest.
pub(crate) fn floor(
    dtype: crate::Dtype,
    m: usize,
    n: usize,
    fro: f64,
    s1: f64,
    noise: Option<f64>,
) -> f64 {
    let edge = (m as f64).sqrt() + (n as f64).sqrt();
    let rounding =
        ROUNDING_FACTOR * (dtype.epsilon() / 2.0) * (fro / ((m * n) as f64).sqrt()) * edge;
    let svd = s1 * m.max(n) as f64 * f64::EPSILON;
    let noise = noise.map_or(0.0, |sd| NOISE_FACTOR * sd * edge);
    rounding.max(svd).max(noise)
}

fn dense_svd(view: &ServerView) -> Result<Svd> {
    let m = view.width();
    let g = view.augmented_gradient_block(0..m)?;
    let fro = g.norm_l2();
    let svd = g
        .thin_svd()
        .map_err(|e| Error::Numerical(format!("SVD of the gradient: {e:?}")))?;
    let s: Vec<f64> = svd.S().column_vector().iter().copied().collect();
    Ok((svd.U().to_owned(), s, svd.V().to_owned(), fro))
}

/// G~ * X for X ((d+1) x k), streaming over row blocks of the gradient.
fn times(view: &ServerView, x: MatRef<'_, f64>) -> Result<Mat<f64>> {
    view.augmented_times(Side::Gradient, x)
}

/// G~^T * Y for Y (m x k), streaming; also returns ||G~||_F.
fn times_t(view: &ServerView, y: MatRef<'_, f64>) -> Result<(Mat<f64>, f64)> {
    let n = view.input_dim() + 1;
    let mut z = Mat::zeros(n, y.ncols());
    let mut fro2 = 0.0;
    view.for_each_block(Side::Gradient, |r, a, b| {
        fro2 += aug_squared_norm(a, b);
        aug_t_times_add(z.as_mut(), a, b, y.subrows(r.start, r.len()));
    })?;
    Ok((z, fro2.sqrt()))
}

fn orthonormal(a: Mat<f64>) -> Mat<f64> {
    let k = a.ncols();
    a.qr().compute_thin_Q().subcols(0, k).to_owned()
}

/// Randomized range finder (Halko, Martinsson & Tropp 2011) with power iterations,
/// doubling the sketch until the spectrum has fallen to its floor inside it.
fn randomized_svd(
    view: &ServerView,
    seed: u64,
    forced: Option<usize>,
    noise: Option<f64>,
) -> Result<Svd> {
    let (m, n) = (view.width(), view.input_dim() + 1);
    let cap = m.min(n);
    let mut k = forced.map_or(48, |b| b + 16).min(cap);
    let mut rng = salted(seed, Salt::Sketch);
    loop {
        let omega = Mat::from_fn(n, k, |_, _| StandardNormal.sample(&mut rng));
        let mut q = orthonormal(times(view, omega.as_ref())?);
        let mut fro = 0.0;
        for _ in 0..POWER_ITERATIONS {
            let (z, f) = times_t(view, q.as_ref())?;
            fro = f;
            q = orthonormal(times(view, orthonormal(z).as_ref())?);
        }
        let (bt, f) = times_t(view, q.as_ref())?; // (d+1) x k = (Q^T G~)^T
        if fro == 0.0 {
            fro = f;
        }
        let svd = bt
            .thin_svd()
            .map_err(|e| Error::Numerical(format!("SVD of the sketch: {e:?}")))?;
        let s: Vec<f64> = svd.S().column_vector().iter().copied().collect();
        // Bt = V S W^T, so G~ ~ Q W S V^T.
        let u = &q * svd.V();
        let v = svd.U().to_owned();
        let t = floor(
            view.dtype,
            m,
            n,
            fro,
            s.first().copied().unwrap_or(0.0),
            noise,
        );
        let fell = s.iter().position(|&x| x <= t);
        if fell.is_some_and(|p| p + 8 <= k) || k == cap || forced.is_some() {
            return Ok((u, s, v, fro));
        }
        k = (2 * k).min(cap);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Dtype;
    use crate::model::{Activation, Dense, Gradient, Mlp};
    use faer::Col;
    use rand::SeedableRng;

    /// A rank-B gradient built from (1) directly, in f64 and rounded to f32.
    fn view(m: usize, d: usize, b: usize, dtype: Dtype, seed: u64) -> (ServerView, Mat<f64>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut g = |r, c| Mat::from_fn(r, c, |_, _| StandardNormal.sample(&mut rng));
        let x: Mat<f64> = g(b, d);
        let delta: Mat<f64> = g(m, b);
        let w = g(m, d);
        let bias = g(m, 1);
        let gw = &delta * &x;
        let gb = Col::from_fn(m, |j| (0..b).map(|i| delta[(j, i)]).sum::<f64>());
        let round = |v: f64| {
            if dtype == Dtype::F32 {
                v as f32 as f64
            } else {
                v
            }
        };
        let gw = Mat::from_fn(m, d, |i, j| round(gw[(i, j)]));
        let gb = Col::from_fn(m, |i| round(gb[i]));
        let model = Mlp::new(
            vec![Dense {
                weight: w,
                bias: Some(bias.col(0).to_owned()),
            }],
            Activation::Identity,
        )
        .unwrap();
        let grad = Gradient {
            layers: vec![Dense {
                weight: gw,
                bias: Some(gb),
            }],
        };
        (ServerView::from_memory(&model, &grad, dtype).unwrap(), x)
    }

    /// The row space must contain every augmented input: the residual of projecting
    /// x~_i on V is at the dtype's precision (times the conditioning, bounded by 1e3 here).
    fn check(view: &ServerView, x: &Mat<f64>, eps: f64) {
        let s = estimate(view, &SubspaceOptions::default()).unwrap();
        assert_eq!(s.batch, x.nrows());
        for i in 0..x.nrows() {
            let xt = Col::from_fn(
                x.ncols() + 1,
                |j| if j < x.ncols() { x[(i, j)] } else { 1.0 },
            );
            let c = s.v.transpose() * &xt;
            let res = (&xt - &s.v * &c).norm_l2() / xt.norm_l2();
            assert!(res < 1e3 * eps, "sample {i}: residual {res}");
        }
    }

    #[test]
    fn rank_and_row_space_dense_f64_and_f32() {
        let (v, x) = view(500, 30, 6, Dtype::F64, 1);
        check(&v, &x, f64::EPSILON);
        let (v, x) = view(500, 30, 6, Dtype::F32, 2);
        check(&v, &x, f32::EPSILON as f64);
    }

    /// A wide rank-1 gradient: the SVD's own error (~eps s_1) must not count as signal.
    #[test]
    fn wide_rank_one_is_rank_one() {
        let (v, x) = view(1024, 3072, 1, Dtype::F64, 5);
        check(&v, &x, f64::EPSILON);
    }

    #[test]
    fn randomized_path_agrees() {
        // both sides above DENSE_MAX_SIDE: the streaming range finder runs.
        let (v, x) = view(12000, 2000, 5, Dtype::F32, 3);
        assert!(v.width().min(v.input_dim() + 1) > DENSE_MAX_SIDE);
        check(&v, &x, f32::EPSILON as f64);
    }

    #[test]
    fn forced_batch_beyond_the_layer_is_an_error() {
        let (v, _) = view(50, 4, 2, Dtype::F64, 4);
        let e = estimate(
            &v,
            &SubspaceOptions {
                batch: Some(9),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(matches!(e, Error::BatchTooLarge { batch: 9, .. }), "{e:?}");
    }
}
