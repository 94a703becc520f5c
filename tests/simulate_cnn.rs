//! `gradleak simulate --model lenet|convnet|DIR` (issue 21) through the binary: on photo
//! crops the head's features come back to the dtype's floor, certified, compared here
//! with the features the saved model computes from the saved truth; the same seed gives
//! the same bytes; a saved model folder run as `--model DIR` gives the same gradient;
//! MLP-only options are refused with one line.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use gradleak::attack::conv::ConvProblem;
use gradleak::io::cnn::{read_model_dir, read_tensors};
use gradleak::io::npy;

const BIN: &str = env!("CARGO_BIN_EXE_gradleak");

/// The photos beside the checkout (`../shared/data/photos`).
fn photos() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let p = ["../shared/data/photos", "../../shared/data/photos"]
        .iter()
        .map(|r| root.join(r))
        .find(|p| p.is_dir())
        .expect("../shared/data/photos beside the checkout");
    format!("images:{}", p.display())
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gradleak-simcnn-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("simulate")
        .args(args)
        .output()
        .unwrap()
}

fn simulate(args: &[&str], save: &Path) -> serde_json::Value {
    let out = Command::new(BIN)
        .arg("simulate")
        .args(args)
        .arg("--save")
        .arg(save)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&std::fs::read(save.join("report.json")).unwrap()).unwrap()
}

/// The recovered features (saved in the truth's order) against the features the saved
/// model computes from the saved pixels; returns the largest relative row error.
fn feature_error(save: &Path) -> f64 {
    let (spec, t, _) = read_model_dir(&save.join("model")).unwrap();
    let (g, storage) = read_tensors(&save.join("gradient.safetensors")).unwrap();
    let p = ConvProblem::new(&spec, &t, &g, storage, None).unwrap();
    let x = npy::read_matrix(save.join("truth.npy")).unwrap();
    let h = p.features(&x).unwrap();
    let rec = npy::read_matrix(save.join("features.npy")).unwrap();
    assert_eq!(rec.shape(), h.shape());
    (0..h.nrows())
        .map(|i| (h.row(i) - rec.row(i)).norm_l2() / h.row(i).norm_l2())
        .fold(0.0, f64::max)
}

/// Features exact to the floor: f64 a few eps amplified by the batch's conditioning
/// (measured <= 1e-15 at B = 2), f32 ~2e-7; a wrong sample would be off by > 1e-2.
#[test]
fn lenet_and_convnet_features_exact_certified_and_reproducible() {
    let data = photos();
    let dir = tmpdir("exact");
    for (model, batch, dtype, bound) in
        [("lenet", "2", "f64", 1e-12), ("convnet", "3", "f32", 1e-5)]
    {
        let args = [
            "--model", model, "--data", &data, "--batch", batch, "--dtype", dtype, "--seed", "2",
        ];
        let save = dir.join(format!("{model}-a"));
        let r = simulate(&args, &save);
        let f = &r["features"];
        assert_eq!(
            f["certified"], true,
            "{model}: {}",
            r["attack"]["certificate"]
        );
        assert_eq!(f["exact"].as_u64().unwrap(), batch.parse::<u64>().unwrap());
        assert_eq!(f["recovered_fraction"], 1.0, "{model}");
        assert_eq!(f["label_accuracy"], 1.0, "{model}");
        assert_eq!(r["input"], serde_json::json!([3, 32, 32]));
        assert_eq!(r["dtype"], dtype);
        let err = feature_error(&save);
        assert!(err < bound, "{model}: features off the truth by {err:e}");
        // the same seed: the same bytes
        let again = dir.join(format!("{model}-b"));
        simulate(&args, &again);
        for file in [
            "truth.npy",
            "labels.npy",
            "features.npy",
            "gradient.safetensors",
            "model/model.safetensors",
        ] {
            assert_eq!(
                std::fs::read(save.join(file)).unwrap(),
                std::fs::read(again.join(file)).unwrap(),
                "{model}: {file} differs between two runs with seed 2"
            );
        }
        // a different seed: a different model and batch
        let other = dir.join(format!("{model}-c"));
        let mut args3 = args.to_vec();
        *args3.last_mut().unwrap() = "3";
        simulate(&args3, &other);
        assert_ne!(
            std::fs::read(save.join("gradient.safetensors")).unwrap(),
            std::fs::read(other.join("gradient.safetensors")).unwrap()
        );
    }
    // the saved LeNet as a model folder: the same client, so the same gradient
    let folder = dir.join("lenet-a/model");
    let save = dir.join("folder");
    let r = simulate(
        &[
            "--model",
            folder.to_str().unwrap(),
            "--data",
            &data,
            "--batch",
            "2",
            "--dtype",
            "f64",
            "--seed",
            "2",
        ],
        &save,
    );
    assert_eq!(r["features"]["certified"], true);
    assert_eq!(
        std::fs::read(save.join("gradient.safetensors")).unwrap(),
        std::fs::read(dir.join("lenet-a/gradient.safetensors")).unwrap()
    );
    // a folder with an eval-mode BatchNorm (the zoo fixture, 3x12x12): folded, saved folded
    let zoo = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cnn/zoo-f64");
    let save = dir.join("zoo");
    let r = simulate(
        &[
            "--model",
            zoo.to_str().unwrap(),
            "--data",
            &format!("{data}:12"),
            "--batch",
            "1",
        ],
        &save,
    );
    assert_eq!(r["features"]["certified"], true);
    let err = feature_error(&save);
    assert!(err < 1e-12, "zoo: features off the truth by {err:e}");
    let text = std::fs::read_to_string(save.join("model/model.json")).unwrap();
    assert!(!text.contains("BatchNorm2d"), "saved unfolded: {text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn options_that_do_not_fit_a_cnn_are_one_line_errors() {
    let data = photos();
    let dir = tmpdir("bad");
    let report = dir.join("r.json");
    let r = report.to_str().unwrap();
    for (args, expect) in [
        (
            vec!["--model", "lenet", "--width", "512"],
            "--width does not apply to a CNN client",
        ),
        (
            vec!["--model", "convnet", "--activation", "tanh"],
            "--activation does not apply to a CNN client",
        ),
        (
            vec!["--model", "lenet", "--loss", "mse"],
            "cross-entropy only",
        ),
        (
            vec!["--model", "lenet", "--defense", "noise:0.1"],
            "--defense is not supported with a CNN client",
        ),
        (
            vec!["--model", "resnet"],
            "--model resnet: not lenet, convnet or a model folder",
        ),
        (vec!["--pixels"], "--pixels needs --model"),
        (vec!["--model", "lenet", "--data", "digits"], "does not fit"),
    ] {
        let mut a = args.clone();
        if !args.contains(&"--data") {
            a.extend(["--data", &data]);
        }
        a.extend(["--batch", "1", "--report", r]);
        let out = run(&a);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} ran");
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        assert!(!report.exists(), "{args:?} wrote a report");
    }
    // the options a CNN does take explicitly
    let out = run(&[
        "--model",
        "lenet",
        "--activation",
        "relu",
        "--init",
        "torch-default",
        "--data",
        &data,
        "--batch",
        "1",
        "--report",
        r,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
