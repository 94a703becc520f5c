//! Defences a client applies before its gradient leaves (`--defense`, in order).
//!
//! Stages, one module each: [`dp`] (per-sample clipping, DP-SGD noise and its
//! accountant, relative noise), [`compress`] (pruning, top-k, quantisation),
//! [`local`] (several local steps). The semantics and how they compose are in
//! docs/DESIGN.md, "Defences".

pub mod compress;
pub mod dp;
pub mod local;

use faer::Mat;
use serde::Serialize;

pub use crate::model::ops::rms;
use crate::model::ops::{count_zeros, distance};
use crate::model::{Gradient, Loss, Mlp, Targets};
use crate::{Error, Result};

/// Largest bit width `quantize:BITS` accepts: beyond 32 bits the levels are finer
/// than f32 itself, so the defence would do nothing measurable.
pub const MAX_QUANTIZE_BITS: u32 = 32;

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

impl Defense {
    /// The command-line spelling (`clip:1`, `local-steps:5:0.1`, ...).
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

    /// Check the parameter's range: an invalid one is a one-line error, never a panic.
    pub fn check(&self) -> Result<()> {
        let bad = |why: &str| {
            Err(Error::Spec {
                kind: "defence",
                spec: self.spelling(),
                reason: why.to_string(),
            })
        };
        match *self {
            Defense::Clip(c) if !(c > 0.0 && c.is_finite()) => {
                bad("the clipping norm C must be positive")
            }
            Defense::Noise(s) if !(s >= 0.0 && s.is_finite()) => {
                bad("the noise multiplier SIGMA must be >= 0")
            }
            Defense::NoiseRel(s) if !(s >= 0.0 && s.is_finite()) => {
                bad("the relative noise S must be >= 0")
            }
            Defense::Prune(p) if !(0.0..=1.0).contains(&p) => {
                bad("the pruned fraction P must be in [0, 1]")
            }
            Defense::TopK(0) => bad("K must be at least 1"),
            Defense::Quantize(b) if b == 0 || b > MAX_QUANTIZE_BITS => {
                bad(&format!("BITS must be in 1..={MAX_QUANTIZE_BITS}"))
            }
            Defense::LocalSteps(0, _) => bad("E must be at least 1 step"),
            Defense::LocalSteps(_, lr) if !(lr > 0.0 && lr.is_finite()) => {
                bad("the learning rate LR must be positive")
            }
            _ => Ok(()),
        }
    }

    /// Clip and local steps rebuild the update from the client's data, so they
    /// must come before anything that changes the gradient.
    fn rebuilds_from_data(&self) -> bool {
        matches!(self, Defense::Clip(_) | Defense::LocalSteps(..))
    }
}

impl std::str::FromStr for Defense {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::Spec {
            kind: "defence",
            spec: s.to_string(),
            reason: "bad value".into(),
        };
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
        d.check()?;
        Ok(d)
    }
}

impl std::fmt::Display for Defense {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.spelling())
    }
}

/// Check a whole chain: each parameter, and the order rules of docs/DESIGN.md
/// (clip / local-steps first and alone; DP noise needs a clip before it).
pub fn check_chain(defenses: &[Defense]) -> Result<()> {
    let mut clip = None;
    for (k, d) in defenses.iter().enumerate() {
        d.check()?;
        if d.rebuilds_from_data() && k > 0 {
            return Err(Error::Spec {
                kind: "defence",
                spec: d.to_string(),
                reason: "it rebuilds the update from the client's data, so it must be the first defence \
                         (and only one of clip / local-steps)"
                    .into(),
            });
        }
        match d {
            Defense::Clip(c) => clip = Some(*c),
            Defense::Noise(_) if clip.is_none() => {
                return Err(Error::Spec {
                    kind: "defence",
                    spec: d.to_string(),
                    reason: "DP-SGD noise has standard deviation SIGMA * C; put clip:C before it \
                             (or use noise-rel:S)"
                        .into(),
                });
            }
            _ => {}
        }
    }
    Ok(())
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
    /// Standard deviation of the noise added per gradient entry, if any (Gaussian
    /// noises compose in quadrature).
    pub noise_std: Option<f64>,
    /// Relative change of the gradient: ||g' - g|| / ||g||.
    pub relative_change: f64,
    /// (epsilon, delta) of one DP-SGD step, when clip and noise were both applied.
    pub epsilon: Option<f64>,
    pub delta: Option<f64>,
    /// Share of gradient entries that are exactly zero after the defences.
    pub zero_fraction: f64,
}

/// Apply the defences in order to the clean gradient `grad` (the client's mean-loss
/// gradient on `ctx`).
pub fn apply(
    defenses: &[Defense],
    ctx: &ClientContext<'_>,
    grad: Gradient<f64>,
    rng: &mut impl rand::Rng,
) -> Result<(Gradient<f64>, DefenseReport)> {
    check_chain(defenses)?;
    let clean = grad;
    let mut g = clean.clone();
    let mut report = DefenseReport::default();
    let mut variance = None::<f64>;
    let mut clip_norm = None;
    for d in defenses {
        match *d {
            Defense::Clip(c) => {
                g = dp::clipped_mean_gradient(ctx, c)?;
                clip_norm = Some(c);
            }
            Defense::Noise(sigma) => {
                let c = clip_norm.expect("check_chain: clip precedes noise");
                let sd = dp::dp_sgd_noise_std(sigma, c, ctx.x.nrows());
                dp::add_gaussian(&mut g, sd, rng);
                *variance.get_or_insert(0.0) += sd * sd;
                if sigma > 0.0 {
                    report.delta = Some(dp::DP_DELTA);
                    report.epsilon = Some(dp::gaussian_epsilon(sigma, dp::DP_DELTA)?);
                }
            }
            Defense::NoiseRel(s) => {
                let sd = s * rms(&g);
                dp::add_gaussian(&mut g, sd, rng);
                *variance.get_or_insert(0.0) += sd * sd;
            }
            Defense::Prune(p) => compress::prune(&mut g, p),
            Defense::TopK(k) => compress::top_k(&mut g, k),
            Defense::Quantize(bits) => compress::quantize(&mut g, bits),
            Defense::LocalSteps(e, lr) => g = local::local_update(ctx, e, lr)?,
        }
    }
    report.noise_std = variance.map(f64::sqrt);
    report.relative_change = distance(&g, &clean) / clean.norm().max(f64::MIN_POSITIVE);
    report.zero_fraction = count_zeros(&g) as f64 / g.len().max(1) as f64;
    Ok((g, report))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::{Activation, Init, InitConfig};
    use rand::SeedableRng;

    /// A small client: d = 6, m = 10, one hidden layer of 5, K = 3, B = 4, tanh, ce.
    pub(crate) fn client(seed: u64) -> (Mlp<f64>, Mat<f64>, Targets) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let cfg = InitConfig {
            input_dim: 6,
            width: 10,
            hidden: 5,
            depth: 2,
            outputs: 3,
            init: Init::TorchDefault,
            activation: Activation::Tanh,
            prior_mean: 0.0,
            prior_sq_norm: 6.0,
            prior_centred_sq_norm: 6.0,
        };
        let model = cfg.build(&mut rng).unwrap();
        let x = Mat::from_fn(4, 6, |i, j| ((i * 6 + j) as f64 * 0.71).sin() * 2.0);
        (model, x, Targets::Classes(vec![0, 2, 1, 2]))
    }

    /// What a cross-entropy client knows of its batch `x`, `targets` under `model`.
    pub(crate) fn ce_context<'a>(
        model: &'a Mlp<f64>,
        x: &'a Mat<f64>,
        targets: &'a Targets,
    ) -> ClientContext<'a> {
        ClientContext {
            model,
            x,
            targets,
            loss: Loss::Ce,
        }
    }

    #[test]
    fn parse_rejects_out_of_range_values_with_one_line_errors() {
        for bad in [
            "prune:1.5",
            "prune:-0.1",
            "quantize:0",
            "quantize:64",
            "noise:-1",
            "noise-rel:-2",
            "clip:0",
            "topk:0",
            "local-steps:0:0.1",
            "local-steps:2:-1",
            "clip:nan",
        ] {
            let e = bad.parse::<Defense>().unwrap_err();
            // a range or value error of the defence as typed (its message is one line)
            assert!(
                matches!(
                    &e,
                    Error::Spec {
                        kind: "defence",
                        ..
                    }
                ),
                "{bad}: {e:?}"
            );
            assert_eq!(e.to_string().lines().count(), 1, "{bad}: {e}");
        }
        for good in [
            "clip:1",
            "noise:0.5",
            "noise-rel:1e-3",
            "prune:0.9",
            "topk:10",
            "quantize:8",
            "local-steps:3:0.01",
        ] {
            let d: Defense = good.parse().unwrap();
            assert_eq!(d.spelling().parse::<Defense>().unwrap(), d);
        }
    }

    #[test]
    fn chain_order_rules() {
        // DP noise without a clip before it: the noise spec is the one named
        assert!(matches!(
            check_chain(&[Defense::Noise(1.0)]).unwrap_err(),
            Error::Spec { kind: "defence", spec, .. } if spec == "noise:1"
        ));
        assert!(check_chain(&[Defense::Prune(0.5), Defense::Clip(1.0)]).is_err());
        assert!(check_chain(&[Defense::Clip(1.0), Defense::LocalSteps(2, 0.1)]).is_err());
        assert!(
            check_chain(&[
                Defense::Clip(1.0),
                Defense::Noise(1.0),
                Defense::Quantize(8)
            ])
            .is_ok()
        );
    }

    #[test]
    fn report_measures_the_change_and_the_zeros() {
        let (model, x, t) = client(1);
        let ctx = ce_context(&model, &x, &t);
        let g = model.gradient(x.as_ref(), &t, Loss::Ce).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        let (_, r) = apply(&[Defense::Prune(1.0)], &ctx, g.clone(), &mut rng).unwrap();
        assert!((r.relative_change - 1.0).abs() < 1e-15 && r.zero_fraction == 1.0);
        let (g2, r) = apply(&[Defense::NoiseRel(0.1)], &ctx, g.clone(), &mut rng).unwrap();
        let sd = r.noise_std.unwrap();
        assert!((sd - 0.1 * rms(&g)).abs() < 1e-15 * sd.max(1.0));
        // ||noise|| / ||g|| = sd sqrt(n) / (rms sqrt(n)) = 0.1, up to the chi fluctuation
        // 1/sqrt(2n) ~ 0.04 for these n ~ 100 entries.
        assert!(
            (r.relative_change - 0.1).abs() < 0.03,
            "{}",
            r.relative_change
        );
        assert!(distance(&g2, &g) > 0.0);
    }
}

#[cfg(test)]
mod noise_tests {
    use crate::attack::{AttackConfig, Method};
    use crate::simulate::{self, SimConfig};

    /// The analytic attack's stated confidence under noise matches what it achieves:
    /// the measured error of one digit under noise-rel is within a factor 2 of the
    /// predicted first-order error (a chi-square fluctuation, not a bias).
    #[test]
    fn analytic_predicts_its_error_under_noise() {
        for s in [1e-4, 1e-2] {
            let cfg = SimConfig {
                batch: 1,
                width: 512,
                defenses: vec![super::Defense::NoiseRel(s)],
                attack: AttackConfig::new(Method::Analytic, 1),
                ..SimConfig::default()
            };
            let out = simulate::run(&cfg).unwrap();
            let predicted = out.reconstruction.diagnostics.predicted_rel_error.unwrap();
            let measured = out.report.median_rel_error;
            assert!(
                measured < 2.0 * predicted && measured > 0.5 * predicted,
                "{s}: {measured} vs {predicted}"
            );
            assert!(!out.reconstruction.samples[0].exact);
        }
    }
}
