//! The client: its network, loss, and the server's choice of parameters.

mod activation;
pub mod cnn;
pub mod init;
mod loss;
mod mlp;
pub(crate) mod ops;

pub use activation::{Activation, LEAKY_SLOPE};
pub use init::{Init, InitConfig};
pub use loss::{Loss, Targets};
pub(crate) use mlp::check_output_residuals;
pub use mlp::{Backward, Dense, Forward, Gradient, Mlp, cast_mat, mat_is_finite};
