//! The exact route (docs/DESIGN.md, "Beyond the paper: exact equations"): the signal
//! model, the span residual and its zeros, the search, the pattern search for
//! piecewise-linear activations, refinement from tensor starts, and labels.

pub mod analytic;
pub mod certificate;
pub mod labels;
pub mod pattern;
pub mod refine;
pub mod signal;
pub mod span;
