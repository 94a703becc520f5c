//! Defences a client applies before its gradient leaves (`--defense`, in order).
//! (Only parsing exists so far; applying them is not implemented yet.)

use faer::Mat;
use serde::Serialize;

use crate::model::{Gradient, Loss, Mlp, Targets};
use crate::{Error, Result};

/// One defence step.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind", content = "value")]
pub enum Defense {
    /// Per-sample gradient clipping to norm C.
    Clip(f64),
    /// Gaussian noise of standard deviation SIGMA * C on the summed gradient (DP-SGD).
    Noise(f64),
    /// Gaussian noise of standard deviation S times the gradient's RMS.
    NoiseRel(f64),
    /// Zero the P fraction of smallest-magnitude entries per tensor.
    Prune(f64),
    /// Keep the K largest-magnitude entries per tensor.
    TopK(usize),
    /// Uniform quantisation per tensor to BITS bits.
    Quantize(u32),
    /// E local steps of gradient descent with rate LR; the update is divided by -LR.
    LocalSteps(usize, f64),
}

impl std::str::FromStr for Defense {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::Invalid(format!("--defense '{s}': bad value"));
        let parts: Vec<&str> = s.split(':').collect();
        let f = |i: usize| -> Result<f64> {
            parts
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|v| v.is_finite())
                .ok_or_else(bad)
        };
        let d = match (parts[0], parts.len()) {
            ("clip", 2) => Defense::Clip(f(1)?),
            ("noise", 2) => Defense::Noise(f(1)?),
            ("noise-rel", 2) => Defense::NoiseRel(f(1)?),
            ("prune", 2) => Defense::Prune(f(1)?),
            ("topk", 2) => Defense::TopK(parts[1].parse().map_err(|_| bad())?),
            ("quantize", 2) => Defense::Quantize(parts[1].parse().map_err(|_| bad())?),
            ("local-steps", 3) => Defense::LocalSteps(parts[1].parse().map_err(|_| bad())?, f(2)?),
            _ => {
                return Err(Error::Unknown {
                    kind: "defense",
                    name: s.into(),
                    expected: "clip:C noise:SIGMA noise-rel:S prune:P topk:K quantize:BITS local-steps:E:LR".into(),
                });
            }
        };
        Ok(d)
    }
}

impl Defense {
    /// The command-line spelling (`prune:0.9`).
    pub fn spelling(&self) -> String {
        match self {
            Defense::Clip(c) => format!("clip:{c}"),
            Defense::Noise(s) => format!("noise:{s}"),
            Defense::NoiseRel(s) => format!("noise-rel:{s}"),
            Defense::Prune(p) => format!("prune:{p}"),
            Defense::TopK(k) => format!("topk:{k}"),
            Defense::Quantize(b) => format!("quantize:{b}"),
            Defense::LocalSteps(e, lr) => format!("local-steps:{e}:{lr}"),
        }
    }
}

/// What the client knows when it applies a defence.
pub struct ClientContext<'a> {
    pub model: &'a Mlp<f64>,
    /// The private batch, B x d.
    pub x: &'a Mat<f64>,
    pub targets: &'a Targets,
    pub loss: Loss,
}

/// What the defences did, for the report (and the server's noise-aware threshold).
#[derive(Clone, Debug, Default, Serialize)]
pub struct DefenseReport {
    /// Standard deviation of the noise added per gradient entry, if any.
    pub noise_std: Option<f64>,
    /// Relative change of the gradient: ||g' - g|| / ||g||.
    pub relative_change: f64,
    /// (epsilon, delta) of one DP-SGD step, when clip and noise were both applied.
    pub epsilon: Option<f64>,
    pub delta: Option<f64>,
}

/// Apply the defences in order to the clean gradient.
pub fn apply(
    defenses: &[Defense],
    _ctx: &ClientContext<'_>,
    grad: Gradient<f64>,
    _rng: &mut impl rand::Rng,
) -> Result<(Gradient<f64>, DefenseReport)> {
    if let Some(d) = defenses.first() {
        return Err(Error::Invalid(format!(
            "defence {d:?} is not implemented yet"
        )));
    }
    Ok((grad, DefenseReport::default()))
}
