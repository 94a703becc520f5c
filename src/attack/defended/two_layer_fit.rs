//! The two-layer joint fit from found samples, seeding the missing ones from what the
//! found leave unexplained (used by the likelihood refit in [`super`] and by the
//! reduced problem, [`super::reduced`]).

use crate::Result;

/// The two-layer joint fit from the found inputs `x_found` (one per row), seeding
/// `missing` more from the residual (and, for one missing, trying splits of each found
/// sample): the fit, how many were seeded, and the start's objective.
pub(super) fn fit_two_layer(
    tl: &crate::attack::two_layer::TwoLayer,
    x_found: faer::Mat<f64>,
    missing: usize,
    hold_found: bool,
    seed: u64,
) -> Result<(crate::attack::two_layer::Fit, usize, f64)> {
    let d = x_found.ncols();
    let mut x0 = x_found;
    let mut filled = 0;
    if missing > 0 {
        // fit the found ones, then seed the missing from what they leave unexplained
        let f0 = if hold_found {
            let r = tl.r_step(&x0, &tl.pre(&x0))?;
            crate::attack::two_layer::Fit {
                x: x0.clone(),
                r,
                iterations: 0,
                objective: 0.0,
            }
        } else {
            tl.refine(&x0, crate::attack::two_layer::gauss_newton::STEPS)?
        };
        let extra = tl.fill_missing(&f0.x, &f0.r, missing, seed);
        filled = extra.len();
        let found = f0.x.nrows();
        x0 = faer::Mat::from_fn(found + filled, d, |i, j| {
            if i < found {
                f0.x[(i, j)]
            } else {
                extra[i - found][j]
            }
        });
    }
    if !hold_found && missing == 1 && x0.nrows() >= 2 {
        // two close samples can share one zero of the span residual (a mixture
        // of both): also try splitting each found sample in two, and keep the
        // start that a few Gauss-Newton steps take lowest
        x0 = super::split::best_split(tl, x0, filled == 1, seed)?;
    }
    let start = tl.fit(&x0, 0, 0.0)?.objective;
    let n = x0.nrows();
    let fit = if hold_found && filled > 0 {
        // the found samples are exact: fit only the seeded ones around them
        // (a joint fit from there was measured to pull the exact ones off, to
        // 1e-3, on digits B = 8 prune:0.5)
        let fixed: Vec<bool> = (0..n).map(|i| i < n - filled).collect();
        tl.refine_holding(&x0, &fixed, crate::attack::two_layer::gauss_newton::STEPS)?
    } else {
        tl.refine(&x0, crate::attack::two_layer::gauss_newton::STEPS)?
    };
    Ok((fit, filled, start))
}
