//! gradleak: how much one model gradient leaks.
//!
//! A server sends a model, a client returns the gradient of its loss on a private
//! batch, and the server reconstructs the batch from that one gradient:
//!
//! ```
//! use faer::Mat;
//! use gradleak::model::{Activation, Init, InitConfig, Loss, Targets};
//! use gradleak::rng::{Stream, stream};
//! use gradleak::{AttackParams, Dtype, Method, ServerView, attack, metrics};
//!
//! // a client: a 6-400-3 tanh network and a private batch of 3 inputs
//! let (d, width, classes, batch) = (6, 400, 3, 3);
//! let model = InitConfig {
//!     input_dim: d,
//!     width,
//!     hidden: 16,
//!     depth: 1,
//!     outputs: classes,
//!     init: Init::TorchDefault,
//!     activation: Activation::Tanh,
//!     prior_mean: 0.0,
//!     prior_sq_norm: d as f64,
//!     prior_centred_sq_norm: d as f64,
//! }
//! .build(&mut stream(1, Stream::Model))?;
//! let x = Mat::from_fn(batch, d, |i, j| ((3 * i + j) as f64).sin());
//! let y = vec![0, 1, 2];
//! let gradient = model.gradient(x.as_ref(), &Targets::Classes(y.clone()), Loss::Ce)?;
//!
//! // the server: what it holds, the attack, and how close it came
//! let view = ServerView::from_memory(&model, &gradient, Dtype::F64)?;
//! let params = AttackParams::new(Method::Auto).seed(1).loss(Loss::Ce).check()?;
//! let rec = attack::run(&view, &params)?;
//! let m = metrics::evaluate(&x, &rec.samples, None, 1e-8, Some(&y))?;
//! assert_eq!(m.recovered_fraction, 1.0);
//! assert!(rec.samples.iter().all(|s| s.exact));
//! # Ok::<(), gradleak::Error>(())
//! ```
//!
//! The pipeline, one module per stage (docs/DESIGN.md, "Where things are"):
//! [`data`] -> [`model`] (the client and its gradient) -> [`defense`] ->
//! [`attack`] (subspace, then a method) -> [`metrics`] -> [`report`].
//! [`simulate`] runs it end to end, [`sweep`] over a grid, [`audit`] to the weakest
//! defence that stops every attack; [`io`] reads and writes the files users hold.
//! The mathematics is in docs/DESIGN.md, with the notation used here.

pub mod attack;
pub mod audit;
pub mod data;
pub mod defense;
mod error;
pub mod io;
pub mod metrics;
pub mod model;
pub(crate) mod numerics;
pub mod plot;
pub mod report;
pub mod rng;
mod scalar;
pub mod simulate;
pub mod sweep;
pub mod text;

pub use attack::{
    AttackConfig, AttackParams, Flow, Method, Observer, Reconstruction, Sample, ServerView, Stage,
};
pub use error::{Error, Result};
pub use scalar::{Dtype, Real};
