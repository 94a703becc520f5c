//! Tests of the labelled joint fit (`labelled.rs`).

use super::*;
use crate::attack::Method;
use crate::attack::exact::testing::deficient_case as case;
use crate::model::Activation;

/// dr_i/dx_i of every smooth activation against central differences (truncation
/// ~h^2, rounding ~eps/h: 1e-7 of the derivative's size leaves room for both), and
/// no sample's residual moving with another's input.
#[test]
fn residual_derivatives_match_central_differences() {
    for act in [
        Activation::Tanh,
        Activation::Sigmoid,
        Activation::Gelu,
        Activation::Silu,
        Activation::Softplus,
    ] {
        let (view, x, y) = case(act, 5, 30, 3);
        let tl = TwoLayer::new(&view, &[(1.0, 1.0), (1.0, 1.0)]).unwrap();
        let c = view.upper[0].bias.clone().unwrap();
        let (_, t) = ce_residuals(&tl, &c, &y, &x);
        let h = 1e-5;
        for i in 0..3 {
            let size = t[i].norm_l2();
            for j in 0..5 {
                let (mut xp, mut xm) = (x.clone(), x.clone());
                xp[(i, j)] += h;
                xm[(i, j)] -= h;
                let fd = (ce_residuals(&tl, &c, &y, &xp).0 - ce_residuals(&tl, &c, &y, &xm).0)
                    * (0.5 / h);
                for i2 in 0..3 {
                    for kk in 0..3 {
                        let want = if i2 == i { t[i][(kk, j)] } else { 0.0 };
                        let err = (fd[(i2, kk)] - want).abs();
                        assert!(
                            err <= 1e-7 * size,
                            "{act} x[{i},{j}] -> r[{i2},{kk}]: {err:e}"
                        );
                    }
                }
            }
        }
    }
}

/// At the client's inputs sum_i softmax(x_i) - B O_c is the label histogram exactly
/// (up to rounding); at other inputs the reading is off.
#[test]
fn label_counts_at_the_truth_are_the_histogram() {
    let (view, x, _) = case(Activation::Tanh, 8, 400, 8);
    let tl = TwoLayer::new(&view, &[(1.0, 1.0), (1.0, 1.0)]).unwrap();
    let c = view.upper[0].bias.clone().unwrap();
    let (counts, off) = label_counts(&tl, &c, &x);
    assert_eq!(counts, vec![3, 3, 2]);
    assert!(off < 1e-12, "{off:e}");
    let (_, off) = label_counts(&tl, &c, &(&x * 0.0));
    assert!(off > 1e-6, "{off:e}");
}

/// The route on B = 8 inputs of rank 7 (two blank coordinates, one linear relation):
/// the span search finds the 4 samples outside the relation; with a prior image the
/// labelled joint fit recovers all 8 to 1e-8 with their labels, certified by the
/// batch closure; without one the report says why it did not run.
#[test]
fn the_joint_fit_recovers_samples_in_a_linear_relation() {
    let (view, x, y) = case(Activation::Tanh, 8, 400, 8);
    let mut cfg = AttackConfig::new(Method::Span, 1);
    cfg.loss = Some(Loss::Ce);
    cfg.search.max_starts = 60;
    let rec = crate::attack::exact::route::attack(&view, &cfg).unwrap();
    assert_eq!(rec.samples.len(), 4, "{:?}", rec.notes);
    assert!(
        rec.notes
            .iter()
            .any(|n| n.contains("needs a public prior mean image")),
        "{:?}",
        rec.notes
    );
    let mean: Vec<f64> = (0..8).map(|j| x.col(j).iter().sum::<f64>() / 8.0).collect();
    cfg.prior_image = Some(mean);
    let rec = crate::attack::exact::route::attack(&view, &cfg).unwrap();
    let m = crate::metrics::evaluate(&x, &rec.samples, None, 1e-8, Some(&y)).unwrap();
    assert_eq!(
        m.recovered_fraction, 1.0,
        "{:e} {:?}",
        m.max_rel_error, rec.notes
    );
    assert_eq!(m.label_accuracy, Some(1.0));
    assert!(
        rec.samples
            .iter()
            .all(|s| s.stage == Stage::Joint && s.exact)
    );
    let cert = rec.certificate.as_ref().unwrap();
    assert!(cert.certified, "{}", cert.why);
    assert_eq!(
        rec.samples
            .iter()
            .map(|s| (s.x[6], s.x[7]))
            .collect::<Vec<_>>(),
        vec![(0.0, 0.0); 8]
    );
}
