//! Typed errors of the library. The binary turns each into one readable line.

use std::path::PathBuf;

/// Everything that can go wrong in gradleak, named by what the user can fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{}: {cause}", path.display())]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    /// A file exists but its content is not what its format promises.
    #[error("{}: malformed file: {reason}", path.display())]
    Format { path: PathBuf, reason: String },
    /// Shapes that must agree do not.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// NaN or Inf where finite numbers are required.
    #[error("non-finite value (NaN or Inf) in {0}")]
    NonFinite(String),
    /// A name on the command line or in a file that gradleak does not know.
    #[error("unknown {kind} '{name}' (expected one of: {expected})")]
    Unknown {
        kind: &'static str,
        name: String,
        expected: String,
    },
    /// A text specification (data, defence, prior, grid axis, shard) that does not parse
    /// or is out of range; `kind` names which.
    #[error("{kind} '{spec}': {reason}")]
    Spec {
        kind: &'static str,
        spec: String,
        reason: String,
    },
    /// A parameter outside what the method or the model allows.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// An attack parameter outside its range (`name` is the parameter's name in
    /// [`AttackParams`](crate::AttackParams)).
    #[error("{name}: {reason}")]
    Param { name: &'static str, reason: String },
    /// The method fixes each sample's scale with the first-layer bias, and the model has none.
    #[error(
        "{method} needs a first-layer bias to fix each sample's scale (the model has none, or its gradient is zero)"
    )]
    NeedsFirstLayerBias { method: &'static str },
    /// A batch larger than the first layer can separate (limit = min(width, input dim + 1),
    /// or the singular values computed).
    #[error("a batch of {batch} is more than the first layer can separate (at most {limit})")]
    BatchTooLarge { batch: usize, limit: usize },
    /// The gradient has full rank: the batch may be larger than the first layer can separate.
    #[error(
        "the gradient has full rank {rank}: the batch is at least as large as the first layer allows (min(width, input dim + 1) = {rank}); a rank-based attack cannot separate it"
    )]
    FullRank { rank: usize },
    /// The method does not apply to this model (activation, depth, layers).
    #[error("{0}")]
    Unsupported(String),
    /// The caller's [`Observer`](crate::Observer) asked the attack to stop.
    #[error("cancelled by the caller")]
    Cancelled,
    /// The first-layer gradient carries no signal above its floor (rounding or known
    /// noise): a result ("nothing recoverable"), which `attack::run` reports as such.
    #[error(
        "the first-layer gradient is zero (or below its noise floor): nothing to reconstruct \
         (largest singular value {largest:.3e} <= floor {floor:.3e})"
    )]
    NoSignal { largest: f64, floor: f64 },
    /// A numerical routine failed (e.g. an SVD did not converge).
    #[error("numerical failure: {0}")]
    Numerical(String),
}

/// Result with the library's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error tagged with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            cause: source,
        }
    }

    /// A malformed-file error tagged with the path it concerns.
    pub fn format(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
