//! How the server chooses the parameters it sends (`--init`).

use faer::{Col, Mat};
use rand_distr::{Distribution, Normal, Uniform};
use serde::{Deserialize, Serialize};

use super::{Activation, Dense, Mlp};
use crate::{Error, Result};

/// The server's law for the parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Init {
    /// First layer i.i.d. N(0, s^2) on the augmented row (w_j, b_j), with
    /// s = 1 / sqrt(E||(x, 1)||^2) so that pre-activations have unit variance on the prior.
    Gaussian,
    /// As `Gaussian` on the centred inputs x - xbar, then b_j = -w_j . xbar + N(0, 1):
    /// the client sees an ordinary network (docs/DESIGN.md, "Centring").
    Centred,
    /// PyTorch's `nn.Linear` default: weight and bias U(-1/sqrt(in), 1/sqrt(in)).
    TorchDefault,
    /// Weights N(0, 2 / in) (`kaiming_normal_`, fan-in, ReLU gain), biases zero.
    KaimingNormal,
}

impl Init {
    pub const ALL: [Init; 4] = [
        Init::Gaussian,
        Init::Centred,
        Init::TorchDefault,
        Init::KaimingNormal,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Init::Gaussian => "gaussian",
            Init::Centred => "centred",
            Init::TorchDefault => "torch-default",
            Init::KaimingNormal => "kaiming-normal",
        }
    }
}

impl std::str::FromStr for Init {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Init::ALL
            .into_iter()
            .find(|i| i.name() == s)
            .ok_or_else(|| Error::Unknown {
                kind: "init",
                name: s.into(),
                expected: "gaussian centred torch-default kaiming-normal".into(),
            })
    }
}

impl std::fmt::Display for Init {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Everything needed to draw a model.
#[derive(Clone, Debug)]
pub struct InitConfig {
    pub input_dim: usize,
    /// First-layer width m.
    pub width: usize,
    /// Width of the other hidden layers.
    pub hidden: usize,
    /// Number of hidden layers (>= 1).
    pub depth: usize,
    /// Output dimension K.
    pub outputs: usize,
    pub init: Init,
    pub activation: Activation,
    /// Public prior mean xbar of every input coordinate (used by `centred`).
    pub prior_mean: f64,
    /// E||x||^2 under the prior (used by `gaussian`).
    pub prior_sq_norm: f64,
    /// E||x - xbar||^2 under the prior (used by `centred`).
    pub prior_centred_sq_norm: f64,
}

fn normal_mat(rows: usize, cols: usize, sd: f64, rng: &mut impl rand::Rng) -> Mat<f64> {
    let n = Normal::new(0.0, sd).expect("finite sd");
    Mat::from_fn(rows, cols, |_, _| n.sample(rng))
}

fn uniform_dense(rows: usize, cols: usize, rng: &mut impl rand::Rng) -> Dense<f64> {
    let bound = 1.0 / (cols as f64).sqrt();
    let u = Uniform::new(-bound, bound).expect("bound > 0");
    // PyTorch draws the whole weight, then the bias.
    let weight = Mat::from_fn(rows, cols, |_, _| u.sample(rng));
    let bias = Col::from_fn(rows, |_| u.sample(rng));
    Dense {
        weight,
        bias: Some(bias),
    }
}

impl InitConfig {
    /// Draw the model from the seeded generator.
    pub fn build(&self, rng: &mut impl rand::Rng) -> Result<Mlp<f64>> {
        if self.depth == 0
            || self.width == 0
            || self.input_dim == 0
            || self.outputs == 0
            || self.hidden == 0
        {
            return Err(Error::Empty(
                "depth, width, hidden, input and output dimensions must all be at least 1",
            ));
        }
        let (d, m) = (self.input_dim, self.width);
        let first = match self.init {
            Init::Gaussian => {
                let s = 1.0 / (self.prior_sq_norm + 1.0).sqrt();
                let w = normal_mat(m, d, s, rng);
                let b = normal_mat(m, 1, s, rng);
                Dense {
                    weight: w,
                    bias: Some(b.col(0).to_owned()),
                }
            }
            Init::Centred => {
                let s = 1.0 / self.prior_centred_sq_norm.max(f64::MIN_POSITIVE).sqrt();
                let w = normal_mat(m, d, s, rng);
                let noise = normal_mat(m, 1, 1.0, rng);
                let b = Col::from_fn(m, |j| {
                    let dot: f64 = (0..d).map(|k| w[(j, k)]).sum::<f64>() * self.prior_mean;
                    -dot + noise[(j, 0)]
                });
                Dense {
                    weight: w,
                    bias: Some(b),
                }
            }
            Init::TorchDefault => uniform_dense(m, d, rng),
            Init::KaimingNormal => Dense {
                weight: normal_mat(m, d, (2.0 / d as f64).sqrt(), rng),
                bias: Some(Col::zeros(m)),
            },
        };
        let mut layers = vec![first];
        let mut fan_in = m;
        for l in 1..=self.depth {
            let out = if l == self.depth {
                self.outputs
            } else {
                self.hidden
            };
            let layer = match self.init {
                Init::TorchDefault => uniform_dense(out, fan_in, rng),
                Init::KaimingNormal => Dense {
                    weight: normal_mat(out, fan_in, (2.0 / fan_in as f64).sqrt(), rng),
                    bias: Some(Col::zeros(out)),
                },
                Init::Gaussian | Init::Centred => Dense {
                    weight: normal_mat(out, fan_in, 1.0 / (fan_in as f64).sqrt(), rng),
                    bias: Some(Col::zeros(out)),
                },
            };
            layers.push(layer);
            fan_in = out;
        }
        Mlp::new(layers, self.activation)
    }
}

/// A tiny seeded network for tests: 5 inputs, first width 7, hidden 6, PyTorch's init.
#[cfg(test)]
pub(crate) fn tiny_model(act: Activation, depth: usize, outputs: usize, seed: u64) -> Mlp<f64> {
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    InitConfig {
        input_dim: 5,
        width: 7,
        hidden: 6,
        depth,
        outputs,
        init: Init::TorchDefault,
        activation: act,
        prior_mean: 0.0,
        prior_sq_norm: 5.0,
        prior_centred_sq_norm: 5.0,
    }
    .build(&mut rng)
    .expect("valid test model")
}
