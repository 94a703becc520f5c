//! The exact route (docs/DESIGN.md, "Beyond the paper: exact equations"): the signal
//! model, the span residual and its zeros, the search, the pattern search for
//! piecewise-linear activations, refinement from tensor starts, and labels.

pub mod analytic;
pub mod labels;
pub mod pattern;
pub(crate) mod pattern_rounds;
pub mod refine;
pub mod rounds;
pub mod seed;
pub mod signal;
pub mod span;
