//! Activations with their first three derivatives in closed form.
//!
//! Conventions follow PyTorch: `leaky_relu` has slope 0.01, `elu` has alpha 1,
//! `gelu` is the exact erf form, `softplus` has beta 1. At the kink of a
//! piecewise-linear activation the derivative is the left one (PyTorch's choice).

use serde::{Deserialize, Serialize};

/// Slope of `leaky_relu` on the negative side (PyTorch's default).
pub const LEAKY_SLOPE: f64 = 0.01;

/// Element-wise nonlinearity between linear layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Tanh,
    Sigmoid,
    Relu,
    LeakyRelu,
    Gelu,
    Silu,
    Softplus,
    Elu,
    Identity,
}

fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

fn normal_pdf(z: f64) -> f64 {
    INV_SQRT_2PI * (-0.5 * z * z).exp()
}

fn normal_cdf(z: f64) -> f64 {
    0.5 * libm::erfc(-z / std::f64::consts::SQRT_2)
}

impl Activation {
    /// Every activation, in the order the command line lists them.
    pub const ALL: [Activation; 9] = [
        Activation::Tanh,
        Activation::Sigmoid,
        Activation::Relu,
        Activation::LeakyRelu,
        Activation::Gelu,
        Activation::Silu,
        Activation::Softplus,
        Activation::Elu,
        Activation::Identity,
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Activation::Tanh => "tanh",
            Activation::Sigmoid => "sigmoid",
            Activation::Relu => "relu",
            Activation::LeakyRelu => "leaky_relu",
            Activation::Gelu => "gelu",
            Activation::Silu => "silu",
            Activation::Softplus => "softplus",
            Activation::Elu => "elu",
            Activation::Identity => "identity",
        }
    }

    /// True where the first derivative is a step function (piecewise-linear).
    pub fn is_piecewise_linear(self) -> bool {
        matches!(
            self,
            Activation::Relu | Activation::LeakyRelu | Activation::Identity
        )
    }

    /// act(z).
    pub fn eval(self, z: f64) -> f64 {
        match self {
            Activation::Tanh => z.tanh(),
            Activation::Sigmoid => sigmoid(z),
            Activation::Relu => z.max(0.0),
            Activation::LeakyRelu => {
                if z > 0.0 {
                    z
                } else {
                    LEAKY_SLOPE * z
                }
            }
            Activation::Gelu => z * normal_cdf(z),
            Activation::Silu => z * sigmoid(z),
            Activation::Softplus => z.max(0.0) + (-z.abs()).exp().ln_1p(),
            Activation::Elu => {
                if z > 0.0 {
                    z
                } else {
                    z.exp_m1()
                }
            }
            Activation::Identity => z,
        }
    }

    /// act'(z).
    pub fn d1(self, z: f64) -> f64 {
        match self {
            Activation::Tanh => {
                let t = z.tanh();
                1.0 - t * t
            }
            Activation::Sigmoid => {
                let s = sigmoid(z);
                s * (1.0 - s)
            }
            Activation::Relu => f64::from(z > 0.0),
            Activation::LeakyRelu => {
                if z > 0.0 {
                    1.0
                } else {
                    LEAKY_SLOPE
                }
            }
            Activation::Gelu => normal_cdf(z) + z * normal_pdf(z),
            Activation::Silu => {
                let s = sigmoid(z);
                s + z * s * (1.0 - s)
            }
            Activation::Softplus => sigmoid(z),
            Activation::Elu => {
                if z > 0.0 {
                    1.0
                } else {
                    z.exp()
                }
            }
            Activation::Identity => 1.0,
        }
    }

    /// act''(z) (zero almost everywhere for piecewise-linear activations).
    pub fn d2(self, z: f64) -> f64 {
        match self {
            Activation::Tanh => {
                let t = z.tanh();
                -2.0 * t * (1.0 - t * t)
            }
            Activation::Sigmoid => {
                let s = sigmoid(z);
                s * (1.0 - s) * (1.0 - 2.0 * s)
            }
            Activation::Relu | Activation::LeakyRelu | Activation::Identity => 0.0,
            Activation::Gelu => normal_pdf(z) * (2.0 - z * z),
            Activation::Silu => {
                let s = sigmoid(z);
                let s1 = s * (1.0 - s);
                2.0 * s1 + z * s1 * (1.0 - 2.0 * s)
            }
            Activation::Softplus => {
                let s = sigmoid(z);
                s * (1.0 - s)
            }
            Activation::Elu => {
                if z > 0.0 {
                    0.0
                } else {
                    z.exp()
                }
            }
        }
    }

    /// act'''(z).
    pub fn d3(self, z: f64) -> f64 {
        match self {
            Activation::Tanh => {
                let t = z.tanh();
                (6.0 * t * t - 2.0) * (1.0 - t * t)
            }
            Activation::Sigmoid => {
                let s = sigmoid(z);
                s * (1.0 - s) * (1.0 - 6.0 * s + 6.0 * s * s)
            }
            Activation::Relu | Activation::LeakyRelu | Activation::Identity => 0.0,
            Activation::Gelu => normal_pdf(z) * (z * z * z - 4.0 * z),
            Activation::Silu => {
                let s = sigmoid(z);
                let s1 = s * (1.0 - s);
                let s2 = s1 * (1.0 - 2.0 * s);
                let s3 = s1 * (1.0 - 6.0 * s + 6.0 * s * s);
                3.0 * s2 + z * s3
            }
            Activation::Softplus => {
                let s = sigmoid(z);
                s * (1.0 - s) * (1.0 - 2.0 * s)
            }
            Activation::Elu => {
                if z > 0.0 {
                    0.0
                } else {
                    z.exp()
                }
            }
        }
    }

    /// The k-th derivative for k in 0..=3.
    pub fn derivative(self, k: usize, z: f64) -> f64 {
        match k {
            0 => self.eval(z),
            1 => self.d1(z),
            2 => self.d2(z),
            3 => self.d3(z),
            _ => panic!("derivative order {k} > 3 is not provided"),
        }
    }
}

impl std::str::FromStr for Activation {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        Activation::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| crate::Error::Unknown {
                kind: "activation",
                name: s.to_string(),
                expected: Activation::ALL.map(|a| a.name()).join(" "),
            })
    }
}

impl std::fmt::Display for Activation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Central differences have error O(h^2 f'''); with h = 1e-5 and the
    /// roundoff eps/h ~ 1e-11, 1e-7 relative-to-scale is a safe bound.
    #[test]
    fn derivatives_match_finite_differences() {
        let h = 1e-5;
        for act in Activation::ALL {
            for &z in &[-3.1, -1.3, -0.4, 0.27, 0.9, 2.2, 4.5] {
                for k in 1..=3 {
                    let fd =
                        (act.derivative(k - 1, z + h) - act.derivative(k - 1, z - h)) / (2.0 * h);
                    let an = act.derivative(k, z);
                    assert!(
                        (fd - an).abs() <= 1e-7 * (1.0 + an.abs()),
                        "{act} d{k} at {z}: analytic {an}, finite difference {fd}"
                    );
                }
            }
        }
    }

    #[test]
    fn names_round_trip_and_unknown_is_an_error() {
        for act in Activation::ALL {
            assert_eq!(act.name().parse::<Activation>().unwrap(), act);
        }
        let err = "swish".parse::<Activation>().unwrap_err();
        assert!(
            matches!(&err, crate::Error::Unknown { kind: "activation", name, expected }
                if name == "swish" && expected.split(' ').any(|e| e == "tanh")),
            "{err:?}"
        );
    }

    #[test]
    fn known_values() {
        assert!((Activation::Gelu.eval(1.0) - 0.841_344_746_068_542_9).abs() < 1e-14);
        assert!((Activation::Softplus.eval(0.0) - std::f64::consts::LN_2).abs() < 1e-15);
        assert_eq!(Activation::Relu.d1(0.0), 0.0);
        assert_eq!(Activation::LeakyRelu.d1(-1.0), LEAKY_SLOPE);
    }
}
