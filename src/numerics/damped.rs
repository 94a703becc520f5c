//! The Levenberg-Marquardt loop of the large fits (the two-layer likelihood fit, the
//! labelled joint fit, the E-step fit): a problem states its normal equations at a
//! point and solves them damped; [`minimise`] accepts a step when the objective falls
//! and moves the damping by one policy ([`INITIAL`], [`DECREASE`], [`INCREASE`],
//! [`MIN`], [`TRIES`]).

// `!(x > y)` is deliberate: it also stops on NaN.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

/// Damping of the first step.
pub const INITIAL: f64 = 1e-4;
/// The damping is divided by this after an accepted step ...
pub const DECREASE: f64 = 3.0;
/// ... and never falls below this.
pub const MIN: f64 = 1e-12;
/// The damping is multiplied by this after a rejected step (or a failed solve).
pub const INCREASE: f64 = 8.0;
/// Damping increases tried per step before the fit counts as stalled.
pub const TRIES: usize = 8;

/// A least-squares problem in the form Levenberg-Marquardt needs.
pub trait NormalEquations {
    /// Where the fit is (the unknowns and whatever the objective cached there).
    type Point;
    /// The normal equations (or what gives their products) at a point.
    type System;
    /// The normal equations at `at`.
    fn system(&self, at: &Self::Point) -> Self::System;
    /// The point one step from `at` solving the equations damped by `lambda` (None when
    /// the solve fails: it counts as a rejected step).
    fn step(&self, at: &Self::Point, sys: &Self::System, lambda: f64) -> Option<Self::Point>;
    /// The objective at a point (non-finite: rejected).
    fn objective(&self, at: &Self::Point) -> f64;
}

/// Where [`minimise`] ended.
#[derive(Debug)]
pub struct Minimum<P> {
    pub point: P,
    pub objective: f64,
    /// Steps started.
    pub steps: usize,
    /// The last step found no lower objective in [`TRIES`] dampings.
    pub stalled: bool,
}

/// Levenberg-Marquardt from `start` (objective `f0`), at most `steps` steps, none
/// started once `converged(f)`; after an accepted step that lowers the objective by
/// less than the fraction `min_gain` (when given) it stops too.
pub fn minimise<N: NormalEquations>(
    n: &N,
    start: N::Point,
    f0: f64,
    steps: usize,
    min_gain: Option<f64>,
    converged: impl Fn(f64) -> bool,
) -> Minimum<N::Point> {
    let (mut at, mut f) = (start, f0);
    let mut lambda = INITIAL;
    let (mut done, mut stalled) = (0, false);
    while done < steps && !converged(f) {
        done += 1;
        let sys = n.system(&at);
        let mut moved = None;
        for _ in 0..TRIES {
            if let Some(cand) = n.step(&at, &sys, lambda) {
                let fc = n.objective(&cand);
                if fc.is_finite() && fc < f {
                    let gain = (f - fc) / f.max(f64::MIN_POSITIVE);
                    (at, f) = (cand, fc);
                    lambda = (lambda / DECREASE).max(MIN);
                    moved = Some(gain);
                    break;
                }
            }
            lambda *= INCREASE;
        }
        match moved {
            None => {
                stalled = true;
                break;
            }
            Some(gain) if min_gain.is_some_and(|g| !(gain > g)) => break,
            Some(_) => {}
        }
    }
    Minimum {
        point: at,
        objective: f,
        steps: done,
        stalled,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// min ||A u - b||^2 with A = diag(1, 10): one undamped step solves it; damped
    /// steps approach it geometrically.
    struct Quadratic;
    impl NormalEquations for Quadratic {
        type Point = [f64; 2];
        type System = ();
        fn system(&self, _: &[f64; 2]) {}
        fn step(&self, u: &[f64; 2], _: &(), lambda: f64) -> Option<[f64; 2]> {
            // normal matrix diag(1, 100), gradient A^T (A u - b), b = (1, 10)
            let g = [u[0] - 1.0, 100.0 * u[1] - 100.0];
            Some([
                u[0] - g[0] / (1.0 + lambda),
                u[1] - g[1] / (100.0 * (1.0 + lambda)),
            ])
        }
        fn objective(&self, u: &[f64; 2]) -> f64 {
            (u[0] - 1.0).powi(2) + (10.0 * u[1] - 10.0).powi(2)
        }
    }

    #[test]
    fn converges_on_a_quadratic_and_counts_its_steps() {
        let f0 = Quadratic.objective(&[0.0, 0.0]);
        let m = minimise(&Quadratic, [0.0, 0.0], f0, 50, None, |f| f <= 1e-28);
        assert!((m.point[0] - 1.0).abs() < 1e-14 && (m.point[1] - 1.0).abs() < 1e-14);
        assert!(m.objective <= 1e-28 || m.stalled, "{m:?}");
        assert!(m.steps < 50);
    }

    /// A problem whose every step goes uphill stalls after one step of TRIES dampings.
    struct Uphill;
    impl NormalEquations for Uphill {
        type Point = f64;
        type System = ();
        fn system(&self, _: &f64) {}
        fn step(&self, u: &f64, _: &(), _: f64) -> Option<f64> {
            Some(u + 1.0)
        }
        fn objective(&self, u: &f64) -> f64 {
            u * u
        }
    }

    #[test]
    fn uphill_steps_stall() {
        let m = minimise(&Uphill, 1.0, 1.0, 10, Some(1e-9), |_| false);
        assert!(m.stalled);
        assert_eq!((m.steps, m.point), (1, 1.0));
    }
}
