//! Subsamples of neurons: the search and refinement iterate on a few hundred or
//! thousand neurons and check on all of them (docs/DESIGN.md, "Span search"); the
//! searches hold a quarter back for the certificate ("Certificate", held-back neurons).

use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

/// Share of the neurons the span searches hold back (never screen, iterate or polish on
/// them) so that a zero can be checked on neurons it was not fitted to.
pub const HELD_OUT_SHARE: f64 = 0.25;
/// None is held back when fewer than this would be.
pub const MIN_HELD_OUT: usize = 64;

/// A random order of the m neurons; its prefixes are the subsamples a stage works on,
/// so a smaller subsample is part of a larger one.
pub struct Subsample {
    order: Vec<usize>,
}

impl Subsample {
    /// A random order of `m` neurons drawn from `rng`.
    pub fn new(m: usize, rng: &mut ChaCha8Rng) -> Self {
        let mut order: Vec<usize> = (0..m).collect();
        order.shuffle(rng);
        Subsample { order }
    }

    /// The first `n` neurons of the order (at most m), sorted.
    pub fn first(&self, n: usize) -> Vec<usize> {
        let mut rows = self.order[..n.min(self.order.len())].to_vec();
        rows.sort_unstable();
        rows
    }

    /// How many neurons are held back: a quarter, none when that is under `MIN_HELD_OUT`.
    pub fn held_count(&self) -> usize {
        let h = (self.order.len() as f64 * HELD_OUT_SHARE) as usize;
        if h < MIN_HELD_OUT { 0 } else { h }
    }

    /// The held-back neurons (the last `held_count` of the order), sorted.
    pub fn held_back(&self) -> Vec<usize> {
        let m = self.order.len();
        let mut rows = self.order[m - self.held_count()..].to_vec();
        rows.sort_unstable();
        rows
    }

    /// As [`Subsample::first`], never reaching the held-back neurons.
    pub fn first_kept(&self, n: usize) -> Vec<usize> {
        self.first(n.min(self.order.len() - self.held_count()))
    }

    /// Every neuron but the held-back ones, sorted: where zeros are polished and checked.
    pub fn kept(&self) -> Vec<usize> {
        self.first_kept(self.order.len())
    }
}

/// Size of a subsample: `per_unknown` neurons per unknown of one sample, at least
/// `min` (also when `requested`), at most the m neurons there are.
pub fn size(
    requested: Option<usize>,
    per_unknown: usize,
    min: usize,
    unknowns: usize,
    m: usize,
) -> usize {
    requested.unwrap_or(per_unknown * unknowns).max(min).min(m)
}
