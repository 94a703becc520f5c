//! Piecewise-linear activations (ReLU, leaky ReLU): activation-pattern search
//! (docs/DESIGN.md, "Piecewise-linear activations").
//!
//! For a two-layer net, sample i's signal is s_i = p_i (.) (A^T r_i) with p_i a vector
//! of slopes (0/1 for ReLU): a structured vector in the B-dimensional column space
//! Q (the idea behind SPEAR, Dimitrov et al. 2024). The span residual is flat inside
//! each activation cell, so instead of descending it we alternate projections:
//! pattern -> best r (variable projection) -> project the signal onto span Q ->
//! round each neuron's ratio to the nearer slope -> new pattern, until the pattern
//! is stable. Starts are the patterns of the gradient's row points. Once all B
//! signals S are known, the inputs follow linearly from G~ V = S diag(alpha) C^T.

use faer::Col;

use super::alternation::{Alternation, Found, deflate, slopes};
use super::floor::RoundingScale;
use super::floor::exact_floor;
use super::pattern_rounds;
use super::signal::{Neurons, SignalModel};
use super::subsample::Subsample;
use super::zero::{Zero, row_points};
use crate::attack::evidence::SearchStats;
use crate::attack::params::AttackConfig;
use crate::attack::subspace::Subspace;
use crate::attack::view::ServerView;
use crate::model::Activation;
use crate::rng::{Salt, salted};
use crate::{Error, Result};

/// Neurons of the subsample the alternation starts on.
pub const PATTERN_NEURONS: usize = 2048;

/// Signals found by the pattern search, then the inputs by the linear solve.
pub fn search(
    view: &ServerView,
    sub: &Subspace,
    cfg: &AttackConfig,
) -> Result<(Vec<Zero>, SearchStats, SignalModel)> {
    let t0 = std::time::Instant::now();
    let (lo, hi) = slopes(view.activation).ok_or_else(|| {
        Error::Unsupported(format!(
            "the pattern search handles relu and leaky_relu; {} {}",
            view.activation,
            if view.activation == Activation::Identity {
                "makes every signal the same vector A^T r: the inputs cannot be separated"
            } else {
                "is smooth: use the span search"
            }
        ))
    })?;
    let model = SignalModel::new(view, sub)?;
    let a = model
        .output_weights()
        .ok_or_else(|| {
            Error::Unsupported(
                "the pattern search needs a two-layer model (one hidden layer)".into(),
            )
        })?
        .clone();
    let (m, b) = (model.width(), model.batch());
    let all = Neurons::all(&sub.q);
    let floor = exact_floor(view, sub);
    let small = {
        let order = Subsample::new(m, &mut salted(cfg.seed, Salt::PatternNeurons));
        Neurons::new(
            &sub.q,
            order.first(PATTERN_NEURONS.max(16 * (b + a.nrows()))),
        )
    };
    // F on the subsample is computed against a re-orthonormalised basis: the same
    // rounding floor applies (it depends on the conditioning of G~, not on m)
    let floor_small = floor;
    let gv = sub.projected_gradient();
    let mut stats = SearchStats {
        exact_floor: floor,
        ..Default::default()
    };
    let mut found: Vec<Found> = Vec::new();
    let alt = Alternation {
        a: &a,
        q: &sub.q,
        small: &small,
        all: &all,
        slopes: (lo, hi),
        floor,
        floor_small,
        model: &model,
        scale: &RoundingScale::new(view)?,
        sub,
    };
    let vl = Col::from_fn(b, |k| sub.v[(sub.v.nrows() - 1, k)]);
    let opts = &cfg.search;
    pattern_rounds::rounds(
        &alt,
        &gv,
        &vl,
        cfg.seed,
        opts.seed_rounds,
        opts.ica_iterations,
        opts.threads,
        &mut found,
        &mut stats,
    );
    stats.seed_seconds = t0.elapsed().as_secs_f64();
    // then the row points of the gradient with the found signals removed
    let starts = row_points(sub, &deflate(&alt, &gv, &found));
    stats.candidates += starts.len();
    for c in starts {
        if found.len() >= b
            || stats.starts >= cfg.search.max_starts
            || cfg
                .search
                .seconds
                .is_some_and(|s| t0.elapsed().as_secs_f64() > s)
            || cfg.cancel.is_cancelled()
        {
            break;
        }
        stats.starts += 1;
        let (res, iters) = alt.run_from(&c);
        stats.lm_iterations += iters;
        let Some((pat, r, f)) = res else { continue };
        if alt.degenerate(&pat) || !alt.own_floor(&pat, &r, f) {
            stats.degenerate += 1;
            continue;
        }
        if alt.duplicate(&found, &pat) {
            stats.duplicates += 1;
            continue;
        }
        found.push((pat, r, f));
    }
    stats.seconds = t0.elapsed().as_secs_f64();
    let zeros = if found.len() < b {
        alt.partial_inputs(sub, &gv, &found)
    } else {
        alt.inputs(sub, &gv, &found)
    };
    Ok((zeros, stats, model))
}
