//! The verdict: the one place a [`Sample`] is called exact. A stage hands over a
//! [`Candidate`] with the [`Claim`] its own test supports; [`Candidate::judge`] turns it
//! into a sample, [`certify`] applies the batch certificate (`exact::certificate`), and
//! [`withdraw`] takes the word back from a sample a later fit moved (docs/DESIGN.md,
//! "Certificate").

use super::evidence::Certificate;
use super::reconstruction::{Reconstruction, Sample, Stage};

/// What a stage's own test says about its sample, before the certificate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Claim {
    /// No claim: an estimate or a fit (the moments, a likelihood fit, a fit the
    /// certificate alone may vouch for).
    None,
    /// The relative residual of the sample's own equations, exact at most at `floor`
    /// (the single-sample formula, the gradient-matching baselines).
    Residual { residual: f64, floor: f64 },
    /// A search's acceptance of its zero (span residual under the sample's own rounding
    /// floor, on all and on the held-back neurons; a pattern's fit on every neuron).
    Accepted(bool),
    /// A sample a later fit held fixed keeps the verdict it had.
    Kept(bool),
}

impl Claim {
    /// The verdict before the certificate.
    fn holds(self) -> bool {
        match self {
            Claim::None => false,
            Claim::Residual { residual, floor } => residual <= floor,
            Claim::Accepted(ok) | Claim::Kept(ok) => ok,
        }
    }
}

/// A sample before the verdict: the fields of [`Sample`] but `exact`, and the claim.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub x: Vec<f64>,
    pub residual: Option<f64>,
    pub stage: Stage,
    pub label: Option<usize>,
    pub output_residual: Option<Vec<f64>>,
    pub claim: Claim,
}

impl Candidate {
    /// The sample, exact when its claim holds.
    pub fn judge(self) -> Sample {
        Sample {
            exact: self.claim.holds(),
            x: self.x,
            residual: self.residual,
            stage: self.stage,
            label: self.label,
            output_residual: self.output_residual,
        }
    }
}

/// Mark the samples of `rec` exact exactly when the certificate vouches for them: a
/// closing batch decides alone (it overrides a search's verdict, e.g. a fit over its
/// own floor); otherwise a sample stays exact only if its certificate entry agrees.
pub fn certify(rec: &mut Reconstruction, cert: Certificate) {
    for (s, e) in rec.samples.iter_mut().zip(&cert.samples) {
        s.exact = if cert.certified {
            e.exact
        } else {
            s.exact && e.exact
        };
    }
    rec.diagnostics.certified = Some(cert.certified);
    rec.diagnostics.closure_residual = cert.closure_residual;
    rec.certificate = Some(cert);
}

/// A sample a later stage moved (or found on a view holding other samples' errors) is
/// no longer exact.
pub fn withdraw(s: &mut Sample) {
    s.exact = false;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(claim: Claim) -> Candidate {
        Candidate {
            x: vec![1.0],
            residual: None,
            stage: Stage::Span,
            label: None,
            output_residual: None,
            claim,
        }
    }

    /// Each claim gives its verdict; a residual exactly at the floor still counts, a NaN
    /// residual never does.
    #[test]
    fn claims_give_their_verdicts() {
        let exact = |c| candidate(c).judge().exact;
        assert!(!exact(Claim::None));
        assert!(exact(Claim::Residual {
            residual: 1e-15,
            floor: 1e-15
        }));
        assert!(!exact(Claim::Residual {
            residual: f64::NAN,
            floor: 1.0
        }));
        assert!(exact(Claim::Accepted(true)) && !exact(Claim::Accepted(false)));
        assert!(exact(Claim::Kept(true)) && !exact(Claim::Kept(false)));
    }
}
