//! The exact route on a CNN's head (issue 21): the features h_i entering the first
//! Linear layer and the labels, recovered to the dtype's floor and certified, from
//! PyTorch-made gradients (tests/fixtures/cnn); the command line on the same folder.

mod common;

use std::process::Command;

use common::cnn::{attack_head, fixture, problem};
use gradleak::io::safetensors::read_batch;
use gradleak::metrics;

/// The features come back at the gradient's rounding floor times the batch's
/// conditioning: f32 ~2e-7 (bound 1e-5); a wrong sample is off by > 1e-2. (The zoo
/// fixtures' 6-8-3 head is too narrow for the route: they test the client only.)
#[test]
fn head_features_and_labels_are_exact_and_certified() {
    for (name, tol) in [("lenet-f32", 1e-5), ("pixnet-f64", 1e-12)] {
        let dir = fixture(name);
        let p = problem(&dir);
        let rec = attack_head(&p);
        let b = read_batch(dir.join("batch.safetensors")).unwrap();
        let y: Vec<usize> = (0..b.x.nrows())
            .map(|i| b.y.as_ref().unwrap()[(i, 0)] as usize)
            .collect();
        let h = p.features(&b.x).unwrap();
        let m = metrics::evaluate(&h, &rec.features.samples, None, tol, Some(&y)).unwrap();
        assert_eq!(
            m.recovered_fraction, 1.0,
            "{name}: max error {:e}",
            m.max_rel_error
        );
        assert_eq!(m.label_accuracy, Some(1.0), "{name}");
        let cert = rec.features.certificate.as_ref().unwrap();
        assert!(cert.certified, "{name}: {}", cert.why);
        assert!(rec.features.samples.iter().all(|s| s.exact), "{name}");
        assert_eq!(rec.feature_dim, h.ncols());
    }
}

fn gradleak_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gradleak"))
}

#[test]
fn cli_attacks_a_model_folder_and_names_bad_layers() {
    let dir = fixture("lenet-f32");
    let tmp = std::env::temp_dir().join(format!("gradleak-cnn-cli-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let out = gradleak_bin()
        .args(["attack", "--quiet", "--loss", "ce", "--model"])
        .arg(&dir)
        .arg("--gradient")
        .arg(dir.join("gradient.safetensors"))
        .arg("--truth")
        .arg(dir.join("batch.safetensors"))
        .arg("--out")
        .arg(tmp.join("feats.npy"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("recovered 2 (2 exact), missing 0; certified true"),
        "{stdout}"
    );
    assert!(stdout.contains("recovered within 1e-3: 2/2"), "{stdout}");
    let x = gradleak::io::npy::read_matrix(tmp.join("feats.npy")).unwrap();
    assert_eq!(x.shape(), (2, 400));
    // a description with a layer gradleak does not know: one line, non-zero exit
    let bad = tmp.join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::copy(dir.join("model.safetensors"), bad.join("model.safetensors")).unwrap();
    let text = std::fs::read_to_string(dir.join("model.json"))
        .unwrap()
        .replacen("\"ReLU\"", "\"Hardswish\"", 1);
    std::fs::write(bad.join("model.json"), text).unwrap();
    let out = gradleak_bin()
        .args(["attack", "--quiet", "--model"])
        .arg(&bad)
        .arg("--gradient")
        .arg(dir.join("gradient.safetensors"))
        .arg("--out")
        .arg(tmp.join("bad.npy"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("unknown layer 'Hardswish (layer 1)'"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(!tmp.join("bad.npy").exists());
    std::fs::remove_dir_all(&tmp).unwrap();
}
