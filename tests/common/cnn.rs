//! The CNN fixtures (tests/fixtures/cnn, made by scripts/make_cnn_fixtures.py).

use std::path::{Path, PathBuf};

use gradleak::attack::conv::ConvProblem;
use gradleak::attack::conv::ConvReconstruction;
use gradleak::attack::{self, AttackParams, Method};
use gradleak::io::cnn::{read_model_dir, read_tensors};
use gradleak::model::Loss;

/// The folder of the committed case `name`; a missing fixture fails the test.
pub fn fixture(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/cnn")
        .join(name);
    assert!(
        d.join("model.json").exists(),
        "{}: run scripts/make_cnn_fixtures.py",
        d.display()
    );
    d
}

/// The server's problem on a case folder: its model and its gradient as stored.
pub fn problem(dir: &Path) -> ConvProblem {
    let (spec, t, _) = read_model_dir(dir).unwrap();
    let (g, storage) = read_tensors(&dir.join("gradient.safetensors")).unwrap();
    ConvProblem::new(&spec, &t, &g, storage, None).unwrap()
}

/// The attack on the head as the tests run it: the auto route, seed 1, cross-entropy.
pub fn attack_head(p: &ConvProblem) -> ConvReconstruction {
    let cfg = AttackParams::new(Method::Auto)
        .seed(1)
        .loss(Loss::Ce)
        .check()
        .unwrap();
    attack::run_conv(p, &cfg).unwrap()
}
