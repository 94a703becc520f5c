//! gradleak: how much one model gradient leaks.
//!
//! The pipeline, one module per stage:
//! [`data`] -> [`model`] (the client and its gradient) -> [`defense`] ->
//! [`attack`] (subspace, then a method) -> [`metrics`] -> [`report`].
//! [`simulate`] runs it end to end; [`io`] reads and writes the files users hold.
//! The mathematics is in docs/DESIGN.md, with the notation used here.

pub mod attack;
pub mod data;
pub mod defense;
mod error;
pub mod io;
pub mod metrics;
pub mod model;
pub mod numerics;
pub mod plot;
pub mod report;
pub mod rng;
mod scalar;
pub mod simulate;
pub mod sweep;

pub use error::{Error, Result};
pub use scalar::{Dtype, Real};
