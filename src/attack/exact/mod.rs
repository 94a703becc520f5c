//! The exact route (docs/DESIGN.md, "Beyond the paper: exact equations"), from the
//! bottom up: the signal model ([`signal`]), the vocabulary of zeros and unknowns
//! ([`zero`]), when a residual is exact ([`floor`]), neuron subsamples
//! ([`subsample`]), one sample's problem ([`problem`]), the span search ([`search`]),
//! the alternating-projection polish for piecewise-linear activations
//! ([`alternation`]), their seeding rounds and pattern search ([`pattern`]), labels
//! ([`labels`]), the choice between the searches ([`route`]), refinement from tensor
//! starts ([`refine`]), and the single-sample formula ([`analytic`]).
//! Each module imports only those listed before it.

pub mod alternation;
pub mod analytic;
pub mod certificate;
pub mod floor;
pub mod labels;
pub mod pattern;
pub(crate) mod pattern_rounds;
pub mod problem;
pub mod refine;
pub mod rounds;
pub mod route;
pub mod search;
pub mod seed;
pub mod signal;
pub mod subsample;
pub mod zero;

#[cfg(test)]
pub(crate) mod testing;
