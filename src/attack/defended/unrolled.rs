//! The E-step map of a two-layer net and its joint fit (docs/DESIGN.md, "Defended
//! gradients: local steps"): X, Y -> sum_t g(theta_t) with theta_{t+1} = theta_t - LR
//! g(theta_t), forward-mode tangents through the E steps, Levenberg-Marquardt on the
//! inputs' coordinates in O_W's row space and free targets.

// `!(x > 0.0)` is deliberate throughout: it also rejects NaN.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

use faer::linalg::solvers::Solve;
use faer::{Col, Mat};

use crate::attack::ServerView;
use crate::model::{Activation, Loss};
use crate::numerics::damped;
use crate::{Error, Result};

/// Levenberg-Marquardt iterations at most on the E-step map.
pub const STEPS: usize = 40;
/// Stop once the weighted residual per entry, relative to the observation's, is below
/// this (f64 rounding of an E-step sum).
pub const FLOOR: f64 = 1e-26;

/// One dense layer's tensors.
#[derive(Clone)]
pub(super) struct Params {
    pub(super) w: Mat<f64>,
    pub(super) b: Col<f64>,
    pub(super) a: Mat<f64>,
    pub(super) c: Col<f64>,
}

impl Params {
    fn zeros(m: usize, d: usize, k: usize) -> Self {
        Params {
            w: Mat::zeros(m, d),
            b: Col::zeros(m),
            a: Mat::zeros(k, m),
            c: Col::zeros(k),
        }
    }

    fn axpy(&mut self, s: f64, o: &Params) {
        self.w += faer::Scale(s) * &o.w;
        self.b += faer::Scale(s) * &o.b;
        self.a += faer::Scale(s) * &o.a;
        self.c += faer::Scale(s) * &o.c;
    }
}

/// The forward quantities of one local step.
pub(super) struct Step {
    pub(super) p: Params,
    pub(super) h: Mat<f64>,
    pub(super) d1: Mat<f64>,
    pub(super) d2: Mat<f64>,
    /// phi(F): softmax (ce), F (mse), sigmoid (bce).
    pub(super) phi: Mat<f64>,
    pub(super) r: Mat<f64>,
    pub(super) ra: Mat<f64>,
    pub(super) delta: Mat<f64>,
}

/// The E-step map X, Y -> sum_t g(theta_t) of a two-layer net.
pub struct Unrolled {
    act: Activation,
    loss: Loss,
    pub(super) theta0: Params,
    lr: f64,
    steps: usize,
}

fn add_row(z: &mut Mat<f64>, v: &Col<f64>) {
    for j in 0..z.ncols() {
        for i in 0..z.nrows() {
            z[(i, j)] += v[j];
        }
    }
}

fn col_sums(z: &Mat<f64>) -> Col<f64> {
    Col::from_fn(z.ncols(), |j| (0..z.nrows()).map(|i| z[(i, j)]).sum())
}

impl Unrolled {
    /// Residual scale of the mean loss: r = scale (phi(F) - Y).
    pub(super) fn scale(&self, bsz: usize, k: usize) -> f64 {
        match self.loss {
            Loss::Ce => 1.0 / bsz as f64,
            Loss::Mse => 2.0 / (bsz * k) as f64,
            Loss::Bce => 1.0 / (bsz * k) as f64,
        }
    }

    fn phi(&self, f: &Mat<f64>) -> Mat<f64> {
        let (bsz, k) = f.shape();
        match self.loss {
            Loss::Ce => {
                let mut p = Mat::zeros(bsz, k);
                for i in 0..bsz {
                    let mx = (0..k).map(|j| f[(i, j)]).fold(f64::NEG_INFINITY, f64::max);
                    let s: f64 = (0..k).map(|j| (f[(i, j)] - mx).exp()).sum();
                    for j in 0..k {
                        p[(i, j)] = (f[(i, j)] - mx).exp() / s;
                    }
                }
                p
            }
            Loss::Mse => f.clone(),
            Loss::Bce => Mat::from_fn(bsz, k, |i, j| Activation::Sigmoid.eval(f[(i, j)])),
        }
    }

    /// d phi along dF at phi(F) = `phi`.
    pub(super) fn dphi(&self, phi: &Mat<f64>, df: &Mat<f64>) -> Mat<f64> {
        let (bsz, k) = df.shape();
        match self.loss {
            Loss::Ce => {
                let mut out = Mat::zeros(bsz, k);
                for i in 0..bsz {
                    let pd: f64 = (0..k).map(|j| phi[(i, j)] * df[(i, j)]).sum();
                    for j in 0..k {
                        out[(i, j)] = phi[(i, j)] * (df[(i, j)] - pd);
                    }
                }
                out
            }
            Loss::Mse => df.clone(),
            Loss::Bce => Mat::from_fn(bsz, k, |i, j| {
                phi[(i, j)] * (1.0 - phi[(i, j)]) * df[(i, j)]
            }),
        }
    }

    fn step(&self, p: Params, x: &Mat<f64>, y: &Mat<f64>) -> (Step, Params) {
        let mut z = x * p.w.transpose();
        add_row(&mut z, &p.b);
        let (bsz, m) = z.shape();
        let k = p.a.nrows();
        let h = Mat::from_fn(bsz, m, |i, j| self.act.eval(z[(i, j)]));
        let d1 = Mat::from_fn(bsz, m, |i, j| self.act.d1(z[(i, j)]));
        let d2 = Mat::from_fn(bsz, m, |i, j| self.act.d2(z[(i, j)]));
        let mut f = &h * p.a.transpose();
        add_row(&mut f, &p.c);
        let phi = self.phi(&f);
        let s = self.scale(bsz, k);
        let r = Mat::from_fn(bsz, k, |i, j| s * (phi[(i, j)] - y[(i, j)]));
        let ra = &r * &p.a;
        let delta = Mat::from_fn(bsz, m, |i, j| d1[(i, j)] * ra[(i, j)]);
        let g = Params {
            w: delta.transpose() * x,
            b: col_sums(&delta),
            a: r.transpose() * &h,
            c: col_sums(&r),
        };
        (
            Step {
                p,
                h,
                d1,
                d2,
                phi,
                r,
                ra,
                delta,
            },
            g,
        )
    }

    /// The observation the E steps produce, and every step's forward quantities.
    pub(super) fn forward(&self, x: &Mat<f64>, y: &Mat<f64>) -> (Params, Vec<Step>) {
        let (m, d) = self.theta0.w.shape();
        let k = self.theta0.a.nrows();
        let mut total = Params::zeros(m, d, k);
        let mut theta = self.theta0.clone();
        let mut steps = Vec::with_capacity(self.steps);
        for _ in 0..self.steps {
            let (st, g) = self.step(theta.clone(), x, y);
            total.axpy(1.0, &g);
            theta.axpy(-self.lr, &g);
            steps.push(st);
        }
        (total, steps)
    }

    /// The observation's tangent along (dX, dY) (forward mode through the E steps).
    pub(super) fn tangent(
        &self,
        steps: &[Step],
        x: &Mat<f64>,
        dx: &Mat<f64>,
        dy: &Mat<f64>,
    ) -> Params {
        let (m, d) = self.theta0.w.shape();
        let k = self.theta0.a.nrows();
        let bsz = x.nrows();
        let s = self.scale(bsz, k);
        let mut dtheta = Params::zeros(m, d, k);
        let mut total = Params::zeros(m, d, k);
        for (t, st) in steps.iter().enumerate() {
            let moved = t > 0;
            let mut dz = dx * st.p.w.transpose();
            if moved {
                dz += x * dtheta.w.transpose();
                add_row(&mut dz, &dtheta.b);
            }
            let dh = Mat::from_fn(bsz, m, |i, j| st.d1[(i, j)] * dz[(i, j)]);
            let mut df = &dh * st.p.a.transpose();
            if moved {
                df += &st.h * dtheta.a.transpose();
                add_row(&mut df, &dtheta.c);
            }
            let dphi = self.dphi(&st.phi, &df);
            let dr = Mat::from_fn(bsz, k, |i, j| s * (dphi[(i, j)] - dy[(i, j)]));
            let mut dra = &dr * &st.p.a;
            if moved {
                dra += &st.r * &dtheta.a;
            }
            let ddelta = Mat::from_fn(bsz, m, |i, j| {
                st.d2[(i, j)] * dz[(i, j)] * st.ra[(i, j)] + st.d1[(i, j)] * dra[(i, j)]
            });
            let dg = Params {
                w: ddelta.transpose() * x + st.delta.transpose() * dx,
                b: col_sums(&ddelta),
                a: dr.transpose() * &st.h + st.r.transpose() * &dh,
                c: col_sums(&dr),
            };
            total.axpy(1.0, &dg);
            dtheta.axpy(-self.lr, &dg);
        }
        total
    }
}

/// The joint fit: unknowns x_i in x0_i + span U (U d x nb orthonormal: O_W's row space
/// for local steps, all of R^d under pruning) for the samples not held, and y_i
/// (targets, free reals) for all; residual sqrt(weight) (model - O) per tensor, on the
/// observed entries only when a mask is set.
pub struct LocalFit {
    pub(super) model: Unrolled,
    pub(super) obs: Params,
    pub(super) u: Mat<f64>,
    /// sqrt of the weight of (W, b, A, c): 1 / RMS of the observed layer.
    pub(super) sw: [f64; 4],
    /// Flattened indices of the observed entries (None: all).
    pub(super) kept: Option<Vec<usize>>,
    /// Half-widths of the rounding bins of (W, b, A, c): the residual of an entry is
    /// its distance to the bin around the observed value (None: plain residual).
    bins: Option<[f64; 4]>,
}

/// Outcome of [`LocalFit::fit`].
pub struct Fitted {
    pub x: Mat<f64>,
    pub y: Mat<f64>,
    pub iterations: usize,
    /// Weighted squared residual per observed entry at the start and at the end.
    pub start: f64,
    pub objective: f64,
    /// Output residuals of the first step (labels).
    pub r: Mat<f64>,
}

impl Fitted {
    /// Sample `i`'s fitted input.
    pub fn input(&self, i: usize) -> Vec<f64> {
        self.x.row(i).iter().copied().collect()
    }

    /// Sample `i`'s class under cross-entropy: its largest fitted target.
    pub fn label(&self, i: usize) -> Option<usize> {
        (0..self.y.ncols()).max_by(|&p, &q| self.y[(i, p)].total_cmp(&self.y[(i, q)]))
    }

    /// Sample `i`'s output residual at the first step.
    pub fn output_residual(&self, i: usize) -> Vec<f64> {
        self.r.row(i).iter().copied().collect()
    }
}

/// The targets Y0 (B x K) a fit starts from: for cross-entropy each sample's label
/// one-hot (uniform over the K classes where it is unknown), zeros for the other losses.
pub fn start_targets(loss: Loss, labels: &[Option<usize>], k: usize) -> Mat<f64> {
    Mat::from_fn(labels.len(), k, |i, j| match (loss, labels[i]) {
        (Loss::Ce, Some(l)) => f64::from(l == j),
        (Loss::Ce, None) => 1.0 / k as f64,
        _ => 0.0,
    })
}

impl LocalFit {
    /// From the view, E, LR and the loss; the inputs move in O_W's top-`batch` row space.
    pub fn new(view: &ServerView, steps: usize, lr: f64, loss: Loss, batch: usize) -> Result<Self> {
        let g = view.first.grad_weight.to_mat()?;
        let u = row_space(&g, batch)?;
        Self::with_basis(view, steps, lr, loss, u)
    }

    /// As [`Self::new`] with the inputs' directions `u` (d x nb, orthonormal columns).
    pub fn with_basis(
        view: &ServerView,
        steps: usize,
        lr: f64,
        loss: Loss,
        u: Mat<f64>,
    ) -> Result<Self> {
        if view.depth() != 1 {
            return Err(Error::Needs {
                what: "the E-step model",
                needs: "one hidden layer",
            });
        }
        let bias = |b: &Option<Col<f64>>, n: usize| b.clone().unwrap_or_else(|| Col::zeros(n));
        let m = view.width();
        let k = view.outputs();
        let theta0 = Params {
            w: view.first.weight.to_mat()?,
            b: bias(&view.first.bias, m),
            a: view.upper[0].weight.clone(),
            c: bias(&view.upper[0].bias, k),
        };
        let obs = Params {
            w: view.first.grad_weight.to_mat()?,
            b: bias(&view.first.grad_bias, m),
            a: view.upper_grad[0].weight.clone(),
            c: bias(&view.upper_grad[0].bias, k),
        };
        let rms1 = ((obs.w.squared_norm_l2() + obs.b.squared_norm_l2())
            / (m * (obs.w.ncols() + 1)) as f64)
            .sqrt();
        let rms2 =
            ((obs.a.squared_norm_l2() + obs.c.squared_norm_l2()) / (k * (m + 1)) as f64).sqrt();
        if !(rms1 > 0.0 && rms2 > 0.0) {
            return Err(Error::Invalid("the observed update is zero".into()));
        }
        Ok(LocalFit {
            model: Unrolled {
                act: view.activation,
                loss,
                theta0,
                lr,
                steps,
            },
            obs,
            u,
            sw: [1.0 / rms1, 1.0 / rms1, 1.0 / rms2, 1.0 / rms2],
            kept: None,
            bins: None,
        })
    }

    /// Fit only the entries that are not exactly zero (pruned / sparsified entries are
    /// unknowns, not zeros).
    pub fn masked(mut self) -> Self {
        let mut all = vec![0.0; self.full_entries()];
        let sw = self.sw;
        self.sw = [1.0; 4];
        self.flatten_all(&self.obs, &mut all);
        self.sw = sw;
        self.kept = Some((0..all.len()).filter(|&p| all[p] != 0.0).collect());
        self
    }

    /// Residuals are distances to the rounding bins of half-width `half` per tensor
    /// (W, b, A, c): a consistent estimate (every entry rounds to what was received).
    pub fn binned(mut self, half: [f64; 4]) -> Self {
        self.bins = Some(half);
        self
    }

    /// The tensor (0..4) of flattened entry `p`.
    fn tensor_of(&self, p: usize) -> usize {
        let (m, d) = self.obs.w.shape();
        let k = self.obs.a.nrows();
        let ends = [m * d, m * (d + 1), m * (d + 1) + k * m];
        ends.iter().position(|&e| p < e).unwrap_or(3)
    }

    fn full_entries(&self) -> usize {
        let (m, d) = self.obs.w.shape();
        let k = self.obs.a.nrows();
        m * (d + 1) + k * (m + 1)
    }

    fn entries(&self) -> usize {
        self.kept.as_ref().map_or(self.full_entries(), Vec::len)
    }

    /// Flattened weighted tensor: W column-major, b, A column-major, c.
    fn flatten_all(&self, g: &Params, out: &mut [f64]) {
        let [s0, s1, s2, s3] = self.sw;
        let values = col_major(&g.w)
            .map(|x| s0 * x)
            .chain(g.b.iter().map(|x| s1 * x))
            .chain(col_major(&g.a).map(|x| s2 * x))
            .chain(g.c.iter().map(|x| s3 * x));
        for (o, v) in out.iter_mut().zip(values) {
            *o = v;
        }
    }

    /// The observed entries of the flattened weighted tensor into `out`.
    fn flatten(&self, g: &Params, buf: &mut [f64], out: &mut [f64]) {
        self.flatten_all(g, buf);
        match &self.kept {
            None => out.copy_from_slice(buf),
            Some(kept) => {
                for (o, &p) in out.iter_mut().zip(kept) {
                    *o = buf[p];
                }
            }
        }
    }

    pub(super) fn residual(&self, x: &Mat<f64>, y: &Mat<f64>) -> (Col<f64>, Vec<Step>) {
        let (mut g, steps) = self.model.forward(x, y);
        g.axpy(-1.0, &self.obs);
        let mut buf = vec![0.0; self.full_entries()];
        let mut r = vec![0.0; self.entries()];
        self.flatten(&g, &mut buf, &mut r);
        if let Some(half) = self.bins {
            for (a, v) in r.iter_mut().enumerate() {
                let p = self.kept.as_ref().map_or(a, |k| k[a]);
                let t = self.tensor_of(p);
                let h = self.sw[t] * half[t];
                *v = v.signum() * (v.abs() - h).max(0.0);
            }
        }
        (Col::from_fn(r.len(), |i| r[i]), steps)
    }

    /// Rows of the Jacobian that count: all, or with bins those outside their bin.
    fn active(&self, res: &Col<f64>) -> Vec<usize> {
        (0..res.nrows())
            .filter(|&p| self.bins.is_none() || res[p] != 0.0)
            .collect()
    }

    /// The Jacobian (observed entries x (free samples x nb + B K)) of the weighted
    /// residual in (the free inputs' coordinates along U, y).
    pub(super) fn jacobian(
        &self,
        steps: &[Step],
        x: &Mat<f64>,
        free: &[usize],
        rows: &[usize],
    ) -> Mat<f64> {
        let (bsz, d) = x.shape();
        let nb = self.u.ncols();
        let k = self.obs.a.nrows();
        let nx = free.len() * nb;
        let n = nx + bsz * k;
        let mut jac = Mat::zeros(rows.len(), n);
        let mut buf = vec![0.0; self.full_entries()];
        let mut col = vec![0.0; self.entries()];
        for q in 0..n {
            let mut dx = Mat::zeros(bsz, d);
            let mut dy = Mat::zeros(bsz, k);
            if q < nx {
                let (i, c) = (free[q / nb], q % nb);
                for l in 0..d {
                    dx[(i, l)] = self.u[(l, c)];
                }
            } else {
                let q2 = q - nx;
                dy[(q2 / k, q2 % k)] = 1.0;
            }
            let g = self.model.tangent(steps, x, &dx, &dy);
            self.flatten(&g, &mut buf, &mut col);
            for (a, &p) in rows.iter().enumerate() {
                jac[(a, q)] = col[p];
            }
        }
        jac
    }

    /// (J^T J, J^T r) on the entries `rows`: in closed form for one step without
    /// bins ([`Self::one_step_normal`]), otherwise from the whole Jacobian.
    fn normal(
        &self,
        steps: &[Step],
        x: &Mat<f64>,
        free: &[usize],
        rows: &[usize],
        res: &Col<f64>,
    ) -> (Mat<f64>, Col<f64>) {
        if let [st] = steps
            && self.bins.is_none()
        {
            return self.one_step_normal(st, x, free, rows, res);
        }
        let jac = self.jacobian(steps, x, free, rows);
        let ra = Col::from_fn(rows.len(), |a| res[rows[a]]);
        (jac.transpose() * &jac, jac.transpose() * &ra)
    }

    /// Levenberg-Marquardt from inputs `x0` (B x d) and targets `y0` (B x K); the
    /// inputs of the samples flagged in `held` stay as given, the others start at their
    /// projection on span U.
    pub fn fit(
        &self,
        x0: &Mat<f64>,
        y0: &Mat<f64>,
        held: &[bool],
        iterations: usize,
    ) -> Result<Fitted> {
        let (bsz, d) = x0.shape();
        let free: Vec<usize> = (0..bsz)
            .filter(|&i| !held.get(i).copied().unwrap_or(false))
            .collect();
        let entries = self.entries() as f64;
        let proj = x0 * &self.u * self.u.transpose();
        let x = Mat::from_fn(bsz, d, |i, l| {
            if free.contains(&i) {
                proj[(i, l)]
            } else {
                x0[(i, l)]
            }
        });
        let (res, steps) = self.residual(&x, y0);
        let f = res.squared_norm_l2();
        let start = f / entries;
        let p = EStep {
            fit: self,
            free: &free,
        };
        let at = At {
            x,
            y: y0.clone(),
            res,
            steps,
        };
        let stop = damped::Stop {
            steps: iterations,
            min_gain: Some(1e-12),
            converged: |f: f64| !(f / entries > FLOOR),
        };
        let m = damped::minimise(&p, at, f, &damped::LARGE, stop);
        Ok(Fitted {
            r: m.point.steps[0].r.clone(),
            x: m.point.x,
            y: m.point.y,
            iterations: m.steps,
            start,
            objective: m.objective / entries,
        })
    }
}

/// A point of the E-step fit: inputs, targets, and the residual and local steps there.
struct At {
    x: Mat<f64>,
    y: Mat<f64>,
    res: Col<f64>,
    steps: Vec<Step>,
}

/// The E-step fit in the free samples' span coordinates and every target, as normal
/// equations for [`damped::minimise`].
struct EStep<'a> {
    fit: &'a LocalFit,
    free: &'a [usize],
}

impl damped::NormalEquations for EStep<'_> {
    type Point = At;
    /// J^T J and J^T e on the active rows.
    type System = (Mat<f64>, Col<f64>);

    fn system(&self, at: &At) -> Option<(Mat<f64>, Col<f64>)> {
        let rows = self.fit.active(&at.res);
        Some(self.fit.normal(&at.steps, &at.x, self.free, &rows, &at.res))
    }

    fn step(&self, at: &At, sys: &(Mat<f64>, Col<f64>), lambda: f64) -> Option<At> {
        let (jtj, grad) = sys;
        let u = &self.fit.u;
        let (bsz, d) = at.x.shape();
        let (nb, k) = (u.ncols(), at.y.ncols());
        let nx = self.free.len() * nb;
        let n = jtj.nrows();
        let a = Mat::from_fn(n, n, |p, q| {
            if p == q {
                jtj[(p, p)] * (1.0 + lambda) + 1e-300
            } else {
                jtj[(p, q)]
            }
        });
        let sol = a.partial_piv_lu().solve(grad);
        if !sol.norm_l2().is_finite() {
            return None;
        }
        let mut xc = at.x.clone();
        for (a, &i) in self.free.iter().enumerate() {
            for l in 0..nb {
                let s = sol[a * nb + l];
                for c in 0..d {
                    xc[(i, c)] -= s * u[(c, l)];
                }
            }
        }
        let yc = Mat::from_fn(bsz, k, |i, l| at.y[(i, l)] - sol[nx + i * k + l]);
        let (res, steps) = self.fit.residual(&xc, &yc);
        Some(At {
            x: xc,
            y: yc,
            res,
            steps,
        })
    }

    fn objective(&self, at: &At) -> f64 {
        at.res.squared_norm_l2()
    }
}

/// An orthonormal basis (d x B) of the row space of `g` (m x d, rank B): randomized
/// range finder with oversampling and two power iterations (exact for rank B).
pub(super) fn row_space(g: &Mat<f64>, batch: usize) -> Result<Mat<f64>> {
    super::reduced::range_finder(g, batch, 6, 2, 0x10ca_157e)
}

/// The entries of `m` column by column.
pub(super) fn col_major(m: &Mat<f64>) -> impl Iterator<Item = f64> + '_ {
    (0..m.ncols()).flat_map(move |j| (0..m.nrows()).map(move |i| m[(i, j)]))
}
