//! The pixel stage below a CNN's features (issue 21): on a tiny ReLU CNN the conv
//! layers' equations determine the input at B = 1 and the pixels come back at the
//! rounding floor; at B = 4 they do not, and the free directions are counted and
//! filled by the prior, never called exact. PyTorch-made fixtures (tests/fixtures/cnn).

mod common;

use std::path::Path;

use common::cnn::{attack_head, fixture, problem};
use gradleak::Dtype;
use gradleak::attack::Reconstruction;
use gradleak::attack::conv::{ConvProblem, pixels};
use gradleak::io::safetensors::read_batch;
use gradleak::model::Loss;

/// The pixel stage as these tests run it: cross-entropy, f64, seed 1, and a flat
/// mid-grey prior image filling what the gradient leaves free.
fn recover(
    p: &ConvProblem,
    features: &Reconstruction,
    opts: &pixels::PixelOptions,
) -> pixels::Pixels {
    let prior = vec![0.5; p.cnn.input_dim()];
    pixels::recover(p, features, Loss::Ce, &prior, Dtype::F64, 1, opts).unwrap()
}

/// The head's reconstruction of every sample with its features and label replaced by
/// the true ones (the server's model on the true pixels), for cases the head itself
/// cannot separate.
fn true_features(p: &ConvProblem, dir: &Path) -> Reconstruction {
    let mut features = attack_head(p).features;
    let b = read_batch(dir.join("batch.safetensors")).unwrap();
    let h = p.features(&b.x).unwrap();
    assert_eq!(features.samples.len(), b.x.nrows());
    for (i, s) in features.samples.iter_mut().enumerate() {
        s.x = h.row(i).iter().copied().collect();
        s.label = Some(b.y.as_ref().unwrap()[(i, 0)] as usize);
    }
    features
}

/// B = 1: features exact from the head, then both conv layers determined (the random
/// move of the start does not survive) and the pixels within 1e-10 of the truth
/// (measured 6.7e-13: f64 rounding times the solves' conditioning); a wrong input
/// would not reproduce the features.
#[test]
fn pixels_are_exact_where_the_conv_equations_determine_them() {
    let dir = fixture("pixnet-f64");
    let p = problem(&dir);
    let px = recover(&p, &attack_head(&p).features, &Default::default());
    assert_eq!(px.layers.len(), 2);
    for l in &px.layers {
        assert!(l.determined, "{}: free {:.1}", l.name, l.free_estimate);
        assert_eq!(l.free_at_least, 0, "{}", l.name);
    }
    assert!(px.exact, "closure {:e}", px.feature_closure);
    let b = read_batch(dir.join("batch.safetensors")).unwrap();
    let err = (&px.x - &b.x).norm_l2() / b.x.norm_l2();
    assert!(err < 1e-10, "pixels off by {err:e}");
}

/// B = 4 from the true features and labels (the 16-wide head cannot separate 4): the
/// first conv layer's input has 864 unknowns against at most 432 + (active outputs)
/// equations, so directions are free; the probe counts at least the deficit, the
/// layers are not determined and the pixels are not called exact.
#[test]
fn free_directions_are_counted_and_never_exact() {
    let dir = fixture("pixnet-f64-b4");
    let p = problem(&dir);
    let features = true_features(&p, &dir);
    assert_eq!(features.samples.len(), 4);
    let px = recover(&p, &features, &Default::default());
    let top = &px.layers[0];
    assert!(top.free_at_least > 0, "{top:?}");
    assert!(!top.determined);
    // the probe's estimate is a one-vector trace estimate of the null space's dimension
    assert!(
        top.free_estimate >= 0.5 * top.free_at_least as f64,
        "{top:?}"
    );
    assert!(!px.exact);
}

/// The TV fill at B = 4 (true features and labels, as above): it lowers the pixels'
/// total variation while their equations keep their residual (the steps lie in the
/// equations' null space); a determined layer (B = 1) is left alone and stays exact.
#[test]
fn tv_fill_lowers_total_variation_and_keeps_the_equations() {
    let dir = fixture("pixnet-f64-b4");
    let p = problem(&dir);
    let features = true_features(&p, &dir);
    let opts = pixels::PixelOptions {
        fill: pixels::Fill::Tv { iterations: 50 },
        ..Default::default()
    };
    let plain = recover(&p, &features, &Default::default());
    let px = recover(&p, &features, &opts);
    let last = px.layers.last().unwrap();
    let tv = last
        .tv
        .expect("the pixel layer is not determined: the fill runs");
    assert!(tv.iterations > 0);
    assert!(tv.tv_end < 0.9 * tv.tv_start, "{tv:?}");
    assert!(
        tv.residual_end <= 1e-8_f64.max(10.0 * last.residual),
        "{tv:?} vs {}",
        last.residual
    );
    assert!(plain.layers.last().unwrap().tv.is_none());
    assert!(!px.exact);
    // the fill moved the pixels (only in the null space)
    assert!((&px.x - &plain.x).norm_l2() > 1e-3 * plain.x.norm_l2());

    let dir = fixture("pixnet-f64");
    let p = problem(&dir);
    let px = recover(&p, &attack_head(&p).features, &opts);
    assert!(px.layers.iter().all(|l| l.tv.is_none()));
    assert!(px.exact, "closure {:e}", px.feature_closure);
}
