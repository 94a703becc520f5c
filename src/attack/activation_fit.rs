//! Which activation the gradient came from, when the server does not know it.
//!
//! Every sample of a batch satisfies the span test of the exact route only under the
//! activation the client used: with the wrong one the equations do not close and the
//! search finds nothing at its floor. So each candidate gets a short span search (a few
//! starts); the one with the most samples passing their test wins, and a gradient no
//! candidate fits is an error rather than an empty result.

use serde::Serialize;

use super::params::{AttackConfig, Method};
use super::view::ServerView;
use crate::model::Activation;
use crate::{Error, Result};

/// Starts of each candidate's probe (enough for a batch that the full search solves
/// in its first round; the probe only has to tell candidates apart).
pub const PROBE_STARTS: usize = 24;

/// One candidate's probe.
#[derive(Clone, Debug, Serialize)]
pub struct Fit {
    pub activation: Activation,
    /// Samples found and passing their span test, of the estimated batch.
    pub exact: usize,
    pub found: usize,
    pub batch: usize,
    /// Smallest span residual among the samples found.
    pub best_residual: Option<f64>,
    pub seconds: f64,
}

/// The evidence for the chosen activation.
#[derive(Clone, Debug, Serialize)]
pub struct Choice {
    pub chosen: Activation,
    pub fits: Vec<Fit>,
}

/// Probe each candidate with a short span search and pick the best fit. Errors when no
/// candidate has a sample passing its test.
pub fn choose(view: &ServerView, cfg: &AttackConfig, candidates: &[Activation]) -> Result<Choice> {
    let mut fits = Vec::with_capacity(candidates.len());
    for &a in candidates {
        let t = std::time::Instant::now();
        let mut v = view.clone();
        v.activation = a;
        let probe = cfg
            .clone()
            .into_params()
            .method(Method::Span)
            .search_starts(PROBE_STARTS)
            .seed_rounds(1)
            .check()?;
        let fit = match super::run(&v, &probe) {
            Ok(rec) => Fit {
                activation: a,
                exact: rec.samples.iter().filter(|s| s.exact).count(),
                found: rec.samples.len(),
                batch: rec.batch_estimated,
                best_residual: rec
                    .samples
                    .iter()
                    .filter_map(|s| s.residual)
                    .min_by(f64::total_cmp),
                seconds: t.elapsed().as_secs_f64(),
            },
            Err(Error::Cancelled) => return Err(Error::Cancelled),
            // a candidate the route cannot run (e.g. an unsupported combination) fits nothing
            Err(_) => Fit {
                activation: a,
                exact: 0,
                found: 0,
                batch: 0,
                best_residual: None,
                seconds: t.elapsed().as_secs_f64(),
            },
        };
        fits.push(fit);
    }
    let best = fits.iter().filter(|f| f.exact > 0).max_by(|a, b| {
        a.exact.cmp(&b.exact).then_with(|| {
            // fewer exact ties: the smaller best residual wins
            b.best_residual
                .unwrap_or(f64::INFINITY)
                .total_cmp(&a.best_residual.unwrap_or(f64::INFINITY))
        })
    });
    match best {
        Some(f) => Ok(Choice {
            chosen: f.activation,
            fits: fits.clone(),
        }),
        None => Err(Error::Unsupported(format!(
            "no activation fits this gradient: no sample passes its span test under {} (the model may not be a plain MLP, or the gradient may be noisy or defended)",
            fits.iter()
                .map(|f| f.activation.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}
