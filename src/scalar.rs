//! The two floating-point types a client may compute in.

use serde::{Deserialize, Serialize};

/// Storage and working precision of a model, a gradient or a batch. Half precisions
/// (`F16`, `Bf16`) are read and upcast; arithmetic on them runs in f32 ([`Dtype::compute`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    Bf16,
    F16,
    F32,
    F64,
}

impl Dtype {
    /// Unit roundoff of the type: the floor under which a relative residual is
    /// indistinguishable from zero.
    pub fn epsilon(self) -> f64 {
        match self {
            Dtype::Bf16 => 2f64.powi(-7),
            Dtype::F16 => 2f64.powi(-10),
            Dtype::F32 => f32::EPSILON as f64,
            Dtype::F64 => f64::EPSILON,
        }
    }

    /// The type gradleak computes in for data of this precision (half runs in f32).
    pub fn compute(self) -> Dtype {
        match self {
            Dtype::Bf16 | Dtype::F16 | Dtype::F32 => Dtype::F32,
            Dtype::F64 => Dtype::F64,
        }
    }

    /// Bytes per stored value.
    pub fn bytes(self) -> usize {
        match self {
            Dtype::Bf16 | Dtype::F16 => 2,
            Dtype::F32 => 4,
            Dtype::F64 => 8,
        }
    }

    /// Whether `v` is exactly a value of this type (what a gradient computed in it and
    /// stored wider still shows: the low mantissa bits are zero).
    pub fn holds(self, v: f64) -> bool {
        match self {
            Dtype::Bf16 => half::bf16::from_f64(v).to_f64() == v,
            Dtype::F16 => half::f16::from_f64(v).to_f64() == v,
            Dtype::F32 => (v as f32) as f64 == v,
            Dtype::F64 => true,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
            Dtype::F32 => "f32",
            Dtype::F64 => "f64",
        }
    }
}

impl std::str::FromStr for Dtype {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "bf16" | "bfloat16" => Ok(Dtype::Bf16),
            "f16" | "float16" | "half" => Ok(Dtype::F16),
            "f32" | "float32" => Ok(Dtype::F32),
            "f64" | "float64" => Ok(Dtype::F64),
            _ => Err(crate::Error::Unknown {
                kind: "dtype",
                name: s.to_string(),
                expected: "bf16 f16 f32 f64".into(),
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
