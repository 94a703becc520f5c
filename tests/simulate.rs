//! One simulated round end to end, through the binary: the report has the fields
//! other tools read, `--save` writes what it promises, and the same seed gives the
//! same numbers.

use std::path::PathBuf;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_gradleak");

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gradleak-sim-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn simulate(args: &[&str], report: &PathBuf) -> serde_json::Value {
    let out = Command::new(BIN)
        .arg("simulate")
        .args(args)
        .arg("--report")
        .arg(report)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&std::fs::read(report).unwrap()).unwrap()
}

#[test]
fn report_fields_save_and_reproducibility() {
    let dir = tmpdir("rep");
    let save = dir.join("round");
    let args = [
        "--data", "digits", "--batch", "1", "--width", "512", "--method", "analytic", "--dtype",
        "f32", "--seed", "4",
    ];
    let mut with_save: Vec<&str> = args.to_vec();
    with_save.extend(["--save", save.to_str().unwrap()]);
    let r = simulate(&with_save, &dir.join("a.json"));
    for key in [
        "batch_true",
        "batch_estimated",
        "dim",
        "width",
        "activation",
        "method",
        "per_sample",
        "median_rel_error",
        "max_rel_error",
        "recovered_fraction",
        "seconds",
    ] {
        assert!(r.get(key).is_some(), "report lacks {key}");
    }
    for key in ["gradient", "attack", "total"] {
        assert!(r["seconds"][key].as_f64().is_some());
    }
    assert_eq!(r["batch_estimated"], 1);
    assert_eq!(r["dim"], 64);
    // f32 gradient: x = g_w / g_b is exact up to the gradient's rounding
    assert!(r["max_rel_error"].as_f64().unwrap() < 1e-5);
    assert_eq!(r["per_sample"][0]["exact"], true);

    let truth = gradleak::io::npy::read_matrix(save.join("truth.npy")).unwrap();
    let rec = gradleak::io::npy::read_matrix(save.join("reconstruction.npy")).unwrap();
    assert_eq!(truth.shape(), (1, 64));
    assert!((&truth - &rec).norm_l2() / truth.norm_l2() < 1e-5);
    let img = image::open(save.join("grid.png")).unwrap();
    // a 96-pixel caption column (truth / recovered), two rows of one 8x8 digit zoomed
    // 12x with 2-pixel gaps
    assert_eq!(
        (img.width(), img.height()),
        (96 + 2 + 96 + 2, 2 + 2 * (96 + 2))
    );
    // the captions are drawn: dark pixels in the caption column
    let rgb = img.to_rgb8();
    let dark = (0..96)
        .flat_map(|x| (0..img.height()).map(move |y| (x, y)))
        .filter(|&(x, y)| rgb.get_pixel(x, y)[0] < 128)
        .count();
    assert!(dark > 20, "no caption drawn ({dark} dark pixels)");
    let (model, dtype) = gradleak::io::safetensors::read_model(
        save.join("model.safetensors"),
        gradleak::model::Activation::Tanh,
    )
    .unwrap();
    assert_eq!(dtype, gradleak::Dtype::F32);
    assert_eq!(model.width(), 512);
    assert!(save.join("gradient.safetensors").exists());

    // same seed, same numbers; another seed, another batch
    let r2 = simulate(&args, &dir.join("b.json"));
    assert_eq!(r["median_rel_error"], r2["median_rel_error"]);
    let mut other = args.to_vec();
    let last = other.len() - 1;
    other[last] = "5";
    let r3 = simulate(&other, &dir.join("c.json"));
    assert_ne!(r["per_sample"][0]["label_true"], serde_json::Value::Null);
    assert!(r["median_rel_error"] != r3["median_rel_error"] || r["per_sample"] != r3["per_sample"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Regression (702e7ae): the pattern search kept a ReLU pattern only under its own
/// rounding floor, which true f64 patterns overshoot by F's own evaluation (2-3.4e-14
/// against 1.5-1.8e-14 here): 6 of 16 patterns were kept and no input came back.
#[test]
fn relu_digits_b16_all_patterns_kept() {
    let dir = tmpdir("relu16");
    let r = simulate(
        &[
            "--data",
            "digits",
            "--init",
            "torch-default",
            "--activation",
            "relu",
            "--batch",
            "16",
            "--width",
            "1024",
            "--seed",
            "1",
            "--tol",
            "1e-6",
            "--dtype",
            "f64",
        ],
        &dir.join("r.json"),
    );
    assert_eq!(
        r["recovered_fraction"], 1.0,
        "max error {}",
        r["max_rel_error"]
    );
    assert_eq!(r["attack"]["certificate"]["certified"], true);
}
