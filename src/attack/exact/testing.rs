//! Small simulated clients for the exact route's unit tests.

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
    let (d, m, k) = (6, 400, 3);
    let model: Mlp<f64> = InitConfig {
        input_dim: d,
        width: m,
        hidden: 16,
        depth,
        outputs: k,
        init: Init::TorchDefault,
        activation: act,
        prior_mean: 0.0,
        prior_sq_norm: d as f64,
        prior_centred_sq_norm: d as f64,
    }
    .build(&mut rng)
    .unwrap();
    let x = Mat::from_fn(b, d, |_, _| StandardNormal.sample(&mut rng));
    let y: Vec<usize> = (0..b).map(|i| i % k).collect();
    let g = model
        .gradient(x.as_ref(), &Targets::Classes(y.clone()), Loss::Ce)
        .unwrap();
    (
        ServerView::from_memory(&model, &g, Dtype::F64).unwrap(),
        x,
        y,
    )
}
