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
use super::context::Context;
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
    pattern_slopes(view.activation)?;
    let ctx = Context::new(view, sub, cfg.seed)?;
    let (zeros, stats) = search_in(&ctx, cfg)?;
    Ok((zeros, stats, ctx.model))
}

/// The two slopes of a piecewise-linear activation (an error for any other).
fn pattern_slopes(act: Activation) -> Result<(f64, f64)> {
    slopes(act).ok_or_else(|| {
        Error::Unsupported(format!(
            "the pattern search handles relu and leaky_relu; {act} {}",
            if act == Activation::Identity {
                "makes every signal the same vector A^T r: the inputs cannot be separated"
            } else {
                "is smooth: use the span search"
            }
        ))
    })
}

/// As [`search`] in a run's context.
pub fn search_in(ctx: &Context<'_>, cfg: &AttackConfig) -> Result<(Vec<Zero>, SearchStats)> {
    let (zeros, stats, _) = search_patterns(ctx, cfg)?;
    Ok((zeros, stats))
}

/// As [`search_in`], with the activation patterns found (in the order found).
pub(crate) fn search_patterns(
    ctx: &Context<'_>,
    cfg: &AttackConfig,
) -> Result<(Vec<Zero>, SearchStats, Vec<Found>)> {
    let t0 = std::time::Instant::now();
    let (view, sub, model) = (ctx.view, ctx.sub, &ctx.model);
    let (lo, hi) = pattern_slopes(view.activation)?;
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
    let floor = ctx.floor;
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
    let scale = &ctx.scale;
    let alt = Alternation {
        a: &a,
        q: &sub.q,
        small: &small,
        all: &all,
        slopes: (lo, hi),
        floor,
        floor_small,
        stop: scale.floor(0.0),
        model,
        scale,
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
    // then the row points of the gradient with the found signals removed, drawn again
    // after each new pattern: with f found the residual's rows mix only the B - f
    // missing samples (at B - f = 1 each is the missing input), while the first list,
    // from fewer found, mixes more
    let mut starts = row_points(sub, &deflate(&alt, &gv, &found)).into_iter();
    stats.candidates += starts.len();
    while let Some(c) = starts.next() {
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
        starts = row_points(sub, &deflate(&alt, &gv, &found)).into_iter();
        stats.candidates += starts.len();
    }
    stats.seconds = t0.elapsed().as_secs_f64();
    let zeros = if found.len() < b {
        alt.partial_inputs(sub, &gv, &found)
    } else {
        alt.inputs(sub, &gv, &found)
    };
    Ok((zeros, stats, found))
}

#[cfg(test)]
mod probe {
    //! Diagnosis of a fixture's pattern search (issue 22): `GRADLEAK_PROBE=DIR cargo test
    //! --release --lib probe -- --ignored --nocapture`, DIR a make_fixtures.py case.
    use super::*;
    use crate::attack::exact::alternation::alternate;
    use crate::attack::exact::floor::{RoundingScale, exact_floor};
    use crate::attack::exact::seed;
    use crate::attack::exact::zero::best_residual_of;
    use crate::io::safetensors::TensorFile;
    use faer::Mat;

    #[test]
    #[ignore]
    fn probe() {
        let Ok(dir) = std::env::var("GRADLEAK_PROBE") else {
            return;
        };
        let dir = std::path::Path::new(&dir);
        let act = if dir.to_string_lossy().contains("leaky") {
            Activation::LeakyRelu
        } else {
            Activation::Relu
        };
        let view = ServerView::from_files(
            &dir.join("model.safetensors"),
            &dir.join("gradient.safetensors"),
            act,
        )
        .unwrap();
        let x = TensorFile::open(dir.join("batch.safetensors"))
            .unwrap()
            .matrix("x")
            .unwrap();
        let cfg = AttackConfig::new(crate::attack::params::Method::Auto, 1);
        let sub = crate::attack::subspace::estimate(&view, &cfg.subspace_options()).unwrap();
        let (lo, hi) = slopes(act).unwrap();
        let model = SignalModel::new(&view, &sub).unwrap();
        let a = model.output_weights().unwrap().clone();
        let (m, b) = (model.width(), model.batch());
        let all = Neurons::all(&sub.q);
        let floor = exact_floor(&view, &sub);
        let s = &sub.singular_values;
        println!(
            "B {b} m {m} kappa {:.3e} exact_floor {floor:.3e}",
            s[0] / s[b - 1]
        );
        let small = {
            let order = Subsample::new(m, &mut salted(cfg.seed, Salt::PatternNeurons));
            Neurons::new(
                &sub.q,
                order.first(PATTERN_NEURONS.max(16 * (b + a.nrows()))),
            )
        };
        let scale = RoundingScale::new(&view).unwrap();
        let mk = |fl: f64| Alternation {
            a: &a,
            q: &sub.q,
            small: &small,
            all: &all,
            slopes: (lo, hi),
            floor,
            floor_small: floor,
            stop: fl,
            model: &model,
            scale: &scale,
            sub: &sub,
        };
        let alt = mk(floor);
        let rows: Vec<usize> = (0..m).collect();
        let mut truth = Vec::new();
        let mut fs = Vec::new();
        for i in 0..b {
            let xi: Vec<f64> = (0..x.ncols()).map(|j| x[(i, j)]).collect();
            let c = model.coords.c_of_x(&xi);
            let pat: Vec<bool> = model.z(&c, &rows).iter().map(|&z| z > 0.0).collect();
            let mm = Mat::from_fn(
                m,
                a.nrows(),
                |j, k| if pat[j] { hi } else { lo } * a[(k, j)],
            );
            let (f, r) = best_residual_of(&mm, &all).unwrap();
            let own = alt.own_floor(&pat, &r, f);
            let sg = alt.signal(&pat, &r);
            let amp = scale.amplification(&sub, &(&sg * (1.0 / sg.norm_l2())));
            fs.push((f, scale.floor(amp), own));
            truth.push((c, pat));
        }
        let fmax = fs.iter().map(|v| v.0).fold(0.0, f64::max);
        let nown = fs.iter().filter(|v| v.2).count();
        let flo = fs.iter().map(|v| v.1).fold(f64::INFINITY, f64::min);
        println!(
            "true patterns: F max {fmax:.2e}, own floors >= {flo:.2e}, {nown}/{b} pass own floor"
        );
        let near = |p: &[bool]| -> (usize, usize) {
            truth
                .iter()
                .enumerate()
                .map(|(i, (_, t))| (t.iter().zip(p).filter(|(a, b)| a != b).count(), i))
                .min()
                .unwrap()
        };
        // the first seeding round's starts, alternated with the global floor and a tight one
        let gv = sub.projected_gradient();
        let vl = Col::from_fn(b, |k| sub.v[(sub.v.nrows() - 1, k)]);
        let seeds = seed::candidates(&gv, &vl, cfg.seed, cfg.search.ica_iterations);
        for fl in [floor, scale.floor(0.0)] {
            let alt = mk(fl);
            let (mut ok, mut hit) = (0, std::collections::BTreeSet::new());
            let mut lines = Vec::new();
            for c in &seeds {
                let zs = model.z(c, &rows);
                let p0: Vec<bool> = zs.iter().map(|&z| z > 0.0).collect();
                let (d0, i0) = near(&p0);
                let (res, it) = alt.run_from(c);
                let after = res
                    .as_ref()
                    .map(|(p, r, f)| (near(p), *f, alt.own_floor(p, r, *f)));
                if let Some((_, _, true)) = after {
                    ok += 1;
                    hit.insert(after.unwrap().0.1);
                }
                lines.push(format!(
                    "start: {d0} neurons off sample {i0}; {it} sweeps -> {:?}",
                    after.map(|((d, i), f, o)| format!("{d} off {i}, F {f:.1e}, own {o}"))
                ));
            }
            println!(
                "stop floor {fl:.1e}: {} seeds, {ok} pass own floor, {} distinct samples",
                seeds.len(),
                hit.len()
            );
            for l in lines.iter().take(12) {
                println!("  {l}");
            }
        }
        // the alternation from each true pattern flipped on a share of neurons
        let mut rng = salted(7, Salt::PatternNeurons);
        for share in [0.01, 0.05, 0.1] {
            for fl in [floor, scale.floor(0.0)] {
                let mut back = 0;
                for (_, pat) in truth.iter().take(16) {
                    let mut p = pat.clone();
                    let order = Subsample::new(m, &mut rng);
                    for &j in order.first((share * m as f64) as usize).iter() {
                        p[j] = !p[j];
                    }
                    let mut st = SearchStats::default();
                    if let Some((q, _, _)) = alternate(&a, &all, p, (lo, hi), (fl, floor), &mut st)
                    {
                        back += (q == *pat) as usize;
                    }
                }
                println!("flip {share}: stop floor {fl:.1e}: {back}/16 back to the truth");
            }
        }
    }
}
