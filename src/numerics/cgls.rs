//! CGLS: conjugate gradients on the normal equations of min ||A x - b||, with A given
//! only as products (docs/DESIGN.md, "Pixels: the conv stage"). Started at x0 it
//! converges to x0 plus the least-norm correction, so every direction A does not see
//! keeps its value from x0 (the prior).

// `!(x > 0.0)` is deliberate: it also stops on NaN.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

/// A linear map R^n -> R^m given by its products with vectors.
pub trait LinearMap {
    fn cols(&self) -> usize;
    fn rows(&self) -> usize;
    /// y = A x.
    fn apply(&self, x: &[f64]) -> Vec<f64>;
    /// x = A^T y.
    fn adjoint(&self, y: &[f64]) -> Vec<f64>;
}

/// What a solve reached.
#[derive(Clone, Debug)]
pub struct Solved {
    pub x: Vec<f64>,
    /// ||A x - b|| / ||b|| at the end.
    pub residual: f64,
    pub iterations: usize,
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// CGLS from `x0` until ||A^T r|| <= `tol` ||A^T b|| or `max_iter` steps.
pub fn solve<A: LinearMap>(a: &A, b: &[f64], x0: &[f64], tol: f64, max_iter: usize) -> Solved {
    let mut x = x0.to_vec();
    let ax = a.apply(&x);
    let mut r: Vec<f64> = b.iter().zip(&ax).map(|(b, v)| b - v).collect();
    let mut s = a.adjoint(&r);
    let scale = dot(&a.adjoint(b), &a.adjoint(b))
        .sqrt()
        .max(f64::MIN_POSITIVE);
    let mut p = s.clone();
    let mut gamma = dot(&s, &s);
    let mut iterations = 0;
    while iterations < max_iter && gamma.sqrt() > tol * scale {
        let q = a.apply(&p);
        let qq = dot(&q, &q);
        if !(qq > 0.0) {
            break;
        }
        let alpha = gamma / qq;
        for (xi, pi) in x.iter_mut().zip(&p) {
            *xi += alpha * pi;
        }
        for (ri, qi) in r.iter_mut().zip(&q) {
            *ri -= alpha * qi;
        }
        s = a.adjoint(&r);
        let next = dot(&s, &s);
        let beta = next / gamma;
        gamma = next;
        for (pi, si) in p.iter_mut().zip(&s) {
            *pi = si + beta * *pi;
        }
        iterations += 1;
    }
    let nb = dot(b, b).sqrt().max(f64::MIN_POSITIVE);
    let ax = a.apply(&x);
    let res = b
        .iter()
        .zip(&ax)
        .map(|(b, v)| (b - v).powi(2))
        .sum::<f64>()
        .sqrt()
        / nb;
    Solved {
        x,
        residual: res,
        iterations,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dense test matrix as a map.
    struct Dense(Vec<Vec<f64>>);
    impl LinearMap for Dense {
        fn cols(&self) -> usize {
            self.0[0].len()
        }
        fn rows(&self) -> usize {
            self.0.len()
        }
        fn apply(&self, x: &[f64]) -> Vec<f64> {
            self.0.iter().map(|r| dot(r, x)).collect()
        }
        fn adjoint(&self, y: &[f64]) -> Vec<f64> {
            (0..self.cols())
                .map(|j| self.0.iter().zip(y).map(|(r, v)| r[j] * v).sum())
                .collect()
        }
    }

    /// Full column rank: the solution of a consistent system to rounding. Rank
    /// deficient: the null direction keeps its value from x0.
    #[test]
    fn solves_and_keeps_the_null_space_at_the_start() {
        let a = Dense(vec![
            vec![2.0, 1.0, 0.0],
            vec![1.0, 3.0, 1.0],
            vec![0.0, 1.0, 4.0],
            vec![1.0, 0.0, 1.0],
        ]);
        let truth = [0.3, -1.2, 0.7];
        let b = a.apply(&truth);
        let s = solve(&a, &b, &[5.0, 5.0, 5.0], 1e-15, 100);
        for (x, t) in s.x.iter().zip(truth) {
            assert!((x - t).abs() < 1e-13, "{x} vs {t}");
        }
        // columns 0 and 2 equal: null direction (1, 0, -1) / sqrt 2
        let a = Dense(vec![vec![1.0, 2.0, 1.0], vec![3.0, -1.0, 3.0]]);
        let b = a.apply(&truth);
        let x0 = [1.0, 0.0, 0.0];
        let s = solve(&a, &b, &x0, 1e-15, 100);
        assert!(s.residual < 1e-13);
        let null = |v: &[f64]| (v[0] - v[2]) / 2f64.sqrt();
        assert!((null(&s.x) - null(&x0)).abs() < 1e-13);
    }
}
