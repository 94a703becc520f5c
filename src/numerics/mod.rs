//! Shared numerics of the attacks: Levenberg-Marquardt for least squares and
//! L-BFGS for smooth minimisation.

pub mod cgls;
pub mod damped;
pub mod lbfgs;
pub mod lm;
