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

use faer::linalg::solvers::Solve;
use faer::{Col, Mat, MatRef, Side};

use super::bert::Bert;
use super::span::{RowSpan, Test};

/// Gauss-Newton steps per candidate at most (the screen's, then the full system's). True
/// pairs measured at the floor after 2-3 steps (BERT-base dims, B = 8); a pair shared by
/// several sequences, whose null space holds each of its contexts, took 7.
pub const GN_STEPS: usize = 12;

/// A candidate whose screen residual is still above this share of its starting residual
/// after `STALL_AFTER` steps is dropped: a true pair's residual falls by about 100 in
/// the first step (measured 5e-2 -> 5e-4, BERT-base dims, B = 8), a false pair's by
/// at most a fifth on the full system (0.23 -> 0.22; B = 32: 8.5e-2 -> 6.8e-2).
pub const STALL_SHARE: f64 = 0.5;
pub const STALL_AFTER: usize = 1;

/// The screen's S_g equations per unknown of the family: rows S of output.dense's input
/// with |S| + 1 - r_g = `SCREEN_EQUATIONS` m. Linearised, a false pair's residual keeps
/// about sqrt(1 - 1 / SCREEN_EQUATIONS) = 0.71 of itself after a step (above
/// `STALL_SHARE`); a true pair's goes to the floor as on the full system.
pub const SCREEN_EQUATIONS: usize = 2;

/// Gauss-Newton steps on S_h alone before the screen: they set LN_a's scale, which the
/// family's chart (b.w = 1) leaves free; S_h's other equations already hold.
pub const SCALE_STEPS: usize = 1;

/// One candidate's outcome.
#[derive(Clone, Debug)]
pub struct Solved {
    pub position: usize,
    pub token: u32,
    /// The context c (d) at the solution.
    pub c: Vec<f64>,
    /// Distances of (h, 1), (g, 1), (o, 1) from S_h, S_g, S_o, with their thresholds.
    pub tests: [Test; 3],
    /// Gauss-Newton steps on the screen's rows, then on the full system.
    pub screen_steps: usize,
    pub steps: usize,
    /// The screen's necessary test passed (the full system was solved).
    pub screened: bool,
    pub accepted: bool,
}

/// Candidates between two progress reports of the context solver (BERT route).
pub(crate) const PROGRESS_EVERY: usize = 500;

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
    /// The family's shared directions (when it has any).
    shared: Option<Family>,
}

/// The context family of every candidate, w = w_x + F theta with F shared (docs/DESIGN.md,
/// "Text: BERT", shared family): null(A_x) lies in null(M_0) + span(M_0^+ a_x), and
/// a_x = N_g^T (x + b_o) enters through p_a = P (x + b_o) alone.
struct Family {
    /// P = M_0^+ N_g^T (r_c x d).
    p: Mat<f64>,
    /// Y = [Z, p_r / |p_r|] (r_c x (z+1)): null(M_0) and M_0^+ r.
    y: Mat<f64>,
    /// beta = b^T Y: the chart b.w = 1 is the constraint beta phi = 1 + b.p_a.
    beta: Col<f64>,
    /// F (r_c x m), its top d rows times W_o: EW = (B_c,top F)^T W_o (m x d), and b^T F.
    f: Mat<f64>,
    ew: Mat<f64>,
    bf: Col<f64>,
    /// EW centred by rows, times gamma_a (m x d): the LN_a tangent's shared part, and
    /// that times W_i (m x ffn) and times N_h,top (m x K_h).
    ewg: Mat<f64>,
    q: Mat<f64>,
    qh: Mat<f64>,
    screen: Screen,
}

/// The screen's rows S of S_g: (g_S, 1) in span(B_g[S, bias]), a necessary condition of
/// (g, 1) in S_g with |S| + 1 - r_g equations.
struct Screen {
    rows: Vec<usize>,
    /// Q[:, S] (m x |S|) and W_i[:, S] (d x |S|).
    q: Mat<f64>,
    wi: Mat<f64>,
    /// Orthonormal complement of span(B_g[S, bias]) in R^(|S|+1), bias row dropped (its
    /// coordinate is the constant 1): |S| x K_S; `last` is the bias row.
    n: Mat<f64>,
    last: Vec<f64>,
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

/// The forward pass of one candidate at w: c, c W_o, (n^_a, sigma_a), h, z, g, (n^_b, sigma_b), o.
struct Point {
    c: Vec<f64>,
    yc: Vec<f64>,
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

/// One Gauss-Newton step from J^T (m x equations) and the residual: the solution of
/// (J^T J + mu I) theta = -J^T res by Cholesky, mu = 1e-14 of J^T J's largest diagonal
/// entry (a pseudo-inverse that drops directions under 1e-7 of the strongest).
fn gn_step(jt: &Mat<f64>, res: &[f64]) -> Option<Col<f64>> {
    let m = jt.nrows();
    let mut jtj = jt * jt.transpose();
    let rc = Col::from_fn(res.len(), |j| -res[j]);
    let jtr = jt * &rc;
    let top = (0..m).map(|i| jtj[(i, i)]).fold(0.0, f64::max);
    if !(top > 0.0 && top.is_finite()) {
        return None;
    }
    for i in 0..m {
        jtj[(i, i)] += top * 1e-14;
    }
    let theta = jtj.llt(Side::Lower).ok()?.solve(&jtr);
    let finite = theta.iter().all(|v| v.is_finite());
    finite.then_some(theta)
}

fn norm(r: &[f64]) -> f64 {
    r.iter().map(|v| v * v).sum::<f64>().sqrt()
}

/// Orthonormal complement of the column space of `a` (n x k, n > k), from its full SVD;
/// columns under 1e-10 of the largest singular value count as missing.
fn complement_of(a: MatRef<'_, f64>) -> Mat<f64> {
    let n = a.nrows();
    let Ok(svd) = a.svd() else {
        return Mat::zeros(n, 0);
    };
    let s: Vec<f64> = svd.S().column_vector().iter().copied().collect();
    let keep = s.iter().filter(|&&v| v > s[0] * 1e-10).count();
    svd.U().subcols(keep, n - keep).to_owned()
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
        let mut solver = ContextSolver {
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
            shared: None,
        };
        if family > 0 {
            // null(M_0) has the family's m dimensions (measured: BERT-base dims, B = 8,
            // 22 eigenvalues of M_0^T M_0 at <= 5.4e-9, the next 3.8e-3)
            solver.shared = solver.family_of(family);
        }
        solver
    }

    /// The shared family (None when M_0's spectrum cannot be split at z).
    fn family_of(&self, z: usize) -> Option<Family> {
        let m = self.model;
        let d = m.hidden();
        let rc = self.bc.ncols();
        let eig = self.m0tm0.self_adjoint_eigen(Side::Lower).ok()?;
        let lam: Vec<f64> = eig.S().column_vector().iter().copied().collect();
        let v = eig.U();
        if z >= rc || lam[z] <= 0.0 {
            return None;
        }
        // M_0^+ y = sum over the kept eigenvectors of v_k (v_k . M_0^T y) / lambda_k
        let vr = v.subcols(z, rc - z);
        let pinv = |t: MatRef<'_, f64>| -> Mat<f64> {
            let mut c = vr.transpose() * t;
            for k in 0..rc - z {
                for j in 0..c.ncols() {
                    c[(k, j)] /= lam[z + k];
                }
            }
            vr * c
        };
        let t = (&self.ng * &self.m0).transpose().to_owned();
        let p = pinv(t.as_ref());
        let pr = pinv(self.m0tr.as_mat());
        let prn = (0..rc).map(|i| pr[(i, 0)].powi(2)).sum::<f64>().sqrt();
        let y = Mat::from_fn(
            rc,
            z + 1,
            |i, j| {
                if j < z { v[(i, j)] } else { pr[(i, 0)] / prn }
            },
        );
        let b = Col::from_fn(rc, |j| self.bc[(d, j)]);
        if std::env::var("GRADLEAK_DEBUG_BERT").is_ok() {
            let by = y.transpose() * &b;
            eprintln!(
                "DBG family z {z} lam {:?} top {:.3e} |b^T Z| {:.3e} b.p_r {:.3e}",
                &lam[..(z + 3).min(rc)],
                lam[rc - 1],
                (0..z).map(|j| by[j] * by[j]).sum::<f64>().sqrt(),
                by[z]
            );
        }
        let (f, beta) = {
            // the chart b.w = 1 is one linear constraint on phi: F spans beta's complement
            let beta = y.transpose() * &b;
            let bn = beta.norm_l2();
            let hat = Col::from_fn(z + 1, |i| beta[i] / bn);
            // Householder H with H e_1 = -sign(hat_0) hat: its other columns are
            // orthonormal and orthogonal to beta
            let s = if hat[0] >= 0.0 { 1.0 } else { -1.0 };
            let u = Col::from_fn(z + 1, |i| hat[i] + if i == 0 { s } else { 0.0 });
            let uu = u.squared_norm_l2();
            let h = Mat::from_fn(z + 1, z, |i, j| {
                let col = j + 1;
                f64::from(u8::from(i == col)) - 2.0 * u[i] * u[col] / uu
            });
            (&y * &h, beta)
        };
        let bft = self.bc.subrows(0, d) * &f;
        let ew = bft.transpose() * &m.wo;
        let bf = f.transpose() * &b;
        let gamma = &m.ln_a.gamma;
        let mut ewg = ew.transpose().to_owned();
        centre_cols(&mut ewg);
        let ewg = Mat::from_fn(ewg.ncols(), d, |t, i| ewg[(i, t)] * gamma[i]);
        let q = &ewg * &m.wi;
        let qh = &ewg * self.span_h.complement.subrows(0, d);
        let screen = self.screen(&q, f.ncols());
        Some(Family {
            p,
            y,
            beta,
            f,
            ew,
            bf,
            ewg,
            q,
            qh,
            screen,
        })
    }

    /// Rows S evenly spread over the ffn coordinates, |S| = r_g + `SCREEN_EQUATIONS` m - 1
    /// (all of them when that is more).
    fn screen(&self, q: &Mat<f64>, m: usize) -> Screen {
        let model = self.model;
        let ffn = model.wi.ncols();
        let basis = &self.span_g.basis;
        let rg = basis.ncols();
        let size = (rg + SCREEN_EQUATIONS * m).saturating_sub(1).clamp(1, ffn);
        let rows: Vec<usize> = (0..size).map(|i| i * ffn / size).collect();
        let bs = Mat::from_fn(size + 1, rg, |i, j| {
            basis[(if i < size { rows[i] } else { ffn }, j)]
        });
        let full = complement_of(bs.as_ref());
        Screen {
            q: Mat::from_fn(q.nrows(), size, |t, j| q[(t, rows[j])]),
            wi: Mat::from_fn(model.hidden(), size, |i, j| model.wi[(i, rows[j])]),
            n: full.subrows(0, size).to_owned(),
            last: (0..full.ncols()).map(|j| full[(size, j)]).collect(),
            rows,
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
        let ycm = &row(&c) * &m.wo;
        let yc: Vec<f64> = (0..d).map(|j| ycm[(0, j)]).collect();
        let y: Vec<f64> = (0..d).map(|j| x[j] + yc[j] + m.bo[j]).collect();
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
            yc,
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

    /// S_h's residual N_h^T (h, 1).
    fn residual_h(&self, pt: &Point) -> Vec<f64> {
        let rh = &aug_row(&pt.h) * &self.span_h.complement;
        (0..rh.ncols()).map(|j| rh[(0, j)]).collect()
    }

    /// The residual [N_h^T (h, 1); (I - B_g B_g^T) (g, 1); N_o^T (o, 1)] (S_g's through
    /// its basis: its complement is ffn + 1 - r_g wide).
    fn residual(&self, pt: &Point) -> Vec<f64> {
        let ga = aug_row(&pt.g);
        let bg = &self.span_g.basis;
        let rg = &ga - (&ga * bg) * bg.transpose();
        let ro = &aug_row(&pt.o) * &self.span_o.complement;
        let mut out = self.residual_h(pt);
        for r in [rg, ro] {
            out.extend((0..r.ncols()).map(|j| r[(0, j)]));
        }
        out
    }

    /// The screen's residual [N_h^T (h, 1); N_S^T (g_S, 1)].
    fn residual_screen(&self, fam: &Family, pt: &Point) -> Vec<f64> {
        let s = &fam.screen;
        let gs = Mat::from_fn(1, s.rows.len(), |_, j| pt.g[s.rows[j]]);
        let rs = &gs * &s.n;
        let mut out = self.residual_h(pt);
        out.extend((0..rs.ncols()).map(|j| rs[(0, j)] + s.last[j]));
        out
    }

    /// The LN_a tangent along F at `pt` times a right matrix M (d x n), from its shared
    /// part `phi` = EWg M: [(phi - b_F (gamma C yc) M) / den - u ((gamma n^) M)] / sigma,
    /// u = n^ . dy / d (docs/DESIGN.md, "Text: BERT", shared family).
    fn tangent_times(
        &self,
        fam: &Family,
        pt: &Point,
        u: &[f64],
        phi: &Mat<f64>,
        right: MatRef<'_, f64>,
    ) -> Mat<f64> {
        let gamma = &self.model.ln_a.gamma;
        let d = gamma.len();
        let mean = pt.yc.iter().sum::<f64>() / d as f64;
        let ycg = Mat::from_fn(1, d, |_, i| gamma[i] * (pt.yc[i] - mean));
        let ng = Mat::from_fn(1, d, |_, i| gamma[i] * pt.na[i]);
        let a1 = &ycg * right;
        let a2 = &ng * right;
        Mat::from_fn(phi.nrows(), phi.ncols(), |t, j| {
            ((phi[(t, j)] - fam.bf[t] * a1[(0, j)]) / pt.den - u[t] * a2[(0, j)]) / pt.sa
        })
    }

    /// The LN_a tangent itself (m x d): `tangent_times` with M = I.
    fn tangent_rows(&self, fam: &Family, pt: &Point, u: &[f64]) -> Mat<f64> {
        let gamma = &self.model.ln_a.gamma;
        let d = gamma.len();
        let mean = pt.yc.iter().sum::<f64>() / d as f64;
        Mat::from_fn(fam.ewg.nrows(), d, |t, i| {
            let a1 = gamma[i] * (pt.yc[i] - mean);
            let a2 = gamma[i] * pt.na[i];
            ((fam.ewg[(t, i)] - fam.bf[t] * a1) / pt.den - u[t] * a2) / pt.sa
        })
    }

    /// u_t = n^ . dy_t / d with dy = (EW - b_F yc) / den.
    fn tangent_u(&self, fam: &Family, pt: &Point) -> Vec<f64> {
        let d = pt.na.len();
        let n = Col::from_fn(d, |i| pt.na[i]);
        let en = &fam.ew * &n;
        let yn: f64 = (0..d).map(|i| pt.yc[i] * pt.na[i]).sum();
        (0..fam.bf.nrows())
            .map(|t| (en[t] - fam.bf[t] * yn) / (pt.den * d as f64))
            .collect()
    }

    /// J^T of S_h's residual alone (m x K_h).
    fn jacobian_h(&self, fam: &Family, pt: &Point) -> Mat<f64> {
        let u = self.tangent_u(fam, pt);
        let nh = self.span_h.complement.subrows(0, pt.na.len());
        self.tangent_times(fam, pt, &u, &fam.qh, nh)
    }

    /// J^T of the screen's residual (m x (K_h + K_S)).
    fn jacobian_screen(&self, fam: &Family, pt: &Point) -> Mat<f64> {
        let s = &fam.screen;
        let u = self.tangent_u(fam, pt);
        let nh = self.span_h.complement.subrows(0, pt.na.len());
        let jh = self.tangent_times(fam, pt, &u, &fam.qh, nh);
        let mut dg = self.tangent_times(fam, pt, &u, &s.q, s.wi.as_ref());
        let act = self.model.cfg.activation;
        for (j, &col) in s.rows.iter().enumerate() {
            let a = act.derivative(pt.z[col]);
            for t in 0..dg.nrows() {
                dg[(t, j)] *= a;
            }
        }
        let jg = &dg * &s.n;
        let (kh, ks) = (jh.ncols(), jg.ncols());
        Mat::from_fn(dg.nrows(), kh + ks, |t, j| {
            if j < kh { jh[(t, j)] } else { jg[(t, j - kh)] }
        })
    }

    /// J^T of the full residual (m x (K_h + ffn + 1 + K_o)) along F.
    fn jacobian_full(&self, fam: &Family, pt: &Point) -> Mat<f64> {
        let m = self.model;
        let d = m.hidden();
        let u = self.tangent_u(fam, pt);
        let dh = self.tangent_rows(fam, pt, &u);
        let nh = self.span_h.complement.subrows(0, d);
        let jh = self.tangent_times(fam, pt, &u, &fam.qh, nh);
        let mut dg = self.tangent_times(fam, pt, &u, &fam.q, m.wi.as_ref());
        let k = dg.nrows();
        for j in 0..dg.ncols() {
            let s = m.cfg.activation.derivative(pt.z[j]);
            for t in 0..k {
                dg[(t, j)] *= s;
            }
        }
        let mut du = &dg * &m.wf;
        du += &dh;
        ln_tangent(&mut du, &pt.nb, pt.sb, &m.ln_b.gamma);
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

    /// Solve every candidate; `xs` rows are their block-0 inputs (augmented). `done` is
    /// told the number solved so far after every `PROGRESS_EVERY` candidates.
    pub fn solve(
        &self,
        pairs: &[(usize, u32)],
        xs: MatRef<'_, f64>,
        done: &mut dyn FnMut(usize),
    ) -> Vec<Solved> {
        let mut tick = |i: usize| {
            if (i + 1).is_multiple_of(PROGRESS_EVERY) {
                done(i + 1);
            }
        };
        let d = self.model.hidden();
        let xb = Mat::from_fn(xs.nrows(), d, |i, j| xs[(i, j)] + self.model.bo[j]);
        let x = |i: usize| -> Vec<f64> { (0..d).map(|j| xs[(i, j)]).collect() };
        match &self.shared {
            Some(fam) => {
                // p_a = P (x + b_o) for every candidate at once
                let pa = &xb * fam.p.transpose();
                (0..pairs.len())
                    .map(|i| {
                        let p = Col::from_fn(pa.ncols(), |j| pa[(i, j)]);
                        let s = self.solve_family(fam, pairs[i], &x(i), &p);
                        tick(i);
                        s
                    })
                    .collect()
            }
            None => {
                let ax = &xb * &self.ng;
                (0..pairs.len())
                    .map(|i| {
                        let a = Col::from_fn(ax.ncols(), |j| ax[(i, j)]);
                        let s = self.solve_linear(pairs[i], &x(i), &a);
                        tick(i);
                        s
                    })
                    .collect()
            }
        }
    }

    fn outcome(
        &self,
        (position, token): (usize, u32),
        pt: Point,
        screen_steps: usize,
        steps: usize,
        screened: bool,
    ) -> Solved {
        let tests = self.tests(&pt);
        let accepted = screened && self.within(&pt, &tests);
        Solved {
            position,
            token,
            c: pt.c,
            tests,
            screen_steps,
            steps,
            screened,
            accepted,
        }
    }

    /// No family (m = 0): the least-squares solution of A_x w = r is the context.
    fn solve_linear(&self, pair: (usize, u32), x: &[f64], a: &Col<f64>) -> Solved {
        let d = self.model.hidden();
        let rc = self.bc.ncols();
        let b = Col::from_fn(rc, |j| self.bc[(d, j)]);
        // A^T A = M0^T M0 + u b^T + b u^T + |a|^2 b b^T, u = M0^T a; A^T r = M0^T r + b (a . r)
        let u = self.m0.transpose() * a;
        let aa = a.squared_norm_l2();
        let ar: f64 = (0..a.nrows()).map(|j| a[j] * self.r[j]).sum();
        let gram = Mat::from_fn(rc, rc, |i, j| {
            self.m0tm0[(i, j)] + u[i] * b[j] + b[i] * u[j] + aa * b[i] * b[j]
        });
        let atr = Col::from_fn(rc, |i| self.m0tr[i] + b[i] * ar);
        let mut w = Col::<f64>::zeros(rc);
        if let Ok(eig) = gram.self_adjoint_eigen(Side::Lower) {
            let v = eig.U();
            for (k, &lk) in eig.S().column_vector().iter().enumerate() {
                if lk <= 0.0 {
                    continue;
                }
                let coef: f64 = (0..rc).map(|i| v[(i, k)] * atr[i]).sum::<f64>() / lk;
                for i in 0..rc {
                    w[i] += coef * v[(i, k)];
                }
            }
        }
        let pt = self.point(x, &w);
        self.outcome(pair, pt, 0, 0, true)
    }

    /// Screen, then the full system warm-started at the screen's point.
    fn solve_family(&self, fam: &Family, pair: (usize, u32), x: &[f64], pa: &Col<f64>) -> Solved {
        let d = self.model.hidden();
        let rc = self.bc.ncols();
        let m = fam.f.ncols();
        // w_x = -p_a (+ Y beta (1 + b.p_a) / |beta|^2 when the chart is a constraint)
        let mut w = Col::from_fn(rc, |i| -pa[i]);
        let bpa: f64 = (0..rc).map(|j| self.bc[(d, j)] * pa[j]).sum();
        let s = (1.0 + bpa) / fam.beta.squared_norm_l2();
        w += &fam.y * (&fam.beta * s);
        let mut pt = self.point(x, &w);
        if !(pt.den.is_finite() && pt.den != 0.0) {
            return self.outcome(pair, pt, 0, 0, false);
        }
        // the chart leaves LN_a's scale free: fix it on S_h alone first (its other
        // equations hold along the family), so the screen starts where A_x w = r does
        for _ in 0..SCALE_STEPS {
            let res = self.residual_h(&pt);
            let jt = self.jacobian_h(fam, &pt);
            let Some(theta) = gn_step(&jt, &res) else {
                break;
            };
            w = &w + &fam.f * &theta;
            pt = self.point(x, &w);
        }
        // the screen: a necessary test on S_h and the rows S of S_g
        let start = norm(&self.residual_screen(fam, &pt));
        let (mut best, mut best_w) = (start, w.clone());
        let mut screen_steps = 0;
        let mut screened = self.screen_within(fam, &pt);
        while !screened && screen_steps < GN_STEPS {
            let jt = self.jacobian_screen(fam, &pt);
            let res = self.residual_screen(fam, &pt);
            let Some(theta) = gn_step(&jt, &res) else {
                break;
            };
            w = &w + &fam.f * &theta;
            screen_steps += 1;
            let pn = self.point(x, &w);
            let now = norm(&self.residual_screen(fam, &pn));
            if !now.is_finite() {
                break;
            }
            pt = pn;
            if now < best {
                best = now;
                best_w = w.clone();
            }
            screened = self.screen_within(fam, &pt);
            // measured against the start, not the last step: a pair shared by several
            // sequences wanders among its contexts for a few steps (B = 32: "You" at 0,
            // in 12 sequences, was lost when every step had to halve)
            if !screened && screen_steps >= STALL_AFTER && best > STALL_SHARE * start {
                break;
            }
        }
        if !screened {
            if best < norm(&self.residual_screen(fam, &pt)) {
                pt = self.point(x, &best_w);
            }
            return self.outcome(pair, pt, screen_steps, 0, false);
        }
        // the full system from there (Gauss-Newton is not monotone where a shared
        // pair's null space holds several contexts: keep the best point seen)
        let mut best = norm(&self.residual(&pt));
        let mut best_w = w.clone();
        let mut steps = 0;
        while steps < GN_STEPS && !self.within(&pt, &self.tests(&pt)) {
            let jt = self.jacobian_full(fam, &pt);
            let res = self.residual(&pt);
            let Some(theta) = gn_step(&jt, &res) else {
                break;
            };
            debug_assert_eq!(theta.nrows(), m);
            w = &w + &fam.f * &theta;
            steps += 1;
            let pn = self.point(x, &w);
            let now = norm(&self.residual(&pn));
            if !now.is_finite() {
                break;
            }
            pt = pn;
            if now < best {
                best = now;
                best_w = w.clone();
            }
        }
        if norm(&self.residual(&pt)) > best {
            pt = self.point(x, &best_w);
        }
        self.outcome(pair, pt, screen_steps, steps, true)
    }

    /// The screen passes: its residual (S_h and S_g's rows S, each at most the full
    /// span's distance, absolute) within the full test's combined budget (`within`).
    fn screen_within(&self, fam: &Family, pt: &Point) -> bool {
        let tests = self.tests(pt);
        let got = norm(&self.residual_screen(fam, pt)).powi(2);
        match self.budget(pt, &tests) {
            Some(budget) => got <= budget,
            None => false,
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

    /// sum_s (tau_s |v~_s|)^2 over s in {h, g, o}, None when a span's threshold does not
    /// discriminate (tau_s > max_tau).
    fn budget(&self, pt: &Point, tests: &[Test; 3]) -> Option<f64> {
        let sq = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>() + 1.0;
        let norms = [sq(&pt.h), sq(&pt.g), sq(&pt.o)];
        let spans = [self.span_h, self.span_g, self.span_o];
        let mut budget = 0.0;
        for k in 0..3 {
            if tests[k].tau > spans[k].max_tau() {
                return None;
            }
            budget += tests[k].tau.powi(2) * norms[k];
        }
        Some(budget)
    }

    /// The solved point passes: Gauss-Newton minimises the stacked residual
    /// sum_s ||N_s^T v~_s||^2 = sum_s (d_s |v~_s|)^2, and at the true context each term is
    /// within its own threshold (d_s <= tau_s), so the minimum is within
    /// sum_s (tau_s |v~_s|)^2; each span must also discriminate (tau_s <= max_tau).
    /// One span alone may exceed its own tau: the solve trades the spans' noise.
    fn within(&self, pt: &Point, tests: &[Test; 3]) -> bool {
        let sq = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>() + 1.0;
        let norms = [sq(&pt.h), sq(&pt.g), sq(&pt.o)];
        let got: f64 = (0..3).map(|k| tests[k].distance.powi(2) * norms[k]).sum();
        self.budget(pt, tests).is_some_and(|b| got <= b)
    }
}
