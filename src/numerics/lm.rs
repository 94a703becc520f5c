//! Levenberg-Marquardt for small dense least-squares problems (the search and
//! refinement stages solve many of them; docs/DESIGN.md, "Levenberg-Marquardt").

// `!(x > 0.0)` is deliberate throughout: it also rejects NaN.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

use faer::linalg::solvers::Solve;
use faer::{Col, Mat, Side};

/// A nonlinear least-squares problem min_u ||e(u)||^2.
pub trait Problem {
    /// Residual e(u).
    fn residual(&self, u: &Col<f64>) -> Option<Col<f64>>;
    /// Residual and Jacobian de/du at u (None where the model is undefined).
    fn jacobian(&self, u: &Col<f64>) -> Option<(Col<f64>, Mat<f64>)>;
    /// Map u back onto the problem's manifold after a step (e.g. renormalise a
    /// scale-free block). The residual must not change.
    fn normalise(&self, _u: &mut Col<f64>) {}
}

/// Stopping rules.
#[derive(Clone, Copy, Debug)]
pub struct LmOptions {
    pub max_iterations: usize,
    /// Stop once ||e|| falls below this.
    pub target: f64,
    /// Stop when a step improves ||e|| by less than this fraction, several times in a row.
    pub stall: f64,
}

impl Default for LmOptions {
    fn default() -> Self {
        LmOptions {
            max_iterations: 60,
            target: 0.0,
            stall: 1e-6,
        }
    }
}

/// Initial damping relative to the mean diagonal of J^T J.
const INITIAL_DAMPING: f64 = 1e-3;
/// Damping beyond which no step can help (the problem is flat here).
const MAX_DAMPING: f64 = 1e12;
/// Consecutive stalled iterations before giving up.
const STALL_PATIENCE: usize = 4;

/// Result of one solve.
#[derive(Clone, Debug)]
pub struct LmResult {
    pub u: Col<f64>,
    pub iterations: usize,
}

/// Minimise ||e(u)|| from `u0`. Damping: lambda (diag(J^T J) + mean diag * 1e-9 I)
/// (Marquardt's scaling with a floor so scale-free directions stay solvable).
pub fn solve<P: Problem>(p: &P, u0: Col<f64>, opts: &LmOptions) -> Option<LmResult> {
    let mut u = u0;
    p.normalise(&mut u);
    let (mut e, mut j) = p.jacobian(&u)?;
    let mut norm = e.norm_l2();
    let mut lambda = INITIAL_DAMPING;
    let mut stalled = 0;
    let n = u.nrows();
    let mut it = 0;
    while it < opts.max_iterations && norm > opts.target {
        it += 1;
        let jtj = j.transpose() * &j;
        let jte = j.transpose() * &e;
        let mean_diag = (0..n).map(|k| jtj[(k, k)]).sum::<f64>() / n as f64;
        if !(mean_diag > 0.0) || !mean_diag.is_finite() {
            break;
        }
        let mut improved = false;
        while lambda < MAX_DAMPING {
            let mut a = jtj.clone();
            for k in 0..n {
                a[(k, k)] += lambda * (jtj[(k, k)] + 1e-9 * mean_diag);
            }
            let step = match a.llt(Side::Lower) {
                Ok(ch) => ch.solve(&jte),
                Err(_) => {
                    lambda *= 10.0;
                    continue;
                }
            };
            let mut cand = &u - &step;
            p.normalise(&mut cand);
            if let Some(ec) = p.residual(&cand) {
                let nc = ec.norm_l2();
                if nc.is_finite() && nc < norm {
                    stalled = if nc > norm * (1.0 - opts.stall) {
                        stalled + 1
                    } else {
                        0
                    };
                    u = cand;
                    norm = nc;
                    lambda = (lambda / 3.0).max(1e-12);
                    improved = true;
                    break;
                }
            }
            lambda *= 4.0;
        }
        if !improved || stalled >= STALL_PATIENCE {
            break;
        }
        match p.jacobian(&u) {
            Some((ee, jj)) => {
                e = ee;
                j = jj;
            }
            None => break,
        }
    }
    Some(LmResult { u, iterations: it })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rosenbrock as least squares: e = (10 (u1 - u0^2), 1 - u0), zero at (1, 1).
    struct Rosen;
    impl Problem for Rosen {
        fn residual(&self, u: &Col<f64>) -> Option<Col<f64>> {
            Some(Col::from_fn(2, |k| {
                if k == 0 {
                    10.0 * (u[1] - u[0] * u[0])
                } else {
                    1.0 - u[0]
                }
            }))
        }
        fn jacobian(&self, u: &Col<f64>) -> Option<(Col<f64>, Mat<f64>)> {
            let j = Mat::from_fn(2, 2, |r, c| match (r, c) {
                (0, 0) => -20.0 * u[0],
                (0, 1) => 10.0,
                (1, 0) => -1.0,
                _ => 0.0,
            });
            Some((self.residual(u)?, j))
        }
    }

    #[test]
    fn solves_rosenbrock_to_working_precision() {
        let r = solve(
            &Rosen,
            Col::from_fn(2, |k| if k == 0 { -1.2 } else { 1.0 }),
            &LmOptions {
                max_iterations: 200,
                target: 1e-14,
                stall: 0.0,
            },
        )
        .unwrap();
        assert!(
            (r.u[0] - 1.0).abs() < 1e-10 && (r.u[1] - 1.0).abs() < 1e-10,
            "{:?}",
            r
        );
    }
}
