//! A small simulated client for the defended fits' unit tests.

use faer::Mat;

use super::likelihood::ErrorModel;
use crate::attack::two_layer::TwoLayer;
use crate::attack::{AttackConfig, Method, ServerView};
use crate::defense::Defense;
use crate::simulate::{self, SimConfig};

/// Digits, `batch` samples, m = 128, PyTorch's init, optionally under `noise-rel`: the
/// true inputs and the two-layer problem, weighted by the known noise (unit weights
/// without it).
pub(crate) fn two_layer(batch: usize, noise: Option<f64>) -> (Mat<f64>, TwoLayer) {
    let cfg = SimConfig {
        batch,
        width: 128,
        init: crate::model::Init::TorchDefault,
        defenses: noise.map(Defense::NoiseRel).into_iter().collect(),
        attack: AttackConfig::new(Method::Analytic, 1),
        ..SimConfig::default()
    };
    let out = simulate::run(&cfg).unwrap();
    let mut view = ServerView::from_memory(&out.model, &out.gradient, crate::Dtype::F64).unwrap();
    let weights = match out.report.defense.as_ref().and_then(|d| d.noise_std) {
        Some(sd) => {
            view.noise_std = Some(sd);
            view.defenses = cfg.defenses.clone();
            ErrorModel::of(&view, &out.gradient).unwrap().weights()
        }
        None => vec![(1.0, 1.0), (1.0, 1.0)],
    };
    (out.batch.x.clone(), TwoLayer::new(&view, &weights).unwrap())
}
