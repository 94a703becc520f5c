//! Subsamples of neurons: the search and refinement iterate on a few hundred or
//! thousand neurons and check on all of them (docs/DESIGN.md, "Span search").

use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

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
