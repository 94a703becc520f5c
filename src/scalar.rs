//! The two floating-point types a client may compute in.

use serde::{Deserialize, Serialize};

/// Storage and compute precision of a model, a gradient or a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
    F64,
}

impl Dtype {
    /// Unit roundoff of the type: the floor under which a relative residual is
    /// indistinguishable from zero.
    pub fn epsilon(self) -> f64 {
        match self {
            Dtype::F32 => f32::EPSILON as f64,
            Dtype::F64 => f64::EPSILON,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F64 => "f64",
        }
    }
}

impl std::str::FromStr for Dtype {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "f32" | "float32" => Ok(Dtype::F32),
            "f64" | "float64" => Ok(Dtype::F64),
            _ => Err(crate::Error::Unknown {
                kind: "dtype",
                name: s.to_string(),
                expected: "f32 f64".into(),
            }),
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A real scalar the client model can compute in (f32 or f64).
pub trait Real:
    faer::traits::RealField + Copy + Send + Sync + std::fmt::Debug + Default + 'static
{
    const DTYPE: Dtype;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
}

impl Real for f32 {
    const DTYPE: Dtype = Dtype::F32;
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
}

impl Real for f64 {
    const DTYPE: Dtype = Dtype::F64;
    fn from_f64(x: f64) -> Self {
        x
    }
    fn to_f64(self) -> f64 {
        self
    }
}
