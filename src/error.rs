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
    /// An output path that cannot be written as given.
    #[error("{} {reason}", path.display())]
    Output { path: PathBuf, reason: &'static str },
    /// A tensor the model description names is not in the file or dict given.
    #[error("the {what} has no tensor '{name}'")]
    MissingTensor { what: &'static str, name: String },
    /// A parameter outside what the method or the model allows.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// A count that must be positive is zero (a batch, a set of methods, nodes, ...):
    /// the message says which.
    #[error("invalid argument: {0}")]
    Empty(&'static str),
    /// A method or loss given a model or targets it is not built for.
    #[error("invalid argument: {what} needs {needs}")]
    Needs {
        what: &'static str,
        needs: &'static str,
    },
    /// A setting outside the values a routine provides (`allowed` says which).
    #[error("invalid argument: {what} {value} is not {allowed}")]
    NotProvided {
        what: &'static str,
        value: usize,
        allowed: String,
    },
    /// Output that could not be encoded; the encoder's error is the source.
    #[error("invalid argument: {what}")]
    Encode {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A batch larger than the data set it is drawn from.
    #[error("invalid argument: batch of {requested} requested but {data} has only {rows} rows")]
    NotEnoughRows {
        requested: usize,
        data: String,
        rows: usize,
    },
    /// A class index in the targets beyond the model's outputs.
    #[error("invalid argument: class index {index} out of range for {classes} classes")]
    ClassOutOfRange { index: usize, classes: usize },
    /// Too few neurons for the weight law's dimension.
    #[error(
        "invalid argument: {neurons} neurons are too few to estimate a {dim}-dimensional weight law"
    )]
    TooFewNeurons { neurons: usize, dim: usize },
    /// A pre-activation law the moment route cannot use.
    #[error(
        "invalid argument: pre-activation law N({mu}, {sigma}^2) must have a finite positive scale"
    )]
    BadPreactivationLaw { mu: f64, sigma: f64 },
    /// The activation's third and fourth moments vanish: the moment route has no signal.
    #[error(
        "invalid argument: {activation}: E[act'''] and E[act''''] both vanish under N({mu}, {sigma}^2); the moment attack has no signal"
    )]
    NoMomentSignal {
        activation: String,
        mu: f64,
        sigma: f64,
    },
    /// A merge of sweep shards that lacks some of the grid's runs.
    #[error(
        "invalid argument: {missing} of {total} grid runs are in none of the inputs (first: {first}); run their shards first"
    )]
    ShardsMissing {
        missing: usize,
        total: usize,
        first: String,
    },
    /// A merge of sweep shards with rows from another grid.
    #[error(
        "invalid argument: {rows} input rows are not in this grid: merge with the same settings and grid as the shards"
    )]
    ShardsForeign { rows: usize },
    /// A photo folder without photos.
    #[error("invalid argument: {}: no PNG or JPEG photos", dir.display())]
    NoPhotos { dir: PathBuf },
    /// A plot whose y column has no numeric row.
    #[error("invalid argument: no rows of {} have a numeric '{column}'", csv.display())]
    NoNumericRows { csv: PathBuf, column: String },
    /// An output path without a file name.
    #[error("invalid argument: {} is not a file path", path.display())]
    NotAFilePath { path: PathBuf },
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

    /// An encoding failure of `what`, the encoder's error as its source.
    pub fn encode(what: impl Into<String>, source: impl std::fmt::Display) -> Self {
        Error::Encode {
            what: what.into(),
            source: source.to_string().into(),
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
