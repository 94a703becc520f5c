//! Exact recovery on gradients made by real PyTorch clients
//! (../shared/fixtures/pytorch, beside the checkout): every sample to relative
//! error <= 1e-4 and, for cross-entropy, every label.

use std::path::{Path, PathBuf};

use gradleak::attack::{self, AttackParams, Method, ServerView};
use gradleak::io::safetensors::read_batch;
use gradleak::metrics;
use gradleak::model::{Activation, Loss};

/// The acceptance tolerance on relative error for float32 gradients.
const TOL: f64 = 1e-4;

/// ../shared beside the checkout (CI), or two levels up (a git worktree under wt/).
fn fixture(name: &str) -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    ["../shared", "../../shared"]
        .iter()
        .map(|s| root.join(s).join("fixtures/pytorch").join(name))
        .find(|p| p.exists())
}

fn run(name: &str, act: Activation, loss: Option<Loss>, method: Method, check_labels: bool) {
    // a missing fixture fails the test: it is made by the checked-in scripts
    let dir = fixture(name)
        .unwrap_or_else(|| panic!("fixture {name} not found in ../shared/fixtures/pytorch"));
    run_dir(&dir, name, act, loss, method, check_labels)
}

fn run_dir(
    dir: &Path,
    name: &str,
    act: Activation,
    loss: Option<Loss>,
    method: Method,
    check_labels: bool,
) {
    let view = ServerView::from_files(
        &dir.join("model.safetensors"),
        &dir.join("gradient.safetensors"),
        act,
    )
    .unwrap();
    let mut params = AttackParams::new(method).seed(1);
    if let Some(l) = loss {
        params = params.loss(l);
    }
    let cfg = params.check().unwrap();
    let t0 = std::time::Instant::now();
    let rec = attack::run(&view, &cfg).unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let truth = read_batch(dir.join("batch.safetensors")).unwrap();
    let labels: Option<Vec<usize>> =
        (check_labels && truth.y.as_ref().is_some_and(|y| y.ncols() == 1)).then(|| {
            truth
                .y
                .as_ref()
                .unwrap()
                .col(0)
                .iter()
                .map(|&v| v as usize)
                .collect()
        });
    let m = metrics::evaluate(&truth.x, &rec.samples, None, TOL, labels.as_deref()).unwrap();
    eprintln!(
        "{name}: found {}/{} max rel error {:.2e} labels {:?} in {secs:.1} s; residuals {:?}",
        rec.samples.len(),
        truth.x.nrows(),
        m.max_rel_error,
        m.label_accuracy,
        rec.samples
            .iter()
            .map(|s| s.residual.unwrap_or(f64::NAN))
            .collect::<Vec<_>>()
    );
    assert_eq!(rec.batch_estimated, truth.x.nrows());
    assert_eq!(
        m.recovered_fraction, 1.0,
        "{name}: max relative error {:.2e}",
        m.max_rel_error
    );
    assert!(
        rec.samples.iter().all(|s| s.exact),
        "{name}: every recovered sample should be exact"
    );
    if labels.is_some() {
        assert_eq!(m.label_accuracy, Some(1.0), "{name}: labels");
    }
}

#[test]
fn digits_tanh_ce_is_recovered_exactly_with_labels() {
    run(
        "digits-tanh-ce",
        Activation::Tanh,
        Some(Loss::Ce),
        Method::Auto,
        true,
    );
}

#[test]
fn diabetes_sigmoid_mse_is_recovered_exactly() {
    run(
        "diabetes-sigmoid-mse",
        Activation::Sigmoid,
        Some(Loss::Mse),
        Method::Auto,
        false,
    );
}

/// Every case made by scripts/make_fixtures.py (tests/fixtures/pytorch) is recovered
/// exactly with its labels (ce, bce), except identity, where the inputs are not
/// identifiable (every signal is A^T r) and the attack must return no sample.
#[test]
fn generated_fixtures() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pytorch");
    // the fixtures are checked in: a missing folder fails the test
    let dirs = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("generated fixtures not found in {}: {e}", root.display()));
    let mut dirs: Vec<PathBuf> = dirs
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    assert!(
        !dirs.is_empty(),
        "no generated fixture in {}",
        root.display()
    );
    let mut failed = Vec::new();
    for dir in dirs {
        let case: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("case.json")).unwrap()).unwrap();
        let act: Activation = case["activation"].as_str().unwrap().parse().unwrap();
        let l = case["loss"].as_str().unwrap().to_lowercase();
        let loss = if l.contains("bce") || l.contains("bcewith") {
            Loss::Bce
        } else if l.contains("ce") || l.contains("crossentropy") {
            Loss::Ce
        } else {
            Loss::Mse
        };
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let ok = std::panic::catch_unwind(|| {
            run_dir(
                &dir,
                &name,
                act,
                Some(loss),
                Method::Auto,
                loss != Loss::Mse,
            )
        });
        if ok.is_err() && act != Activation::Identity {
            failed.push(name);
        }
    }
    assert!(
        failed.is_empty(),
        "smooth cases not recovered exactly: {failed:?}"
    );
}

/// Without being told the loss, the cross-entropy signature of the residuals gives the labels.
#[test]
fn digits_labels_without_the_loss() {
    run("digits-tanh-ce", Activation::Tanh, None, Method::Span, true);
}
