//! One conv layer's equations in its input (docs/DESIGN.md, "Pixels: the conv
//! stage"): with the layer's output signals dZ known, its weight gradient
//! dL/dW = dZ^T im2col(a) is linear in the input a, and so is the forward relation
//! im2col(a) W^T = Z - b at every output whose value is known.

use faer::Mat;

use crate::model::cnn::kernels::{self, Window};
use crate::numerics::cgls::LinearMap;

/// The stacked, scaled equations [w_f (forward at known outputs); w_g vec(dZ^T im2col(a))]
/// in the unknown batch a (B x C*H*W, flattened row by row).
pub struct ConvEquations<'a> {
    pub window: Window,
    pub batch: usize,
    /// O x (C KH KW).
    pub weight: &'a Mat<f64>,
    /// (B P) x O output signals.
    pub dz: Mat<f64>,
    /// (B P) x O: which outputs are known (their value is an equation).
    pub known: Vec<bool>,
    /// Weights of the two blocks (each block's right-hand side scaled to unit norm).
    pub w_forward: f64,
    pub w_gradient: f64,
}

impl ConvEquations<'_> {
    /// Forward equations: known outputs.
    pub fn forward_count(&self) -> usize {
        self.known.iter().filter(|&&k| k).count()
    }
    /// Gradient equations: the weight gradient's entries.
    pub fn gradient_count(&self) -> usize {
        self.weight.nrows() * self.weight.ncols()
    }
    fn n_in(&self) -> usize {
        self.window.c * self.window.h * self.window.w
    }
    fn as_batch(&self, a: &[f64]) -> Mat<f64> {
        let n = self.n_in();
        Mat::from_fn(self.batch, n, |s, k| a[s * n + k])
    }

    /// The right-hand side from the known outputs z (B P x O, bias removed, only the
    /// known entries read) and the observed weight gradient (O x C KH KW).
    pub fn rhs(&self, z: &Mat<f64>, grad: &Mat<f64>) -> Vec<f64> {
        let mut b = Vec::with_capacity(self.rows());
        let o = self.weight.nrows();
        for r in 0..z.nrows() {
            for ch in 0..o {
                if self.known[r * o + ch] {
                    b.push(self.w_forward * z[(r, ch)]);
                }
            }
        }
        for ch in 0..o {
            for k in 0..grad.ncols() {
                b.push(self.w_gradient * grad[(ch, k)]);
            }
        }
        b
    }
}

impl LinearMap for ConvEquations<'_> {
    fn cols(&self) -> usize {
        self.batch * self.n_in()
    }
    fn rows(&self) -> usize {
        self.forward_count() + self.gradient_count()
    }
    fn apply(&self, a: &[f64]) -> Vec<f64> {
        let cols = kernels::im2col(&self.as_batch(a), &self.window);
        let z = &cols * self.weight.transpose();
        let g = self.dz.transpose() * &cols;
        let o = self.weight.nrows();
        let mut y = Vec::with_capacity(self.rows());
        for r in 0..z.nrows() {
            for ch in 0..o {
                if self.known[r * o + ch] {
                    y.push(self.w_forward * z[(r, ch)]);
                }
            }
        }
        for ch in 0..o {
            for k in 0..g.ncols() {
                y.push(self.w_gradient * g[(ch, k)]);
            }
        }
        y
    }
    fn adjoint(&self, y: &[f64]) -> Vec<f64> {
        let o = self.weight.nrows();
        let rows = self.dz.nrows();
        let mut rz = Mat::<f64>::zeros(rows, o);
        let mut at = 0;
        for r in 0..rows {
            for ch in 0..o {
                if self.known[r * o + ch] {
                    rz[(r, ch)] = self.w_forward * y[at];
                    at += 1;
                }
            }
        }
        let k = self.weight.ncols();
        let rg = Mat::from_fn(o, k, |ch, j| self.w_gradient * y[at + ch * k + j]);
        let cols = &rz * self.weight + &self.dz * &rg;
        let x = kernels::col2im(&cols, self.batch, &self.window);
        let n = self.n_in();
        (0..self.batch * n).map(|i| x[(i / n, i % n)]).collect()
    }
}

/// Average pooling's forward relation at its known outputs (B x O P, row by row).
pub struct PoolEquations {
    pub window: Window,
    pub batch: usize,
    pub known: Vec<bool>,
}

impl LinearMap for PoolEquations {
    fn cols(&self) -> usize {
        self.batch * self.window.c * self.window.h * self.window.w
    }
    fn rows(&self) -> usize {
        self.known.iter().filter(|&&k| k).count()
    }
    fn apply(&self, a: &[f64]) -> Vec<f64> {
        let n = self.cols() / self.batch;
        let x = Mat::from_fn(self.batch, n, |s, k| a[s * n + k]);
        let y = kernels::avg_pool(&x, &self.window);
        let m = y.ncols();
        (0..self.batch * m)
            .filter(|&i| self.known[i])
            .map(|i| y[(i / m, i % m)])
            .collect()
    }
    fn adjoint(&self, y: &[f64]) -> Vec<f64> {
        let m = self.window.c * self.window.positions();
        let mut d = Mat::<f64>::zeros(self.batch, m);
        let mut at = 0;
        for i in 0..self.batch * m {
            if self.known[i] {
                d[(i / m, i % m)] = y[at];
                at += 1;
            }
        }
        let x = kernels::avg_pool_back(&d, &self.window);
        let n = x.ncols();
        (0..self.batch * n).map(|i| x[(i / n, i % n)]).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};

    /// <A x, y> = <x, A^T y> on a strided padded window with some outputs unknown.
    #[test]
    fn adjoint_is_the_transpose() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let window = Window {
            c: 2,
            h: 5,
            w: 6,
            kh: 3,
            kw: 3,
            sh: 2,
            sw: 1,
            ph: 1,
            pw: 1,
            oh: 3,
            ow: 6,
        };
        let (b, o) = (2, 3);
        let weight = Mat::from_fn(o, window.patch(), |_, _| rng.random::<f64>() - 0.5);
        let rows = b * window.positions();
        let eq = ConvEquations {
            window,
            batch: b,
            weight: &weight,
            dz: Mat::from_fn(rows, o, |_, _| rng.random::<f64>() - 0.5),
            known: (0..rows * o).map(|_| rng.random::<f64>() < 0.6).collect(),
            w_forward: 1.3,
            w_gradient: 0.7,
        };
        let x: Vec<f64> = (0..eq.cols()).map(|_| rng.random::<f64>() - 0.5).collect();
        let y: Vec<f64> = (0..eq.rows()).map(|_| rng.random::<f64>() - 0.5).collect();
        let ax = eq.apply(&x);
        let aty = eq.adjoint(&y);
        let l: f64 = ax.iter().zip(&y).map(|(a, b)| a * b).sum();
        let r: f64 = x.iter().zip(&aty).map(|(a, b)| a * b).sum();
        assert!((l - r).abs() < 1e-12 * l.abs().max(1.0), "{l} vs {r}");
    }
}
