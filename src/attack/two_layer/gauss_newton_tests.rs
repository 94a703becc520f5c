//! Tests of the two-layer Levenberg-Marquardt fit (`gauss_newton.rs`).

use super::*;
use crate::attack::defended::likelihood::ErrorModel;
use crate::attack::{AttackConfig, Method};
use crate::defense::Defense;
use crate::simulate::{self, SimConfig};

/// The adjoint is the transpose of the tangent: <J v, u> = <v, J^T u> to rounding,
/// and J v matches a central difference of the residual.
#[test]
fn jacobian_products_are_consistent() {
    let cfg = SimConfig {
        batch: 3,
        width: 64,
        init: crate::model::Init::TorchDefault,
        defenses: vec![Defense::NoiseRel(1e-3)],
        attack: AttackConfig::new(Method::Analytic, 1),
        ..SimConfig::default()
    };
    let out = simulate::run(&cfg).unwrap();
    let mut view =
        crate::attack::ServerView::from_memory(&out.model, &out.gradient, crate::Dtype::F64)
            .unwrap();
    view.noise_std = out.report.defense.as_ref().unwrap().noise_std;
    let errors = ErrorModel::of(&view, &out.gradient).unwrap();
    let tl = TwoLayer::new(&view, &errors.weights()).unwrap();
    let x = out.batch.x.clone();
    let r = Mat::from_fn(3, tl.a.nrows(), |i, k| 0.1 * ((i + 2 * k) as f64).sin());
    let pt = tl.point(&x, &r);
    let dx = Mat::from_fn(x.nrows(), x.ncols(), |i, j| ((3 * i + j) as f64).cos());
    let dr = Mat::from_fn(r.nrows(), r.ncols(), |i, j| ((i + j) as f64).sin());
    let jv = tl.jvp(&pt, &dx, &dr);
    let u = tl.residual(&pt);
    let (ux, ur) = tl.vjp(&pt, &u);
    let ip = |a: &Mat<f64>, b: &Mat<f64>| -> f64 {
        (0..a.ncols())
            .flat_map(|j| (0..a.nrows()).map(move |i| (i, j)))
            .map(|(i, j)| a[(i, j)] * b[(i, j)])
            .sum()
    };
    let ipc =
        |a: &Col<f64>, b: &Col<f64>| -> f64 { a.iter().zip(b.iter()).map(|(x, y)| x * y).sum() };
    let lhs = ip(&jv.w, &u.w) + ipc(&jv.b, &u.b) + ip(&jv.a, &u.a) + ipc(&jv.c, &u.c);
    let rhs = ip(&dx, &ux) + ip(&dr, &ur);
    assert!((lhs - rhs).abs() <= 1e-10 * lhs.abs(), "{lhs} {rhs}");
    let h = 1e-6;
    let rp = tl.residual(&tl.point(&(&x + faer::Scale(h) * &dx), &(&r + faer::Scale(h) * &dr)));
    let rm = tl.residual(&tl.point(&(&x - faer::Scale(h) * &dx), &(&r - faer::Scale(h) * &dr)));
    let fd = (&rp.w - &rm.w) * faer::Scale(0.5 / h);
    let err = (&fd - &jv.w).norm_l2() / jv.w.norm_l2();
    assert!(err < 1e-7, "{err:e}");
    let fd = (&rp.a - &rm.a) * faer::Scale(0.5 / h);
    let err = (&fd - &jv.a).norm_l2() / jv.a.norm_l2();
    assert!(err < 1e-7, "a: {err:e}");
    let fd = (&rp.b - &rm.b) * faer::Scale(0.5 / h);
    let err = (&fd - &jv.b).norm_l2() / jv.b.norm_l2();
    assert!(err < 1e-7, "b: {err:e}");
    // the closed-form diagonal matches J^T W J on a unit direction
    let (cx, _) = tl.diagonal(&pt);
    let mut e = Mat::zeros(x.nrows(), x.ncols());
    e[(1, 5)] = 1.0;
    let col = tl.jvp(&pt, &e, &Mat::zeros(r.nrows(), r.ncols()));
    let want = tl.weighted_norm2(&col);
    assert!(
        (cx[(1, 5)] - want).abs() <= 1e-10 * want,
        "{} {want}",
        cx[(1, 5)]
    );
    // the formed normal matrix is J^T W J: compare two columns with products
    let nm = tl.normal_matrix(&pt);
    let (b, d, k) = (x.nrows(), x.ncols(), r.ncols());
    for q in [d + 5, b * d + 2 * k + 3] {
        let mut ex = Mat::zeros(b, d);
        let mut er = Mat::zeros(b, k);
        if q < b * d {
            ex[(q / d, q % d)] = 1.0;
        } else {
            er[((q - b * d) / k, (q - b * d) % k)] = 1.0;
        }
        let (jx, jr) = tl.vjp(&pt, &tl.weigh(tl.jvp(&pt, &ex, &er)));
        for p in 0..b * (d + k) {
            let want = if p < b * d {
                jx[(p / d, p % d)]
            } else {
                jr[((p - b * d) / k, (p - b * d) % k)]
            };
            assert!(
                (nm[(p, q)] - want).abs() <= 1e-9 * nm[(q, q)].abs(),
                "{p} {q}: {} {want}",
                nm[(p, q)]
            );
        }
    }
}

/// On an exact gradient the truth is the global minimum (objective 0): from a
/// start 5 % off, Gauss-Newton must land on it to near rounding.
#[test]
fn converges_to_the_truth_on_an_exact_gradient() {
    let cfg = SimConfig {
        batch: 4,
        width: 512,
        init: crate::model::Init::TorchDefault,
        attack: AttackConfig::new(Method::Analytic, 1),
        ..SimConfig::default()
    };
    let out = simulate::run(&cfg).unwrap();
    let view = crate::attack::ServerView::from_memory(&out.model, &out.gradient, crate::Dtype::F64)
        .unwrap();
    let tl = TwoLayer::new(&view, &[(1.0, 1.0), (1.0, 1.0)]).unwrap();
    let x = out.batch.x.clone();
    let x0 = Mat::from_fn(x.nrows(), x.ncols(), |i, j| {
        x[(i, j)]
            + 0.05 * x.norm_l2() / (x.ncols() as f64 * x.nrows() as f64).sqrt()
                * ((7 * i + 3 * j) as f64).sin()
    });
    let fit = tl.refine(&x0, STEPS).unwrap();
    let err = (&fit.x - &x).norm_l2() / x.norm_l2();
    let err0 = (&x0 - &x).norm_l2() / x.norm_l2();
    eprintln!("start {err0:e} end {err:e} after {} steps", fit.iterations);
    assert!(err < 1e-8, "{err:e} after {} steps", fit.iterations);
}
