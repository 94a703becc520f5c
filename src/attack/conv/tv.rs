//! The total-variation fill of the pixels' free directions (docs/DESIGN.md, "Pixels:
//! the conv stage", "TV fill"): from a solution of the pixel layer's equations A x = b,
//! descend the smoothed total variation of x along its projection on the null space
//! of A, so every step keeps A x (the equations) and lowers TV. A stated prior, never
//! exact: it only chooses among the images the gradient cannot tell apart.

// `!(x > 0.0)` is deliberate: it also stops on NaN.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

use crate::numerics::cgls::{self, LinearMap};

/// Smoothing of |grad x| in TV_eps (pixels in [0, 1]: a 1 % step is already in the
/// linear part).
pub const SMOOTHING: f64 = 1e-2;
/// CGLS stops the null-space projection when ||A^T r|| is this share of ||A^T A g||.
pub const PROJECTION_TOLERANCE: f64 = 1e-10;
/// Armijo's sufficient-decrease constant.
const ARMIJO: f64 = 1e-4;
/// Halvings one line search may spend before the fill stops.
const MAX_HALVINGS: usize = 30;

/// Budgets of the fill.
#[derive(Clone, Copy, Debug)]
pub struct TvOptions {
    /// Projected descent steps.
    pub iterations: usize,
    /// CGLS steps per projection at most.
    pub cgls_iterations: usize,
}

/// Images of a batch: B x (C H W), row by row, C, H, W order.
#[derive(Clone, Copy, Debug)]
pub struct Images {
    pub batch: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

/// What the fill reached.
#[derive(Clone, Debug)]
pub struct TvFill {
    pub x: Vec<f64>,
    /// TV_eps of the start and of the result.
    pub tv_start: f64,
    pub tv_end: f64,
    /// ||A x - b|| / ||b|| of the start and of the result.
    pub residual_start: f64,
    pub residual_end: f64,
    pub iterations: usize,
}

/// TV_eps(x) = sum over samples, channels and pixels of
/// `sqrt((x[i+1,j] - x[i,j])^2 + (x[i,j+1] - x[i,j])^2 + eps^2)`, forward differences,
/// zero past the last row and column; and its gradient.
pub fn total_variation(x: &[f64], im: Images, eps: f64) -> (f64, Vec<f64>) {
    let (h, w) = (im.h, im.w);
    let mut g = vec![0.0; x.len()];
    let mut tv = 0.0;
    for plane in 0..im.batch * im.c {
        let o = plane * h * w;
        for i in 0..h {
            for j in 0..w {
                let k = o + i * w + j;
                let dy = if i + 1 < h { x[k + w] - x[k] } else { 0.0 };
                let dx = if j + 1 < w { x[k + 1] - x[k] } else { 0.0 };
                let n = (dy * dy + dx * dx + eps * eps).sqrt();
                tv += n;
                let (gy, gx) = (dy / n, dx / n);
                if i + 1 < h {
                    g[k + w] += gy;
                    g[k] -= gy;
                }
                if j + 1 < w {
                    g[k + 1] += gx;
                    g[k] -= gx;
                }
            }
        }
    }
    (tv, g)
}

fn residual<A: LinearMap>(eq: &A, b: &[f64], x: &[f64]) -> f64 {
    let ax = eq.apply(x);
    let nb = b
        .iter()
        .map(|v| v * v)
        .sum::<f64>()
        .sqrt()
        .max(f64::MIN_POSITIVE);
    ax.iter()
        .zip(b)
        .map(|(a, v)| (a - v).powi(2))
        .sum::<f64>()
        .sqrt()
        / nb
}

/// The TV fill from `start` (a solution of `eq` x = `b`): projected gradient descent
/// with Armijo backtracking, the direction d = P_N grad TV (P_N = I - A^+ A, by CGLS on
/// A u = A g from 0), so A x does not move.
pub fn fill<A: LinearMap>(eq: &A, b: &[f64], start: &[f64], im: Images, opts: TvOptions) -> TvFill {
    let mut x = start.to_vec();
    let (tv_start, _) = total_variation(&x, im, SMOOTHING);
    let residual_start = residual(eq, b, &x);
    let mut tv = tv_start;
    let mut step = 1.0;
    let mut done = 0;
    for _ in 0..opts.iterations {
        let (_, g) = total_variation(&x, im, SMOOTHING);
        let ag = eq.apply(&g);
        let zero = vec![0.0; x.len()];
        let row = cgls::solve(eq, &ag, &zero, PROJECTION_TOLERANCE, opts.cgls_iterations);
        let d: Vec<f64> = g.iter().zip(&row.x).map(|(g, r)| g - r).collect();
        let slope: f64 = g.iter().zip(&d).map(|(g, d)| g * d).sum();
        if !(slope > 0.0) {
            break;
        }
        step *= 2.0;
        let mut accepted = false;
        for _ in 0..MAX_HALVINGS {
            let y: Vec<f64> = x.iter().zip(&d).map(|(x, d)| x - step * d).collect();
            let (t, _) = total_variation(&y, im, SMOOTHING);
            if t <= tv - ARMIJO * step * slope {
                x = y;
                tv = t;
                accepted = true;
                break;
            }
            step *= 0.5;
        }
        if !accepted {
            break;
        }
        done += 1;
    }
    TvFill {
        residual_end: residual(eq, b, &x),
        x,
        tv_start,
        tv_end: tv,
        residual_start,
        iterations: done,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gradient matches central differences of TV_eps.
    #[test]
    fn gradient_matches_differences() {
        let im = Images {
            batch: 2,
            c: 2,
            h: 3,
            w: 4,
        };
        let n = 2 * 2 * 3 * 4;
        let x: Vec<f64> = (0..n).map(|k| ((k * 7919) % 23) as f64 / 23.0).collect();
        let (_, g) = total_variation(&x, im, 0.1);
        let h = 1e-6;
        for k in 0..n {
            let mut p = x.clone();
            p[k] += h;
            let mut m = x.clone();
            m[k] -= h;
            let fd = (total_variation(&p, im, 0.1).0 - total_variation(&m, im, 0.1).0) / (2.0 * h);
            assert!((fd - g[k]).abs() < 1e-7, "{k}: {fd} vs {}", g[k]);
        }
    }
}
