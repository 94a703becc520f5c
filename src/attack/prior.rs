//! A public prior over input values (`--prior mean=..,std=..,min=..,max=..`).

use serde::Serialize;

use crate::data::PriorStats;
use crate::{Error, Result};

/// Per-coordinate prior on input values: where search starts are drawn from and
/// what range a reconstruction may plausibly take.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Prior {
    pub mean: f64,
    pub std: f64,
    pub min: f64,
    pub max: f64,
}

impl Default for Prior {
    /// Standardised data: mean 0, sd 1, unbounded.
    fn default() -> Self {
        Prior {
            mean: 0.0,
            std: 1.0,
            min: f64::NEG_INFINITY,
            max: f64::INFINITY,
        }
    }
}

impl From<PriorStats> for Prior {
    fn from(s: PriorStats) -> Self {
        Prior {
            mean: s.mean,
            std: s.std,
            min: s.min,
            max: s.max,
        }
    }
}

impl std::str::FromStr for Prior {
    type Err = Error;
    /// `mean=0.3,std=0.4,min=0,max=1`; missing keys keep their defaults.
    fn from_str(s: &str) -> Result<Self> {
        let mut p = Prior::default();
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| Error::Spec {
                kind: "prior",
                spec: s.to_string(),
                reason: "expected key=value pairs".into(),
            })?;
            let v: f64 = v.parse().map_err(|_| Error::Spec {
                kind: "prior",
                spec: s.to_string(),
                reason: format!("'{v}' is not a number"),
            })?;
            match k {
                "mean" => p.mean = v,
                "std" => p.std = v,
                "min" => p.min = v,
                "max" => p.max = v,
                _ => {
                    return Err(Error::Unknown {
                        kind: "prior key",
                        name: k.into(),
                        expected: "mean std min max".into(),
                    });
                }
            }
        }
        if p.std.is_nan() || p.std <= 0.0 || !p.mean.is_finite() || p.min >= p.max {
            return Err(Error::Spec {
                kind: "prior",
                spec: s.to_string(),
                reason: "need std > 0, a finite mean and min < max".into(),
            });
        }
        Ok(p)
    }
}
