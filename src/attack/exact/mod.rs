//! The exact route (docs/DESIGN.md, "Beyond the paper: exact equations"), from the
//! bottom up: the signal model ([`signal`]), the vocabulary of zeros and unknowns
//! ([`zero`]), when a residual is exact ([`floor`]), neuron subsamples
//! (`subsample`), one sample's problem (`problem`), the span search (`search`),
//! the alternating-projection polish for piecewise-linear activations
//! (`alternation`), their seeding rounds and pattern search (`pattern`), deep
//! piecewise-linear nets layer by layer (`deep_pattern`), labels (`labels`),
//! rank-deficient inputs (`deficient`), the choice between the searches (`route`),
//! refinement from tensor starts (`refine`), the single-sample formula (`analytic`),
//! and when a search keeps a zero (`accept`, after [`certificate`]'s rounding scale).
//! Each module imports only those listed before it.

pub(crate) mod accept;
pub(crate) mod alternation;
pub(crate) mod analytic;
pub mod certificate;
pub(crate) mod deep_pattern;
pub(crate) mod deficient;
pub mod floor;
pub(crate) mod labels;
pub(crate) mod pattern;
pub(crate) mod pattern_rounds;
pub(crate) mod problem;
pub(crate) mod refine;
pub(crate) mod rounds;
pub(crate) mod route;
pub(crate) mod search;
pub(crate) mod seed;
pub mod signal;
pub(crate) mod subsample;
pub mod zero;

#[cfg(test)]
pub(crate) mod testing;
