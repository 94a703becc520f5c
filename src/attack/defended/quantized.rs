//! The error a server knows is in the first layer after `quantize:BITS` (and noise):
//! the subspace floor and the span search's acceptance need it as a noise level
//! (docs/DESIGN.md, "Defended gradients").

use crate::Result;
use crate::attack::{AttackConfig, ServerView};
use crate::defense::Defense;

/// Margin on the rounding error's level when it stands in for noise: the error is
/// not independent of the signal (entries near one level share their error), which
/// lifts a few singular values of G~ above the Gaussian edge (digits B = 8, m = 4096,
/// quantize:8: s_9 = 1.46 x the bulk, 1.09 x the plain floor; s_8 is 2.5 x s_9).
pub const QUANTIZE_MARGIN: f64 = 1.6;

/// Variance of the rounding error of a uniform quantiser of step q: q^2 / 12
/// (the observed tensor's [min, max] over 2^BITS - 1 steps; its ends are exact).
fn step_variance(lo: f64, hi: f64, bits: u32) -> f64 {
    if !(hi > lo) {
        return 0.0;
    }
    let q = (hi - lo) / (2f64.powi(bits as i32) - 1.0);
    q * q / 12.0
}

/// The standard deviation per first-layer entry of the error the server knows of:
/// the known Gaussian noise and, after `quantize:BITS`, the larger of the weight's and
/// the bias's rounding variances (a conservative single level for G~ = [g_W, g_b]).
/// None when neither applies.
pub fn first_layer_error_std(view: &ServerView) -> Result<Option<f64>> {
    let noise = view.noise_std.unwrap_or(0.0).powi(2);
    let Some(bits) = view.defenses.iter().rev().find_map(|d| match d {
        Defense::Quantize(b) => Some(*b),
        _ => None,
    }) else {
        return Ok(view.noise_std);
    };
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    let m = view.width();
    for start in (0..m).step_by(crate::attack::view::BLOCK_ROWS) {
        let r = start..(start + crate::attack::view::BLOCK_ROWS).min(m);
        let g = view.first.grad_weight.block(r.clone())?;
        for c in g.col_iter() {
            for &x in c.iter() {
                lo = lo.min(x);
                hi = hi.max(x);
            }
        }
        view.first.grad_weight.release(r);
    }
    let mut var = step_variance(lo, hi, bits);
    if let Some(b) = &view.first.grad_bias {
        let (l, h) = b
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &x| {
                (l.min(x), h.max(x))
            });
        var = var.max(step_variance(l, h, bits));
    }
    var *= QUANTIZE_MARGIN * QUANTIZE_MARGIN;
    Ok(Some((noise + var).sqrt()))
}

/// The attack's configuration with the known first-layer error as its noise level
/// (unless the user gave one).
pub fn with_known_error(view: &ServerView, cfg: &AttackConfig) -> Result<AttackConfig> {
    let mut cfg = cfg.clone();
    if cfg.noise_std.is_none() {
        cfg.noise_std = first_layer_error_std(view)?;
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attack::{Method, subspace};
    use crate::simulate::{self, SimConfig};

    /// quantize:8 spreads rounding error over every entry of G~: read as rounding of
    /// f64 it inflates the rank far past B (50 for 8 on digits, m = 4096); as a known
    /// error of step^2 / 12 (with the margin) the rank is B again (s_8 / s_9 = 2.5).
    #[test]
    fn quantisation_error_sets_the_rank_floor() {
        let defenses = vec![Defense::Quantize(8)];
        let cfg = SimConfig {
            batch: 8,
            width: 4096,
            init: crate::model::Init::TorchDefault,
            defenses: defenses.clone(),
            attack: AttackConfig::new(Method::Analytic, 1),
            ..SimConfig::default()
        };
        let out = simulate::run(&cfg).unwrap();
        let mut view =
            ServerView::from_memory(&out.model, &out.gradient, crate::Dtype::F64).unwrap();
        let plain = subspace::estimate(&view, &cfg.attack.subspace_options());
        assert!(plain.is_err() || plain.unwrap().batch > 8);
        view.defenses = defenses;
        let known = with_known_error(&view, &cfg.attack).unwrap();
        let sd = known.noise_std.unwrap();
        assert!(sd > 0.0);
        let sub = subspace::estimate(&view, &known.subspace_options()).unwrap();
        assert_eq!(sub.batch, 8, "{:?}", &sub.singular_values[..8]);
    }
}
