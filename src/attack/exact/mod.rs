//! The exact route (docs/DESIGN.md, "Beyond the paper: exact equations"), from the
//! bottom up: the signal model ([`signal`]), the vocabulary of zeros and unknowns
//! ([`zero`]), when a residual is exact and the rounding scale ([`floor`]), neuron
//! subsamples (`subsample`), the state one run builds once (`context`), one sample's problem (`problem`), labels (`labels`), the
//! batch's verdict ([`certificate`]), when a search keeps a zero (`accept`), the span
//! search (`search`) and its seeding rounds (`seed`, `rounds`), the
//! alternating-projection polish for piecewise-linear activations (`alternation`,
//! `pattern_rounds`, `pattern`), deep piecewise-linear nets layer by layer
//! (`deep_pattern`), rank-deficient inputs (`deficient`, and the labelled joint fit
//! `labelled`), the choice between the searches (`route`), refinement from tensor
//! starts (`refine`) and the single-sample formula (`analytic`). Each module imports
//! only those listed before it (the order of docs/DESIGN.md, checked by
//! scripts/layering.py).

pub(crate) mod accept;
pub(crate) mod alternation;
pub(crate) mod analytic;
pub mod certificate;
pub(crate) mod context;
pub(crate) mod deep_pattern;
pub(crate) mod deficient;
pub mod floor;
pub(crate) mod labelled;
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
