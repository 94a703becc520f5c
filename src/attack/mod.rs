//! The attacks: from what the server holds ([`ServerView`]) to a [`Reconstruction`].
//!
//! Stages (docs/DESIGN.md, "Where things are"): [`subspace`] (batch size, row space)
//! -> a method: [`exact`] (the single-sample formula, the span and pattern searches,
//! refinement), [`moment`] (the paper's moments + CP decomposition), [`baseline`]
//! (DLG, IG). Parameters: [`params`]; results: [`reconstruction`] and [`evidence`]
//! (search statistics, certificate); the law of the weights: [`law`]; progress:
//! [`observer`].

pub mod activation_fit;
pub mod baseline;
pub(crate) mod blocks;
pub mod cancel;
pub mod conv;
pub(crate) mod defended;
pub mod evidence;
pub mod exact;
pub mod files;
pub mod law;
pub mod moment;
pub mod observer;
pub mod params;
pub mod precision;
pub mod prior;
pub mod reconstruction;
pub mod stages;
pub mod subspace;
pub mod two_layer;
pub mod verdict;
pub mod view;

pub use cancel::Cancel;
pub use files::{ReadInfo, ReadOptions};
pub use observer::{Flow, Observer};
pub use params::{AttackConfig, AttackParams, Method};
pub use prior::Prior;
pub use reconstruction::{Diagnostics, Reconstruction, Sample, Stage};
pub use subspace::{RankRule, Subspace, SubspaceOptions};
pub use view::{FirstLayer, Rows, ServerView};

use crate::{Error, Result};

/// Run the configured attack. A gradient below its noise floor is a result with no
/// sample and the reason, not an error.
pub fn run(view: &ServerView, cfg: &AttackConfig) -> Result<Reconstruction> {
    let cfg = &defended::quantized::with_known_error(view, cfg)?;
    let out = match cfg.method {
        Method::Analytic => exact::analytic::attack(view, cfg),
        Method::Tensor => moment::attack(view, cfg),
        Method::Refine => exact::refine::attack(view, cfg),
        Method::Span => exact::route::attack(view, cfg),
        Method::Auto => auto(view, cfg),
        Method::Dlg => baseline::dlg(view, cfg),
        Method::Ig => baseline::ig(view, cfg),
    };
    match out {
        Err(Error::NoSignal { largest, floor }) => Ok(defended::nothing_recoverable(
            cfg.method, view, largest, floor,
        )),
        other => other,
    }
}

/// Attack a convolutional client's gradient: the features entering its fully
/// connected head, exactly, by [`run`] on the head.
pub fn run_conv(p: &conv::ConvProblem, cfg: &AttackConfig) -> Result<conv::ConvReconstruction> {
    conv::attack(p, cfg, run)
}

/// The default route: exact analytic recovery for one sample, otherwise the best
/// multi-sample method available.
fn auto(view: &ServerView, cfg: &AttackConfig) -> Result<Reconstruction> {
    if defended::complete::applies(view) {
        let mut rec = defended::complete_then_attack(view, cfg, run)?;
        rec.method = Method::Auto;
        return Ok(rec);
    }
    if let Some((e, lr)) = defended::local_steps::applies(view) {
        let mut rec = defended::local_steps::attack(view, cfg, e, lr, run)?;
        rec.method = Method::Auto;
        return Ok(rec);
    }
    let sub = subspace::estimate(view, &cfg.subspace_options())?;
    let mut rec = if sub.batch == 1 && view.first.grad_bias.is_some() {
        exact::analytic::attack_certified(view, cfg, &sub)?
    } else {
        defended::refine_found(view, cfg, exact::route::attack_on(view, cfg, &sub)?)?
    };
    rec.method = Method::Auto;
    Ok(rec)
}
