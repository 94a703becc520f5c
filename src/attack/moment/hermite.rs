//! Gaussian expectations of an activation's derivative against Hermite polynomials
//! (docs/DESIGN.md, "Hermite coefficients").
//!
//! For a pre-activation z = mu + sigma g with g ~ N(0, 1), Stein's lemma gives
//!
//! ```text
//! gamma_k(mu, sigma) = E[act'(z) He_k(g)] = sigma^k E[act^(k+1)(z)],
//! ```
//!
//! so only act' is ever evaluated: no derivative beyond the first is needed, and
//! the order-(k+1) moment tensor of the attack has weight gamma_k for each sample.

use faer::{Mat, Side};
use serde::Serialize;

use crate::model::Activation;
use crate::{Error, Result};

/// Nodes of the Gauss-Hermite rule (exact for polynomials of degree < 192).
pub const HERMITE_NODES: usize = 96;

/// Activation expectations use Gauss-Legendre panels against the normal density,
/// split at the kink when there is one: Gauss-Hermite converges only geometrically
/// in the distance of act's complex poles (tanh' has poles at i pi / (2 sigma)), which
/// left 7e-7 errors at sigma = 1.8 with 96 nodes; 2 x 64 panels of 16 nodes reach
/// ~1e-13 for every activation and scale here.
pub const LEGENDRE_PANELS: usize = 64;
const LEGENDRE_NODES: usize = 16;

/// Standard-normal tail beyond which the integrand is dropped (P(|g| > 12) ~ 4e-33).
const TAIL: f64 = 12.0;

/// Highest Hermite order provided (He_0 .. He_4).
pub const MAX_ORDER: usize = 4;

/// The default pre-activation law for choosing the order: every server initialisation
/// in this crate scales the first layer to (about) unit pre-activation variance,
/// centred at zero (the weight rows have mean zero).
pub const DEFAULT_LAW: (f64, f64) = (0.0, 1.0);

/// A moment order is used when the correlation of act'(z) with the normalised
/// He_k(g) / sqrt(k!) is at least this. Below it the tensor's signal is swamped by the
/// O(1/sqrt m) sampling noise at any width we can afford, and the exact zeros
/// (tanh's odd orders, ReLU-like even orders) come out ~1e-16.
pub const ORDER_THRESHOLD: f64 = 0.02;

/// A quadrature rule for E[f(g)], g ~ N(0, 1): nodes and weights (summing to 1).
#[derive(Clone, Debug)]
pub struct Rule {
    pub nodes: Vec<f64>,
    pub weights: Vec<f64>,
}

impl Rule {
    /// Probabilists' Gauss-Hermite rule with n nodes (Golub-Welsch: the nodes are the
    /// eigenvalues of the Jacobi matrix of He_k, off-diagonal sqrt(k), the weights the
    /// squared first components of its eigenvectors).
    pub fn hermite(n: usize) -> Result<Rule> {
        golub_welsch(n, |k| (k as f64).sqrt(), 1.0)
    }

    /// E[f(g)] (exact for polynomials of degree < 2n).
    pub fn expect(&self, f: impl Fn(f64) -> f64) -> f64 {
        self.nodes
            .iter()
            .zip(&self.weights)
            .map(|(&x, &w)| w * f(x))
            .sum()
    }
}

/// Gauss rule from the three-term recurrence with zero diagonal and off-diagonal
/// beta(k), k = 1..n-1; `mass` is the integral of the weight function.
fn golub_welsch(n: usize, beta: impl Fn(usize) -> f64, mass: f64) -> Result<Rule> {
    if n == 0 {
        return Err(Error::Empty("a quadrature rule needs at least one node"));
    }
    let j = Mat::from_fn(n, n, |a, b| {
        if a + 1 == b {
            beta(b)
        } else if b + 1 == a {
            beta(a)
        } else {
            0.0
        }
    });
    let evd = j
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| Error::Numerical(format!("Golub-Welsch eigenproblem: {e:?}")))?;
    let nodes: Vec<f64> = evd.S().column_vector().iter().copied().collect();
    let weights: Vec<f64> = (0..n).map(|k| mass * evd.U()[(0, k)].powi(2)).collect();
    Ok(Rule { nodes, weights })
}

/// He_k(g), probabilists' Hermite polynomial, k <= MAX_ORDER.
pub fn he(k: usize, g: f64) -> f64 {
    let g2 = g * g;
    match k {
        0 => 1.0,
        1 => g,
        2 => g2 - 1.0,
        3 => g * (g2 - 3.0),
        4 => g2 * g2 - 6.0 * g2 + 3.0,
        _ => unreachable!("He_{k} beyond MAX_ORDER"),
    }
}

/// k! for small k.
pub fn factorial(k: usize) -> f64 {
    (1..=k).map(|v| v as f64).product()
}

/// Where an activation's first two derivatives are not smooth (None: analytic).
fn kink(act: Activation) -> Option<f64> {
    match act {
        Activation::Relu | Activation::LeakyRelu | Activation::Elu => Some(0.0),
        _ => None,
    }
}

/// Computes Gaussian expectations of one activation.
#[derive(Clone, Debug)]
pub struct Coefficients {
    act: Activation,
    legendre: Rule,
}

impl Coefficients {
    pub fn new(act: Activation) -> Result<Self> {
        let legendre = golub_welsch(
            LEGENDRE_NODES,
            |k| k as f64 / ((4 * k * k - 1) as f64).sqrt(),
            2.0,
        )?;
        Ok(Coefficients { act, legendre })
    }

    /// E[f(g)] for g ~ N(0, 1), where f may have a kink at g = `at`.
    fn expect(&self, at: Option<f64>, f: impl Fn(f64) -> f64) -> f64 {
        let t = at.filter(|t| t.abs() < TAIL).unwrap_or(0.0);
        // Gauss-Legendre panels on [-TAIL, t] and [t, TAIL] against the normal density.
        let mut sum = 0.0;
        for (a, b) in [(-TAIL, t), (t, TAIL)] {
            let h = (b - a) / LEGENDRE_PANELS as f64;
            for p in 0..LEGENDRE_PANELS {
                let (lo, hi) = (a + p as f64 * h, a + (p + 1) as f64 * h);
                let (mid, half) = (0.5 * (lo + hi), 0.5 * (hi - lo));
                for (&x, &w) in self.legendre.nodes.iter().zip(&self.legendre.weights) {
                    let g = mid + half * x;
                    sum += half * w * f(g) * (-0.5 * g * g).exp();
                }
            }
        }
        sum * 0.398_942_280_401_432_7
    }

    /// gamma_k(mu, sigma) = E[act'(mu + sigma g) He_k(g)] = sigma^k E[act^(k+1)(z)].
    pub fn gamma(&self, k: usize, mu: f64, sigma: f64) -> f64 {
        let at = kink(self.act).map(|z0| (z0 - mu) / sigma);
        self.expect(at, |g| self.act.d1(mu + sigma * g) * he(k, g))
    }

    /// E[act'(z)^2], the scale of the per-neuron fluctuations.
    pub fn second_moment(&self, mu: f64, sigma: f64) -> f64 {
        let at = kink(self.act).map(|z0| (z0 - mu) / sigma);
        self.expect(at, |g| self.act.d1(mu + sigma * g).powi(2))
    }

    /// Correlation of act'(z) with He_k(g) / sqrt(k!): how much of act' the order-k
    /// Hermite component carries (1 at most, by Cauchy-Schwarz).
    pub fn strength(&self, k: usize, mu: f64, sigma: f64) -> f64 {
        let s2 = self.second_moment(mu, sigma);
        if s2 <= 0.0 {
            return 0.0;
        }
        self.gamma(k, mu, sigma).abs() / (factorial(k) * s2).sqrt()
    }
}

/// Tensor order used by the attack: `Order(p + 1)` pairs the gradient with He_p.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Order(pub usize);

impl Order {
    /// The Hermite degree p = order - 1.
    pub fn hermite_degree(self) -> usize {
        self.0 - 1
    }
}

/// The lowest order >= 3 whose coefficient is clearly non-zero at (mu, sigma).
pub fn choose_order(act: Activation, mu: f64, sigma: f64) -> Result<Order> {
    let c = Coefficients::new(act)?;
    for k in 2..MAX_ORDER {
        if c.strength(k, mu, sigma) >= ORDER_THRESHOLD {
            return Ok(Order(k + 1));
        }
    }
    Err(Error::NoMomentSignal {
        activation: act.to_string(),
        mu,
        sigma,
    })
}

/// One line of `gradleak activations`.
#[derive(Clone, Debug, Serialize)]
pub struct ActivationRow {
    pub activation: String,
    /// E[act^(k+1)(z)] for k = 0..=3, z ~ N(mu, sigma^2).
    pub derivative_means: Vec<f64>,
    /// Correlation of act' with He_k / sqrt(k!), k = 0..=3.
    pub strengths: Vec<f64>,
    /// The order the tensor attack uses (None: no usable order).
    pub order: Option<usize>,
}

/// The coefficient table for every activation under N(mu, sigma^2).
pub fn table(mu: f64, sigma: f64) -> Result<Vec<ActivationRow>> {
    if !(sigma > 0.0 && sigma.is_finite() && mu.is_finite()) {
        return Err(Error::BadPreactivationLaw { mu, sigma });
    }
    Activation::ALL
        .into_iter()
        .map(|act| {
            let c = Coefficients::new(act)?;
            Ok(ActivationRow {
                activation: act.to_string(),
                derivative_means: (0..MAX_ORDER)
                    .map(|k| c.gamma(k, mu, sigma) / sigma.powi(k as i32))
                    .collect(),
                strengths: (0..MAX_ORDER).map(|k| c.strength(k, mu, sigma)).collect(),
                order: choose_order(act, mu, sigma).ok().map(|o| o.0),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gauss-Hermite with n nodes is exact for polynomials of degree 2n - 1: E[g^4] = 3,
    /// E[g^6] = 15, orthogonality E[He_j He_k] = k! delta_jk, to a few ulps of the sum.
    #[test]
    fn hermite_rule_integrates_polynomials() {
        let r = Rule::hermite(HERMITE_NODES).unwrap();
        let tol = 1e3 * f64::EPSILON;
        assert!((r.expect(|_| 1.0) - 1.0).abs() < tol);
        assert!((r.expect(|g| g.powi(4)) - 3.0).abs() < tol * 3.0);
        assert!((r.expect(|g| g.powi(6)) - 15.0).abs() < tol * 15.0);
        assert!(r.expect(|g| g.powi(3)).abs() < tol);
        for j in 0..=MAX_ORDER {
            for k in 0..=MAX_ORDER {
                let want = if j == k { factorial(k) } else { 0.0 };
                let got = r.expect(|g| he(j, g) * he(k, g));
                assert!((got - want).abs() < tol * 30.0, "E[He_{j} He_{k}] = {got}");
            }
        }
    }

    /// A fine midpoint sum of f(z) phi(z) on [-12, 12] (error O(h^2) ~ 1e-12 here).
    fn riemann(f: impl Fn(f64) -> f64) -> f64 {
        let n = 400_000;
        let h = 2.0 * TAIL / n as f64;
        (0..n)
            .map(|i| {
                let z = -TAIL + (i as f64 + 0.5) * h;
                f(z) * (-0.5 * z * z).exp() * 0.398_942_280_401_432_7 * h
            })
            .sum()
    }

    /// Stein's lemma both ways: gamma_k from act' against He_k must equal
    /// sigma^k E[act^(k+1)] from the closed-form derivatives, and a Riemann sum.
    #[test]
    fn coefficients_match_stein_and_riemann() {
        for act in [
            Activation::Tanh,
            Activation::Sigmoid,
            Activation::Gelu,
            Activation::Softplus,
            Activation::Silu,
        ] {
            let c = Coefficients::new(act).unwrap();
            for &(mu, s) in &[(0.0, 1.0), (0.3, 0.7), (-0.5, 1.8)] {
                for k in 0..=2 {
                    let g = c.gamma(k, mu, s);
                    let stein = s.powi(k as i32) * riemann(|z| act.derivative(k + 1, mu + s * z));
                    assert!(
                        (g - stein).abs() < 1e-9,
                        "{act} k={k} N({mu},{s}): {g} vs {stein}"
                    );
                }
            }
        }
        // E[tanh'(z)] against the Riemann sum directly.
        let c = Coefficients::new(Activation::Tanh).unwrap();
        let want = riemann(|z| Activation::Tanh.d1(z));
        assert!((c.gamma(0, 0.0, 1.0) - want).abs() < 1e-11);
    }

    /// ReLU: E[1{z > 0} He_k(g)] has closed forms (phi(0) = 1/sqrt(2 pi)):
    /// k=0: 1/2 - ... at mu = 0: 1/2, k=1: phi(0), k=2: 0, k=3: -phi(0).
    #[test]
    fn relu_coefficients_closed_form() {
        let c = Coefficients::new(Activation::Relu).unwrap();
        let phi0 = 0.398_942_280_401_432_7;
        for (k, want) in [(0, 0.5), (1, phi0), (2, 0.0), (3, -phi0)] {
            let got = c.gamma(k, 0.0, 1.0);
            assert!((got - want).abs() < 1e-12, "k={k}: {got} vs {want}");
        }
    }

    #[test]
    fn order_choice() {
        for (act, order) in [
            (Activation::Tanh, 3),
            (Activation::Sigmoid, 3),
            (Activation::Relu, 4),
            (Activation::Gelu, 4),
            (Activation::Softplus, 4),
            (Activation::Silu, 4),
        ] {
            assert_eq!(choose_order(act, 0.0, 1.0).unwrap(), Order(order), "{act}");
        }
        assert!(matches!(
            choose_order(Activation::Identity, 0.0, 1.0),
            Err(Error::NoMomentSignal { .. })
        ));
        // a shifted bias brings order 3 back for ReLU
        assert_eq!(choose_order(Activation::Relu, 0.8, 1.0).unwrap(), Order(3));
    }
}
