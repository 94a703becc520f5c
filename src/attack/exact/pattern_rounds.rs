//! Seeding rounds of the pattern search (docs/DESIGN.md, "Seeding by demixing"):
//! each FastICA estimate of the projected gradient gives an input c, its activation
//! pattern starts the alternation; exact patterns are kept, the gradient is projected
//! off their signals and the next round demixes what is left.

use faer::{Col, Mat};

use super::alternation::{Alternation, Found, deflate};
use super::seed;
use crate::attack::evidence::SearchStats;

/// Run the alternation from every seed on `threads` threads (results in seed order).
fn from_seeds(
    alt: &Alternation<'_>,
    seeds: &[Col<f64>],
    threads: usize,
) -> Vec<(Option<Found>, usize)> {
    let threads = threads.clamp(1, seeds.len().max(1));
    if threads == 1 {
        return seeds.iter().map(|c| alt.run_from(c)).collect();
    }
    let chunk = seeds.len().div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = seeds
            .chunks(chunk)
            .map(|part| s.spawn(move || part.iter().map(|c| alt.run_from(c)).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("alternation thread panicked"))
            .collect()
    })
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
    for round in 0..max_rounds {
        if found.len() >= b {
            break;
        }
        let res = deflate(alt, gv, found);
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
        for (res, iters) in from_seeds(alt, &seeds, threads) {
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
            break;
        }
    }
    stats.seeded = found.len();
}
