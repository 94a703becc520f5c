//! Losses with mean reduction, as PyTorch defines them.

use faer::Mat;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The client's training loss (reduction = 'mean').
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Loss {
    /// Mean squared error, averaged over all B x K entries (`nn.MSELoss`).
    Mse,
    /// Cross-entropy over K classes, averaged over the batch (`nn.CrossEntropyLoss`).
    Ce,
    /// Binary cross-entropy with logits, averaged over all entries (`nn.BCEWithLogitsLoss`).
    Bce,
}

/// What the client trains against.
#[derive(Clone, Debug, PartialEq)]
pub enum Targets {
    /// Class indices, one per sample (for `ce`).
    Classes(Vec<usize>),
    /// Real targets, B x K (for `mse`, and 0/1 for `bce`).
    Values(Mat<f64>),
}

impl Targets {
    pub fn len(&self) -> usize {
        match self {
            Targets::Classes(c) => c.len(),
            Targets::Values(v) => v.nrows(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn softmax_row(out: &Mat<f64>, i: usize) -> Vec<f64> {
    let k = out.ncols();
    let mx = (0..k)
        .map(|j| out[(i, j)])
        .fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = (0..k).map(|j| (out[(i, j)] - mx).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

fn sigmoid(z: f64) -> f64 {
    crate::model::Activation::Sigmoid.eval(z)
}

impl Loss {
    pub const ALL: [Loss; 3] = [Loss::Mse, Loss::Ce, Loss::Bce];

    pub fn name(self) -> &'static str {
        match self {
            Loss::Mse => "mse",
            Loss::Ce => "ce",
            Loss::Bce => "bce",
        }
    }

    fn check(self, out: &Mat<f64>, targets: &Targets) -> Result<()> {
        if targets.len() != out.nrows() {
            return Err(Error::Shape(format!(
                "{} targets for a batch of {}",
                targets.len(),
                out.nrows()
            )));
        }
        match (self, targets) {
            (Loss::Ce, Targets::Classes(c)) => {
                if out.ncols() < 2 {
                    return Err(Error::Shape(
                        "cross-entropy needs an output of at least 2 classes".into(),
                    ));
                }
                if let Some(&bad) = c.iter().find(|&&y| y >= out.ncols()) {
                    return Err(Error::ClassOutOfRange {
                        index: bad,
                        classes: out.ncols(),
                    });
                }
                Ok(())
            }
            (Loss::Mse | Loss::Bce, Targets::Values(v)) => {
                if v.ncols() != out.ncols() {
                    return Err(Error::Shape(format!(
                        "targets have {} columns, the model outputs {}",
                        v.ncols(),
                        out.ncols()
                    )));
                }
                Ok(())
            }
            (Loss::Ce, _) => Err(Error::Needs {
                what: "cross-entropy",
                needs: "class indices as targets",
            }),
            _ => Err(Error::Needs {
                what: self.name(),
                needs: "real-valued targets",
            }),
        }
    }

    /// Mean loss of the outputs `out` (B x K).
    pub fn value(self, out: &Mat<f64>, targets: &Targets) -> Result<f64> {
        self.check(out, targets)?;
        let (b, k) = (out.nrows(), out.ncols());
        let mut total = 0.0;
        match (self, targets) {
            (Loss::Ce, Targets::Classes(c)) => {
                for (i, &y) in c.iter().enumerate() {
                    total -= softmax_row(out, i)[y].ln();
                }
                Ok(total / b as f64)
            }
            (Loss::Mse, Targets::Values(v)) => {
                for i in 0..b {
                    for j in 0..k {
                        total += (out[(i, j)] - v[(i, j)]).powi(2);
                    }
                }
                Ok(total / (b * k) as f64)
            }
            (Loss::Bce, Targets::Values(v)) => {
                for i in 0..b {
                    for j in 0..k {
                        let z = out[(i, j)];
                        // log(1 + e^z) - y z, computed stably
                        total += z.max(0.0) + (-z.abs()).exp().ln_1p() - v[(i, j)] * z;
                    }
                }
                Ok(total / (b * k) as f64)
            }
            _ => unreachable!("checked above"),
        }
    }

    /// dL/d out (B x K): the output residuals, including the 1/B (or 1/BK) of the mean.
    pub fn residual(self, out: &Mat<f64>, targets: &Targets) -> Result<Mat<f64>> {
        self.check(out, targets)?;
        let (b, k) = (out.nrows(), out.ncols());
        let mut r = Mat::zeros(b, k);
        match (self, targets) {
            (Loss::Ce, Targets::Classes(c)) => {
                for (i, &y) in c.iter().enumerate() {
                    let p = softmax_row(out, i);
                    for j in 0..k {
                        r[(i, j)] = (p[j] - f64::from(j == y)) / b as f64;
                    }
                }
            }
            (Loss::Mse, Targets::Values(v)) => {
                for i in 0..b {
                    for j in 0..k {
                        r[(i, j)] = 2.0 * (out[(i, j)] - v[(i, j)]) / (b * k) as f64;
                    }
                }
            }
            (Loss::Bce, Targets::Values(v)) => {
                for i in 0..b {
                    for j in 0..k {
                        r[(i, j)] = (sigmoid(out[(i, j)]) - v[(i, j)]) / (b * k) as f64;
                    }
                }
            }
            _ => unreachable!("checked above"),
        }
        Ok(r)
    }
}

impl std::str::FromStr for Loss {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Loss::ALL
            .into_iter()
            .find(|l| l.name() == s)
            .ok_or_else(|| Error::Unknown {
                kind: "loss",
                name: s.to_string(),
                expected: "mse ce bce".into(),
            })
    }
}

impl std::fmt::Display for Loss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The residual is the derivative of the value: central differences agree to
    /// O(h^2) = 1e-10 plus roundoff 1e-16/h.
    #[test]
    fn residual_is_the_derivative_of_the_value() {
        let out = Mat::from_fn(3, 4, |i, j| ((i * 7 + j * 3) as f64).sin());
        let cases = [
            (Loss::Ce, Targets::Classes(vec![2, 0, 3])),
            (
                Loss::Mse,
                Targets::Values(Mat::from_fn(3, 4, |i, j| (i + j) as f64 * 0.1)),
            ),
            (
                Loss::Bce,
                Targets::Values(Mat::from_fn(3, 4, |i, j| ((i + j) % 2) as f64)),
            ),
        ];
        let h = 1e-6;
        for (loss, t) in cases {
            let r = loss.residual(&out, &t).unwrap();
            for i in 0..3 {
                for j in 0..4 {
                    let mut p = out.clone();
                    p[(i, j)] += h;
                    let mut m = out.clone();
                    m[(i, j)] -= h;
                    let fd =
                        (loss.value(&p, &t).unwrap() - loss.value(&m, &t).unwrap()) / (2.0 * h);
                    assert!(
                        (fd - r[(i, j)]).abs() < 1e-8,
                        "{loss} ({i},{j}): {fd} vs {}",
                        r[(i, j)]
                    );
                }
            }
        }
    }

    #[test]
    fn bad_targets_are_errors() {
        let out = Mat::<f64>::zeros(2, 3);
        assert!(matches!(
            Loss::Ce.residual(&out, &Targets::Classes(vec![0, 3])),
            Err(Error::ClassOutOfRange {
                index: 3,
                classes: 3
            })
        ));
        assert!(matches!(
            Loss::Ce.residual(&out, &Targets::Classes(vec![0])),
            Err(Error::Shape(_))
        ));
        assert!(matches!(
            Loss::Mse.residual(&out, &Targets::Classes(vec![0, 1])),
            Err(Error::Needs {
                what: "mse",
                needs: "real-valued targets"
            })
        ));
    }
}
