//! Stage timings of the text attack on one gradient, and the token filter against the
//! direct per-position computation (normalise and project the whole vocabulary).

use std::fmt;
use std::path::Path;
use std::time::Instant;

use super::{TextError, TextParams};

/// What `gradleak text bench` prints.
pub struct TextBench {
    pub report: super::TextReport,
    /// Seconds of the expanded filter for one position (mean over the attack's positions).
    pub filter_per_position: f64,
    /// Seconds of the direct computation for one position (mean over the timed ones).
    pub direct_per_position: f64,
    /// Largest difference between the two distances over the timed positions.
    pub max_difference: f64,
    pub direct_positions: usize,
}

/// Run the attack once, then the direct filter on the first `direct_positions` positions.
pub fn run(
    model_dir: &Path,
    gradient: &Path,
    direct_positions: usize,
) -> Result<TextBench, TextError> {
    let report = super::attack(model_dir, gradient, &TextParams::default())?;
    let loaded = super::Loaded::read(model_dir, gradient)?;
    let super::Model::Gpt2(model) = &loaded.model else {
        return Err(TextError::Unsupported(
            "the filter bench compares GPT-2's per-position filter; this model has none".into(),
        ));
    };
    let span0 = super::span::RowSpan::of(
        loaded.g0.as_ref(),
        loaded.dtype,
        "block 0 c_attn",
        model.hidden(),
    )?;
    let t = Instant::now();
    let filter = super::filter::TokenFilter::new(model.embeddings(), &span0);
    let setup = t.elapsed().as_secs_f64();
    let n = direct_positions
        .max(1)
        .min(report.token_filter.len().max(1));
    let t = Instant::now();
    let screens: Vec<Vec<f64>> = (0..n).map(|p| filter.screen(p)).collect();
    let filter_per_position = (setup
        + t.elapsed().as_secs_f64() * report.token_filter.len().max(1) as f64 / n as f64)
        / report.token_filter.len().max(1) as f64;
    let t = Instant::now();
    let mut max_difference: f64 = 0.0;
    for (p, screen) in screens.iter().enumerate() {
        let direct = filter.direct(p);
        for (a, b) in screen.iter().zip(&direct) {
            max_difference = max_difference.max((a - b).abs());
        }
    }
    let direct_per_position = t.elapsed().as_secs_f64() / n as f64;
    Ok(TextBench {
        report,
        filter_per_position,
        direct_per_position,
        max_difference,
        direct_positions: n,
    })
}

impl fmt::Display for TextBench {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.report;
        let s = &r.seconds;
        writeln!(
            f,
            "case: d = {}, vocab {}, {} positions, {} sequences, certified {}",
            r.hidden,
            r.vocab,
            r.token_filter.len(),
            r.sequences.len(),
            r.certified
        )?;
        writeln!(f, "stage        seconds (wall)")?;
        for (name, v) in [
            ("load", s.load),
            ("span", s.span),
            ("filter", s.filter),
            ("search", s.search),
            ("certificate", s.certificate),
        ] {
            writeln!(f, "{name:<12} {v:>8.2}")?;
        }
        writeln!(
            f,
            "token filter per position: expanded {:.3} s (set-up shared over the positions), direct {:.3} s ({} positions timed): {:.1}x; largest distance difference {:.1e}",
            self.filter_per_position,
            self.direct_per_position,
            self.direct_positions,
            self.direct_per_position / self.filter_per_position,
            self.max_difference
        )
    }
}
