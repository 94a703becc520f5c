//! Two-layer nets: the weighted gradient equations solved jointly in (X, R) by
//! Levenberg-Marquardt, each step's normal equations by preconditioned conjugate
//! gradients on Jacobian products (docs/DESIGN.md, "Defended gradients: maximum
//! likelihood").
//!
//! With the notation of [`crate::attack::two_layer`] (Z = X W^T + 1 b^T, D = act'(Z),
//! H = act(Z), P = R A, Delta = D o P), a direction (dX, dR) moves
//!
//! ```text
//! dZ = dX W^T, dDelta = act''(Z) o dZ o P + D o (dR A),
//! dO_W = dDelta^T X + Delta^T dX, dO_b = dDelta^T 1, dO_A = dR^T H + R^T (D o dZ), dO_c = dR^T 1
//! ```
//!
//! and the adjoint runs the same lines backwards. A product costs O(B m (d + K)), so a
//! step never forms the Jacobian; the preconditioner is its exact column norms.

// `!(x > 0.0)` is deliberate throughout: it also rejects NaN.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

use faer::{Col, Mat};

use super::{Fit, TwoLayer};
use crate::Result;
use crate::numerics::damped;

/// Levenberg-Marquardt steps at most. From the span estimates (relative error
/// ~1e-2) the objective settles in well under this (measured, docs/EXPERIMENTS.md 4).
pub const STEPS: usize = 40;
/// Conjugate-gradient iterations per step at most.
pub const CG_ITERATIONS: usize = 60;
/// Inexact Newton: CG stops once its residual is this fraction of the gradient.
pub const CG_TOL: f64 = 1e-4;
/// Stop once a step lowers the objective by less than this fraction.
pub const F_TOL: f64 = 1e-9;

/// Residual (or a direction) in gradient space: (O_W, O_b, O_A, O_c).
pub(crate) struct Grad {
    w: Mat<f64>,
    b: Col<f64>,
    a: Mat<f64>,
    c: Col<f64>,
}

/// The forward quantities at one point.
pub(crate) struct Point {
    x: Mat<f64>,
    r: Mat<f64>,
    d1: Mat<f64>,
    d2: Mat<f64>,
    h: Mat<f64>,
    p: Mat<f64>,
    delta: Mat<f64>,
}

fn ones(n: usize) -> Col<f64> {
    Col::from_fn(n, |_| 1.0)
}

impl TwoLayer {
    pub(crate) fn point(&self, x: &Mat<f64>, r: &Mat<f64>) -> Point {
        let z = self.pre(x);
        let (bsz, m) = z.shape();
        let d1 = Mat::from_fn(bsz, m, |i, j| self.act.d1(z[(i, j)]));
        let d2 = Mat::from_fn(bsz, m, |i, j| self.act.d2(z[(i, j)]));
        let h = Mat::from_fn(bsz, m, |i, j| self.act.eval(z[(i, j)]));
        let p = r * &self.a;
        let delta = Mat::from_fn(bsz, m, |i, j| d1[(i, j)] * p[(i, j)]);
        Point {
            x: x.clone(),
            r: r.clone(),
            d1,
            d2,
            h,
            p,
            delta,
        }
    }

    /// Model minus observation.
    pub(crate) fn residual(&self, pt: &Point) -> Grad {
        let bsz = pt.x.nrows();
        Grad {
            w: pt.delta.transpose() * &pt.x - &self.ow,
            b: pt.delta.transpose() * ones(bsz) - &self.ob,
            a: pt.r.transpose() * &pt.h - &self.oa,
            c: pt.r.transpose() * ones(bsz) - &self.oc,
        }
    }

    /// sum over the four tensors of weight x squared norm.
    pub(crate) fn weighted_norm2(&self, g: &Grad) -> f64 {
        let [ww, wb, wa, wc] = self.weights;
        ww * g.w.squared_norm_l2()
            + wb * g.b.squared_norm_l2()
            + wa * g.a.squared_norm_l2()
            + wc * g.c.squared_norm_l2()
    }

    pub(crate) fn entries(&self) -> f64 {
        (self.ow.nrows() * (self.ow.ncols() + 1) + self.oa.nrows() * (self.oa.ncols() + 1)) as f64
    }

    /// J (dX, dR).
    fn jvp(&self, pt: &Point, dx: &Mat<f64>, dr: &Mat<f64>) -> Grad {
        let dz = dx * self.w.transpose();
        let dp = dr * &self.a;
        let (bsz, m) = dz.shape();
        let dd = Mat::from_fn(bsz, m, |i, j| {
            pt.d2[(i, j)] * dz[(i, j)] * pt.p[(i, j)] + pt.d1[(i, j)] * dp[(i, j)]
        });
        let dh = Mat::from_fn(bsz, m, |i, j| pt.d1[(i, j)] * dz[(i, j)]);
        Grad {
            w: dd.transpose() * &pt.x + pt.delta.transpose() * dx,
            b: dd.transpose() * ones(bsz),
            a: dr.transpose() * &pt.h + pt.r.transpose() * &dh,
            c: dr.transpose() * ones(bsz),
        }
    }

    /// J^T u.
    pub(crate) fn vjp(&self, pt: &Point, u: &Grad) -> (Mat<f64>, Mat<f64>) {
        let bsz = pt.x.nrows();
        let m = self.w.nrows();
        // adjoint of dDelta: X U_W^T + 1 u_b^T
        let mut e = &pt.x * u.w.transpose();
        for j in 0..m {
            for i in 0..bsz {
                e[(i, j)] += u.b[j];
            }
        }
        let hbar = &pt.r * &u.a; // B x m, adjoint of dH
        let pbar = Mat::from_fn(bsz, m, |i, j| e[(i, j)] * pt.d1[(i, j)]);
        let zbar = Mat::from_fn(bsz, m, |i, j| {
            e[(i, j)] * pt.p[(i, j)] * pt.d2[(i, j)] + hbar[(i, j)] * pt.d1[(i, j)]
        });
        let dx = &pt.delta * &u.w + &zbar * &self.w;
        let mut dr = &pt.h * u.a.transpose() + &pbar * self.a.transpose();
        for k in 0..dr.ncols() {
            for i in 0..bsz {
                dr[(i, k)] += u.c[k];
            }
        }
        (dx, dr)
    }

    pub(crate) fn weigh(&self, mut g: Grad) -> Grad {
        let [ww, wb, wa, wc] = self.weights;
        g.w *= faer::Scale(ww);
        g.b *= faer::Scale(wb);
        g.a *= faer::Scale(wa);
        g.c *= faer::Scale(wc);
        g
    }

    /// The diagonal of J^T W J (squared weighted column norms), in closed form.
    fn diagonal(&self, pt: &Point) -> (Mat<f64>, Mat<f64>) {
        let [ww, wb, wa, wc] = self.weights;
        let (bsz, m) = pt.delta.shape();
        let (d, k) = (self.w.ncols(), self.a.nrows());
        let mut cx = Mat::zeros(bsz, d);
        let mut cr = Mat::zeros(bsz, k);
        for i in 0..bsz {
            let xn2: f64 = (0..d).map(|c| pt.x[(i, c)].powi(2)).sum();
            let rn2: f64 = (0..k).map(|c| pt.r[(i, c)].powi(2)).sum();
            let hn2: f64 = (0..m).map(|j| pt.h[(i, j)].powi(2)).sum();
            for c in 0..d {
                let mut s = 0.0;
                for j in 0..m {
                    let wjc = self.w[(j, c)];
                    let dd = pt.d2[(i, j)] * wjc * pt.p[(i, j)];
                    let de = pt.delta[(i, j)];
                    s += ww * (dd * dd * xn2 + 2.0 * dd * de * pt.x[(i, c)] + de * de)
                        + wb * dd * dd
                        + wa * rn2 * (pt.d1[(i, j)] * wjc).powi(2);
                }
                cx[(i, c)] = s;
            }
            for c in 0..k {
                let s2: f64 = (0..m)
                    .map(|j| (pt.d1[(i, j)] * self.a[(c, j)]).powi(2))
                    .sum();
                cr[(i, c)] = (ww * xn2 + wb) * s2 + wa * hn2 + wc;
            }
        }
        (cx, cr)
    }

    /// Levenberg-Marquardt from `x0` and its best output residuals (the exact R-step).
    pub fn refine(&self, x0: &Mat<f64>, steps: usize) -> Result<Fit> {
        let r0 = self.r_step(x0, &self.pre(x0))?;
        self.gauss_newton(x0, &r0, &[], steps, DENSE_MAX_UNKNOWNS)
    }

    /// As [`Self::refine`], with the inputs of the samples flagged in `fixed` held.
    pub fn refine_holding(&self, x0: &Mat<f64>, fixed: &[bool], steps: usize) -> Result<Fit> {
        let r0 = self.r_step(x0, &self.pre(x0))?;
        self.gauss_newton(x0, &r0, fixed, steps, DENSE_MAX_UNKNOWNS)
    }

    /// Levenberg-Marquardt on the weighted objective from (x0, r0), at most `steps`; the
    /// normal matrix is formed up to `dense_max` unknowns (else conjugate gradients).
    pub fn gauss_newton(
        &self,
        x0: &Mat<f64>,
        r0: &Mat<f64>,
        fixed: &[bool],
        steps: usize,
        dense_max: usize,
    ) -> Result<Fit> {
        let n = self.entries();
        let pt = self.point(x0, r0);
        let f = self.weighted_norm2(&self.residual(&pt));
        let joint = Joint {
            tl: self,
            fixed,
            dense_max,
        };
        let stop = damped::Stop {
            steps,
            min_gain: Some(F_TOL),
            converged: |_| false,
        };
        let m = damped::minimise(&joint, pt, f, &damped::LARGE, stop);
        Ok(Fit {
            x: m.point.x,
            r: m.point.r,
            iterations: m.steps,
            objective: m.objective / n,
        })
    }

    /// Solve (J^T W J + lambda diag) p = -g by conjugate gradients preconditioned with
    /// the diagonal.
    fn cg(
        &self,
        pt: &Point,
        gx: &Mat<f64>,
        gr: &Mat<f64>,
        cx: &Mat<f64>,
        cr: &Mat<f64>,
        lambda: f64,
    ) -> (Mat<f64>, Mat<f64>) {
        let inv = |c: f64| if c > 0.0 { 1.0 / c } else { 1.0 };
        let prec = |ax: &Mat<f64>, ar: &Mat<f64>| {
            (
                Mat::from_fn(ax.nrows(), ax.ncols(), |i, j| {
                    ax[(i, j)] * inv(cx[(i, j)] * (1.0 + lambda))
                }),
                Mat::from_fn(ar.nrows(), ar.ncols(), |i, j| {
                    ar[(i, j)] * inv(cr[(i, j)] * (1.0 + lambda))
                }),
            )
        };
        let apply = |vx: &Mat<f64>, vr: &Mat<f64>| {
            let jv = self.weigh(self.jvp(pt, vx, vr));
            let (mut ax, mut ar) = self.vjp(pt, &jv);
            for j in 0..ax.ncols() {
                for i in 0..ax.nrows() {
                    ax[(i, j)] = if cx[(i, j)].is_finite() {
                        ax[(i, j)] + lambda * cx[(i, j)] * vx[(i, j)]
                    } else {
                        0.0
                    };
                }
            }
            ar += Mat::from_fn(vr.nrows(), vr.ncols(), |i, j| {
                lambda * cr[(i, j)] * vr[(i, j)]
            });
            (ax, ar)
        };
        let dot = |a: &(Mat<f64>, Mat<f64>), b: &(Mat<f64>, Mat<f64>)| -> f64 {
            let mut s = 0.0;
            for (u, v) in [(&a.0, &b.0), (&a.1, &b.1)] {
                for j in 0..u.ncols() {
                    for i in 0..u.nrows() {
                        s += u[(i, j)] * v[(i, j)];
                    }
                }
            }
            s
        };
        let mut p = (
            Mat::zeros(gx.nrows(), gx.ncols()),
            Mat::zeros(gr.nrows(), gr.ncols()),
        );
        let mut res = (-gx, -gr);
        let g0 = dot(&res, &res).sqrt();
        let mut z = prec(&res.0, &res.1);
        let mut dir = (z.0.clone(), z.1.clone());
        let mut rz = dot(&res, &z);
        for _ in 0..CG_ITERATIONS {
            let q = apply(&dir.0, &dir.1);
            let dq = dot(&dir, &q);
            if !(dq > 0.0) {
                break;
            }
            let alpha = rz / dq;
            p.0 += faer::Scale(alpha) * &dir.0;
            p.1 += faer::Scale(alpha) * &dir.1;
            res.0 -= faer::Scale(alpha) * &q.0;
            res.1 -= faer::Scale(alpha) * &q.1;
            if dot(&res, &res).sqrt() <= CG_TOL * g0 {
                break;
            }
            z = prec(&res.0, &res.1);
            let rz2 = dot(&res, &z);
            let beta = rz2 / rz;
            rz = rz2;
            dir.0 = &z.0 + faer::Scale(beta) * &dir.0;
            dir.1 = &z.1 + faer::Scale(beta) * &dir.1;
        }
        p
    }
}

/// Largest number of unknowns B (d + K) for which the normal matrix is formed (its
/// Gram products cost O(m (B d)^2)); above it conjugate gradients run on products.
pub const DENSE_MAX_UNKNOWNS: usize = 2048;

/// Most multiply-adds the conjugate-gradient path may cost (STEPS x CG_ITERATIONS x two
/// products of m B (d + 1) each), about a minute on one core; above it the joint fit is
/// not run (photos B = 8, m = 4096, d = 3072: 4.7e11, had not finished in 57 minutes).
pub const CG_MAX_WORK: f64 = 1e11;

/// Whether the joint fit of `b` samples fits its budget: the normal matrix is formed
/// (B (d + K) <= `DENSE_MAX_UNKNOWNS`), or the conjugate-gradient path's work is under
/// `CG_MAX_WORK`. Returns the estimated CG work when it does not.
pub fn over_budget(m: usize, d: usize, k: usize, b: usize) -> Option<f64> {
    let work = (STEPS * CG_ITERATIONS * 2) as f64 * (m * b * (d + 1)) as f64;
    (b * (d + k) > DENSE_MAX_UNKNOWNS && work > CG_MAX_WORK).then_some(work)
}

impl TwoLayer {
    /// J^T W J in closed form: every column of J is a sum of outer products of
    /// m-vectors (u_ic = act''(z_i) o w_c o p_i, v_ic = act'(z_i) o w_c,
    /// a_ik = act'(z_i) o A_k, delta_i, h_i) with x_i, e_c or r_i, so its entries are
    /// Gram products of those vectors.
    pub(crate) fn normal_matrix(&self, pt: &Point) -> Mat<f64> {
        let [ww, wb, wa, wc] = self.weights;
        let (bsz, m) = pt.delta.shape();
        let (d, k) = (self.w.ncols(), self.a.nrows());
        let u = Mat::from_fn(m, bsz * d, |j, q| {
            let (i, c) = (q / d, q % d);
            pt.d2[(i, j)] * self.w[(j, c)] * pt.p[(i, j)]
        });
        let v = Mat::from_fn(m, bsz * d, |j, q| {
            let (i, c) = (q / d, q % d);
            pt.d1[(i, j)] * self.w[(j, c)]
        });
        let a = Mat::from_fn(m, bsz * k, |j, q| {
            let (i, kk) = (q / k, q % k);
            pt.d1[(i, j)] * self.a[(kk, j)]
        });
        let dt = pt.delta.transpose().to_owned();
        let ht = pt.h.transpose().to_owned();
        let uu = u.transpose() * &u;
        let vv = v.transpose() * &v;
        let ud = u.transpose() * &dt;
        let ua = u.transpose() * &a;
        let vh = v.transpose() * &ht;
        let da = dt.transpose() * &a;
        let dd = dt.transpose() * &dt;
        let aa = a.transpose() * &a;
        let hh = ht.transpose() * &ht;
        let xx = &pt.x * pt.x.transpose();
        let rr = &pt.r * pt.r.transpose();
        let nx = bsz * d;
        let n = nx + bsz * k;
        let xr = |p: usize, q: usize| {
            // p an input unknown (i, c), q an output-residual unknown (i2, k2)
            let (i, c) = (p / d, p % d);
            let q2 = q - nx;
            let (i2, k2) = (q2 / k, q2 % k);
            ww * (ua[(p, q2)] * xx[(i, i2)] + da[(i, q2)] * pt.x[(i2, c)])
                + wb * ua[(p, q2)]
                + wa * pt.r[(i, k2)] * vh[(p, i2)]
        };
        Mat::from_fn(n, n, |p, q| match (p < nx, q < nx) {
            (true, true) => {
                let (i, c, i2, c2) = (p / d, p % d, q / d, q % d);
                let same = f64::from(c == c2);
                ww * (uu[(p, q)] * xx[(i, i2)]
                    + ud[(p, i2)] * pt.x[(i, c2)]
                    + ud[(q, i)] * pt.x[(i2, c)]
                    + dd[(i, i2)] * same)
                    + wb * uu[(p, q)]
                    + wa * rr[(i, i2)] * vv[(p, q)]
            }
            (true, false) => xr(p, q),
            (false, true) => xr(q, p),
            (false, false) => {
                let (p2, q2) = (p - nx, q - nx);
                let (i, kk, i2, k2) = (p2 / k, p2 % k, q2 / k, q2 % k);
                let same = f64::from(kk == k2);
                ww * aa[(p2, q2)] * xx[(i, i2)] + wb * aa[(p2, q2)] + same * (wa * hh[(i, i2)] + wc)
            }
        })
    }

    /// Solve (N + lambda diag N) p = -g with N formed; held rows (infinite `cx`) stay 0.
    fn dense_step(
        &self,
        nmat: &Mat<f64>,
        gx: &Mat<f64>,
        gr: &Mat<f64>,
        cx: &Mat<f64>,
        lambda: f64,
    ) -> Option<(Mat<f64>, Mat<f64>)> {
        use faer::linalg::solvers::Solve;
        let (bsz, d) = gx.shape();
        let k = gr.ncols();
        let nx = bsz * d;
        let n = nx + bsz * k;
        let held = |p: usize| p < nx && !cx[(p / d, p % d)].is_finite();
        let a = Mat::from_fn(n, n, |p, q| {
            if held(p) || held(q) {
                f64::from(p == q)
            } else if p == q {
                nmat[(p, p)] * (1.0 + lambda)
            } else {
                nmat[(p, q)]
            }
        });
        let rhs = Col::from_fn(n, |p| {
            if held(p) {
                0.0
            } else if p < nx {
                -gx[(p / d, p % d)]
            } else {
                -gr[((p - nx) / k, (p - nx) % k)]
            }
        });
        let sol = a.partial_piv_lu().solve(&rhs);
        if !sol.norm_l2().is_finite() {
            return None;
        }
        Some((
            Mat::from_fn(bsz, d, |i, c| sol[i * d + c]),
            Mat::from_fn(bsz, k, |i, c| sol[nx + i * k + c]),
        ))
    }
}

/// The weighted two-layer problem in (X, R), the inputs of the samples flagged in
/// `fixed` held, as normal equations for [`damped::minimise`].
struct Joint<'a> {
    tl: &'a TwoLayer,
    fixed: &'a [bool],
    dense_max: usize,
}

/// The gradient (gx, gr), the Jacobian's column norms (cx, cr) and, up to `dense_max`
/// unknowns, the normal matrix at a point.
struct Normal {
    gx: Mat<f64>,
    gr: Mat<f64>,
    cx: Mat<f64>,
    cr: Mat<f64>,
    nmat: Option<Mat<f64>>,
}

impl damped::NormalEquations for Joint<'_> {
    type Point = Point;
    type System = Normal;

    fn system(&self, pt: &Point) -> Option<Normal> {
        let tl = self.tl;
        let res = tl.residual(pt);
        let (mut gx, gr) = tl.vjp(pt, &tl.weigh(res));
        let (mut cx, cr) = tl.diagonal(pt);
        // a held sample: no gradient, and an infinite diagonal keeps CG off it
        for (i, _) in self.fixed.iter().enumerate().filter(|f| *f.1) {
            for c in 0..gx.ncols() {
                gx[(i, c)] = 0.0;
                cx[(i, c)] = f64::INFINITY;
            }
        }
        let dense = (pt.x.ncols() + pt.r.ncols()) * pt.x.nrows() <= self.dense_max;
        let nmat = dense.then(|| tl.normal_matrix(pt));
        Some(Normal {
            gx,
            gr,
            cx,
            cr,
            nmat,
        })
    }

    fn step(&self, pt: &Point, s: &Normal, lambda: f64) -> Option<Point> {
        let tl = self.tl;
        let step = s
            .nmat
            .as_ref()
            .and_then(|nm| tl.dense_step(nm, &s.gx, &s.gr, &s.cx, lambda));
        let (px, pr) = match step {
            Some(st) => st,
            None => tl.cg(pt, &s.gx, &s.gr, &s.cx, &s.cr, lambda),
        };
        Some(tl.point(&(&pt.x + &px), &(&pt.r + &pr)))
    }

    fn objective(&self, pt: &Point) -> f64 {
        self.tl.weighted_norm2(&self.tl.residual(pt))
    }
}

#[cfg(test)]
#[path = "gauss_newton_tests.rs"]
mod tests;
