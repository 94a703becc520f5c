//! Measurements behind docs/EXPERIMENTS.md "Rank-deficient inputs: digits B = 64": the
//! joint fit of every layer's equations ([`TwoLayer::gauss_newton`], all 4096
//! neurons, dense normal matrix) on the exact gradient of
//! `simulate --data digits --batch 64 --width 4096 --activation tanh --init torch-default
//! --seed 1`. Minutes each in a release build, so ignored:
//! `cargo test --release --lib deficient_basin -- --ignored --nocapture`
//! (`LEVELS=0.01,0.03 STEPS=25` choose the starts of `basin`; `SAVE=DIR` writes the case
//! for scripts/deficient_probe.py, whose `--save-minima FILE` gives `from_seeds` its
//! `SEEDS=FILE`).

use faer::Mat;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use super::alternating::TwoLayer;
use super::labelled::ce_residuals;
use crate::attack::{AttackConfig, Method};
use crate::simulate::{self, SimConfig};

/// Samples 8, 9, 10 and 42 take part in no linear relation: the span search finds them.
const SEPARABLE: [usize; 4] = [8, 9, 10, 42];

fn case() -> (TwoLayer, Mat<f64>) {
    let (tl, x, _, _) = case_with_labels();
    (tl, x)
}

/// The case, the model's output bias and the client's labels.
fn case_with_labels() -> (TwoLayer, Mat<f64>, faer::Col<f64>, Vec<usize>) {
    let cfg = SimConfig {
        batch: 64,
        width: 4096,
        init: crate::model::Init::TorchDefault,
        attack: AttackConfig::new(Method::Analytic, 1),
        ..SimConfig::default()
    };
    let out = simulate::run(&cfg).unwrap();
    if let Ok(dir) = std::env::var("SAVE") {
        out.save(std::path::Path::new(&dir)).unwrap();
    }
    let view = crate::attack::ServerView::from_memory(&out.model, &out.gradient, crate::Dtype::F64)
        .unwrap();
    let tl = TwoLayer::new(&view, &[(1.0, 1.0), (1.0, 1.0)]).unwrap();
    let c = view.upper[0].bias.clone().unwrap();
    (tl, out.batch.x, c, out.batch.labels.unwrap())
}

fn env<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn row_error(a: &Mat<f64>, x: &Mat<f64>, i: usize, k: usize) -> f64 {
    (a.row(i) - x.row(k)).norm_l2() / x.row(k).norm_l2()
}

/// Every sample displaced by `eps` (relative, Gaussian, blank pixels kept 0), R from
/// the exact R-step, then Levenberg-Marquardt: how many land on the truth.
#[test]
#[ignore]
fn basin() {
    let (tl, x) = case();
    let levels = env("LEVELS", String::from("0.001,0.01,0.03,0.1"));
    let steps = env("STEPS", 40usize);
    let (b, d) = x.shape();
    let blank: Vec<bool> = (0..d).map(|c| (0..b).all(|i| x[(i, c)] == 0.0)).collect();
    for eps in levels.split(',').filter_map(|s| s.parse::<f64>().ok()) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let x0 = Mat::from_fn(b, d, |i, c| {
            let n: f64 = StandardNormal.sample(&mut rng);
            if blank[c] {
                0.0
            } else {
                x[(i, c)] + eps * x.row(i).norm_l2() / (d as f64).sqrt() * n
            }
        });
        let t = std::time::Instant::now();
        let r0 = tl.r_step(&x0, &tl.pre(&x0)).unwrap();
        let fit = tl.gauss_newton(&x0, &r0, &[], steps, 6000).unwrap();
        let mut errs: Vec<f64> = (0..b).map(|i| row_error(&fit.x, &x, i, i)).collect();
        let ok = errs.iter().filter(|&&e| e <= 1e-6).count();
        errs.sort_by(f64::total_cmp);
        eprintln!(
            "start {eps:e}: {ok}/{b} within 1e-6, median {:.2e} max {:.2e}, {} steps, \
             objective {:.3e}, {:.1} s",
            errs[b / 2],
            errs[b - 1],
            fit.iterations,
            fit.objective,
            t.elapsed().as_secs_f64()
        );
    }
}

/// The Jacobi-scaled normal matrix at the truth (blank pixels dropped): its smallest
/// eigenvalues and which samples and unknowns their directions move.
#[test]
#[ignore]
fn conditioning_at_the_truth() {
    let (tl, x) = case();
    let (b, d) = x.shape();
    let r = tl.r_step(&x, &tl.pre(&x)).unwrap();
    let k = r.ncols();
    let nm = tl.normal_matrix(&tl.point(&x, &r));
    let blank: Vec<bool> = (0..d).map(|c| (0..b).all(|i| x[(i, c)] == 0.0)).collect();
    let keep: Vec<usize> = (0..b * (d + k))
        .filter(|&p| p >= b * d || !blank[p % d])
        .collect();
    let n = keep.len();
    let s: Vec<f64> = keep.iter().map(|&p| 1.0 / nm[(p, p)].sqrt()).collect();
    let a = Mat::from_fn(n, n, |p, q| nm[(keep[p], keep[q])] * s[p] * s[q]);
    let eig = a.self_adjoint_eigen(faer::Side::Lower).unwrap();
    let ev = eig.S().column_vector();
    let u = eig.U();
    let few: Vec<String> = (0..12).map(|i| format!("{:.2e}", ev[i])).collect();
    eprintln!(
        "{n} unknowns; largest eigenvalue {:.3e}; smallest 12: {}",
        ev[n - 1],
        few.join(" ")
    );
    for e in 0..12 {
        let mut per = vec![0.0f64; b];
        let mut on_x = 0.0;
        for (p, &kp) in keep.iter().enumerate() {
            let v = u[(p, e)] * u[(p, e)];
            if kp < b * d {
                per[kp / d] += v;
                on_x += v;
            } else {
                per[(kp - b * d) / k] += v;
            }
        }
        let mut idx: Vec<usize> = (0..b).collect();
        idx.sort_by(|&i, &j| per[j].total_cmp(&per[i]));
        let top: Vec<String> = idx[..4]
            .iter()
            .map(|&i| format!("{i}:{:.2}", per[i]))
            .collect();
        let sep: f64 = SEPARABLE.iter().map(|&i| per[i]).sum();
        eprintln!(
            "eigenvalue {:.2e}: on X {on_x:.2}, on R {:.2}; samples {}; separable ones {sep:.1e}",
            ev[e],
            1.0 - on_x,
            top.join(" ")
        );
    }
}

/// The starts the noise route's residual seeding (`fill_missing`) gives for the 60
/// samples in relations, with the 4 separable ones known: distance to the nearest truth.
#[test]
#[ignore]
fn residual_seeds() {
    let (tl, x) = case();
    let (b, d) = x.shape();
    let xf = Mat::from_fn(SEPARABLE.len(), d, |i, c| x[(SEPARABLE[i], c)]);
    let rall = tl.r_step(&x, &tl.pre(&x)).unwrap();
    let rf = Mat::from_fn(SEPARABLE.len(), rall.ncols(), |i, c| {
        rall[(SEPARABLE[i], c)]
    });
    let seeds = tl.fill_missing(&xf, &rf, b - SEPARABLE.len(), 1);
    let s = Mat::from_fn(seeds.len(), d, |i, c| seeds[i][c]);
    let mut near: Vec<(f64, usize)> = (0..seeds.len())
        .map(|i| {
            (0..b)
                .map(|k| (row_error(&s, &x, i, k), k))
                .min_by(|p, q| p.0.total_cmp(&q.0))
                .unwrap()
        })
        .collect();
    near.sort_by(|p, q| p.0.total_cmp(&q.0));
    let mut hit: Vec<usize> = near.iter().map(|p| p.1).collect();
    hit.sort_unstable();
    hit.dedup();
    let mean = Mat::from_fn(1, d, |_, c| {
        (0..b).map(|i| x[(i, c)]).sum::<f64>() / b as f64
    });
    let mut em: Vec<f64> = (0..b).map(|k| row_error(&mean, &x, 0, k)).collect();
    em.sort_by(f64::total_cmp);
    eprintln!(
        "{} seeds: nearest-sample error min {:.2e} median {:.2e} max {:.2e}, {} distinct \
         nearest samples; the batch mean as a start: median {:.2e}, min {:.2e}",
        near.len(),
        near[0].0,
        near[near.len() / 2].0,
        near[near.len() - 1].0,
        hit.len(),
        em[b / 2],
        em[0]
    );
}

/// Levenberg-Marquardt from the starts in the .npy file `SEEDS` (B x d, row i the start
/// for sample i): how many land on the truth.
#[test]
#[ignore]
fn from_seeds() {
    let (tl, x) = case();
    let Ok(path) = std::env::var("SEEDS") else {
        return;
    };
    let x0 = crate::io::npy::read_matrix(&path).unwrap();
    let b = x.nrows();
    let mut e0: Vec<f64> = (0..b).map(|i| row_error(&x0, &x, i, i)).collect();
    e0.sort_by(f64::total_cmp);
    let t = std::time::Instant::now();
    let r0 = tl.r_step(&x0, &tl.pre(&x0)).unwrap();
    let fit = tl
        .gauss_newton(&x0, &r0, &[], env("STEPS", 40usize), 6000)
        .unwrap();
    // nearest truth for each fitted row (the fit may permute samples)
    let mut errs: Vec<f64> = (0..b)
        .map(|k| {
            (0..b)
                .map(|i| row_error(&fit.x, &x, i, k))
                .fold(f64::INFINITY, f64::min)
        })
        .collect();
    let ok = errs.iter().filter(|&&e| e <= 1e-6).count();
    errs.sort_by(f64::total_cmp);
    eprintln!(
        "starts: median {:.2e} max {:.2e}; fit: {ok}/{b} truths within 1e-6, median {:.2e} \
         max {:.2e}, {} steps, objective {:.3e}, {:.1} s",
        e0[b / 2],
        e0[b - 1],
        errs[b / 2],
        errs[b - 1],
        fit.iterations,
        fit.objective,
        t.elapsed().as_secs_f64()
    );
}

/// The alternating fit (exact R-steps and X-steps in the full input space) from the
/// truth displaced by `EPS`, `ITERS` iterations: the error every 20.
#[test]
#[ignore]
fn alternating() {
    let (tl, x) = case();
    let eps = env("EPS", 0.03f64);
    let iters = env("ITERS", 200usize);
    let (b, d) = x.shape();
    let blank: Vec<bool> = (0..d).map(|c| (0..b).all(|i| x[(i, c)] == 0.0)).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut xc = Mat::from_fn(b, d, |i, c| {
        let n: f64 = StandardNormal.sample(&mut rng);
        if blank[c] {
            0.0
        } else {
            x[(i, c)] + eps * x.row(i).norm_l2() / (d as f64).sqrt() * n
        }
    });
    let t = std::time::Instant::now();
    for round in 1..=iters / 20 {
        let fit = tl.fit(&xc, 20, 0.0).unwrap();
        xc = fit.x;
        let mut errs: Vec<f64> = (0..b).map(|i| row_error(&xc, &x, i, i)).collect();
        errs.sort_by(f64::total_cmp);
        eprintln!(
            "start {eps:e}, {} iterations: median {:.2e} max {:.2e}, objective {:.3e}, {:.1} s",
            20 * round,
            errs[b / 2],
            errs[b - 1],
            fit.objective,
            t.elapsed().as_secs_f64()
        );
    }
}

/// Levenberg-Marquardt in X alone with R tied to X by the cross-entropy loss and labels,
/// from the truth displaced by `EPS` with the client's labels (an oracle), from `SEEDS`,
/// or (`START=mean` / `START=prior`) from the batch's / the data set's mean digit plus
/// `EPS` noise, where only the labels' counts matter (`prior` reads them off O_c).
#[test]
#[ignore]
fn labelled() {
    use faer::linalg::solvers::Solve;
    let (tl, x, c, y_true) = case_with_labels();
    let eps = env("EPS", 0.1f64);
    let steps = env("STEPS", 20usize);
    let (b, d) = x.shape();
    let (rt, _) = ce_residuals(&tl, &c, &y_true, &x);
    let r_fit = tl.r_step(&x, &tl.pre(&x)).unwrap();
    eprintln!(
        "loss residuals vs fitted at the truth: {:.1e}",
        (&rt - &r_fit).norm_l2() / r_fit.norm_l2()
    );
    let blank: Vec<bool> = (0..d).map(|cc| (0..b).all(|i| x[(i, cc)] == 0.0)).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut xc = Mat::from_fn(b, d, |i, cc| {
        let n: f64 = StandardNormal.sample(&mut rng);
        if blank[cc] {
            0.0
        } else {
            x[(i, cc)] + eps * x.row(i).norm_l2() / (d as f64).sqrt() * n
        }
    });
    if let Ok(path) = std::env::var("SEEDS") {
        xc = crate::io::npy::read_matrix(&path).unwrap();
    }
    // START=mean: every start the batch mean plus EPS (relative) noise, so the labels
    // by index carry only their counts
    if std::env::var("START").is_ok_and(|v| v == "mean") {
        let mean: Vec<f64> = (0..d)
            .map(|cc| (0..b).map(|i| x[(i, cc)]).sum::<f64>() / b as f64)
            .collect();
        let mn = mean.iter().map(|v| v * v).sum::<f64>().sqrt();
        xc = Mat::from_fn(b, d, |_, cc| {
            let n: f64 = StandardNormal.sample(&mut rng);
            if blank[cc] {
                0.0
            } else {
                mean[cc] + eps * mn / (d as f64).sqrt() * n
            }
        });
    }
    // START=prior: every start the mean digit of the whole data set (1797 digits) plus
    // EPS noise; its labels from the counts the output bias gradient gives (below)
    // (START=scalar: the data set's scalar mean in every pixel instead)
    let start = std::env::var("START").unwrap_or_default();
    let prior = start == "prior" || start == "scalar";
    if prior {
        let mut rng0 = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let data = crate::data::DataSpec::Digits.load(0, &mut rng0).unwrap();
        let n = data.x.nrows() as f64;
        let mut mean: Vec<f64> = (0..d)
            .map(|cc| (0..data.x.nrows()).map(|i| data.x[(i, cc)]).sum::<f64>() / n)
            .collect();
        if start == "scalar" {
            let xbar = data.prior_stats().mean;
            mean = vec![xbar; d];
        }
        let mn = mean.iter().map(|v| v * v).sum::<f64>().sqrt();
        xc = Mat::from_fn(b, d, |_, cc| {
            let nz: f64 = StandardNormal.sample(&mut rng);
            if blank[cc] {
                0.0
            } else {
                mean[cc] + eps * mn / (d as f64).sqrt() * nz
            }
        });
    }
    // LABELS=fit: each start's label is the most negative entry of its R-step residual
    let y: Vec<usize> = if prior {
        // sum_i r_i = O_c: count_k = sum_i softmax_k(x_i) - B O_c[k], softmax at the starts
        let (r0, _) = ce_residuals(&tl, &c, &vec![usize::MAX; b], &xc);
        let k = r0.ncols();
        let counts: Vec<usize> = (0..k)
            .map(|kk| {
                let soft: f64 = (0..b).map(|i| r0[(i, kk)] * b as f64).sum();
                (soft - b as f64 * tl.oc[kk]).round().max(0.0) as usize
            })
            .collect();
        let mut truth_counts = vec![0usize; k];
        for &l in &y_true {
            truth_counts[l] += 1;
        }
        eprintln!("label counts from O_c {counts:?}, client's {truth_counts:?}");
        let mut y: Vec<usize> = counts
            .iter()
            .enumerate()
            .flat_map(|(kk, &n)| std::iter::repeat_n(kk, n))
            .collect();
        y.resize(b, 0);
        y
    } else if std::env::var("LABELS").is_ok_and(|v| v == "fit") {
        let r0 = tl.r_step(&xc, &tl.pre(&xc)).unwrap();
        (0..b)
            .map(|i| {
                (0..r0.ncols())
                    .min_by(|&p, &q| r0[(i, p)].total_cmp(&r0[(i, q)]))
                    .unwrap()
            })
            .collect()
    } else {
        y_true.clone()
    };
    let wrong = (0..b).filter(|&i| y[i] != y_true[i]).count();
    eprintln!("{wrong} of {b} start labels differ from the client's");
    let k = rt.ncols();
    let nx = b * d;
    let objective = |xx: &Mat<f64>| {
        let (r, _) = ce_residuals(&tl, &c, &y, xx);
        tl.weighted_norm2(&tl.residual(&tl.point(xx, &r)))
    };
    let mut f = objective(&xc);
    let mut lambda = 1e-4;
    let t0 = std::time::Instant::now();
    for step in 1..=steps {
        let (r, tb) = ce_residuals(&tl, &c, &y, &xc);
        let pt = tl.point(&xc, &r);
        let (gx, gr) = tl.vjp(&pt, &tl.weigh(tl.residual(&pt)));
        let nm = tl.normal_matrix(&pt);
        let tm = Mat::from_fn(b * k, nx, |p, q| {
            if p / k == q / d {
                tb[p / k][(p % k, q % d)]
            } else {
                0.0
            }
        });
        let nxx = nm.submatrix(0, 0, nx, nx);
        let nxr = nm.submatrix(0, nx, nx, b * k);
        let nrr = nm.submatrix(nx, nx, b * k, b * k);
        let nxr_t = nxr * &tm;
        let nc = nxx + &nxr_t + nxr_t.transpose() + tm.transpose() * (nrr * &tm);
        let g = faer::Col::from_fn(nx, |p| gx[(p / d, p % d)])
            + tm.transpose() * faer::Col::from_fn(b * k, |p| gr[(p / k, p % k)]);
        let mut moved = false;
        for _ in 0..8 {
            let a = Mat::from_fn(nx, nx, |p, q| {
                let held = blank[p % d] || blank[q % d];
                if held {
                    f64::from(p == q)
                } else if p == q {
                    nc[(p, p)] * (1.0 + lambda)
                } else {
                    nc[(p, q)]
                }
            });
            let rhs = faer::Col::from_fn(nx, |p| if blank[p % d] { 0.0 } else { -g[p] });
            let sol = a.partial_piv_lu().solve(&rhs);
            let cand = Mat::from_fn(b, d, |i, cc| xc[(i, cc)] + sol[i * d + cc]);
            let fc = objective(&cand);
            if fc.is_finite() && fc < f {
                xc = cand;
                f = fc;
                lambda = (lambda / 3.0f64).max(1e-12);
                moved = true;
                break;
            }
            lambda *= 8.0;
        }
        // nearest fitted row for each true sample (symmetric starts may permute them)
        let mut errs: Vec<f64> = (0..b)
            .map(|kk| {
                (0..b)
                    .map(|i| row_error(&xc, &x, i, kk))
                    .fold(f64::INFINITY, f64::min)
            })
            .collect();
        let ok = errs.iter().filter(|&&e| e <= 1e-6).count();
        errs.sort_by(f64::total_cmp);
        eprintln!(
            "start {eps:e}, step {step}: {ok}/{b} within 1e-6, median {:.2e} max {:.2e}, objective {:.3e}, {:.1} s",
            errs[b / 2],
            errs[b - 1],
            f,
            t0.elapsed().as_secs_f64()
        );
        if !moved {
            break;
        }
    }
}
