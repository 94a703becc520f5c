//! Convolutional clients: the description ([`spec`]), the image-layer arithmetic
//! ([`kernels`]), the network with its exact gradient ([`net`]) and its construction
//! from named tensors with BatchNorm folded ([`build`]).

pub mod build;
pub mod kernels;
pub mod net;
pub mod spec;

pub use build::{Fold, Tensors};
pub use kernels::Window;
pub use net::{Cnn, CnnBackward, CnnForward, CnnGradient, Conv, Layer};
pub use spec::{LayerSpec, ModelSpec, Shape};
