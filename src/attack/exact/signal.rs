//! The predicted first-layer signal of one candidate input with a free output
//! residual: s(c, r)_j = dL/dz_j for x~ = V c and dL/df = r (docs/DESIGN.md,
//! "Signal model"). Shared by the span search and refinement.
//!
//! Coordinates: every candidate lies in the row space, x~ = V c, and its bias
//! coordinate is 1, so c = c0 + N t with t in R^(B-1) (N spans the directions that
//! keep the bias coordinate fixed).

use faer::{Col, Mat};

use crate::attack::blocks::Side;
use crate::attack::subspace::Subspace;
use crate::attack::view::ServerView;
use crate::model::{Activation, Mlp};
use crate::{Error, Result};

/// Affine coordinates of the inputs inside the row space.
#[derive(Clone, Debug)]
pub struct Coordinates {
    /// Row-space basis V, (d+1) x B.
    pub v: Mat<f64>,
    /// The point of the span closest to 0 with bias coordinate 1.
    pub c0: Col<f64>,
    /// B x (B-1) orthonormal basis of the directions with zero bias coordinate.
    pub n: Mat<f64>,
}

impl Coordinates {
    /// From the row-space basis; needs a first-layer bias (the last row of V non-zero).
    pub fn new(v: &Mat<f64>) -> Result<Self> {
        let (d1, b) = v.shape();
        let vl = Col::from_fn(b, |k| v[(d1 - 1, k)]);
        let nl = vl.norm_l2();
        if nl < 1e-8 {
            return Err(Error::NeedsFirstLayerBias {
                method: "the search",
            });
        }
        let c0 = Col::from_fn(b, |k| vl[k] / (nl * nl));
        // Householder QR of [vl/|vl|, I]: the first column of Q is +-vl/|vl|, the
        // other B-1 are an orthonormal basis of its complement.
        let basis = Mat::from_fn(b, b + 1, |i, j| {
            if j == 0 {
                vl[i] / nl
            } else {
                f64::from(i == j - 1)
            }
        });
        let q = basis.qr().compute_Q();
        let n = q.subcols(1, b - 1).to_owned();
        Ok(Coordinates {
            v: v.clone(),
            c0,
            n,
        })
    }

    pub fn batch(&self) -> usize {
        self.v.ncols()
    }
    pub fn input_dim(&self) -> usize {
        self.v.nrows() - 1
    }
    pub fn c_of_t(&self, t: &Col<f64>) -> Col<f64> {
        &self.c0 + &self.n * t
    }
    pub fn t_of_c(&self, c: &Col<f64>) -> Col<f64> {
        self.n.transpose() * (c - &self.c0)
    }
    /// x (d values) of coordinates c, the bias coordinate dropped.
    pub fn x_of_c(&self, c: &Col<f64>) -> Vec<f64> {
        let xt = &self.v * c;
        (0..self.input_dim()).map(|k| xt[k]).collect()
    }
    /// Coordinates of an input x: the closest point of the span with bias coordinate 1.
    pub fn c_of_x(&self, x: &[f64]) -> Col<f64> {
        let d = self.input_dim();
        let xt = Col::from_fn(d + 1, |k| if k < d { x[k] } else { 1.0 });
        let c = self.v.transpose() * &xt;
        self.c_of_t(&self.t_of_c(&c))
    }
}

/// The network above the first layer, as the signal model needs it.
#[derive(Clone, Debug)]
enum Upper {
    /// f = A act(z) + c: s_j = act'(z_j) (A_{:,j} . r), closed-form derivatives.
    TwoLayer { a: Mat<f64> },
    /// Deeper: one forward and K backward passes (one per output unit).
    Deep { model: Box<Mlp<f64>> },
}

/// Predicts first-layer signals for candidate inputs.
#[derive(Clone, Debug)]
pub struct SignalModel {
    pub act: Activation,
    pub coords: Coordinates,
    /// Projected first-layer weights P = W~ V (m x B): z = P c.
    pub p: Mat<f64>,
    /// P N (m x (B-1)): dz/dt.
    pub pn: Mat<f64>,
    /// P^T and (P N)^T, so a neuron's row is a contiguous column.
    pt: Mat<f64>,
    pnt: Mat<f64>,
    /// Output dimension K.
    pub k: usize,
    upper: Upper,
}

impl SignalModel {
    pub fn new(view: &ServerView, sub: &Subspace) -> Result<Self> {
        let coords = Coordinates::new(&sub.v)?;
        let p = view.augmented_times(Side::Weight, sub.v.as_ref())?;
        let pn = &p * &coords.n;
        let upper = if view.upper.is_empty() {
            return Err(Error::Unsupported(
                "the model has a single layer: there is no hidden signal to search".into(),
            ));
        } else if view.upper.len() == 1 {
            Upper::TwoLayer {
                a: view.upper[0].weight.clone(),
            }
        } else {
            Upper::Deep {
                model: Box::new(view.model()?),
            }
        };
        let pt = p.transpose().to_owned();
        let pnt = pn.transpose().to_owned();
        Ok(SignalModel {
            act: view.activation,
            coords,
            p,
            pn,
            pt,
            pnt,
            k: view.outputs(),
            upper,
        })
    }

    pub fn width(&self) -> usize {
        self.p.nrows()
    }
    /// The output weights A (K x m) of a two-layer model.
    pub fn output_weights(&self) -> Option<&Mat<f64>> {
        match &self.upper {
            Upper::TwoLayer { a } => Some(a),
            Upper::Deep { .. } => None,
        }
    }
    pub fn batch(&self) -> usize {
        self.p.ncols()
    }
    /// Number of t unknowns (B - 1).
    pub fn dims(&self) -> usize {
        self.pn.ncols()
    }

    /// Pre-activations of the first layer at c, on `rows`.
    pub fn z(&self, c: &Col<f64>, rows: &[usize]) -> Vec<f64> {
        let c: Vec<f64> = c.iter().copied().collect();
        rows.iter()
            .map(|&j| {
                let col = self.pt.col(j);
                c.iter().enumerate().map(|(k, ck)| col[k] * ck).sum()
            })
            .collect()
    }

    /// M (n x K) with s = M r on `rows`: column k is the signal of output unit k.
    pub fn signal_matrix(&self, c: &Col<f64>, rows: &[usize]) -> Mat<f64> {
        match &self.upper {
            Upper::TwoLayer { a } => {
                let d1: Vec<f64> = self
                    .z(c, rows)
                    .into_iter()
                    .map(|z| self.act.d1(z))
                    .collect();
                Mat::from_fn(rows.len(), self.k, |i, k| d1[i] * a[(k, rows[i])])
            }
            Upper::Deep { model } => {
                let full = self.deep_signals(model, c);
                Mat::from_fn(rows.len(), self.k, |i, k| full[(rows[i], k)])
            }
        }
    }

    /// Hidden pre-activations z_0 = P c, z_l = W_l act(z_{l-1}) + b_l of a deep model
    /// (the first layer through P, O(m B), never the m x d weight).
    fn deep_forward(&self, model: &Mlp<f64>, c: &Col<f64>) -> Vec<Col<f64>> {
        let mut z = vec![&self.p * c];
        for layer in &model.layers[1..model.layers.len() - 1] {
            let prev = z.last().expect("z_0");
            let h = Col::from_fn(prev.nrows(), |j| self.act.eval(prev[j]));
            let mut next = &layer.weight * &h;
            if let Some(b) = &layer.bias {
                next += b;
            }
            z.push(next);
        }
        z
    }

    /// m x K signals of every output unit for a deep model: the backward pass from
    /// dL/df = I_K, deltas only (no weight gradients are formed). Kept as n_l x K
    /// columns, so with few outputs each step is a product of W_l^T with K vectors.
    fn deep_signals(&self, model: &Mlp<f64>, c: &Col<f64>) -> Mat<f64> {
        let k = self.k;
        let z = self.deep_forward(model, c);
        let mut delta = Mat::<f64>::identity(k, k);
        for l in (1..model.layers.len()).rev() {
            let back = model.layers[l].weight.transpose() * &delta;
            let d1: Vec<f64> = z[l - 1].iter().map(|&v| self.act.d1(v)).collect();
            delta = Mat::from_fn(back.nrows(), k, |j, i| back[(j, i)] * d1[j]);
        }
        delta
    }

    /// The signal s = M r (n) and ds/dt (n x (B-1)) on `rows`.
    pub fn signal_and_dt(
        &self,
        c: &Col<f64>,
        r: &Col<f64>,
        rows: &[usize],
    ) -> (Col<f64>, Mat<f64>, Mat<f64>) {
        let nb = self.dims();
        match &self.upper {
            Upper::TwoLayer { a } => {
                let z = self.z(c, rows);
                let ar: Vec<f64> = rows
                    .iter()
                    .map(|&j| (0..self.k).map(|k| a[(k, j)] * r[k]).sum())
                    .collect();
                let d1: Vec<f64> = z.iter().map(|&z| self.act.d1(z)).collect();
                let d2ar: Vec<f64> = z
                    .iter()
                    .zip(&ar)
                    .map(|(&z, &ar)| self.act.d2(z) * ar)
                    .collect();
                let s = Col::from_fn(rows.len(), |i| d1[i] * ar[i]);
                let dt = Mat::from_fn(rows.len(), nb, |i, k| d2ar[i] * self.pnt[(k, rows[i])]);
                let m = Mat::from_fn(rows.len(), self.k, |i, k| d1[i] * a[(k, rows[i])]);
                (s, dt, m)
            }
            Upper::Deep { model } => {
                let m = self.signal_matrix(c, rows);
                let s = &m * r;
                let dt = self.deep_dt(model, c, r, rows);
                (s, dt, m)
            }
        }
    }
}

impl SignalModel {
    /// ds/dt (n x (B-1)) of a deep model by forward-mode differentiation of the backward
    /// pass (docs/DESIGN.md, "Signal model"): tangents dz_0 = P N, dz_l = W_l (act'(z_{l-1}) dz_{l-1})
    /// up, then d delta_{l-1} = (W_l^T d delta_l) act'(z_{l-1}) + (W_l^T delta_l) act''(z_{l-1}) dz_{l-1}
    /// down from d delta_out = 0 (r is held fixed).
    fn deep_dt(&self, model: &Mlp<f64>, c: &Col<f64>, r: &Col<f64>, rows: &[usize]) -> Mat<f64> {
        let nb = self.dims();
        let act = self.act;
        let nl = model.layers.len();
        let zs = self.deep_forward(model, c);
        // act' and act'' of every hidden layer, once (not per tangent column)
        let d1: Vec<Vec<f64>> = zs
            .iter()
            .map(|z| z.iter().map(|&v| act.d1(v)).collect())
            .collect();
        let d2: Vec<Vec<f64>> = zs
            .iter()
            .map(|z| z.iter().map(|&v| act.d2(v)).collect())
            .collect();
        // forward tangents of the hidden pre-activations
        let mut dz: Vec<Mat<f64>> = vec![self.pn.clone()];
        for l in 1..nl - 1 {
            let g = &d1[l - 1];
            let prev = &dz[l - 1];
            let dh = Mat::from_fn(prev.nrows(), nb, |j, k| g[j] * prev[(j, k)]);
            dz.push(&model.layers[l].weight * &dh);
        }
        // backward pass and its tangent
        let mut delta = r.clone();
        let mut ddelta = Mat::<f64>::zeros(r.nrows(), nb);
        for l in (1..nl).rev() {
            let w = &model.layers[l].weight;
            let e = w.transpose() * &delta;
            let de = w.transpose() * &ddelta;
            let (g, h) = (&d1[l - 1], &d2[l - 1]);
            let dzl = &dz[l - 1];
            ddelta = Mat::from_fn(e.nrows(), nb, |j, k| {
                de[(j, k)] * g[j] + e[j] * h[j] * dzl[(j, k)]
            });
            delta = Col::from_fn(e.nrows(), |j| e[j] * g[j]);
        }
        Mat::from_fn(rows.len(), nb, |i, k| ddelta[(rows[i], k)])
    }
}

/// A set of neurons and an orthonormal basis of the signal space restricted to them.
#[derive(Clone, Debug)]
pub struct Neurons {
    pub rows: Vec<usize>,
    /// n x B orthonormal basis of the rows of Q.
    pub q: Mat<f64>,
}

impl Neurons {
    /// Rows `rows` of the column-space basis Q, re-orthonormalised.
    pub fn new(q_full: &Mat<f64>, rows: Vec<usize>) -> Self {
        let b = q_full.ncols();
        let sub = Mat::from_fn(rows.len(), b, |i, k| q_full[(rows[i], k)]);
        let q = sub
            .qr()
            .compute_thin_Q()
            .subcols(0, b.min(rows.len()))
            .to_owned();
        Neurons { rows, q }
    }
    /// All m neurons (Q is already orthonormal).
    pub fn all(q_full: &Mat<f64>) -> Self {
        Neurons {
            rows: (0..q_full.nrows()).collect(),
            q: q_full.clone(),
        }
    }
    pub fn len(&self) -> usize {
        self.rows.len()
    }
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
    /// (I - Q Q^T) y.
    pub fn perp(&self, y: &Col<f64>) -> Col<f64> {
        let a = self.q.transpose() * y;
        y - &self.q * &a
    }
    /// (I - Q Q^T) Y.
    pub fn perp_mat(&self, y: &Mat<f64>) -> Mat<f64> {
        let a = self.q.transpose() * y;
        y - &self.q * &a
    }
}
