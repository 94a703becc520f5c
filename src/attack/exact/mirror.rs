//! Near-mirror zeros under noise (docs/DESIGN.md, "Noise"). With tanh (act' even) and
//! small first-layer biases, z(-x) ~ -z(x), so the signal of a sample x_j is nearly
//! that of an input pointing the other way: a span zero whose F is under the noise
//! floor but far above what noise gives a true sample with that signal
//! (`Acceptance::off_the_noise`). Its signal is still (nearly) x_j's, and the
//! first-layer gradient is linear in the inputs once the signals are fixed:
//! G~ V = sum_i s_i c_i^T, so C^T = S^+ G~ V with S the found samples' signals and the
//! rejected zero's gives a start at x_j itself, polished and judged like any zero.

use faer::linalg::solvers::Solve;
use faer::{Col, Mat, Side};

use super::accept::{Acceptance, Verdict};
use super::problem::SpanProblem;
use super::search::{DUPLICATE_TOL, degenerate, polish_options};
use super::signal::SignalModel;
use super::zero::{Zero, pack, rel_dist};
use crate::attack::subspace::Subspace;
use crate::numerics::lm;

/// Coordinates c (bias coordinate 1) of the input that, with signal `s` and the
/// `found` samples' signals, best explains the projected gradient; None when the
/// fit's bias coordinate vanishes or the signals are dependent.
fn input_for_signal(
    model: &SignalModel,
    sub: &Subspace,
    found: &[Zero],
    s: &Col<f64>,
) -> Option<Col<f64>> {
    let m = model.width();
    let all: Vec<usize> = (0..m).collect();
    let q = found.len() + 1;
    let mut sm = Mat::<f64>::zeros(m, q);
    for (i, z) in found.iter().enumerate() {
        let si = model.signal_matrix(&z.c, &all) * &z.r;
        sm.col_mut(i).copy_from(&si);
    }
    sm.col_mut(q - 1).copy_from(s);
    let sts = sm.transpose() * &sm;
    let rhs = sm.transpose() * sub.projected_gradient();
    let ct = sts.llt(Side::Lower).ok()?.solve(&rhs);
    let b = sub.batch;
    let c = Col::from_fn(b, |k| ct[(q - 1, k)]);
    let bias: f64 = (0..b).map(|k| sub.v[(sub.v.nrows() - 1, k)] * c[k]).sum();
    (bias.abs() > 1e-12 * c.norm_l2() && bias.is_finite()).then(|| c * (1.0 / bias))
}

/// Try each rejected near-mirror zero's signal as a missing sample's: restart from the
/// input that signal explains, polish on the kept neurons, keep what passes the
/// acceptance. Returns how many zeros were added to `zeros` (and their x to `found_x`).
pub(crate) fn recover(
    model: &SignalModel,
    sub: &Subspace,
    acc: &Acceptance,
    bound: Option<(f64, f64)>,
    rejected: &[Zero],
    zeros: &mut Vec<Zero>,
    found_x: &mut Vec<Vec<f64>>,
) -> usize {
    let before = zeros.len();
    let full = SpanProblem {
        model,
        neurons: &acc.kept,
        found: Vec::new(),
        rho: 0.0,
        bound,
        signals: None,
    };
    let all: Vec<usize> = (0..model.width()).collect();
    // polish from (c0, r0) on the kept neurons and judge; the zero when kept
    let attempt = |c0: &Col<f64>, r0: &Col<f64>, found_x: &[Vec<f64>]| -> Option<Zero> {
        let u0 = pack(model, c0, r0);
        let u = lm::solve(&full, u0.clone(), &polish_options(true)).map_or(u0, |p| p.u);
        let f = full.span_residual(&u)?;
        let (tv, rv) = full.split(&u);
        let cz = model.coords.c_of_t(&tv);
        if degenerate(model, &cz) {
            return None;
        }
        let x = model.coords.x_of_c(&cz);
        if found_x.iter().any(|y| rel_dist(&x, y) < DUPLICATE_TOL) {
            return None;
        }
        let verdict = acc.judge(&cz, &rv, f);
        if std::env::var("GL_DEBUG").is_ok() {
            eprintln!(
                "mirror: start {:.3e} from the rejected -> F {f:.3e} pred {:?} {verdict:?}",
                rel_dist(&model.coords.x_of_c(c0), &x),
                acc.predicted_noise_residual(&cz, &rv),
            );
        }
        (verdict != Verdict::Rejected).then_some(Zero {
            c: cz,
            r: rv,
            residual: f,
            exact: verdict == Verdict::Exact,
        })
    };
    for w in rejected {
        if zeros.len() >= model.batch() {
            break;
        }
        // starts: the mirror image -x_w (z(-x) ~ -z(x): the same signal), then the
        // input the rejected zero's signal explains in the gradient
        let xw: Vec<f64> = model.coords.x_of_c(&w.c).iter().map(|v| -v).collect();
        let mut starts = vec![model.coords.c_of_x(&xw)];
        let s = model.signal_matrix(&w.c, &all) * &w.r;
        starts.extend(input_for_signal(model, sub, zeros, &s));
        for c0 in &starts {
            if let Some(z) = attempt(c0, &w.r, found_x) {
                found_x.push(model.coords.x_of_c(&z.c));
                zeros.push(z);
                break;
            }
        }
    }
    zeros.len() - before
}
