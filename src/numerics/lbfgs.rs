//! Limited-memory BFGS with a strong-Wolfe line search (Nocedal & Wright 2006,
//! Algorithms 7.4, 3.5 and 3.6), for the DLG baseline. Minimises f over R^n given
//! f and its gradient.

use crate::Result;

/// Sufficient-decrease constant of the Wolfe conditions (the customary 1e-4).
const C1: f64 = 1e-4;
/// Curvature constant (0.9: the usual choice for quasi-Newton directions).
const C2: f64 = 0.9;
/// Evaluations one line search may spend before giving up.
const MAX_LINE_EVALS: usize = 25;

/// Stopping rules of [`minimize`].
#[derive(Clone, Copy, Debug)]
pub struct LbfgsOptions {
    pub max_iters: usize,
    /// Curvature pairs kept.
    pub memory: usize,
    /// Stop once f <= f_tol.
    pub f_tol: f64,
}

/// What the minimisation reached.
#[derive(Clone, Debug)]
pub struct Minimum {
    pub x: Vec<f64>,
    pub f: f64,
    pub iters: usize,
    pub evals: usize,
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

struct Point {
    a: f64,
    f: f64,
    d: f64,
    g: Vec<f64>,
}

/// Minimise `fun` (value and gradient) from `x0`; `on_iter(iter, f)` after each step.
pub fn minimize(
    mut fun: impl FnMut(&[f64]) -> Result<(f64, Vec<f64>)>,
    x0: Vec<f64>,
    opts: &LbfgsOptions,
    mut on_iter: impl FnMut(usize, f64),
) -> Result<Minimum> {
    let mut x = x0;
    let (mut f, mut g) = fun(&x)?;
    let mut evals = 1;
    let mut mem: std::collections::VecDeque<(Vec<f64>, Vec<f64>, f64)> = Default::default();
    let mut iters = 0;
    let mut failures = 0;
    while iters < opts.max_iters && f > opts.f_tol {
        // two-loop recursion: p = -H g
        let mut q = g.clone();
        let mut alphas = Vec::with_capacity(mem.len());
        for (s, y, rho) in mem.iter().rev() {
            let a = rho * dot(s, &q);
            q.iter_mut().zip(y).for_each(|(qi, yi)| *qi -= a * yi);
            alphas.push(a);
        }
        let gamma = mem.back().map_or_else(
            || 1.0 / dot(&g, &g).sqrt().max(f64::MIN_POSITIVE),
            |(s, y, _)| dot(s, y) / dot(y, y),
        );
        q.iter_mut().for_each(|v| *v *= gamma);
        for ((s, y, rho), a) in mem.iter().zip(alphas.into_iter().rev()) {
            let b = rho * dot(y, &q);
            q.iter_mut().zip(s).for_each(|(qi, si)| *qi += (a - b) * si);
        }
        let p: Vec<f64> = q.into_iter().map(|v| -v).collect();
        let d0 = dot(&g, &p);
        if d0.is_nan() || d0 >= 0.0 {
            if mem.is_empty() {
                break; // zero gradient
            }
            mem.clear();
            continue;
        }
        let mut phi = |a: f64| -> Result<Point> {
            let xa: Vec<f64> = x.iter().zip(&p).map(|(xi, pi)| xi + a * pi).collect();
            let (fa, ga) = fun(&xa)?;
            evals += 1;
            let d = dot(&ga, &p);
            Ok(Point { a, f: fa, d, g: ga })
        };
        match line_search(&mut phi, f, d0)? {
            Some(pt) => {
                failures = 0;
                let s: Vec<f64> = p.iter().map(|v| pt.a * v).collect();
                let y: Vec<f64> = pt.g.iter().zip(&g).map(|(a, b)| a - b).collect();
                let sy = dot(&s, &y);
                x.iter_mut().zip(&s).for_each(|(xi, si)| *xi += si);
                f = pt.f;
                g = pt.g;
                if sy > 1e-12 * dot(&s, &s).sqrt() * dot(&y, &y).sqrt() {
                    if mem.len() == opts.memory {
                        mem.pop_front();
                    }
                    mem.push_back((s, y, 1.0 / sy));
                }
            }
            None => {
                // no acceptable step along this direction: restart from steepest descent once
                failures += 1;
                if failures > 1 || mem.is_empty() {
                    break;
                }
                mem.clear();
            }
        }
        iters += 1;
        on_iter(iters, f);
    }
    Ok(Minimum { x, f, iters, evals })
}

/// Strong-Wolfe line search from step 1; None when no decrease was found.
fn line_search(
    phi: &mut impl FnMut(f64) -> Result<Point>,
    f0: f64,
    d0: f64,
) -> Result<Option<Point>> {
    let mut prev = Point {
        a: 0.0,
        f: f0,
        d: d0,
        g: Vec::new(),
    };
    let mut a = 1.0;
    for i in 0..MAX_LINE_EVALS {
        let pt = phi(a)?;
        if !pt.f.is_finite() {
            a *= 0.1;
            continue;
        }
        if pt.f > f0 + C1 * pt.a * d0 || (i > 0 && pt.f >= prev.f) {
            return zoom(phi, prev, pt, f0, d0);
        }
        if pt.d.abs() <= -C2 * d0 {
            return Ok(Some(pt));
        }
        if pt.d >= 0.0 {
            return zoom(phi, pt, prev, f0, d0);
        }
        a *= 2.0;
        prev = pt;
    }
    Ok((prev.a > 0.0).then_some(prev))
}

/// Cubic interpolation between lo and hi, kept inside the middle 80% of the bracket.
fn cubic(lo: &Point, hi: &Point) -> f64 {
    let (a, b) = (lo.a, hi.a);
    let d1 = lo.d + hi.d - 3.0 * (lo.f - hi.f) / (a - b);
    let disc = d1 * d1 - lo.d * hi.d;
    let (l, u) = (a.min(b), a.max(b));
    let w = u - l;
    if disc >= 0.0 {
        let d2 = (b - a).signum() * disc.sqrt();
        let t = b - (b - a) * (hi.d + d2 - d1) / (hi.d - lo.d + 2.0 * d2);
        if t.is_finite() && t > l + 0.1 * w && t < u - 0.1 * w {
            return t;
        }
    }
    0.5 * (a + b)
}

fn zoom(
    phi: &mut impl FnMut(f64) -> Result<Point>,
    mut lo: Point,
    mut hi: Point,
    f0: f64,
    d0: f64,
) -> Result<Option<Point>> {
    for _ in 0..MAX_LINE_EVALS {
        let pt = phi(cubic(&lo, &hi))?;
        if !pt.f.is_finite() || pt.f > f0 + C1 * pt.a * d0 || pt.f >= lo.f {
            hi = pt;
        } else {
            if pt.d.abs() <= -C2 * d0 {
                return Ok(Some(pt));
            }
            if pt.d * (hi.a - lo.a) >= 0.0 {
                hi = std::mem::replace(&mut lo, pt);
            } else {
                lo = pt;
            }
        }
        if (hi.a - lo.a).abs() <= f64::EPSILON * lo.a.abs().max(1.0) {
            break;
        }
    }
    // the bracket collapsed: accept the best decrease found, if any
    Ok((lo.a > 0.0 && lo.f < f0).then_some(lo))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Rosenbrock function in 10 dimensions: minimum 0 at (1, ..., 1).
    #[test]
    fn minimises_rosenbrock() {
        let n = 10;
        let fun = |x: &[f64]| -> Result<(f64, Vec<f64>)> {
            let mut f = 0.0;
            let mut g = vec![0.0; x.len()];
            for i in 0..x.len() - 1 {
                let a = x[i + 1] - x[i] * x[i];
                let b = 1.0 - x[i];
                f += 100.0 * a * a + b * b;
                g[i] += -400.0 * x[i] * a - 2.0 * b;
                g[i + 1] += 200.0 * a;
            }
            Ok((f, g))
        };
        let opts = LbfgsOptions {
            max_iters: 500,
            memory: 10,
            f_tol: 1e-24,
        };
        let m = minimize(fun, vec![-1.2; n], &opts, |_, _| {}).unwrap();
        assert!(m.f < 1e-20, "f = {} after {} iterations", m.f, m.iters);
        assert!(m.x.iter().all(|v| (v - 1.0).abs() < 1e-9));
    }
}
