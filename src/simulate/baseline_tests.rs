//! The DLG and IG baselines end to end (here, above `attack`, so that `attack` never
//! imports `simulate`).

use crate::attack::{AttackConfig, Method};
use crate::data::DataSpec;
use crate::simulate::{self, SimConfig};

fn digits(method: Method, batch: usize, width: usize, seed: u64) -> SimConfig {
    let mut cfg = SimConfig {
        data: DataSpec::Digits,
        batch,
        width,
        seed,
        attack: AttackConfig::new(method, seed),
        ..SimConfig::default()
    };
    cfg.attack.baseline.restarts = 3;
    cfg
}

/// DLG is a fair baseline: on one digit (d = 64) and a small first layer it recovers
/// the input to the gradient's precision, not just a blur.
#[test]
fn dlg_recovers_one_digit() {
    let out = simulate::run(&digits(Method::Dlg, 1, 32, 1)).unwrap();
    let r = &out.report;
    assert!(
        r.median_rel_error < 1e-3,
        "rel error {} ({:?})",
        r.median_rel_error,
        r.attack.diagnostics
    );
    assert_eq!(r.label_accuracy, Some(1.0));
}

/// IG runs end to end on digits with its TV prior and returns B candidates.
#[test]
fn ig_runs_end_to_end() {
    let mut cfg = digits(Method::Ig, 2, 32, 2);
    cfg.attack.baseline.ig_iters = 200;
    cfg.attack.baseline.ig_restarts = 1;
    let out = simulate::run(&cfg).unwrap();
    assert_eq!(out.reconstruction.samples.len(), 2);
    assert!(
        out.reconstruction
            .samples
            .iter()
            .all(|s| s.x.iter().all(|v| (0.0..=1.0).contains(v)))
    );
    assert!(out.report.median_rel_error.is_finite());
}

/// With B given, a gradient the subspace stage rejects (below its noise floor) is
/// still matched, and the report says why.
#[test]
fn dlg_with_given_batch_matches_a_gradient_below_the_noise_floor() {
    let mut cfg = digits(Method::Dlg, 1, 32, 3);
    cfg.defenses = vec![crate::defense::Defense::NoiseRel(20.0)];
    cfg.attack.batch = Some(1);
    cfg.attack.baseline.restarts = 1;
    cfg.attack.baseline.dlg_iters = 20;
    let out = simulate::run(&cfg).unwrap();
    assert_eq!(out.reconstruction.samples.len(), 1);
    assert!(
        out.reconstruction
            .notes
            .iter()
            .any(|n| n.contains("subspace stage")),
        "{:?}",
        out.reconstruction.notes
    );
}
