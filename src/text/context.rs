//! The encoder route's per-candidate stage (docs/DESIGN.md, "Text: BERT"): for a
//! candidate (position, token) pair with block-0 input x, the attention context c that
//! makes x a true input of every per-position layer: (c, 1) in S_c, (h, 1) in S_h with
//! h = LN_a(x + W_o c + b_o), (g, 1) in S_g with g = act(W_i h + b_i), and (o, 1) in S_o
//! with o block 0's output.
//!
//! With s = 1/sigma the LN scale, (s c, s) = B_c w is linear in w and the S_h condition
//! is N_h^T (gamma * C(s (x + b_o) + W_o s c), 0) = -N_h^T (beta, 1): A_x w = r, with
//! A_x = M_0 + a_x b^T (M_0 shared by every candidate, a_x = N_g^T (x + b_o), b the last
//! row of B_c). Its null space has dimension r_c - r_x (the dependencies of the batch's
//! x's, whose contexts can be traded), so c is pinned down by Gauss-Newton on the
//! nonlinear S_h, S_g and S_o residuals over that null space.

use faer::{Col, Mat, MatRef, Side};

use super::bert::Bert;
use super::span::{RowSpan, Test};

/// Gauss-Newton steps per candidate at most. True pairs measured at the floor after 2-3
/// steps (BERT-base dims, B = 8); a pair shared by several sequences, whose null space
/// holds each of its contexts, took 7.
pub const GN_STEPS: usize = 12;

/// A candidate whose residual is still above this share of its starting residual
/// after `STALL_AFTER` steps is dropped: a true pair's residual falls by about 100 in
/// the first step (measured 5e-2 -> 5e-4, BERT-base dims, B = 8), a false pair's by
/// at most a fifth (0.23 -> 0.22; B = 32: 8.5e-2 -> 6.8e-2).
pub const STALL_SHARE: f64 = 0.5;
pub const STALL_AFTER: usize = 1;

/// One candidate's outcome.
#[derive(Clone, Debug)]
pub struct Solved {
    pub position: usize,
    pub token: u32,
    /// The context c (d), h and o (augmented) at the solution.
    pub c: Vec<f64>,
    /// Distances of (h, 1), (g, 1), (o, 1) from S_h, S_g, S_o, with their thresholds.
    pub tests: [Test; 3],
    /// ||A_x w_0 - r|| / ||r||: the linear residual before Gauss-Newton.
    pub linear: f64,
    pub steps: usize,
    pub accepted: bool,
}

/// What every candidate shares.
pub(crate) struct ContextSolver<'a> {
    model: &'a Bert,
    span_h: &'a RowSpan,
    span_g: &'a RowSpan,
    span_o: &'a RowSpan,
    /// B_c ((d+1) x r_c).
    bc: MatRef<'a, f64>,
    /// N_g = C diag(gamma_a) N_h,top (d x K_h): a_x = N_g^T (x + b_o).
    ng: Mat<f64>,
    m0: Mat<f64>,
    m0tm0: Mat<f64>,
    m0tr: Col<f64>,
    r: Col<f64>,
    /// Dimension of the null space searched by Gauss-Newton.
    pub family: usize,
}

/// Centre each column of `m` (subtract its mean over rows): C m.
fn centre_cols(m: &mut Mat<f64>) {
    let d = m.nrows() as f64;
    for j in 0..m.ncols() {
        let mean = (0..m.nrows()).map(|i| m[(i, j)]).sum::<f64>() / d;
        for i in 0..m.nrows() {
            m[(i, j)] -= mean;
        }
    }
}

/// LayerNorm forward of one row y: (n^ = C y / sigma, sigma); h = gamma * n^ + beta.
fn ln_parts(y: &[f64], eps: f64) -> (Vec<f64>, f64) {
    let d = y.len() as f64;
    let mean = y.iter().sum::<f64>() / d;
    let var = y.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d;
    let sigma = (var + eps).sqrt();
    (y.iter().map(|v| (v - mean) / sigma).collect(), sigma)
}

/// The LayerNorm's tangent: rows t of `dy` (m x d) -> gamma * (C t - n^ (n^ . C t) / d) / sigma.
fn ln_tangent(dy: &mut Mat<f64>, n: &[f64], sigma: f64, gamma: &[f64]) {
    let d = n.len();
    for i in 0..dy.nrows() {
        let mean = (0..d).map(|j| dy[(i, j)]).sum::<f64>() / d as f64;
        let dot: f64 = (0..d).map(|j| (dy[(i, j)] - mean) * n[j]).sum::<f64>() / d as f64;
        for j in 0..d {
            dy[(i, j)] = gamma[j] * (dy[(i, j)] - mean - n[j] * dot) / sigma;
        }
    }
}

/// Row vector as a 1 x n matrix.
fn row(v: &[f64]) -> Mat<f64> {
    Mat::from_fn(1, v.len(), |_, j| v[j])
}

/// (v, 1) as a 1 x (n+1) row.
fn aug_row(v: &[f64]) -> Mat<f64> {
    Mat::from_fn(1, v.len() + 1, |_, j| if j < v.len() { v[j] } else { 1.0 })
}

/// The forward pass of one candidate at w: c, (n^_a, sigma_a), h, z, g, (n^_b, sigma_b), o.
struct Point {
    c: Vec<f64>,
    den: f64,
    na: Vec<f64>,
    sa: f64,
    h: Vec<f64>,
    z: Vec<f64>,
    g: Vec<f64>,
    nb: Vec<f64>,
    sb: f64,
    o: Vec<f64>,
}

impl<'a> ContextSolver<'a> {
    /// `rank_x` is the rank of block 0's query/key/value gradient (the x's span).
    pub fn new(
        model: &'a Bert,
        span_c: &'a RowSpan,
        span_h: &'a RowSpan,
        span_g: &'a RowSpan,
        span_o: &'a RowSpan,
        rank_x: usize,
    ) -> Self {
        let d = model.hidden();
        let bc = span_c.basis.as_ref();
        let rc = bc.ncols();
        let nh = span_h.complement.as_ref();
        let kh = nh.ncols();
        let gamma = &model.ln_a.gamma;
        let mut ng = Mat::from_fn(d, kh, |i, j| gamma[i] * nh[(i, j)]);
        centre_cols(&mut ng);
        // M_0 = N_g^T W_o^T B_c,top: rows of `wo` are c's coordinates (c . wo = W_o c)
        let p = &model.wo * &ng;
        let m0 = p.transpose() * bc.subrows(0, d);
        let m0tm0 = m0.transpose() * &m0;
        let beta = &model.ln_a.beta;
        let r = Col::from_fn(kh, |j| {
            -((0..d).map(|i| nh[(i, j)] * beta[i]).sum::<f64>() + nh[(d, j)])
        });
        let m0tr = m0.transpose() * &r;
        // the x's dependencies trade contexts; an underdetermined system adds its own.
        // One of S_h's K_h equations is void: LN outputs (h, 1) lie in a hyperplane of
        // R^(d+1) whose normal is in the complement, and every candidate satisfies it.
        let family = rc
            .saturating_sub(rank_x)
            .max(rc.saturating_sub(kh.saturating_sub(1)))
            .min(rc);
        ContextSolver {
            model,
            span_h,
            span_g,
            span_o,
            bc,
            ng,
            m0,
            m0tm0,
            m0tr,
            r,
            family,
        }
    }

    /// The equations left once the linear ones are used: S_g's K_g, S_o's K_o - 1 (one
    /// is void, as for S_h) and LN_a's scale (S_h's other equations hold along the
    /// whole family).
    pub fn equations(&self) -> usize {
        self.span_g.complement.ncols() + self.span_o.complement.ncols()
    }

    /// Gauss-Newton can pin the context down: more equations than the family's
    /// dimension (a square or wide system has solutions for false pairs too).
    pub fn determined(&self) -> bool {
        self.equations() > self.family
    }

    fn point(&self, x: &[f64], w: &Col<f64>) -> Point {
        let m = self.model;
        let d = m.hidden();
        let rc = self.bc.ncols();
        let den: f64 = (0..rc).map(|j| self.bc[(d, j)] * w[j]).sum();
        let c: Vec<f64> = (0..d)
            .map(|i| (0..rc).map(|j| self.bc[(i, j)] * w[j]).sum::<f64>() / den)
            .collect();
        let yc = &row(&c) * &m.wo;
        let y: Vec<f64> = (0..d).map(|j| x[j] + yc[(0, j)] + m.bo[j]).collect();
        let (na, sa) = ln_parts(&y, m.ln_a.eps);
        let h: Vec<f64> = (0..d)
            .map(|j| m.ln_a.gamma[j] * na[j] + m.ln_a.beta[j])
            .collect();
        let zr = &row(&h) * &m.wi;
        let z: Vec<f64> = (0..zr.ncols()).map(|j| zr[(0, j)] + m.bi[j]).collect();
        let g: Vec<f64> = z.iter().map(|&v| m.cfg.activation.apply(v)).collect();
        let ur = &row(&g) * &m.wf;
        let u: Vec<f64> = (0..d).map(|j| ur[(0, j)] + m.bf[j] + h[j]).collect();
        let (nb, sb) = ln_parts(&u, m.ln_b.eps);
        let o: Vec<f64> = (0..d)
            .map(|j| m.ln_b.gamma[j] * nb[j] + m.ln_b.beta[j])
            .collect();
        Point {
            c,
            den,
            na,
            sa,
            h,
            z,
            g,
            nb,
            sb,
            o,
        }
    }

    /// The residual [N_h^T (h, 1); (I - B_g B_g^T) (g, 1); N_o^T (o, 1)] (S_g's through
    /// its basis: its complement is ffn + 1 - r_g wide).
    fn residual(&self, pt: &Point) -> Vec<f64> {
        let rh = &aug_row(&pt.h) * &self.span_h.complement;
        let ga = aug_row(&pt.g);
        let bg = &self.span_g.basis;
        let rg = &ga - (&ga * bg) * bg.transpose();
        let ro = &aug_row(&pt.o) * &self.span_o.complement;
        [rh, rg, ro]
            .iter()
            .flat_map(|r| (0..r.ncols()).map(move |j| r[(0, j)]))
            .collect()
    }

    /// J^T (m x (K_h + K_o)) at `pt` along the directions `f` (r_c x m) of w.
    fn jacobian_t(&self, pt: &Point, f: MatRef<'_, f64>) -> Mat<f64> {
        let m = self.model;
        let d = m.hidden();
        let k = f.ncols();
        // dc = (B_top F - c (b^T F)) / den, as k tangent rows
        let bf = self.bc.subrows(0, d) * f;
        let bb = self.bc.subrows(d, 1) * f;
        let dc = Mat::from_fn(k, d, |t, i| (bf[(i, t)] - pt.c[i] * bb[(0, t)]) / pt.den);
        let mut dh = &dc * &m.wo;
        ln_tangent(&mut dh, &pt.na, pt.sa, &m.ln_a.gamma);
        let mut dg = &dh * &m.wi;
        for j in 0..dg.ncols() {
            let s = m.cfg.activation.derivative(pt.z[j]);
            for t in 0..k {
                dg[(t, j)] *= s;
            }
        }
        let mut du = &dg * &m.wf;
        du += &dh;
        ln_tangent(&mut du, &pt.nb, pt.sb, &m.ln_b.gamma);
        let jh = &dh * self.span_h.complement.subrows(0, d);
        let ffn = dg.ncols();
        let bg = self.span_g.basis.subrows(0, ffn);
        // (dg, 0) - ((dg, 0) B_g) B_g^T
        let proj = (&dg * bg) * self.span_g.basis.transpose();
        let jo = &du * self.span_o.complement.subrows(0, d);
        let (nh, ng) = (jh.ncols(), ffn + 1);
        Mat::from_fn(k, nh + ng + jo.ncols(), |t, j| {
            if j < nh {
                jh[(t, j)]
            } else if j < nh + ng {
                let i = j - nh;
                let own = if i < ffn { dg[(t, i)] } else { 0.0 };
                own - proj[(t, i)]
            } else {
                jo[(t, j - nh - ng)]
            }
        })
    }

    /// Solve every candidate; `xs` rows are their block-0 inputs (augmented).
    pub fn solve(&self, pairs: &[(usize, u32)], xs: MatRef<'_, f64>) -> Vec<Solved> {
        let d = self.model.hidden();
        let rc = self.bc.ncols();
        let b = Col::from_fn(rc, |j| self.bc[(d, j)]);
        // a_x = N_g^T (x + b_o) for every candidate at once
        let xb = Mat::from_fn(xs.nrows(), d, |i, j| xs[(i, j)] + self.model.bo[j]);
        let ax = &xb * &self.ng;
        let rr: f64 = self.r.squared_norm_l2();
        (0..pairs.len())
            .map(|i| {
                let a = Col::from_fn(ax.ncols(), |j| ax[(i, j)]);
                let x: Vec<f64> = (0..d).map(|j| xs[(i, j)]).collect();
                self.solve_one(pairs[i], &x, &a, &b, rr)
            })
            .collect()
    }

    fn solve_one(
        &self,
        (position, token): (usize, u32),
        x: &[f64],
        a: &Col<f64>,
        b: &Col<f64>,
        rr: f64,
    ) -> Solved {
        let rc = b.nrows();
        // A^T A = M0^T M0 + u b^T + b u^T + |a|^2 b b^T, u = M0^T a; A^T r = M0^T r + b (a . r)
        let u = self.m0.transpose() * a;
        let aa = a.squared_norm_l2();
        let ar: f64 = (0..a.nrows()).map(|j| a[j] * self.r[j]).sum();
        let gram = Mat::from_fn(rc, rc, |i, j| {
            self.m0tm0[(i, j)] + u[i] * b[j] + b[i] * u[j] + aa * b[i] * b[j]
        });
        let atr = Col::from_fn(rc, |i| self.m0tr[i] + b[i] * ar);
        let failed = |linear: f64| Solved {
            position,
            token,
            c: Vec::new(),
            tests: [Test {
                distance: 1.0,
                tau: 0.0,
            }; 3],
            linear,
            steps: 0,
            accepted: false,
        };
        let Ok(eig) = gram.self_adjoint_eigen(Side::Lower) else {
            return failed(1.0);
        };
        let lam: Vec<f64> = eig.S().column_vector().iter().copied().collect();
        let v = eig.U();
        let m = self.family;
        // w0 = sum over the kept eigenvectors (ascending: the last rc - m)
        let mut w = Col::<f64>::zeros(rc);
        for k in m..rc {
            if lam[k] <= 0.0 {
                continue;
            }
            let coef: f64 = (0..rc).map(|i| v[(i, k)] * atr[i]).sum::<f64>() / lam[k];
            for i in 0..rc {
                w[i] += coef * v[(i, k)];
            }
        }
        let aw = &self.m0 * &w;
        let bw: f64 = (0..rc).map(|i| b[i] * w[i]).sum();
        let lin2: f64 = (0..aw.nrows())
            .map(|j| (aw[j] + a[j] * bw - self.r[j]).powi(2))
            .sum();
        let linear = (lin2 / rr).sqrt();
        let f = v.subcols(0, m);
        let mut pt = self.point(x, &w);
        let mut res = self.residual(&pt);
        let norm = |r: &[f64]| r.iter().map(|v| v * v).sum::<f64>().sqrt();
        let start = norm(&res);
        let mut best_norm = start;
        let mut best_w = w.clone();
        let mut steps = 0;
        if m > 0 && pt.den.is_finite() && pt.den != 0.0 {
            for step in 1..=GN_STEPS {
                let jt = self.jacobian_t(&pt, f);
                let jtj = &jt * jt.transpose();
                let jtr = Col::from_fn(m, |t| {
                    (0..res.len()).map(|j| jt[(t, j)] * res[j]).sum::<f64>()
                });
                let Ok(e) = jtj.self_adjoint_eigen(Side::Lower) else {
                    break;
                };
                let l: Vec<f64> = e.S().column_vector().iter().copied().collect();
                let top = l.last().copied().unwrap_or(0.0);
                let mut theta = Col::<f64>::zeros(m);
                for (k, &lk) in l.iter().enumerate() {
                    if lk > top * 1e-14 {
                        let coef: f64 = (0..m).map(|i| e.U()[(i, k)] * jtr[i]).sum::<f64>() / lk;
                        for i in 0..m {
                            theta[i] -= coef * e.U()[(i, k)];
                        }
                    }
                }
                w = &w + f * &theta;
                let pn = self.point(x, &w);
                res = self.residual(&pn);
                steps = step;
                let now = norm(&res);
                if !now.is_finite() {
                    break;
                }
                pt = pn;
                // Gauss-Newton is not monotone where a shared pair's null space holds
                // several contexts: keep the best point seen
                if now < best_norm {
                    best_norm = now;
                    best_w = w.clone();
                }
                let done = self.within(&pt, &self.tests(&pt));
                if done || (step >= STALL_AFTER && best_norm > STALL_SHARE * start) {
                    break;
                }
            }
        }
        if norm(&res) > best_norm {
            pt = self.point(x, &best_w);
        }
        let tests = self.tests(&pt);
        let accepted = self.within(&pt, &tests);
        Solved {
            position,
            token,
            c: pt.c,
            tests,
            linear,
            steps,
            accepted,
        }
    }

    fn tests(&self, pt: &Point) -> [Test; 3] {
        [
            (self.span_h, &pt.h),
            (self.span_g, &pt.g),
            (self.span_o, &pt.o),
        ]
        .map(|(s, v)| s.test(aug_row(v).as_ref())[0])
    }

    /// The solved point passes: Gauss-Newton minimises the stacked residual
    /// sum_s ||N_s^T v~_s||^2 = sum_s (d_s |v~_s|)^2, and at the true context each term is
    /// within its own threshold (d_s <= tau_s), so the minimum is within
    /// sum_s (tau_s |v~_s|)^2; each span must also discriminate (tau_s <= max_tau).
    /// One span alone may exceed its own tau: the solve trades the spans' noise.
    fn within(&self, pt: &Point, tests: &[Test; 3]) -> bool {
        let sq = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>() + 1.0;
        let norms = [sq(&pt.h), sq(&pt.g), sq(&pt.o)];
        let spans = [self.span_h, self.span_g, self.span_o];
        let (mut got, mut budget) = (0.0, 0.0);
        for k in 0..3 {
            if tests[k].tau > spans[k].max_tau() {
                return false;
            }
            got += tests[k].distance.powi(2) * norms[k];
            budget += tests[k].tau.powi(2) * norms[k];
        }
        got <= budget
    }
}
