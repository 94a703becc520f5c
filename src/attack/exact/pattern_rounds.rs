//! Seeding rounds of the pattern search (docs/DESIGN.md, "Seeding by demixing"):
//! each FastICA estimate of the projected gradient gives an input c, its activation
//! pattern starts the alternation; exact patterns are kept, the gradient is projected
//! off their signals and the next round demixes what is left.

use faer::{Col, Mat};

use super::alternation::{Alternation, Found, deflate};
use super::seed;
use crate::attack::evidence::SearchStats;

/// The pattern rounds run up to this many times `--seed-rounds` rounds: a round that
/// reaches a few new patterns of a narrow basin is cheap, and later rounds work in a
/// smaller residual space (VGG-style head, B = 64: 19-41 rounds to all 64).
pub const PATTERN_ROUND_FACTOR: usize = 4;
/// Rounds that find nothing new in a row before the rounds stop (a fruitless round is
/// not the end: the next one demixes with fresh FastICA seeds).
pub const PATTERN_PATIENCE: usize = 4;

/// Run the alternation from every seed on `threads` threads (results in seed order):
/// the plain one, and where that keeps no new pattern (none, not under its own floor, or
/// one of `before`, the patterns of earlier rounds) the realisable one in the row space
/// `basis`. What each seed runs depends on the seed alone, so any `threads` gives the
/// same results.
fn from_seeds(
    alt: &Alternation<'_>,
    seeds: &[Col<f64>],
    basis: &Mat<f64>,
    before: &[Found],
    threads: usize,
) -> Vec<(Option<Found>, usize)> {
    let one = |c: &Col<f64>| {
        let (res, iters) = alt.run_from(c);
        let new = res.as_ref().is_some_and(|(p, r, f)| {
            !alt.degenerate(p) && alt.own_floor(p, r, *f) && !alt.duplicate(before, p)
        });
        if new {
            return (res, iters);
        }
        let (res, more) = alt.run_in(c, basis);
        (res, iters + more)
    };
    let threads = threads.clamp(1, seeds.len().max(1));
    if threads == 1 {
        return seeds.iter().map(one).collect();
    }
    let chunk = seeds.len().div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = seeds
            .chunks(chunk)
            .map(|part| s.spawn(move || part.iter().map(one).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("alternation thread panicked"))
            .collect()
    })
}

/// An orthonormal basis (B x k) of the row space of `res`, where the missing samples'
/// c lie: its top `missing` right singular vectors (fewer where the rest are under 1e-9
/// of the largest singular value). The count, not a threshold, sets k: in float32 the
/// rounding of G~ leaves every other direction at 1e-7-1e-6 of the largest.
fn row_basis(res: &Mat<f64>, missing: usize) -> Mat<f64> {
    let b = res.ncols();
    let Ok(svd) = res.thin_svd() else {
        return Mat::identity(b, b);
    };
    let s = svd.S().column_vector();
    let smax = s.iter().copied().fold(0.0, f64::max);
    let k = (0..s.nrows())
        .filter(|&i| s[i] > 1e-9 * smax)
        .count()
        .min(missing.max(1));
    svd.V().subcols(0, k).to_owned()
}

/// Demixing rounds: add the exact patterns they reach to `found`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rounds(
    alt: &Alternation<'_>,
    gv: &Mat<f64>,
    vl: &Col<f64>,
    seed_value: u64,
    max_rounds: usize,
    ica_iterations: usize,
    threads: usize,
    found: &mut Vec<Found>,
    stats: &mut SearchStats,
) {
    let b = gv.ncols();
    let mut idle = 0;
    for round in 0..max_rounds.saturating_mul(PATTERN_ROUND_FACTOR) {
        if found.len() >= b {
            break;
        }
        let res = deflate(alt, gv, found);
        let basis = row_basis(&res, b - found.len());
        let seeds = seed::candidates(
            &res,
            vl,
            seed_value.wrapping_add(round as u64),
            ica_iterations,
        );
        stats.candidates += seeds.len();
        stats.starts += seeds.len();
        stats.rounds = round + 1;
        let before = found.len();
        for (res, iters) in from_seeds(alt, &seeds, &basis, &found[..], threads) {
            stats.lm_iterations += iters;
            let Some((pat, r, f)) = res else { continue };
            if alt.degenerate(&pat) || !alt.own_floor(&pat, &r, f) {
                stats.degenerate += 1;
            } else if alt.duplicate(found, &pat) {
                stats.duplicates += 1;
            } else if found.len() < b {
                found.push((pat, r, f));
            }
        }
        if found.len() == before {
            idle += 1;
            if idle >= PATTERN_PATIENCE {
                break;
            }
        } else {
            idle = 0;
        }
    }
    stats.seeded = found.len();
}
