//! The one Levenberg-Marquardt loop of the crate (docs/DESIGN.md, "Levenberg-Marquardt"):
//! a problem states its normal equations at a point and solves them damped;
//! [`minimise`] accepts a step when the objective falls and moves the damping by a
//! [`Policy`]: [`LARGE`] for the large fits (the two-layer likelihood fit, the labelled
//! joint fit, the E-step fit), [`SMALL`] for the small dense problems of the searches
//! ([`crate::numerics::lm`]).

// `!(x > y)` is deliberate: it also stops on NaN.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

/// How the damping moves, and when slow progress stops the fit.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// Damping of the first step.
    pub initial: f64,
    /// The damping is divided by this after an accepted step ...
    pub decrease: f64,
    /// ... and never falls below this.
    pub min: f64,
    /// The damping is multiplied by this after a rejected step ...
    pub increase: f64,
    /// ... and by this after a failed solve.
    pub increase_failed: f64,
    /// Dampings tried per step before the fit counts as stalled ...
    pub tries: usize,
    /// ... or once the damping reaches this (no step can help: the problem is flat here).
    pub max: f64,
    /// Accepted steps in a row with a gain under `min_gain` before the fit stops.
    pub patience: usize,
}

/// The large fits: many unknowns, each solve costly, so few tries per step and a stop
/// at the first slow step.
pub const LARGE: Policy = Policy {
    initial: 1e-4,
    decrease: 3.0,
    min: 1e-12,
    increase: 8.0,
    increase_failed: 8.0,
    tries: 8,
    max: f64::INFINITY,
    patience: 1,
};

/// The small dense problems of the searches ([`crate::numerics::lm`], damping relative
/// to diag(J^T J)): solves are cheap and starts rough, so the damping may grow by small
/// factors until nothing can help, and a fit stops only after several slow steps (the
/// span search and the refinements were tuned with these).
pub const SMALL: Policy = Policy {
    initial: 1e-3,
    decrease: 3.0,
    min: 1e-12,
    increase: 4.0,
    increase_failed: 10.0,
    tries: usize::MAX,
    max: 1e12,
    patience: 4,
};

/// A least-squares problem in the form Levenberg-Marquardt needs.
pub trait NormalEquations {
    /// Where the fit is (the unknowns and whatever the objective cached there).
    type Point;
    /// The normal equations (or what gives their products) at a point.
    type System;
    /// The normal equations at `at` (None where there are none: the fit stops there).
    fn system(&self, at: &Self::Point) -> Option<Self::System>;
    /// The point one step from `at` solving the equations damped by `lambda` (None when
    /// the solve fails: the damping grows by [`Policy::increase_failed`]).
    fn step(&self, at: &Self::Point, sys: &Self::System, lambda: f64) -> Option<Self::Point>;
    /// The objective at a point (non-finite: rejected).
    fn objective(&self, at: &Self::Point) -> f64;
}

/// When [`minimise`] stops (besides a stall).
#[derive(Clone, Copy, Debug)]
pub struct Stop<C> {
    /// Steps at most.
    pub steps: usize,
    /// An accepted step lowering the objective by less than this fraction is slow;
    /// [`Policy::patience`] slow steps in a row stop the fit.
    pub min_gain: Option<f64>,
    /// No step is started once `converged(f)`.
    pub converged: C,
}

/// Where [`minimise`] ended.
#[derive(Debug)]
pub struct Minimum<P> {
    pub point: P,
    pub objective: f64,
    /// Steps started.
    pub steps: usize,
    /// The last step found no lower objective before the policy gave up.
    pub stalled: bool,
}

/// Levenberg-Marquardt from `start` (objective `f0`) under `policy` until `stop`.
pub fn minimise<N: NormalEquations, C: Fn(f64) -> bool>(
    n: &N,
    start: N::Point,
    f0: f64,
    policy: &Policy,
    stop: Stop<C>,
) -> Minimum<N::Point> {
    let (mut at, mut f) = (start, f0);
    let mut lambda = policy.initial;
    let (mut done, mut stalled, mut slow) = (0, false, 0);
    while done < stop.steps && !(stop.converged)(f) {
        let Some(sys) = n.system(&at) else { break };
        done += 1;
        let mut moved = None;
        let mut tries = 0;
        while tries < policy.tries && lambda < policy.max {
            tries += 1;
            let Some(cand) = n.step(&at, &sys, lambda) else {
                lambda *= policy.increase_failed;
                continue;
            };
            let fc = n.objective(&cand);
            if fc.is_finite() && fc < f {
                let gain = (f - fc) / f.max(f64::MIN_POSITIVE);
                (at, f) = (cand, fc);
                lambda = (lambda / policy.decrease).max(policy.min);
                moved = Some(gain);
                break;
            }
            lambda *= policy.increase;
        }
        let Some(gain) = moved else {
            stalled = true;
            break;
        };
        slow = match stop.min_gain {
            Some(g) if !(gain > g) => slow + 1,
            _ => 0,
        };
        if slow >= policy.patience {
            break;
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
        fn system(&self, _: &[f64; 2]) -> Option<()> {
            Some(())
        }
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
        let stop = Stop {
            steps: 50,
            min_gain: None,
            converged: |f: f64| f <= 1e-28,
        };
        let m = minimise(&Quadratic, [0.0, 0.0], f0, &LARGE, stop);
        assert!((m.point[0] - 1.0).abs() < 1e-14 && (m.point[1] - 1.0).abs() < 1e-14);
        assert!(m.objective <= 1e-28 || m.stalled, "{m:?}");
        assert!(m.steps < 50);
    }

    /// A problem whose every step goes uphill stalls after one step of `tries` dampings.
    struct Uphill;
    impl NormalEquations for Uphill {
        type Point = f64;
        type System = ();
        fn system(&self, _: &f64) -> Option<()> {
            Some(())
        }
        fn step(&self, u: &f64, _: &(), _: f64) -> Option<f64> {
            Some(u + 1.0)
        }
        fn objective(&self, u: &f64) -> f64 {
            u * u
        }
    }

    #[test]
    fn uphill_steps_stall() {
        let stop = Stop {
            steps: 10,
            min_gain: Some(1e-9),
            converged: |_| false,
        };
        let m = minimise(&Uphill, 1.0, 1.0, &LARGE, stop);
        assert!(m.stalled);
        assert_eq!((m.steps, m.point), (1, 1.0));
    }
}
