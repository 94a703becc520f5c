//! Convolutional clients: the description ([`spec`]), the image-layer arithmetic
//! ([`kernels`]), the network with its exact gradient ([`net`]) and its construction
//! from named tensors with BatchNorm folded ([`build`]); the built-in LeNet and ConvNet
//! and PyTorch's default initialisation ([`arch`]).

pub mod arch;
pub mod build;
pub mod kernels;
pub mod net;
pub mod spec;

pub use arch::Architecture;
pub use build::{Fold, Tensors};
pub use kernels::Window;
pub use net::{Cnn, CnnBackward, CnnForward, CnnGradient, Conv, Layer};
pub use spec::{LayerSpec, ModelSpec, Shape};
