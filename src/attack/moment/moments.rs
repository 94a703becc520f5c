//! Stage 2 of `--method tensor`: project the first layer onto the batch subspace,
//! whiten the weights, and form the Hermite moment tensor
//! T = (1/m) sum_j f_j (x) He_p(u_j)  (docs/DESIGN.md, "Moments").
//!
//! Everything here lives in B dimensions: the m x (d+1) first layer is read once, in
//! row blocks, and only m x B projections are kept. The tensor is P x B^p with
//! P <= B^2, accumulated over neuron blocks by matrix products.

use faer::{Col, Mat, MatRef, Side};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::attack::law::Law;
use crate::attack::view::{BLOCK_ROWS, ServerView};
use crate::{Error, Result};

/// Largest moment tensor (entries of the P x B^p unfolding) built with the full
/// output mode; beyond it the output mode is contracted with one random direction
/// (32 MB of f64, and m P B^p flops stays a few seconds at m = 1e5).
pub const TENSOR_ENTRIES_LIMIT: usize = 1 << 22;

/// Rows of the neuron blocks when accumulating the tensor: keeps the block's
/// B^p-wide Hermite rows near 8 MB whatever B and p are.
const MOMENT_BLOCK_ENTRIES: usize = 1 << 20;

/// The first layer seen from the batch subspace: neuron j's weight row, gradient row
/// and output weights, all small.
#[derive(Clone, Debug)]
pub struct Projected {
    /// V^T w~_j, m x B.
    pub weights: Mat<f64>,
    /// V^T g~_j, m x B.
    pub grads: Mat<f64>,
    /// a_j, the layer-above weights of neuron j (column j of that layer), m x K'.
    pub outputs: Mat<f64>,
}

/// Read the first layer once, in row blocks, and project it onto V ((d+1) x B).
pub fn project(view: &ServerView, v: MatRef<'_, f64>) -> Result<Projected> {
    let m = view.width();
    let Some(above) = view.upper.first() else {
        return Err(Error::Needs {
            what: "the tensor attack",
            needs: "the layer above the first (its weights weigh each neuron's moment)",
        });
    };
    let b = v.ncols();
    let mut weights = Mat::zeros(m, b);
    let mut grads = Mat::zeros(m, b);
    for start in (0..m).step_by(BLOCK_ROWS) {
        let r = start..(start + BLOCK_ROWS).min(m);
        let w = view.augmented_weight_block(r.clone())?;
        weights.subrows_mut(r.start, r.len()).copy_from(&w * v);
        drop(w);
        view.first.weight.release(r.clone());
        let g = view.augmented_gradient_block(r.clone())?;
        grads.subrows_mut(r.start, r.len()).copy_from(&g * v);
        view.first.grad_weight.release(r);
    }
    let outputs = above.weight.transpose().to_owned();
    Ok(Projected {
        weights,
        grads,
        outputs,
    })
}

/// The projected first layer in whitened coordinates: u_j = L^{-1}(p_j - mu) is
/// (about) N(0, I), and h~_j = L^T h_j = sum_i delta_ij e_i with e_i = L^T c_i.
#[derive(Clone, Debug)]
pub struct Whitened {
    /// u_j, m x B.
    pub u: Mat<f64>,
    /// f_j = omega'_j (x) h~_j, m x P (P = K'' B), the free mode of the tensor.
    pub free: Mat<f64>,
    /// Output-mode basis used for omega' = R^T omega (K' x K'').
    pub output_basis: Mat<f64>,
}

/// Whiten with `law`, divide out the output weights, and remove the part of each
/// gradient row that is linear in (a_j, a_j (x) u_j) (a control variate: it has zero
/// correlation with He_p(u_j) for p >= 2 but carries most of the per-neuron variance,
/// the E[act'] and E[act''] components). The output mode is reduced to the at most B
/// directions the first moment (1/m) sum_j omega_j (x) h~_j spans (the r_i's span).
pub fn whiten(
    p: &Projected,
    law: &Law,
    degree: usize,
    control_variate: bool,
    rng: &mut impl Rng,
) -> Result<Whitened> {
    let (m, b) = p.weights.shape();
    let l = &law.chol;
    // u^T = L^{-1} (p - mu)^T
    let mut u_t = Mat::from_fn(b, m, |k, j| p.weights[(j, k)] - law.mean[k]);
    l.solve_lower_triangular_in_place(u_t.as_mut());
    let u = u_t.transpose().to_owned();
    let mut h = &p.grads * l; // rows h_j^T L = (L^T h_j)^T
    let k = p.outputs.ncols();
    let sq: Vec<f64> = (0..m)
        .map(|j| (0..k).map(|o| p.outputs[(j, o)].powi(2)).sum())
        .collect();
    let omega = Mat::from_fn(m, k, |j, o| {
        if sq[j] > 0.0 {
            p.outputs[(j, o)] / sq[j]
        } else {
            0.0
        }
    });
    // output mode: R = top left singular vectors of the first moment M (K' x B)
    let mut basis = if k == 1 {
        Mat::from_fn(1, 1, |_, _| 1.0)
    } else {
        let first = (omega.transpose() * &h) * faer::Scale(1.0 / m as f64);
        let svd = first
            .thin_svd()
            .map_err(|e| Error::Numerical(format!("SVD of the first moment: {e:?}")))?;
        svd.U().subcols(0, k.min(b)).to_owned()
    };
    if basis.ncols() > 1 && basis.ncols() * b * b.pow(degree as u32) > TENSOR_ENTRIES_LIMIT {
        let theta = Col::<f64>::from_fn(basis.ncols(), |_| StandardNormal.sample(rng));
        basis = &basis * theta.as_mat() * faer::Scale(1.0 / theta.norm_l2());
    }
    let om = &omega * &basis; // m x K''
    let kk = om.ncols();
    // control variate: regress h~ on a'_j (x) (1, u_j), a' = R^T a
    let ared = &p.outputs * &basis;
    let nf = kk * (1 + b);
    let phi = Mat::from_fn(m, nf, |j, c| {
        let (o, q) = (c / (1 + b), c % (1 + b));
        ared[(j, o)] * if q == 0 { 1.0 } else { u[(j, q - 1)] }
    });
    let gram = phi.transpose() * &phi;
    let rhs = phi.transpose() * &h;
    let ridge = 1e-12 * (0..nf).map(|i| gram[(i, i)]).sum::<f64>() / nf as f64;
    let gram = Mat::from_fn(nf, nf, |i, j| {
        gram[(i, j)] + if i == j { ridge } else { 0.0 }
    });
    if control_variate && let Ok(llt) = gram.llt(Side::Lower) {
        use faer::linalg::solvers::Solve;
        let coef = llt.solve(&rhs);
        h -= &phi * &coef;
    }
    drop(phi);
    let free = Mat::from_fn(m, kk * b, |j, c| om[(j, c / b)] * h[(j, c % b)]);
    Ok(Whitened {
        u,
        free,
        output_basis: basis,
    })
}

/// The empirical Hermite moment tensor, unfolded P x B^p: entry (a, b1 + B b2 + ...)
/// is (1/m) sum_j `f_j[a] He_p(u_j)[b1, b2, ...]`.
#[derive(Clone, Debug)]
pub struct MomentTensor {
    pub data: Mat<f64>,
    /// B, the size of each symmetric mode.
    pub dim: usize,
    /// p, the Hermite degree (number of symmetric modes).
    pub degree: usize,
}

/// Row-wise p-fold Kronecker power: row j is u_j (x) ... (x) u_j with the first
/// factor's index fastest.
fn kron_rows(u: MatRef<'_, f64>, p: usize) -> Mat<f64> {
    let (n, b) = u.shape();
    let width = b.pow(p as u32);
    Mat::from_fn(n, width, |j, c| {
        let mut c = c;
        let mut v = 1.0;
        for _ in 0..p {
            v *= u[(j, c % b)];
            c /= b;
        }
        v
    })
}

/// The moment tensors are built for Hermite degrees 1 to 3.
fn check_degree(degree: usize) -> Result<()> {
    if !(1..=3).contains(&degree) {
        return Err(Error::NotProvided {
            what: "Hermite degree",
            value: degree,
            allowed: "provided (1..=3)".into(),
        });
    }
    Ok(())
}

/// T = (1/m) sum_j f_j (x) He_p(u_j), for p in 1..=3, streaming over neuron blocks.
pub fn moment_tensor(w: &Whitened, degree: usize) -> Result<MomentTensor> {
    check_degree(degree)?;
    let (m, b) = w.u.shape();
    let pdim = w.free.ncols();
    let width = b.pow(degree as u32);
    let block = (MOMENT_BLOCK_ENTRIES / width).clamp(64, BLOCK_ROWS);
    let mut t = Mat::<f64>::zeros(pdim, width);
    let mut s0 = Col::<f64>::zeros(pdim); // sum_j f_j
    let mut s1 = Mat::<f64>::zeros(pdim, b); // sum_j f_j (x) u_j
    for start in (0..m).step_by(block) {
        let n = block.min(m - start);
        let u = w.u.subrows(start, n);
        let f = w.free.subrows(start, n);
        t += f.transpose() * kron_rows(u, degree);
        for j in 0..n {
            for a in 0..pdim {
                s0[a] += f[(j, a)];
            }
        }
        if degree == 3 {
            s1 += f.transpose() * u;
        }
    }
    // He_2(u) = u u^T - I;  He_3(u) = u^3 - (u (x) I + perms)
    match degree {
        2 => {
            for a in 0..pdim {
                for k in 0..b {
                    t[(a, k + b * k)] -= s0[a];
                }
            }
        }
        3 => {
            for a in 0..pdim {
                for x in 0..b {
                    for y in 0..b {
                        t[(a, x + b * (y + b * y))] -= s1[(a, x)];
                        t[(a, y + b * (x + b * y))] -= s1[(a, x)];
                        t[(a, y + b * (y + b * x))] -= s1[(a, x)];
                    }
                }
            }
        }
        _ => {}
    }
    let t = t * faer::Scale(1.0 / m as f64);
    Ok(MomentTensor {
        data: t,
        dim: b,
        degree,
    })
}

/// Multisets b_1 <= ... <= b_p of {0..B-1}, for p = 0..=degree, in order of p.
/// Number of multivariate Hermite features up to `degree` in `b` dimensions,
/// C(b + degree, degree): the regression's unknowns per output.
pub fn regression_features(b: usize, degree: usize) -> usize {
    (1..=degree).fold(1, |acc, q| acc * (b + q) / q)
}

fn multisets(b: usize, degree: usize) -> Vec<Vec<usize>> {
    let mut out = vec![vec![]];
    let mut level: Vec<Vec<usize>> = vec![vec![]];
    for _ in 0..degree {
        let mut next = Vec::new();
        for s in &level {
            let lo = s.last().copied().unwrap_or(0);
            for k in lo..b {
                let mut t = s.clone();
                t.push(k);
                next.push(t);
            }
        }
        out.extend(next.iter().cloned());
        level = next;
    }
    out
}

/// Multivariate Hermite entry He_p(u)[multiset] = prod_b He_{count_b}(u_b), and the
/// number of orderings of the multiset (p! / prod count_b!).
fn hermite_entry(u: &[f64], set: &[usize]) -> (f64, f64) {
    let mut v = 1.0;
    let mut mult = super::hermite::factorial(set.len());
    let mut i = 0;
    while i < set.len() {
        let mut j = i;
        while j < set.len() && set[j] == set[i] {
            j += 1;
        }
        v *= super::hermite::he(j - i, u[set[i]]);
        mult /= super::hermite::factorial(j - i);
        i = j;
    }
    (v, mult)
}

/// The degree-p Hermite tensor by regression (docs/DESIGN.md, "Regression
/// moments"): regress each free coordinate `f_j[a]` on every multivariate Hermite
/// polynomial of u_j up to degree p (normal equations G_phi = (1/m) sum phi phi^T),
/// and read the degree-p coefficients as a symmetric tensor. Same expectation as
/// [`moment_tensor`] divided by p! (Stein), but the empirical fluctuation of the
/// lower and same-degree Hermite components is projected out instead of left as noise.
pub fn regression_tensor(w: &Whitened, degree: usize) -> Result<MomentTensor> {
    check_degree(degree)?;
    let (m, b) = w.u.shape();
    let pdim = w.free.ncols();
    let sets = multisets(b, degree);
    let nf = sets.len();
    let block = (MOMENT_BLOCK_ENTRIES / nf).clamp(64, BLOCK_ROWS);
    let mut gram = Mat::<f64>::zeros(nf, nf);
    let mut cross = Mat::<f64>::zeros(pdim, nf);
    let mut mults = vec![0.0; nf];
    let mut urow = vec![0.0; b];
    for start in (0..m).step_by(block) {
        let n = block.min(m - start);
        let phi = Mat::from_fn(n, nf, |j, f| {
            for (k, u) in urow.iter_mut().enumerate() {
                *u = w.u[(start + j, k)];
            }
            let (v, mult) = hermite_entry(&urow, &sets[f]);
            mults[f] = mult;
            v
        });
        gram += phi.transpose() * &phi;
        cross += w.free.subrows(start, n).transpose() * &phi;
    }
    let llt = gram.llt(Side::Lower).map_err(|_| {
        Error::Numerical(
            "the Hermite features of the weights are collinear (too few neurons?)".into(),
        )
    })?;
    use faer::linalg::solvers::Solve;
    let coef = llt.solve(cross.transpose()).transpose().to_owned(); // P x F
    let width = b.pow(degree as u32);
    let first = sets.iter().position(|s| s.len() == degree).unwrap_or(0);
    let mut t = Mat::<f64>::zeros(pdim, width);
    for col in 0..width {
        let mut idx: Vec<usize> = (0..degree).map(|q| (col / b.pow(q as u32)) % b).collect();
        idx.sort_unstable();
        let f = first + sets[first..].iter().position(|s| *s == idx).unwrap_or(0);
        for a in 0..pdim {
            t[(a, col)] = coef[(a, f)] / mults[f];
        }
    }
    Ok(MomentTensor {
        data: t,
        dim: b,
        degree,
    })
}

impl MomentTensor {
    /// Compress the free mode to its top `rank` singular directions (a Tucker step
    /// that also drops noise outside the span of the samples' free factors).
    /// Returns the tensor and the basis (P x rank) to map factors back.
    pub fn compress(&self, rank: usize) -> Result<(MomentTensor, Mat<f64>)> {
        let p = self.data.nrows();
        if p <= rank {
            return Ok((self.clone(), Mat::identity(p, p)));
        }
        let svd = self
            .data
            .thin_svd()
            .map_err(|e| Error::Numerical(format!("SVD of the moment tensor: {e:?}")))?;
        let u = svd.U().subcols(0, rank).to_owned();
        let data = u.transpose() * &self.data;
        Ok((
            MomentTensor {
                data,
                dim: self.dim,
                degree: self.degree,
            },
            u,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attack::law::WeightLaw;
    use rand::SeedableRng;

    /// Synthetic (1) in whitened coordinates: u_j ~ N(0, I), one output with
    /// omega = 1, f_j = h~_j = sum_i r_i tanh'(u_j . e_i) e_i. The population tensor is
    /// sum_i r_i gamma_p(0, |e_i|) e_i (x) n_i^(x)p (Stein); the empirical one must
    /// agree entrywise within a few standard errors (estimated from the same draws).
    #[test]
    fn feature_count_is_the_number_of_multisets() {
        for b in 1..12 {
            for p in 1..=3 {
                assert_eq!(regression_features(b, p), multisets(b, p).len());
            }
        }
    }

    #[test]
    fn moment_tensor_matches_population() {
        use crate::attack::moment::hermite::Coefficients;
        use crate::model::Activation;
        let (m, b) = (40_000, 3);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let e = Mat::from_fn(b, b, |_, _| {
            0.7 * {
                let z: f64 = StandardNormal.sample(&mut rng);
                z
            }
        }); // columns e_i
        let r = [1.0, -0.6, 0.8];
        let act = Activation::Tanh;
        let c = Coefficients::new(act).unwrap();
        for degree in [2usize, 3] {
            let u = Mat::from_fn(m, b, |_, _| StandardNormal.sample(&mut rng));
            let h = Mat::from_fn(m, b, |j, a| {
                (0..b)
                    .map(|i| r[i] * act.d1((0..b).map(|k| u[(j, k)] * e[(k, i)]).sum()) * e[(a, i)])
                    .sum()
            });
            let w = Whitened {
                u: u.clone(),
                free: h.clone(),
                output_basis: Mat::identity(1, 1),
            };
            let t = moment_tensor(&w, degree).unwrap();
            let reg = regression_tensor(&w, degree).unwrap();
            let fact = crate::attack::moment::hermite::factorial(degree);
            let width = b.pow(degree as u32);
            // per-neuron terms for the standard error
            let he = |j: usize, col: usize| -> f64 {
                let idx: Vec<usize> = (0..degree).map(|q| (col / b.pow(q as u32)) % b).collect();
                let uu = |k: usize| u[(j, idx[k])];
                let d = |x: usize, y: usize| f64::from(idx[x] == idx[y]);
                match degree {
                    2 => uu(0) * uu(1) - d(0, 1),
                    _ => {
                        uu(0) * uu(1) * uu(2) - uu(0) * d(1, 2) - uu(1) * d(0, 2) - uu(2) * d(0, 1)
                    }
                }
            };
            let mut worst: f64 = 0.0;
            let mut worst_reg: f64 = 0.0;
            for a in 0..b {
                for col in 0..width {
                    let mut pop = 0.0;
                    for i in 0..b {
                        let s = (0..b).map(|k| e[(k, i)].powi(2)).sum::<f64>().sqrt();
                        let mut v = r[i] * c.gamma(degree, 0.0, s) * e[(a, i)];
                        let mut cc = col;
                        for _ in 0..degree {
                            v *= e[(cc % b, i)] / s;
                            cc /= b;
                        }
                        pop += v;
                    }
                    let (mut s1, mut s2) = (0.0, 0.0);
                    for j in 0..m {
                        let x = h[(j, a)] * he(j, col);
                        s1 += x;
                        s2 += x * x;
                    }
                    let mean = s1 / m as f64;
                    assert!(
                        (mean - t.data[(a, col)]).abs() < 1e-12 * (1.0 + mean.abs()),
                        "streaming sum"
                    );
                    let se = ((s2 / m as f64 - mean * mean) / m as f64).sqrt();
                    worst = worst.max((t.data[(a, col)] - pop).abs() / se);
                    // the regression estimate has the same mean (times 1/p!) and a
                    // smaller variance: the plain estimator's standard error bounds it
                    worst_reg = worst_reg.max((fact * reg.data[(a, col)] - pop).abs() / se);
                }
            }
            // b * width entries: the largest |z| of ~27-81 normals stays under 4.5 (p ~ 1e-4)
            assert!(
                worst < 4.5,
                "degree {degree}: worst deviation {worst} standard errors"
            );
        }
    }

    /// A known law projects to V^T Sigma V: compare with the sample covariance of
    /// projected draws.
    #[test]
    fn known_law_projection() {
        let (d, b, m) = (6, 3, 200_000);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let raw = Mat::from_fn(d + 1, b, |_, _| {
            let z: f64 = StandardNormal.sample(&mut rng);
            z
        });
        let v = raw.qr().compute_thin_Q();
        let law = WeightLaw::Centred {
            weight_sd: 0.4,
            xbar: 0.5,
            bias_sd: 1.0,
        };
        let rows = Mat::from_fn(m, d + 1, |_, _| 0.0f64);
        let mut rows = rows;
        for j in 0..m {
            let mut dot = 0.0;
            for k in 0..d {
                let w: f64 = 0.4 * {
                    let z: f64 = StandardNormal.sample(&mut rng);
                    z
                };
                rows[(j, k)] = w;
                dot += w;
            }
            rows[(j, d)] = -0.5 * dot + {
                let z: f64 = StandardNormal.sample(&mut rng);
                z
            };
        }
        let est = Law::estimate((&rows * &v).as_ref()).unwrap();
        let known = law.project(v.as_ref()).unwrap();
        let (dc, dm) = est.gap(&known);
        // sampling error of a covariance ~ sqrt(2 / m) ~ 3e-3
        assert!(dc < 0.02 && dm < 0.02, "covariance gap {dc}, mean gap {dm}");
    }
}
