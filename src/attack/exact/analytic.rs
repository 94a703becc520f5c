//! Exact single-sample recovery: with B = 1, g_w_j = delta_j x and g_b_j = delta_j,
//! so x = g_w_j / g_b_j for every neuron with g_b_j != 0. Combined over neurons by
//! least squares: x = sum_j g_b_j g_w_j / sum_j g_b_j^2 (the neurons with the
//! largest |g_b_j| dominate, which is what keeps the rounding error smallest).

use super::floor::direct_floor;
use super::{certificate, labels};
use crate::attack::params::{AttackConfig, Method};
use crate::attack::reconstruction::{Reconstruction, Stage};
use crate::attack::subspace::{self, Subspace};
use crate::attack::verdict::{self, Candidate, Claim};
use crate::attack::view::BLOCK_ROWS;
use crate::attack::view::ServerView;
use crate::{Error, Result};

pub fn attack(view: &ServerView, cfg: &AttackConfig) -> Result<Reconstruction> {
    if view.first.grad_bias.is_none() || view.first.bias.is_none() {
        return Err(no_bias());
    }
    let sub = subspace::estimate(view, &cfg.subspace_options())?;
    attack_certified(view, cfg, &sub)
}

/// [`attack_on`], then for one sample its label (the output-bias gradient is its
/// residual r_1 = dL/df) and the batch certificate: `--method analytic` and `auto`'s
/// single-sample branch alike.
pub fn attack_certified(
    view: &ServerView,
    cfg: &AttackConfig,
    sub: &Subspace,
) -> Result<Reconstruction> {
    let mut rec = attack_on(view, cfg, sub)?;
    if sub.batch != 1 {
        return Ok(rec);
    }
    if let (Some(s), Some(gc)) = (
        rec.samples.first_mut(),
        view.upper_grad.last().and_then(|l| l.bias.as_ref()),
    ) {
        let r = faer::Col::from_fn(gc.nrows(), |k| gc[k]);
        s.label = labels::assign(cfg.loss, std::slice::from_ref(&r), view.outputs())[0];
        s.output_residual = Some(r.iter().copied().collect());
    }
    if view.depth() >= 1 && view.first.bias.is_some() {
        let cert = certificate::certify(view, sub, &rec.samples, &[], cfg.loss)?;
        verdict::certify(&mut rec, cert);
    }
    Ok(rec)
}

fn no_bias() -> Error {
    Error::NeedsFirstLayerBias {
        method: "the analytic attack (x = g_w / g_b)",
    }
}

/// The attack on an already computed subspace.
pub fn attack_on(view: &ServerView, cfg: &AttackConfig, sub: &Subspace) -> Result<Reconstruction> {
    let (Some(gb), Some(_)) = (&view.first.grad_bias, &view.first.bias) else {
        return Err(no_bias());
    };
    let mut rec = Reconstruction::from_subspace(Method::Analytic, sub);
    if sub.batch != 1 {
        rec.notes.push(format!(
            "the analytic attack recovers a single sample; the gradient has rank {} (the tensor, span and auto methods take more)",
            sub.batch
        ));
        return Ok(rec);
    }
    let (m, d) = (view.width(), view.input_dim());
    let denom = gb.squared_norm_l2();
    if denom == 0.0 {
        return Err(Error::Numerical(
            "every bias gradient is zero: the sample cannot be scaled".into(),
        ));
    }
    let mut x = vec![0.0; d];
    let mut start = 0;
    while start < m {
        let r = start..(start + BLOCK_ROWS).min(m);
        let gw = view.first.grad_weight.block(r.clone())?;
        for (i, j) in r.clone().enumerate() {
            let w = gb[j];
            for k in 0..d {
                x[k] += w * gw[(i, k)];
            }
        }
        view.first.grad_weight.release(r.clone());
        start = r.end;
    }
    x.iter_mut().for_each(|v| *v /= denom);
    // residual of g_w = g_b x^T over all neurons, relative to ||g_w||: a second pass,
    // because expanding the square in the first would cancel away a residual at eps
    let (mut res2, mut norm2) = (0.0, 0.0);
    let mut start = 0;
    while start < m {
        let r = start..(start + BLOCK_ROWS).min(m);
        let gw = view.first.grad_weight.block(r.clone())?;
        for (i, j) in r.clone().enumerate() {
            for k in 0..d {
                let g = gw[(i, k)];
                res2 += (g - gb[j] * x[k]).powi(2);
                norm2 += g * g;
            }
        }
        view.first.grad_weight.release(r.clone());
        start = r.end;
    }
    let residual = (res2 / norm2.max(f64::MIN_POSITIVE)).sqrt();
    let noise = cfg.noise_std.or(view.noise_std).filter(|&s| s > 0.0);
    if let Some(sd) = noise {
        // first-order error of the least-squares ratio under N(0, sd^2) per entry:
        // sd sqrt(1 + x_k^2) / ||g_b|| per coordinate (docs/DESIGN.md)
        let xn2: f64 = x.iter().map(|v| v * v).sum();
        let predicted =
            sd * (d as f64 + xn2).sqrt() / (denom.sqrt() * xn2.sqrt().max(f64::MIN_POSITIVE));
        rec.diagnostics.predicted_rel_error = Some(predicted);
        rec.notes.push(format!(
            "gradient noise sd {sd:.3e}: expected relative error of the sample about {predicted:.2e}"
        ));
    }
    // under noise the formula is a least-squares estimate, never exact
    let claim = match noise {
        None => Claim::Residual {
            residual,
            floor: direct_floor(view.dtype),
        },
        Some(_) => Claim::None,
    };
    rec.samples.push(
        Candidate {
            x,
            residual: Some(residual),
            stage: Stage::Analytic,
            label: None,
            output_residual: None,
            claim,
        }
        .judge(),
    );
    Ok(rec)
}
