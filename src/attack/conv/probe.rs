//! Diagnosis of the head's pattern search on a CNN fixture (issue 21):
//! `GRADLEAK_CONV_PROBE=DIR cargo test --release --lib conv::probe -- --ignored --nocapture`,
//! DIR a make_cnn_fixtures.py case.
use faer::{Col, Mat};

use crate::Dtype;

use crate::attack::evidence::SearchStats;
use crate::attack::exact::alternation::{Alternation, alternate};
use crate::attack::exact::floor::{RoundingScale, exact_floor};
use crate::attack::exact::signal::{Neurons, SignalModel};
use crate::attack::exact::zero::best_residual_of;
use crate::attack::params::{AttackConfig, Method};
use crate::io::safetensors::TensorFile;

/// The case in `GRADLEAK_CONV_PROBE` (a fixture folder of make_cnn_fixtures.py): the
/// head's problem and the true features of its batch; None when the variable is unset.
fn case() -> Option<(super::ConvProblem, faer::Mat<f64>)> {
    let dir = std::env::var("GRADLEAK_CONV_PROBE").ok()?;
    let dir = std::path::Path::new(&dir);
    let (spec, model, _) = crate::io::cnn::read_model_dir(dir).unwrap();
    let (grad, dtype) = crate::io::cnn::read_tensors(&dir.join("gradient.safetensors")).unwrap();
    let p = super::ConvProblem::new(&spec, &model, &grad, dtype, None).unwrap();
    let x = TensorFile::open(dir.join("batch.safetensors"))
        .unwrap()
        .matrix("x")
        .unwrap();
    let h = p.features(&x).unwrap();
    Some((p, h))
}

#[test]
#[ignore]
fn probe() {
    let Some((p, h)) = case() else {
        return;
    };
    let view = &p.view;
    let cfg = AttackConfig::new(Method::Auto, 1);
    let sub = crate::attack::subspace::estimate(view, &cfg.subspace_options()).unwrap();
    let sm = SignalModel::new(view, &sub).unwrap();
    let a = sm.output_weights().unwrap().clone();
    let (m, b) = (sm.width(), sm.batch());
    let all = Neurons::all(&sub.q);
    let floor = exact_floor(view, &sub);
    let scale = RoundingScale::new(view).unwrap();
    let alt = Alternation {
        a: &a,
        q: &sub.q,
        small: &all,
        all: &all,
        slopes: (0.0, 1.0),
        floor,
        floor_small: floor,
        stop: scale.floor(0.0),
        model: &sm,
        scale: &scale,
        sub: &sub,
    };
    let rows: Vec<usize> = (0..m).collect();
    let mut truth = Vec::new();
    for i in 0..b {
        let hi: Vec<f64> = (0..h.ncols()).map(|j| h[(i, j)]).collect();
        let c = sm.coords.c_of_x(&hi);
        let pat: Vec<bool> = sm.z(&c, &rows).iter().map(|&z| z > 0.0).collect();
        let mm = Mat::from_fn(m, a.nrows(), |j, k| if pat[j] { a[(k, j)] } else { 0.0 });
        let (f, r) = best_residual_of(&mm, &all).unwrap();
        let own = alt.own_floor(&pat, &r, f);
        let (back, _) = alt.run_from(&c);
        let ok = back.as_ref().is_some_and(|(q, _, _)| *q == pat);
        println!("sample {i}: F {f:.2e} own {own} run_from(truth) returns truth {ok}");
        truth.push((c, pat));
    }
    // from the truth with 5, 10, 20 % of the active neurons flipped
    for share in [0.02, 0.05, 0.1, 0.2] {
        let mut back = 0;
        for (_, pat) in &truth {
            let mut q = pat.clone();
            for j in (0..m).step_by((1.0 / share) as usize) {
                q[j] = !q[j];
            }
            let mut st = SearchStats::default();
            if let Some((r, _, _)) = alternate(&a, &all, q, (0.0, 1.0), (alt.stop, floor), &mut st)
            {
                back += (r == *pat) as usize;
            }
        }
        println!("flip {share}: {back}/{b} back to the truth");
    }
    // the union of the patterns the pattern search finds with seeds 1..=N
    let nseeds: u64 = std::env::var("NSEEDS").map_or(0, |v| v.parse().unwrap());
    let mut union: Vec<crate::attack::exact::alternation::Found> = Vec::new();
    for s in 1..=nseeds {
        let mut c2 = AttackConfig::new(Method::Auto, s);
        c2.loss = Some(crate::model::Loss::Ce);
        let (zeros, _, _) = crate::attack::exact::pattern::search(view, &sub, &c2).unwrap();
        let mut new = 0;
        for z in &zeros {
            let (res, _) = alt.run_from(&z.c);
            if let Some(f) = res
                && !alt.duplicate(&union, &f.0)
            {
                union.push(f);
                new += 1;
            }
        }
        let covered = truth
            .iter()
            .filter(|(_, t)| union.iter().any(|(p, _, _)| p == t))
            .count();
        println!(
            "seed {s}: {} zeros, {new} new patterns, union {} (true: {covered})",
            zeros.len(),
            union.len()
        );
    }
    if union.len() == b {
        let zs = alt.inputs(&sub, &sub.projected_gradient(), &union);
        let ex = zs.iter().filter(|z| z.accepted).count();
        println!("linear step: {} inputs, {ex} exact", zs.len());
    }
    if std::env::var("SKIP").is_ok() {
        return;
    }
    // the route on the full head and on the head without zero columns / zero rows
    let hm = &p.head.model;
    let hg = &p.head.gradient;
    let (w1, g1) = (&hm.layers[0].weight, &hg.layers[0].weight);
    let (b1, gb1) = (
        hm.layers[0].bias.as_ref().unwrap(),
        hg.layers[0].bias.as_ref().unwrap(),
    );
    let cols: Vec<usize> = (0..w1.ncols())
        .filter(|&c| (0..g1.nrows()).any(|j| g1[(j, c)] != 0.0))
        .collect();
    let rowsk: Vec<usize> = (0..w1.nrows())
        .filter(|&j| gb1[j] != 0.0 || (0..g1.ncols()).any(|c| g1[(j, c)] != 0.0))
        .collect();
    let oracle = std::env::var("ORACLE").is_ok();
    let rowsk: Vec<usize> = if oracle {
        rowsk
            .into_iter()
            .filter(|&j| !truth.iter().all(|(_, p)| p[j]))
            .collect()
    } else {
        rowsk
    };
    println!(
        "kept {} of {} columns, {} of {} neurons",
        cols.len(),
        w1.ncols(),
        rowsk.len(),
        w1.nrows()
    );
    let cut = |w: &Mat<f64>, b: &Col<f64>, rs: &[usize], cs: &[usize]| crate::model::Dense {
        weight: Mat::from_fn(rs.len(), cs.len(), |i, k| w[(rs[i], cs[k])]),
        bias: Some(Col::from_fn(rs.len(), |i| b[rs[i]])),
    };
    let mut layers = hm.layers.clone();
    let mut glayers = hg.layers.clone();
    let outs: Vec<usize> = (0..layers[1].weight.nrows()).collect();
    for (ls, src) in [
        (&mut layers, hm),
        (
            &mut glayers,
            &crate::model::Mlp::new(hg.layers.clone(), hm.activation).unwrap(),
        ),
    ] {
        ls[0] = cut(
            &src.layers[0].weight,
            src.layers[0].bias.as_ref().unwrap(),
            &rowsk,
            &cols,
        );
        ls[1] = cut(
            &src.layers[1].weight,
            src.layers[1].bias.as_ref().unwrap(),
            &outs,
            &rowsk,
        );
    }
    let _ = (b1, gb1);
    let rm = crate::model::Mlp::new(layers, hm.activation).unwrap();
    let rg = crate::model::Gradient { layers: glayers };
    let mut rview = crate::attack::view::ServerView::from_memory(&rm, &rg, Dtype::F64).unwrap();
    rview.dtype = view.dtype;
    let seed: u64 = std::env::var("SEED").map_or(1, |v| v.parse().unwrap());
    let mut cfg = AttackConfig::new(Method::Auto, seed);
    cfg.loss = Some(crate::model::Loss::Ce);
    for (name, v) in [("full", view), ("reduced", &rview)] {
        let t = std::time::Instant::now();
        let rec = crate::attack::run(v, &cfg).unwrap();
        let exact = rec.samples.iter().filter(|s| s.exact).count();
        println!(
            "{name}: {} samples, {exact} exact, {:.1} s",
            rec.samples.len(),
            t.elapsed().as_secs_f64()
        );
    }
}

/// The search's last step, measured in isolation: the true patterns less k of them
/// (the k whose signals keep the least after projecting off the others, or k drawn at
/// random) stand for what the rounds found; how many of the k do the row-point starts
/// find, with the plain alternation (the route's loop) and with the realisable one in
/// the residual's top-k row space? `GRADLEAK_CONV_PROBE=DIR MISSING=1,2,4,8 cargo test
/// --release --lib conv::probe::tail -- --ignored --nocapture`.
#[test]
#[ignore]
fn tail() {
    use crate::attack::exact::alternation::{Found, deflate};
    use crate::attack::exact::zero::row_points;
    use crate::attack::subspace::Subspace;
    let Some((p, h)) = case() else {
        return;
    };
    let view = &p.view;
    let cfg = AttackConfig::new(Method::Auto, 1);
    let sub: Subspace = crate::attack::subspace::estimate(view, &cfg.subspace_options()).unwrap();
    let sm = SignalModel::new(view, &sub).unwrap();
    let a = sm.output_weights().unwrap().clone();
    let (m, b) = (sm.width(), sm.batch());
    let all = Neurons::all(&sub.q);
    let floor = exact_floor(view, &sub);
    let scale = RoundingScale::new(view).unwrap();
    let alt = Alternation {
        a: &a,
        q: &sub.q,
        small: &all,
        all: &all,
        slopes: (0.0, 1.0),
        floor,
        floor_small: floor,
        stop: scale.floor(0.0),
        model: &sm,
        scale: &scale,
        sub: &sub,
    };
    let rows: Vec<usize> = (0..m).collect();
    let mut truth: Vec<Found> = Vec::new();
    for i in 0..b {
        let hi: Vec<f64> = (0..h.ncols()).map(|j| h[(i, j)]).collect();
        let c = sm.coords.c_of_x(&hi);
        let pat: Vec<bool> = sm.z(&c, &rows).iter().map(|&z| z > 0.0).collect();
        let mm = Mat::from_fn(m, a.nrows(), |j, k| if pat[j] { a[(k, j)] } else { 0.0 });
        let (f, r) = best_residual_of(&mm, &all).unwrap();
        truth.push((pat, r, f));
    }
    let gv = sub.projected_gradient();
    // how much of each signal is left after projecting off the other B - 1
    let mut left: Vec<(f64, usize)> = (0..b)
        .map(|i| {
            let others: Vec<Found> = (0..b)
                .filter(|&j| j != i)
                .map(|j| truth[j].clone())
                .collect();
            let s = alt.signal(&truth[i].0, &truth[i].1);
            let sm1 = Mat::from_fn(m, 1, |j, _| s[j]);
            let d = deflate(&alt, &sm1, &others);
            (d.norm_l2() / s.norm_l2(), i)
        })
        .collect();
    left.sort_by(|x, y| x.0.total_cmp(&y.0));
    println!(
        "left after projecting off the others: min {:.2e} (sample {}), median {:.2e}",
        left[0].0,
        left[0].1,
        left[b / 2].0
    );
    let vl = Col::from_fn(b, |k| sub.v[(sub.v.nrows() - 1, k)]);
    let ks: Vec<usize> = std::env::var("MISSING")
        .unwrap_or("1,2,4,8".into())
        .split(',')
        .map(|v| v.parse().unwrap())
        .collect();
    let budget: usize = std::env::var("BUDGET").map_or(400, |v| v.parse().unwrap());
    for &k in &ks {
        for pick in ["hardest", "random"] {
            let miss: Vec<usize> = if pick == "hardest" {
                left.iter().take(k).map(|v| v.1).collect()
            } else {
                let mut rng = crate::rng::salted(k as u64, crate::rng::Salt::PatternNeurons);
                crate::attack::exact::subsample::Subsample::new(b, &mut rng).first(k)
            };
            let found: Vec<Found> = (0..b)
                .filter(|i| !miss.contains(i))
                .map(|i| truth[i].clone())
                .collect();
            let res = deflate(&alt, &gv, &found);
            let svd = res.thin_svd().unwrap();
            let s = svd.S().column_vector();
            let basis = svd.V().subcols(0, k).to_owned();
            let starts = row_points(&sub, &res);
            let project = |c: &Col<f64>| {
                let u = basis.transpose() * c;
                let c2 = &basis * &u;
                let bias = c2.transpose() * &vl;
                c2 * (1.0 / bias)
            };
            for method in ["plain", "plain-projected", "realisable", "plain-refresh"] {
                let t = std::time::Instant::now();
                let mut got: Vec<Found> = found.clone();
                let mut hits = 0;
                let mut wrong = 0;
                let mut used = 0;
                let mut list = starts.clone().into_iter();
                while let Some(c) = list.next() {
                    if got.len() >= b || used >= budget {
                        break;
                    }
                    used += 1;
                    let (r, _) = match method {
                        "plain" | "plain-refresh" => alt.run_from(&c),
                        "plain-projected" => alt.run_from(&project(&c)),
                        _ => alt.run_in(&project(&c), &basis),
                    };
                    let Some((pat, r, f)) = r else { continue };
                    if alt.degenerate(&pat)
                        || !alt.own_floor(&pat, &r, f)
                        || alt.duplicate(&got, &pat)
                    {
                        continue;
                    }
                    if miss.iter().any(|&i| truth[i].0 == pat) {
                        hits += 1;
                    } else {
                        wrong += 1;
                    }
                    got.push((pat, r, f));
                    if method == "plain-refresh" {
                        list = row_points(&sub, &deflate(&alt, &gv, &got)).into_iter();
                    }
                }
                println!(
                    "k {k} {pick} (sigma_k/sigma_1 of residual {:.1e}, next {:.1e}): {method}: {hits}/{k} found, {wrong} wrong, {used} starts, {:.1} s",
                    s[k - 1] / s[0],
                    if k < s.nrows() { s[k] / s[0] } else { 0.0 },
                    t.elapsed().as_secs_f64()
                );
            }
        }
    }
}

/// The route's own pattern search on a fixture, its found patterns compared with the
/// true ones: `GRADLEAK_CONV_PROBE=DIR SEED=S cargo test --release --lib
/// conv::probe::found -- --ignored --nocapture`.
#[test]
#[ignore]
fn found() {
    let Some((p, h)) = case() else {
        return;
    };
    let view = &p.view;
    let seed: u64 = std::env::var("SEED").map_or(1, |v| v.parse().unwrap());
    let mut cfg = AttackConfig::new(Method::Auto, seed);
    cfg.loss = Some(crate::model::Loss::Ce);
    let sub = crate::attack::subspace::estimate(view, &cfg.subspace_options()).unwrap();
    let ctx = crate::attack::exact::context::Context::new(view, &sub, seed).unwrap();
    let sm = &ctx.model;
    let (m, b) = (sm.width(), sm.batch());
    let rows: Vec<usize> = (0..m).collect();
    let truth: Vec<Vec<bool>> = (0..b)
        .map(|i| {
            let hi: Vec<f64> = (0..h.ncols()).map(|j| h[(i, j)]).collect();
            let c = sm.coords.c_of_x(&hi);
            sm.z(&c, &rows).iter().map(|&z| z > 0.0).collect()
        })
        .collect();
    let (_, stats, found) = crate::attack::exact::pattern::search_patterns(&ctx, &cfg).unwrap();
    println!(
        "seed {seed}: {} found ({} seeded, {} rounds, {} starts)",
        found.len(),
        stats.seeded,
        stats.rounds,
        stats.starts
    );
    let mut hit = vec![false; b];
    for (n, (pat, _, f)) in found.iter().enumerate() {
        let (d, i) = truth
            .iter()
            .enumerate()
            .map(|(i, t)| (t.iter().zip(pat).filter(|(a, b)| a != b).count(), i))
            .min()
            .unwrap();
        if d == 0 {
            hit[i] = true;
        } else {
            println!("found #{n}: {d} neurons off sample {i}, F {f:.2e}");
        }
    }
    let missing: Vec<usize> = (0..b).filter(|&i| !hit[i]).collect();
    println!("true patterns not found: {missing:?}");
}
