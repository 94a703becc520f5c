//! What every stage of one run of the exact route reads, built once and passed down
//! (docs/DESIGN.md, "Span search" and "Certificate"): the signal model on the subspace,
//! the rounding scale of G~ (one pass over the gradient), the exact floor of F, and the
//! seeded order of the neurons whose tail the span searches hold back.

use super::floor::{RoundingScale, exact_floor};
use super::signal::SignalModel;
use super::subsample::Subsample;
use crate::Result;
use crate::attack::subspace::Subspace;
use crate::attack::view::ServerView;
use crate::rng::{Salt, salted};

/// One run's shared, read-only state (see the module doc).
pub struct Context<'a> {
    pub view: &'a ServerView,
    pub sub: &'a Subspace,
    pub model: SignalModel,
    pub scale: RoundingScale,
    /// The global exact floor of F (`floor::exact_floor`), an upper bound on every own floor.
    pub floor: f64,
    /// The span searches' order of the m neurons (`Salt::SearchNeurons`): screening,
    /// iteration and polish subsamples come from its kept head, its tail is held back.
    pub order: Subsample,
}

impl<'a> Context<'a> {
    /// The context of a run with seed `seed` on `sub` (errors as `SignalModel::new`
    /// and the pass over the gradient).
    pub fn new(view: &'a ServerView, sub: &'a Subspace, seed: u64) -> Result<Self> {
        let model = SignalModel::new(view, sub)?;
        let order = Subsample::new(model.width(), &mut salted(seed, Salt::SearchNeurons));
        let scale = RoundingScale::new(view)?;
        Ok(Context {
            view,
            sub,
            model,
            scale,
            floor: exact_floor(view, sub),
            order,
        })
    }

    /// The neurons the span searches never iterate on (the certificate's check).
    pub fn held_back(&self) -> Vec<usize> {
        self.order.held_back()
    }
}
