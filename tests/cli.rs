//! The command line on bad input: one line naming the problem, a non-zero exit,
//! no panic and no output file.

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_gradleak");

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pytorch/digits-elu-ce")
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gradleak-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Run and expect failure: exactly one stderr line mentioning `needle`, no panic.
fn fails(args: &[&str], needle: &str) {
    let out = Command::new(BIN).args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{args:?}: not one line: {err}"
    );
    assert!(
        err.contains(needle),
        "{args:?}: '{err}' does not mention '{needle}'"
    );
    assert!(
        !err.contains("panicked") && !err.contains("internal error"),
        "{err}"
    );
}

fn attack_args<'a>(
    model: &'a str,
    grad: &'a str,
    act: &'a str,
    out: &'a str,
    rep: &'a str,
) -> Vec<&'a str> {
    vec![
        "attack",
        "--model",
        model,
        "--gradient",
        grad,
        "--activation",
        act,
        "--out",
        out,
        "--report",
        rep,
    ]
}

#[test]
fn bad_files_and_names_are_one_line_errors_without_output() {
    let dir = tmpdir("bad");
    let f = fixture();
    let model = f.join("model.safetensors");
    let grad = f.join("gradient.safetensors");
    let (m, g) = (model.to_str().unwrap(), grad.to_str().unwrap());
    let out = dir.join("rec.npy");
    let rep = dir.join("rep.json");
    let (o, r) = (out.to_str().unwrap(), rep.to_str().unwrap());

    // missing file
    fails(
        &attack_args("/no/such/model.safetensors", g, "elu", o, r),
        "/no/such/model.safetensors",
    );
    // unknown activation
    fails(
        &attack_args(m, g, "swish", o, r),
        "invalid value 'swish' for '--activation",
    );
    // truncated file
    let bytes = std::fs::read(&grad).unwrap();
    let trunc = dir.join("trunc.safetensors");
    std::fs::write(&trunc, &bytes[..bytes.len() / 2]).unwrap();
    fails(
        &attack_args(m, trunc.to_str().unwrap(), "elu", o, r),
        "malformed",
    );
    // a header that lies about sizes: grow one tensor's end offset
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    let v: serde_json::Value = serde_json::from_str(&header).unwrap();
    let end = v["0.bias"]["data_offsets"][1].as_u64().unwrap();
    let lying = header.replacen(&format!(",{end}]"), &format!(",{}]", end + 4), 1);
    assert_ne!(lying, header);
    let mut lie = Vec::new();
    lie.extend((lying.len() as u64).to_le_bytes());
    lie.extend(lying.as_bytes());
    lie.extend(&bytes[8 + n..]);
    let lie_path = dir.join("lie.safetensors");
    std::fs::write(&lie_path, lie).unwrap();
    fails(
        &attack_args(m, lie_path.to_str().unwrap(), "elu", o, r),
        "malformed",
    );
    // mismatched shapes: another case's gradient
    let other = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/pytorch/digits-relu-bce/gradient.safetensors");
    fails(
        &attack_args(m, other.to_str().unwrap(), "elu", o, r),
        "shape mismatch",
    );
    // a batch larger than the layer allows
    let mut a = attack_args(m, g, "elu", o, r);
    a.extend(["--batch", "500"]);
    fails(&a, "at most");
    assert!(
        !out.exists() && !rep.exists(),
        "a failed run left output behind"
    );
    // unknown loss in client
    let b = f.join("batch.safetensors");
    fails(
        &[
            "client",
            "--model",
            m,
            "--batch",
            b.to_str().unwrap(),
            "--activation",
            "elu",
            "--loss",
            "hinge",
            "--out",
            o,
        ],
        "invalid value 'hinge' for '--loss",
    );
    // wrong shapes in client: a batch of another width
    let b2 = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/pytorch/gaussian-silu-mse/batch.safetensors");
    fails(
        &[
            "client",
            "--model",
            m,
            "--batch",
            b2.to_str().unwrap(),
            "--activation",
            "elu",
            "--loss",
            "ce",
            "--out",
            o,
        ],
        "",
    );
    assert!(!out.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn nan_in_a_gradient_is_named() {
    let dir = tmpdir("nan");
    let f = fixture();
    let mut bytes = std::fs::read(f.join("gradient.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let start = 8 + n + header["0.weight"]["data_offsets"][0].as_u64().unwrap() as usize;
    bytes[start..start + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let bad = dir.join("nan.safetensors");
    std::fs::write(&bad, bytes).unwrap();
    let out = dir.join("rec.npy");
    let rep = dir.join("rep.json");
    let m = f.join("model.safetensors");
    fails(
        &attack_args(
            m.to_str().unwrap(),
            bad.to_str().unwrap(),
            "elu",
            out.to_str().unwrap(),
            rep.to_str().unwrap(),
        ),
        "NaN",
    );
    assert!(!out.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn simulate_rejects_bad_settings() {
    fails(
        &["simulate", "--data", "mnist"],
        "unknown data spec 'mnist'",
    );
    fails(
        &["simulate", "--data", "gaussian:8", "--batch", "0"],
        "batch",
    );
    fails(
        &["simulate", "--init", "xavier"],
        "invalid value 'xavier' for '--init",
    );
    fails(
        &["simulate", "--method", "magic"],
        "invalid value 'magic' for '--method",
    );
    fails(
        &["simulate", "--data", "images:/no/such/dir"],
        "/no/such/dir",
    );
}

/// The client command writes a gradient that the attack reads back; with B = 1 the
/// analytic attack is exact and its report says so.
#[test]
fn client_then_attack_round_trip() {
    let dir = tmpdir("rt");
    let f = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pytorch/digits-b1-tanh-ce");
    let g = dir.join("g.safetensors");
    let st = Command::new(BIN)
        .args(["client", "--model"])
        .arg(f.join("model.safetensors"))
        .arg("--batch")
        .arg(f.join("batch.safetensors"))
        .args(["--activation", "tanh", "--loss", "ce", "--out"])
        .arg(&g)
        .status()
        .unwrap();
    assert!(st.success());
    let out = dir.join("rec.npy");
    let rep = dir.join("rep.json");
    let st = Command::new(BIN)
        .args([
            "attack",
            "--method",
            "analytic",
            "--activation",
            "tanh",
            "--model",
        ])
        .arg(f.join("model.safetensors"))
        .arg("--gradient")
        .arg(&g)
        .arg("--out")
        .arg(&out)
        .arg("--report")
        .arg(&rep)
        .status()
        .unwrap();
    assert!(st.success());
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&rep).unwrap()).unwrap();
    assert_eq!(r["batch_estimated"], 1);
    assert_eq!(r["exact"], 1);
    let x = gradleak::io::npy::read_matrix(&out).unwrap();
    let truth = gradleak::io::safetensors::read_batch(f.join("batch.safetensors"))
        .unwrap()
        .x;
    let err = (&x - &truth).norm_l2() / truth.norm_l2();
    assert!(err < 1e-5, "{err:e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Randomly mutated gradient files (truncations, bit flips, lying header lengths and
/// shapes): each run is a valid attack that writes its output, or exit code 1 with
/// exactly one stderr line and no output file; never a panic.
#[test]
fn mutated_gradients_fail_cleanly_or_run() {
    use rand::{RngExt, SeedableRng};
    let dir = tmpdir("mutated");
    let f = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pytorch/digits-b1-tanh-ce");
    let model = f.join("model.safetensors");
    let bytes = std::fs::read(f.join("gradient.safetensors")).unwrap();
    let grad = dir.join("g.safetensors");
    let out = dir.join("rec.npy");
    let (mut ok, mut failed) = (0, 0);
    for seed in 0..200u64 {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut b = bytes.clone();
        match rng.random_range(0..4) {
            0 => b.truncate(rng.random_range(0..b.len())),
            1 => {
                let i = rng.random_range(0..b.len());
                b[i] ^= 1 << rng.random_range(0..8);
            }
            2 => {
                let i = rng.random_range(0..b.len().min(300));
                b[i] ^= 1 << rng.random_range(0..8);
            }
            _ => {
                let v = u64::from_le_bytes(b[..8].try_into().unwrap());
                let lie = v.wrapping_add(rng.random_range(0..2000)).wrapping_sub(1000);
                b[..8].copy_from_slice(&lie.to_le_bytes());
            }
        }
        std::fs::write(&grad, &b).unwrap();
        let _ = std::fs::remove_file(&out);
        let run = Command::new(BIN)
            .args(["attack", "--model", model.to_str().unwrap(), "--gradient"])
            .arg(&grad)
            .args(["--activation", "tanh", "--method", "analytic", "--out"])
            .arg(&out)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(!err.contains("panicked"), "seed {seed}: {err}");
        if run.status.success() {
            assert!(out.exists(), "seed {seed}: success without output");
            ok += 1;
        } else {
            assert_eq!(run.status.code(), Some(1), "seed {seed}: {err}");
            assert_eq!(err.trim_end().lines().count(), 1, "seed {seed}: {err}");
            assert!(!out.exists(), "seed {seed}: output after failure");
            failed += 1;
        }
    }
    eprintln!("mutated gradients: {ok} valid runs, {failed} clean failures");
}
