//! Small simulated clients for the exact route's (and the defended fits') unit tests.

use faer::Mat;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use crate::Dtype;
use crate::attack::ServerView;
use crate::model::{Activation, Init, InitConfig, Loss, Mlp, Targets};

/// A small two-layer (or deeper) tanh client in f64 and the server's view of it.
pub(crate) fn case(
    act: Activation,
    depth: usize,
    b: usize,
    seed: u64,
) -> (ServerView, Mat<f64>, Vec<usize>) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let d = 6;
    let model = model(act, depth, d, 400, &mut rng);
    let x = Mat::from_fn(b, d, |_, _| StandardNormal.sample(&mut rng));
    client(&model, x)
}

/// A two-layer client with `d` inputs and `m` neurons whose batch has its last two
/// coordinates 0 in every sample and (B = 8) x_7 = 0.5 x_0 + 0.3 x_1 + 0.2 x_2: inputs
/// of rank below B.
pub(crate) fn deficient_case(
    act: Activation,
    d: usize,
    m: usize,
    b: usize,
) -> (ServerView, Mat<f64>, Vec<usize>) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let model = model(act, 1, d, m, &mut rng);
    let mut x = Mat::from_fn(b, d, |_, j| {
        if j < d - 2 {
            StandardNormal.sample(&mut rng)
        } else {
            0.0
        }
    });
    if b == 8 {
        for j in 0..d {
            x[(7, j)] = 0.5 * x[(0, j)] + 0.3 * x[(1, j)] + 0.2 * x[(2, j)];
        }
    }
    client(&model, x)
}

/// PyTorch's default init, 3 classes, hidden layers of 16 beyond the first.
fn model(
    act: Activation,
    depth: usize,
    d: usize,
    m: usize,
    rng: &mut rand_chacha::ChaCha8Rng,
) -> Mlp<f64> {
    InitConfig {
        input_dim: d,
        width: m,
        hidden: 16,
        depth,
        outputs: 3,
        init: Init::TorchDefault,
        activation: act,
        prior_mean: 0.0,
        prior_sq_norm: d as f64,
        prior_centred_sq_norm: d as f64,
    }
    .build(rng)
    .unwrap()
}

/// The cross-entropy gradient of `x` with labels i mod K, and the server's view of it.
fn client(model: &Mlp<f64>, x: Mat<f64>) -> (ServerView, Mat<f64>, Vec<usize>) {
    let y: Vec<usize> = (0..x.nrows()).map(|i| i % model.output_dim()).collect();
    let g = model
        .gradient(x.as_ref(), &Targets::Classes(y.clone()), Loss::Ce)
        .unwrap();
    (
        ServerView::from_memory(model, &g, Dtype::F64).unwrap(),
        x,
        y,
    )
}
