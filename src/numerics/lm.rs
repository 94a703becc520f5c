//! Small dense least-squares problems (the search and refinement stages solve many of
//! them): a [`Problem`] gives its residual and Jacobian, [`solve`] forms the normal
//! equations J^T J densely and runs the crate's one Levenberg-Marquardt loop,
//! [`damped::minimise`] with the [`damped::SMALL`] policy (docs/DESIGN.md,
//! "Levenberg-Marquardt").

// `!(x > 0.0)` is deliberate throughout: it also rejects NaN.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

use faer::linalg::solvers::Solve;
use faer::{Col, Mat, Side};

use super::damped::{self, NormalEquations, Stop};

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
    /// Stop when a step improves ||e|| by less than this fraction, several times in a row
    /// ([`damped::SMALL`]'s patience).
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

/// Share of the mean diagonal of J^T J added to every diagonal entry before damping,
/// so scale-free directions stay solvable.
const DIAGONAL_FLOOR: f64 = 1e-9;

/// Result of one solve.
#[derive(Clone, Debug)]
pub struct LmResult {
    pub u: Col<f64>,
    pub iterations: usize,
}

/// Minimise ||e(u)|| from `u0` (None when the Jacobian is undefined at `u0`). Damping:
/// lambda (diag(J^T J) + `DIAGONAL_FLOOR` mean diag I), Marquardt's scaling.
pub fn solve<P: Problem>(p: &P, u0: Col<f64>, opts: &LmOptions) -> Option<LmResult> {
    let mut u = u0;
    p.normalise(&mut u);
    let jac = p.jacobian(&u)?;
    let norm = jac.0.norm_l2();
    let target = opts.target;
    let m = damped::minimise(
        &Dense(p),
        At { u, jac: Some(jac) },
        norm,
        &damped::SMALL,
        Stop {
            steps: opts.max_iterations,
            min_gain: Some(opts.stall),
            converged: |f: f64| !(f > target),
        },
    );
    Some(LmResult {
        u: m.point.u,
        iterations: m.steps,
    })
}

/// A [`Problem`] as normal equations; the objective is ||e|| (not squared).
struct Dense<'a, P>(&'a P);

/// A point, with the residual and Jacobian there when they are known already.
struct At {
    u: Col<f64>,
    jac: Option<(Col<f64>, Mat<f64>)>,
}

/// J^T J, J^T e and the mean diagonal of J^T J.
struct System {
    jtj: Mat<f64>,
    jte: Col<f64>,
    mean_diag: f64,
}

impl<P: Problem> NormalEquations for Dense<'_, P> {
    type Point = At;
    type System = System;

    fn system(&self, at: &At) -> Option<System> {
        let fresh;
        let (e, j) = match &at.jac {
            Some((e, j)) => (e, j),
            None => {
                fresh = self.0.jacobian(&at.u)?;
                (&fresh.0, &fresh.1)
            }
        };
        let jtj = j.transpose() * j;
        let jte = j.transpose() * e;
        let n = at.u.nrows();
        let mean_diag = (0..n).map(|k| jtj[(k, k)]).sum::<f64>() / n as f64;
        Some(System {
            jtj,
            jte,
            mean_diag,
        })
    }

    fn step(&self, at: &At, s: &System, lambda: f64) -> Option<At> {
        // a zero or non-finite J^T J has no step
        if !(s.mean_diag > 0.0) || !s.mean_diag.is_finite() {
            return None;
        }
        let mut a = s.jtj.clone();
        for k in 0..a.nrows() {
            a[(k, k)] += lambda * (s.jtj[(k, k)] + DIAGONAL_FLOOR * s.mean_diag);
        }
        let step = a.llt(Side::Lower).ok()?.solve(&s.jte);
        let mut u = &at.u - &step;
        self.0.normalise(&mut u);
        Some(At { u, jac: None })
    }

    fn objective(&self, at: &At) -> f64 {
        self.0
            .residual(&at.u)
            .map_or(f64::INFINITY, |e| e.norm_l2())
    }
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
