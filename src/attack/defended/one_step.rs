//! Normal equations of the one-step fit (E = 1, no rounding bins) in closed form, on
//! the observed entries only (docs/DESIGN.md, "Defended gradients: pruning").
//!
//! A column of the Jacobian moves one sample i: along a direction u_c of its input, or
//! along one target y_ik. With E = 1 the tangent of sample i's gradient terms is
//!
//! ```text
//! dz = W u_c (0 for a target), dh = act'(z_i) o dz, dr = s dphi[dh A^T] (- s e_k),
//! ddelta = act''(z_i) o dz o (r_i A) + act'(z_i) o (A^T dr),
//! dO_W = ddelta x_i^T + delta_i u_c^T, dO_b = ddelta, dO_A = dr h_i^T + r_i dh^T, dO_c = dr
//! ```
//!
//! so each entry of a column is a few products of m-vectors and the column costs the
//! number of observed entries, not a full m x (d + 1) tangent (photos B = 8, m = 4096,
//! prune:0.9: 1.26 M observed of 16 M entries). J^T J and J^T r are accumulated in
//! blocks of rows, so J is never held whole.

use faer::{Col, Mat};

use super::unrolled::{LocalFit, Step};

/// Observed entries per block of J (J^T of a block is n x ROWS).
const ROWS: usize = 8192;

/// Per-column tangent vectors of one sample.
struct Columns {
    /// Sample of each column.
    sample: Vec<usize>,
    /// Input direction of each column (None: a target column).
    dir: Vec<Option<usize>>,
    /// ddelta, dh (m x n, stored neuron-major: [j * n + q]).
    ddelta: Vec<f64>,
    dh: Vec<f64>,
    /// dr (K x n, [k * n + q]).
    dr: Vec<f64>,
}

impl LocalFit {
    fn columns(&self, st: &Step, x: &Mat<f64>, free: &[usize]) -> Columns {
        let (bsz, _) = x.shape();
        let m = self.obs.w.nrows();
        let k = self.obs.a.nrows();
        let nb = self.u.ncols();
        let a = &st.p.a;
        let wu = &st.p.w * &self.u; // m x nb
        let s = self.model.scale(bsz, k);
        let n = free.len() * nb + bsz * k;
        let mut c = Columns {
            sample: Vec::with_capacity(n),
            dir: Vec::with_capacity(n),
            ddelta: vec![0.0; m * n],
            dh: vec![0.0; m * n],
            dr: vec![0.0; k * n],
        };
        let mut q = 0;
        let mut push = |c: &mut Columns, i: usize, dir: Option<usize>, dz: &[f64], dr: &[f64]| {
            // dra = dr A (an m-vector)
            for j in 0..m {
                let dra: f64 = (0..k).map(|l| dr[l] * a[(l, j)]).sum();
                c.ddelta[j * n + q] = st.d2[(i, j)] * dz[j] * st.ra[(i, j)] + st.d1[(i, j)] * dra;
                c.dh[j * n + q] = st.d1[(i, j)] * dz[j];
            }
            for (l, v) in dr.iter().enumerate() {
                c.dr[l * n + q] = *v;
            }
            c.sample.push(i);
            c.dir.push(dir);
            q += 1;
        };
        for &i in free {
            for dir in 0..nb {
                let dz: Vec<f64> = (0..m).map(|j| wu[(j, dir)]).collect();
                // df = dh A^T (1 x K), dr = s dphi(df)
                let df = Mat::from_fn(bsz, k, |ii, l| {
                    if ii == i {
                        (0..m).map(|j| st.d1[(i, j)] * dz[j] * a[(l, j)]).sum()
                    } else {
                        0.0
                    }
                });
                let dphi = self.model.dphi(&st.phi, &df);
                let dr: Vec<f64> = (0..k).map(|l| s * dphi[(i, l)]).collect();
                push(&mut c, i, Some(dir), &dz, &dr);
            }
        }
        let zeros = vec![0.0; m];
        for i in 0..bsz {
            for l in 0..k {
                let mut dr = vec![0.0; k];
                dr[l] = -s;
                push(&mut c, i, None, &zeros, &dr);
            }
        }
        c
    }

    /// (J^T J, J^T r) of the weighted residual on the entries `rows` (indices into the
    /// observed entries), for the free inputs' coordinates along U and the targets.
    pub(super) fn one_step_normal(
        &self,
        st: &Step,
        x: &Mat<f64>,
        free: &[usize],
        rows: &[usize],
        res: &Col<f64>,
    ) -> (Mat<f64>, Col<f64>) {
        let (m, d) = self.obs.w.shape();
        let k = self.obs.a.nrows();
        let cols = self.columns(st, x, free);
        let n = cols.sample.len();
        let [s0, s1, s2, s3] = self.sw;
        let mut jtj = Mat::<f64>::zeros(n, n);
        let mut grad = Col::<f64>::zeros(n);
        for block in rows.chunks(ROWS) {
            let mut jt = Mat::<f64>::zeros(n, block.len());
            let mut out = vec![0.0; n];
            for (a, &row) in block.iter().enumerate() {
                let p = self.kept.as_ref().map_or(row, |kept| kept[row]);
                if p < m * d {
                    let (l, j) = (p / m, p % m);
                    for (q, o) in out.iter_mut().enumerate() {
                        let i = cols.sample[q];
                        let mut v = cols.ddelta[j * n + q] * x[(i, l)];
                        if let Some(c) = cols.dir[q] {
                            v += st.delta[(i, j)] * self.u[(l, c)];
                        }
                        *o = s0 * v;
                    }
                } else if p < m * (d + 1) {
                    let j = p - m * d;
                    for (o, v) in out.iter_mut().zip(&cols.ddelta[j * n..(j + 1) * n]) {
                        *o = s1 * v;
                    }
                } else if p < m * (d + 1) + k * m {
                    let (j, l) = ((p - m * (d + 1)) / k, (p - m * (d + 1)) % k);
                    for (q, o) in out.iter_mut().enumerate() {
                        let i = cols.sample[q];
                        *o = s2
                            * (cols.dr[l * n + q] * st.h[(i, j)]
                                + st.r[(i, l)] * cols.dh[j * n + q]);
                    }
                } else {
                    let l = p - m * (d + 1) - k * m;
                    for (o, v) in out.iter_mut().zip(&cols.dr[l * n..(l + 1) * n]) {
                        *o = s3 * v;
                    }
                }
                for (q, v) in out.iter().enumerate() {
                    jt[(q, a)] = *v;
                }
            }
            let rb = Col::from_fn(block.len(), |a| res[block[a]]);
            jtj += &jt * jt.transpose();
            grad += &jt * &rb;
        }
        (jtj, grad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::defense::Defense;
    use crate::model::Loss;

    /// The closed form equals J^T J and J^T r of the tangent-based Jacobian (itself
    /// checked against central differences in `unrolled`) on a pruned gradient, with a
    /// held sample, a reduced input basis and a start off the truth.
    #[test]
    fn closed_form_matches_the_tangents() {
        let (out, view) = super::super::defended_round(vec![Defense::Prune(0.5)], 3, 64);
        let x = out.batch.x.clone();
        let (b, d) = x.shape();
        let x0 = Mat::from_fn(b, d, |i, j| {
            x[(i, j)] + 0.05 * ((3 * i + 7 * j) as f64).sin()
        });
        let y0 = Mat::from_fn(b, 10, |i, j| 0.1 + 0.05 * ((i + 2 * j) as f64).cos());
        let u = Mat::from_fn(d, 5, |i, j| ((i * 5 + j) as f64 * 0.37).sin());
        let u = u.qr().compute_thin_Q();
        let fit = LocalFit::with_basis(&view, 1, 0.0, Loss::Ce, u)
            .unwrap()
            .masked();
        let (res, steps) = fit.residual(&x0, &y0);
        let rows: Vec<usize> = (0..res.nrows()).collect();
        let free = [0, 2];
        let (jtj, grad) = fit.one_step_normal(&steps[0], &x0, &free, &rows, &res);
        let jac = fit.jacobian(&steps, &x0, &free, &rows);
        let want_jtj = jac.transpose() * &jac;
        let want_grad = jac.transpose() * &res;
        let rel = |a: f64, n: f64| a / n;
        // both are sums of the same products in a different order: f64 rounding only
        assert!(rel((&jtj - &want_jtj).norm_l2(), want_jtj.norm_l2()) < 1e-12);
        assert!(rel((&grad - &want_grad).norm_l2(), want_grad.norm_l2()) < 1e-12);
        assert_eq!(jtj.nrows(), free.len() * 5 + b * 10);
    }
}
