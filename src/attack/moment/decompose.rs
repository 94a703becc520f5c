//! Stage 3 of `--method tensor`: CP decomposition of the moment tensor
//! T ~ sum_r f_r (x) n_r^(x)p (one free mode, p symmetric modes, rank R = B)
//! (docs/DESIGN.md, "Decomposition").
//!
//! Start: Jennrich's simultaneous diagonalisation of two random contractions.
//! Polish: alternating least squares with one factor per mode (the data are exactly
//! symmetric in the p modes, so one MTTKRP routine serves them all).
//! Several seeded restarts; the best fit wins.

use faer::linalg::solvers::Solve;
use faer::{Col, Mat, MatRef, Side};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::Serialize;

use super::moments::MomentTensor;
use crate::attack::params::CpOptions;
use crate::{Error, Result};

/// A symmetric-in-p-modes CP model.
#[derive(Clone, Debug)]
pub struct Cp {
    /// Free factors f_r, P x R.
    pub free: Mat<f64>,
    /// Unit directions n_r (the symmetric factors, averaged), B x R.
    pub directions: Mat<f64>,
    /// ||T - model||_F / ||T||_F.
    pub residual: f64,
}

/// What the decomposition did, for the diagnostics.
#[derive(Clone, Debug, Serialize)]
pub struct CpReport {
    pub residual: f64,
    pub restarts: usize,
    /// Residual of every start, in order.
    pub start_residuals: Vec<f64>,
    pub sweeps: usize,
}

/// Khatri-Rao product of the factors: row b_1 + B b_2 + ... (first factor fastest),
/// column r, value prod_t A_t[b_t, r].
fn khatri_rao(factors: &[MatRef<'_, f64>]) -> Mat<f64> {
    let r = factors[0].ncols();
    let rows: usize = factors.iter().map(|f| f.nrows()).product();
    Mat::from_fn(rows, r, |mut i, c| {
        let mut v = 1.0;
        for f in factors {
            v *= f[(i % f.nrows(), c)];
            i /= f.nrows();
        }
        v
    })
}

/// MTTKRP on the first symmetric mode: out[b, r] = sum T[a, b, b2..] F[a,r] prod A_t[b_t, r].
/// `y` = F^T T (R x B^p) is shared by every symmetric mode of one sweep position.
fn mttkrp_sym(y: MatRef<'_, f64>, others: &[MatRef<'_, f64>], b: usize) -> Mat<f64> {
    let r = y.nrows();
    let kr = if others.is_empty() {
        Mat::from_fn(1, r, |_, _| 1.0)
    } else {
        khatri_rao(others)
    };
    let rest = kr.nrows();
    Mat::from_fn(b, r, |bi, c| {
        (0..rest).map(|q| y[(c, bi + b * q)] * kr[(q, c)]).sum()
    })
}

/// Solve X G = M for X with G symmetric positive semi-definite (a Hadamard product of
/// Gram matrices); a ridge of `RIDGE` times its mean diagonal keeps it definite.
fn solve_gram(m: Mat<f64>, g: Mat<f64>) -> Mat<f64> {
    /// Relative ridge: far below any noise level, enough to keep Cholesky alive when
    /// two columns coincide.
    const RIDGE: f64 = 1e-13;
    let r = g.nrows();
    let mean_diag = (0..r).map(|i| g[(i, i)]).sum::<f64>() / r as f64;
    let gr = Mat::from_fn(r, r, |i, j| {
        g[(i, j)]
            + if i == j {
                RIDGE * mean_diag.max(f64::MIN_POSITIVE)
            } else {
                0.0
            }
    });
    match gr.llt(Side::Lower) {
        Ok(llt) => llt.solve(m.transpose()).transpose().to_owned(),
        Err(_) => gr
            .partial_piv_lu()
            .solve(m.transpose())
            .transpose()
            .to_owned(),
    }
}

fn hadamard_grams(factors: &[&Mat<f64>]) -> Mat<f64> {
    let r = factors[0].ncols();
    let mut g = Mat::from_fn(r, r, |_, _| 1.0);
    for f in factors {
        let gf = f.transpose() * *f;
        g = Mat::from_fn(r, r, |i, j| g[(i, j)] * gf[(i, j)]);
    }
    g
}

/// Scale the columns of `a` to unit norm, multiplying the scales into `into`.
fn normalise_into(a: &mut Mat<f64>, into: &mut Mat<f64>) {
    for c in 0..a.ncols() {
        let n = a.col(c).norm_l2();
        if n > 0.0 {
            for i in 0..a.nrows() {
                a[(i, c)] /= n;
            }
            for i in 0..into.nrows() {
                into[(i, c)] *= n;
            }
        }
    }
}

/// ||T - F KR(A_1..A_p)^T||_F / ||T||_F.
fn residual(t: MatRef<'_, f64>, f: &Mat<f64>, sym: &[Mat<f64>]) -> f64 {
    let refs: Vec<MatRef<'_, f64>> = sym.iter().map(|a| a.as_ref()).collect();
    let model = f * khatri_rao(&refs).transpose();
    (t - &model).norm_l2() / t.norm_l2().max(f64::MIN_POSITIVE)
}

/// Jennrich: contract the free mode with xi_1, xi_2 and symmetric modes beyond the
/// second with eta; M_s = N diag(.) N^T, so the eigenvectors of M_1 M_2^{-1} are the n_r.
fn jennrich(t: &MomentTensor, rank: usize, rng: &mut impl Rng) -> Result<Mat<f64>> {
    let (b, p) = (t.dim, t.degree);
    let pdim = t.data.nrows();
    let mut contract = || -> Mat<f64> {
        let xi = Col::<f64>::from_fn(pdim, |_| StandardNormal.sample(rng));
        let v = t.data.transpose() * &xi; // B^p
        let eta = Col::<f64>::from_fn(b, |_| StandardNormal.sample(rng));
        // contract modes 3..p with eta
        let mut cur: Vec<f64> = v.iter().copied().collect();
        let mut modes = p;
        while modes > 2 {
            let inner = b.pow(modes as u32 - 1);
            cur = (0..inner)
                .map(|i| (0..b).map(|k| cur[i + inner * k] * eta[k]).sum())
                .collect();
            modes -= 1;
        }
        if p == 1 {
            // one symmetric mode: no matrix to diagonalise; callers use random starts
            return Mat::from_fn(b, 1, |i, _| cur[i]);
        }
        Mat::from_fn(b, b, |i, j| 0.5 * (cur[i + b * j] + cur[j + b * i]))
    };
    let m1 = contract();
    let m2 = contract();
    if p == 1 {
        return Ok(Mat::from_fn(b, rank, |_, _| StandardNormal.sample(rng)));
    }
    let x = m2.partial_piv_lu().solve(&m1).transpose().to_owned(); // (M2^{-1} M1)^T = M1 M2^{-1}
    let evd = x
        .eigen()
        .map_err(|e| Error::Numerical(format!("Jennrich eigenproblem: {e:?}")))?;
    let u = evd.U();
    let mut n = Mat::from_fn(b, rank.min(b), |i, c| u[(i, c)].re);
    for c in 0..n.ncols() {
        let norm = n.col(c).norm_l2();
        if norm > 0.0 && norm.is_finite() {
            for i in 0..b {
                n[(i, c)] /= norm;
            }
        } else {
            for i in 0..b {
                n[(i, c)] = StandardNormal.sample(rng);
            }
        }
    }
    Ok(n)
}

/// ALS from symmetric start `n` (B x R): returns free factor, symmetric factors, sweeps.
fn als(t: &MomentTensor, n: Mat<f64>, opts: &CpOptions) -> (Mat<f64>, Vec<Mat<f64>>, f64, usize) {
    let (b, p) = (t.dim, t.degree);
    let data = t.data.as_ref();
    let mut sym: Vec<Mat<f64>> = vec![n; p];
    let solve_free = |sym: &[Mat<f64>]| -> Mat<f64> {
        let refs: Vec<MatRef<'_, f64>> = sym.iter().map(|a| a.as_ref()).collect();
        let mk = data * khatri_rao(&refs);
        solve_gram(mk, hadamard_grams(&sym.iter().collect::<Vec<_>>()))
    };
    let mut f = solve_free(&sym);
    let mut res = residual(data, &f, &sym);
    let mut sweeps = 0;
    for _ in 0..opts.max_sweeps {
        sweeps += 1;
        for s in 0..p {
            let y = f.transpose() * data; // R x B^p
            let others: Vec<MatRef<'_, f64>> = (0..p)
                .filter(|&q| q != s)
                .map(|q| sym[q].as_ref())
                .collect();
            let mk = mttkrp_sym(y.as_ref(), &others, b);
            let mut grams: Vec<&Mat<f64>> = vec![&f];
            grams.extend((0..p).filter(|&q| q != s).map(|q| &sym[q]));
            let mut a = solve_gram(mk, hadamard_grams(&grams));
            normalise_into(&mut a, &mut f);
            sym[s] = a;
            // keep F in scale with the new unit column (its norm went into F)
        }
        f = solve_free(&sym);
        let new = residual(data, &f, &sym);
        let done =
            (res - new).abs() <= opts.tol * res.max(f64::MIN_POSITIVE) || new < 1e3 * f64::EPSILON;
        res = new;
        if done || !res.is_finite() {
            break;
        }
    }
    (f, sym, res, sweeps)
}

/// Average the p symmetric factors column by column (signs aligned with the first),
/// to unit norm.
fn directions(sym: &[Mat<f64>]) -> Mat<f64> {
    let (b, r) = sym[0].shape();
    let mut n = Mat::<f64>::zeros(b, r);
    for c in 0..r {
        for a in sym {
            let dot: f64 = (0..b).map(|i| a[(i, c)] * sym[0][(i, c)]).sum();
            let s = if dot < 0.0 { -1.0 } else { 1.0 };
            let norm = a.col(c).norm_l2().max(f64::MIN_POSITIVE);
            for i in 0..b {
                n[(i, c)] += s * a[(i, c)] / norm;
            }
        }
        let norm = n.col(c).norm_l2().max(f64::MIN_POSITIVE);
        for i in 0..b {
            n[(i, c)] /= norm;
        }
    }
    n
}

/// Rank-`rank` symmetric CP of the moment tensor: best of `opts.restarts` Jennrich starts.
pub fn decompose(
    t: &MomentTensor,
    rank: usize,
    opts: &CpOptions,
    rng: &mut impl Rng,
) -> Result<(Cp, CpReport)> {
    if rank == 0 || rank > t.dim {
        return Err(Error::NotProvided {
            what: "CP rank",
            value: rank,
            allowed: format!("in 1..={}", t.dim),
        });
    }
    if !t.data.norm_l2().is_finite() || t.data.norm_l2() == 0.0 {
        return Err(Error::Numerical(
            "the moment tensor is zero or not finite".into(),
        ));
    }
    let mut best: Option<Cp> = None;
    let mut starts = Vec::new();
    let mut sweeps_total = 0;
    for _ in 0..opts.restarts.max(1) {
        let n0 = jennrich(t, rank, rng)?;
        let (f, sym, res, sweeps) = als(t, n0, opts);
        sweeps_total += sweeps;
        starts.push(res);
        if res.is_finite() && best.as_ref().is_none_or(|b| res < b.residual) {
            let n = directions(&sym);
            // re-fit the free factor with the symmetric directions
            let nsym = vec![n.clone(); t.degree];
            let refs: Vec<MatRef<'_, f64>> = nsym.iter().map(|a| a.as_ref()).collect();
            let mk = t.data.as_ref() * khatri_rao(&refs);
            let free = solve_gram(mk, hadamard_grams(&nsym.iter().collect::<Vec<_>>()));
            let res_sym = residual(t.data.as_ref(), &free, &nsym);
            let _ = f;
            best = Some(Cp {
                free,
                directions: n,
                residual: res_sym.max(res),
            });
        }
    }
    let best = best.ok_or_else(|| Error::Numerical("every CP start diverged".into()))?;
    let report = CpReport {
        residual: best.residual,
        restarts: opts.restarts.max(1),
        start_residuals: starts,
        sweeps: sweeps_total,
    };
    Ok((best, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn planted(pdim: usize, b: usize, p: usize, seed: u64) -> (MomentTensor, Mat<f64>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n = Mat::from_fn(b, b, |_, _| {
            let z: f64 = StandardNormal.sample(&mut rng);
            z
        });
        let mut n = n;
        let mut dummy = Mat::zeros(0, b);
        normalise_into(&mut n, &mut dummy);
        let f = Mat::from_fn(pdim, b, |_, _| {
            let z: f64 = StandardNormal.sample(&mut rng);
            z
        });
        let refs: Vec<MatRef<'_, f64>> = (0..p).map(|_| n.as_ref()).collect();
        let data = &f * khatri_rao(&refs).transpose();
        (
            MomentTensor {
                data,
                dim: b,
                degree: p,
            },
            n,
        )
    }

    /// Largest distance between recovered and planted unit directions (sign-free),
    /// matched greedily; min(|a - b|, |a + b|) keeps full precision near zero.
    fn worst_sine(got: &Mat<f64>, want: &Mat<f64>) -> f64 {
        let r = want.ncols();
        let mut used = vec![false; r];
        let mut worst: f64 = 0.0;
        for c in 0..r {
            let (k, cos) = (0..r)
                .filter(|&k| !used[k])
                .map(|k| {
                    let dm: f64 = (0..want.nrows())
                        .map(|i| (got[(i, k)] - want[(i, c)]).powi(2))
                        .sum();
                    let dp: f64 = (0..want.nrows())
                        .map(|i| (got[(i, k)] + want[(i, c)]).powi(2))
                        .sum();
                    (k, dm.min(dp).sqrt())
                })
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .unwrap();
            used[k] = true;
            worst = worst.max(cos);
        }
        worst
    }

    /// Exact planted tensors (orders 3 and 4, free mode wider than B) are recovered
    /// to near machine precision: the residual and direction errors scale with eps
    /// times the conditioning of the random factors (bounded by ~1e4 here).
    #[test]
    fn recovers_planted_low_rank() {
        for (pdim, b, p, seed) in [(6, 6, 2, 1), (12, 8, 2, 2), (5, 5, 3, 3), (4, 4, 1, 4)] {
            let (t, n) = planted(pdim, b, p, seed);
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed + 100);
            let opts = CpOptions {
                restarts: if p == 1 { 20 } else { 3 },
                ..Default::default()
            };
            let (cp, rep) = decompose(&t, b, &opts, &mut rng).unwrap();
            if p == 1 {
                // a matrix has no unique rank decomposition: only the fit is checked
                assert!(cp.residual < 1e-10, "matrix fit {}", cp.residual);
                continue;
            }
            assert!(
                cp.residual < 1e-10,
                "p={p} B={b}: residual {} ({rep:?})",
                cp.residual
            );
            let s = worst_sine(&cp.directions, &n);
            assert!(s < 1e-9, "p={p} B={b}: direction error {s}");
        }
    }

    /// Noise of size eps on the tensor moves the directions by O(eps) (times the
    /// conditioning): the decomposition is stable, not just exact.
    #[test]
    fn stable_under_small_noise() {
        let (mut t, n) = planted(8, 8, 2, 9);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(77);
        let scale = t.data.norm_l2() / ((t.data.nrows() * t.data.ncols()) as f64).sqrt();
        let eps = 1e-4;
        for i in 0..t.data.nrows() {
            for j in 0..t.data.ncols() {
                let z: f64 = StandardNormal.sample(&mut rng);
                t.data[(i, j)] += eps * scale * z;
            }
        }
        // keep the symmetric modes symmetric, as in the real moment tensor
        let b = 8;
        for i in 0..t.data.nrows() {
            for x in 0..b {
                for y in 0..x {
                    let v = 0.5 * (t.data[(i, x + b * y)] + t.data[(i, y + b * x)]);
                    t.data[(i, x + b * y)] = v;
                    t.data[(i, y + b * x)] = v;
                }
            }
        }
        let (cp, _) = decompose(&t, b, &CpOptions::default(), &mut rng).unwrap();
        let s = worst_sine(&cp.directions, &n);
        assert!(s < 1e-2, "direction error {s} for relative noise {eps}");
    }
}
