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

#[test]
#[ignore]
fn probe() {
    let Ok(dir) = std::env::var("GRADLEAK_CONV_PROBE") else {
        return;
    };
    let dir = std::path::Path::new(&dir);
    let (spec, model, _) = crate::io::cnn::read_model_dir(dir).unwrap();
    let (grad, dtype) = crate::io::cnn::read_tensors(&dir.join("gradient.safetensors")).unwrap();
    let p = super::ConvProblem::new(&spec, &model, &grad, dtype, None).unwrap();
    let x = TensorFile::open(dir.join("batch.safetensors"))
        .unwrap()
        .matrix("x")
        .unwrap();
    let h = p.features(&x).unwrap();
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
