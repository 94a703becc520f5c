//! `--method span`: choose the search for the activation (the span search for smooth
//! ones, the pattern search for piecewise-linear ones) and turn its zeros into
//! samples with output residuals and labels.

use super::context::Context;
use super::signal::SignalModel;
use super::zero::Zero;
use super::{alternation, certificate, labels, pattern, search};
use crate::attack::evidence::SearchStats;
use crate::attack::params::{AttackConfig, Method};
use crate::attack::reconstruction::{Reconstruction, Sample, Stage};
use crate::attack::subspace::{self, Subspace};
use crate::attack::verdict::{self, Candidate, Claim};
use crate::attack::view::ServerView;
use crate::{Error, Result};

/// Turn zeros into samples: output residuals with their absolute scale and sign, labels.
pub fn to_samples(
    view: &ServerView,
    sub: &Subspace,
    model: &SignalModel,
    zeros: &[Zero],
    cfg: &AttackConfig,
    stage: Stage,
) -> Vec<Sample> {
    let scaled = labels::output_residuals(sub, model, zeros);
    let lab = labels::assign(cfg.loss, &scaled, view.outputs());
    zeros
        .iter()
        .enumerate()
        .map(|(i, z)| {
            Candidate {
                x: model.coords.x_of_c(&z.c),
                residual: Some(z.residual),
                stage,
                label: lab.get(i).copied().flatten(),
                output_residual: scaled.get(i).map(|r| r.iter().copied().collect()),
                claim: Claim::Accepted(z.accepted),
            }
            .judge()
        })
        .collect()
}

/// Record the search's figures in the reconstruction.
pub fn record(rec: &mut Reconstruction, stats: &SearchStats, found: usize) {
    rec.diagnostics.search = Some(stats.clone());
    rec.diagnostics.found = Some(found);
    if found < rec.batch_estimated {
        rec.notes.push(format!(
            "span search found {found} of {} samples ({} starts, {:.1} s); the rest are missing",
            rec.batch_estimated, stats.starts, stats.seconds
        ));
    }
}

pub fn attack(view: &ServerView, cfg: &AttackConfig) -> Result<Reconstruction> {
    let sub = subspace::estimate(view, &cfg.subspace_options())?;
    attack_on(view, cfg, &sub)
}

/// The search (or the pattern search) on an already computed subspace.
pub fn attack_on(view: &ServerView, cfg: &AttackConfig, sub: &Subspace) -> Result<Reconstruction> {
    let mut sub = sub.clone();
    // inputs zero in some coordinate cap the rank (docs/DESIGN.md, "Rank-deficient inputs")
    let mut rank = super::deficient::input_rank(view, &sub)?;
    super::deficient::cap(&mut sub, &mut rank);
    let mut rec = Reconstruction::from_subspace(Method::Span, &sub);
    if view.first.bias.is_none() {
        return Err(Error::NeedsFirstLayerBias {
            method: "the span search",
        });
    }
    if view.activation == crate::model::Activation::Identity {
        rec.notes.push(
            "with the identity activation every sample's signal is the same vector A^T r: the inputs \
             cannot be separated (only their span is known)"
                .into(),
        );
        return Ok(rec);
    }
    if alternation::slopes(view.activation).is_some() && view.depth() > 1 {
        let (samples, stats, batch) = super::deep_pattern::search(view, &sub, cfg)?;
        let found = samples.len();
        rec.batch_estimated = batch;
        rec.samples = samples;
        record(&mut rec, &stats, found);
        let cert = certificate::certify(view, &sub, &rec.samples, &[], cfg.loss)?;
        verdict::certify(&mut rec, cert);
        return Ok(rec);
    }
    // one context for the search, the certificate and the rank-deficient step
    let ctx = Context::new(view, &sub, cfg.seed)?;
    let (zeros, stats, stage) = if alternation::slopes(view.activation).is_some() {
        let (z, s) = pattern::search_in(&ctx, cfg)?;
        if z.len() < sub.batch {
            rec.notes.push(format!(
                "pattern search found {} of {} activation patterns; without all of them the inputs \
                 are approximate (not exact)",
                z.len(),
                sub.batch
            ));
        }
        (z, s, Stage::Pattern)
    } else {
        let (z, s) = if cfg.search.seed_rounds > 0 {
            super::rounds::search(&ctx, cfg)?
        } else {
            search::search_in(&ctx, cfg, &[], Vec::new(), cfg.search.seconds)?
        };
        (z, s, Stage::Span)
    };
    let model = &ctx.model;
    rec.samples = to_samples(view, &sub, model, &zeros, cfg, stage);
    record(&mut rec, &stats, zeros.len());
    // the span searches never touched their held-back neurons; the pattern search
    // fits a pattern on every neuron, so none is held back there
    let held = match stage {
        Stage::Span => ctx.held_back(),
        _ => Vec::new(),
    };
    let cert =
        certificate::certify_with(view, &sub, model, &ctx.scale, &rec.samples, &held, cfg.loss)?;
    verdict::certify(&mut rec, cert);
    super::deficient::apply(view, &sub, model, &zeros, cfg, &rank, &mut rec)?;
    super::labelled::run(&ctx, cfg, &rank.zero_coordinates, &mut rec)?;
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::super::testing::case;
    use super::*;
    use crate::model::Activation;

    /// The whole route on a small simulated case (smooth, deep smooth, ReLU, and deep
    /// piecewise-linear through `deep_pattern`): every sample to 1e-8, labels right.
    #[test]
    fn recovers_a_small_simulated_batch() {
        for (act, depth) in [
            (Activation::Tanh, 1),
            (Activation::Gelu, 2),
            (Activation::Relu, 1),
            (Activation::Relu, 2),
            (Activation::Relu, 3),
            (Activation::LeakyRelu, 2),
        ] {
            let (view, x, y) = case(act, depth, 3, 11);
            let mut cfg = AttackConfig::new(Method::Span, 3);
            cfg.loss = Some(crate::model::Loss::Ce);
            let rec = attack(&view, &cfg).unwrap();
            let m = crate::metrics::evaluate(&x, &rec.samples, None, 1e-8, Some(&y)).unwrap();
            assert_eq!(
                m.recovered_fraction, 1.0,
                "{act} depth {depth}: max error {:e}",
                m.max_rel_error
            );
            assert_eq!(m.label_accuracy, Some(1.0), "{act} depth {depth}");
        }
    }
}
