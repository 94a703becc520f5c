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

/// Stderr without the progress lines a piped run prints (`gradleak: <stage>: ...`).
fn without_progress(err: &str) -> String {
    err.lines()
        .filter(|l| !l.starts_with("gradleak: ") || l.starts_with("gradleak: error: "))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Run and expect failure: exactly one stderr line (besides progress lines)
/// mentioning `needle`, no panic.
fn fails(args: &[&str], needle: &str) {
    let out = Command::new(BIN).args(args).output().unwrap();
    let err = without_progress(&String::from_utf8_lossy(&out.stderr));
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
        let err = without_progress(&String::from_utf8_lossy(&run.stderr));
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

// ---- what a PyTorch user brings (issue 20) ----

use gradleak::Dtype;
use gradleak::io::safetensors::{OutTensor, TensorFile, write_tensors};

/// ../shared/fixtures/pytorch/digits-tanh-ce (float32, B = 8, 64-4096-10, tanh, CE).
fn shared_tanh() -> PathBuf {
    let base = Path::new(env!("CARGO_MANIFEST_DIR"));
    ["../shared", "../../shared"]
        .iter()
        .map(|s| base.join(s).join("fixtures/pytorch/digits-tanh-ce"))
        .find(|p| p.exists())
        .expect("../shared/fixtures/pytorch/digits-tanh-ce")
}

/// Every tensor of a safetensors file, in the file's order.
fn read_all(src: &Path) -> Vec<OutTensor> {
    let f = TensorFile::open(src).unwrap();
    f.names()
        .map(|n| {
            let (shape, values) = f.values(n).unwrap();
            OutTensor {
                name: n.to_string(),
                shape,
                values,
            }
        })
        .collect()
}

/// Copy a safetensors file in `dtype` with renamed tensors and extra ones.
fn convert(
    src: &Path,
    dst: &Path,
    dtype: Dtype,
    rename: impl Fn(&str) -> String,
    extra: Vec<OutTensor>,
) {
    let mut t = read_all(src);
    for x in &mut t {
        x.name = rename(&x.name);
    }
    t.extend(extra);
    write_tensors(dst, &t, dtype).unwrap();
}

/// Run `attack` on (model, gradient) with `extra` flags; the JSON report and stdout.
fn attack_report(
    dir: &Path,
    model: &Path,
    grad: &Path,
    extra: &[&str],
) -> (serde_json::Value, String, String) {
    let rep = dir.join("rep.json");
    let out = Command::new(BIN)
        .args([
            "attack",
            "--model",
            model.to_str().unwrap(),
            "--gradient",
            grad.to_str().unwrap(),
            "--loss",
            "ce",
            "--out",
            dir.join("rec.npy").to_str().unwrap(),
            "--report",
            rep.to_str().unwrap(),
        ])
        .args(extra)
        .output()
        .unwrap();
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    );
    assert!(out.status.success(), "{extra:?}: {se}");
    let v = serde_json::from_slice(&std::fs::read(&rep).unwrap()).unwrap();
    (v, so, se)
}

fn all_exact_certified(v: &serde_json::Value, b: u64) {
    assert_eq!(v["batch_estimated"], b, "{}", v["attack"]["notes"]);
    assert_eq!(v["exact"], b, "{}", v["attack"]["notes"]);
    assert_eq!(v["certified"], true);
}

#[test]
fn float32_gradient_stored_as_float64_is_attacked_at_float32() {
    let dir = tmpdir("upcast");
    let f = shared_tanh();
    let (m, g) = (dir.join("m64.safetensors"), dir.join("g64.safetensors"));
    convert(
        &f.join("model.safetensors"),
        &m,
        Dtype::F64,
        str::to_string,
        vec![],
    );
    convert(
        &f.join("gradient.safetensors"),
        &g,
        Dtype::F64,
        str::to_string,
        vec![],
    );
    let truth = f.join("batch.safetensors");
    let (v, so, _) = attack_report(
        &dir,
        &m,
        &g,
        &["--activation", "tanh", "--truth", truth.to_str().unwrap()],
    );
    all_exact_certified(&v, 8);
    assert_eq!(v["files"]["storage"], "f64");
    assert_eq!(v["files"]["precision"], "f32");
    assert_eq!(v["files"]["precision_rule"], "detected");
    assert_eq!(v["dtype"], "f32");
    // recovered to float32's precision: the float32 fixture's own figure (<= 1.5e-8
    // measured) with room for the conditioning, far below any float64 claim
    let max = v["truth"]["max_rel_error"].as_f64().unwrap();
    assert!(max <= 64.0 * f32::EPSILON as f64, "{max}");
    assert!(so.contains("stored f64, attacked at f32"), "{so}");
    assert!(so.contains("recovered within 1e-3: 8/8"), "{so}");
    // a float32 model beside the float64 gradient: the same
    let (v, _, _) = attack_report(
        &dir,
        &f.join("model.safetensors"),
        &g,
        &["--activation", "tanh"],
    );
    all_exact_certified(&v, 8);
    // --precision f64 overrides the detection (and so misreads rounding as samples)
    let (v, _, _) = attack_report(
        &dir,
        &m,
        &g,
        &[
            "--activation",
            "tanh",
            "--precision",
            "f64",
            "--search-starts",
            "8",
        ],
    );
    assert_eq!(v["files"]["precision_rule"], "given");
    assert_eq!(v["dtype"], "f64");
    assert!(v["batch_estimated"].as_u64().unwrap() > 8);
}

#[test]
fn half_precision_files_are_read_and_attacked_at_their_precision() {
    let dir = tmpdir("half");
    let f = shared_tanh();
    let truth = f.join("batch.safetensors");
    for (dt, name) in [(Dtype::F16, "f16"), (Dtype::Bf16, "bf16")] {
        let (m, g) = (dir.join("m.safetensors"), dir.join("g.safetensors"));
        convert(&f.join("model.safetensors"), &m, dt, str::to_string, vec![]);
        convert(
            &f.join("gradient.safetensors"),
            &g,
            dt,
            str::to_string,
            vec![],
        );
        let (v, _, _) = attack_report(
            &dir,
            &m,
            &g,
            &["--activation", "tanh", "--truth", truth.to_str().unwrap()],
        );
        assert_eq!(v["files"]["storage"], name);
        assert_eq!(v["dtype"], name);
        assert_eq!(v["recovered"], 8);
        assert_eq!(v["truth"]["missing"], 0);
        // each input to a few units of the half type's roundoff (1.2 eps measured)
        let max = v["truth"]["max_rel_error"].as_f64().unwrap();
        assert!(max <= 8.0 * dt.epsilon(), "{name}: {max}");
        assert_eq!(v["truth"]["label_accuracy"], 1.0);
    }
}

#[test]
fn custom_module_names_prefixes_and_buffers_attack_like_sequential() {
    let dir = tmpdir("names");
    let f = shared_tanh();
    let buffers = || {
        vec![
            OutTensor {
                name: "bn.running_mean".into(),
                shape: vec![4096],
                values: vec![0.0; 4096],
            },
            OutTensor {
                name: "extra".into(),
                shape: vec![3, 3],
                values: vec![1.0; 9],
            },
        ]
    };
    // fc1/fc2 (a custom nn.Module), module.0/module.2 (DataParallel), and names whose
    // natural order is backwards (head before input): ordered by their shapes
    type Rename = fn(&str) -> String;
    let renames: [(&str, Rename); 3] = [
        ("fc", |n| {
            n.replacen("0.", "fc1.", 1).replacen("2.", "fc2.", 1)
        }),
        ("module", |n| format!("module.{n}")),
        ("shapes", |n| {
            n.replacen("0.", "input.", 1).replacen("2.", "head.", 1)
        }),
    ];
    for (what, rename) in renames {
        let (m, g) = (dir.join("m.safetensors"), dir.join("g.safetensors"));
        convert(
            &f.join("model.safetensors"),
            &m,
            Dtype::F32,
            rename,
            buffers(),
        );
        convert(
            &f.join("gradient.safetensors"),
            &g,
            Dtype::F32,
            rename,
            vec![],
        );
        let (v, so, _) = attack_report(&dir, &m, &g, &["--activation", "tanh"]);
        all_exact_certified(&v, 8);
        assert!(so.contains("ignored 2 tensor(s)"), "{what}: {so}");
    }
    // an explicit map; a name that is not there is a one-line error
    let (m, g) = (dir.join("m.safetensors"), dir.join("g.safetensors"));
    let rename = |n: &str| n.replacen("0.", "enc.", 1).replacen("2.", "dec.", 1);
    convert(&f.join("model.safetensors"), &m, Dtype::F32, rename, vec![]);
    convert(
        &f.join("gradient.safetensors"),
        &g,
        Dtype::F32,
        rename,
        vec![],
    );
    let (v, _, _) = attack_report(
        &dir,
        &m,
        &g,
        &["--activation", "tanh", "--names", "enc,dec"],
    );
    all_exact_certified(&v, 8);
    let (ms, gs) = (m.to_str().unwrap(), g.to_str().unwrap());
    let mut a = attack_args(ms, gs, "tanh", "/tmp/x.npy", "/tmp/x.json");
    a.extend(["--names", "enc,nope"]);
    fails(&a, "nope.weight");
}

#[test]
fn a_failed_run_leaves_no_output_file() {
    let dir = tmpdir("outputs");
    let f = fixture();
    let (m, g) = (f.join("model.safetensors"), f.join("gradient.safetensors"));
    let (out, rep) = (dir.join("r.npy"), dir.join("r.json"));
    let labels = dir.join("nodir/l.npy");
    let mut a = attack_args(
        m.to_str().unwrap(),
        g.to_str().unwrap(),
        "elu",
        out.to_str().unwrap(),
        rep.to_str().unwrap(),
    );
    a.extend(["--labels", labels.to_str().unwrap()]);
    fails(&a, "nodir");
    // simulate checks --report before the round runs (no progress line printed first)
    fails(
        &[
            "simulate",
            "--data",
            "gaussian:8",
            "--batch",
            "2",
            "--width",
            "64",
            "--report",
            dir.join("nodir/r.json").to_str().unwrap(),
        ],
        "nodir",
    );
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "left files behind"
    );
}

#[test]
fn activation_is_detected_and_a_wrong_one_refused() {
    let dir = tmpdir("act");
    let f = shared_tanh();
    let (m, g) = (f.join("model.safetensors"), f.join("gradient.safetensors"));
    // no --activation: auto, with the evidence
    let (v, so, se) = attack_report(&dir, &m, &g, &[]);
    all_exact_certified(&v, 8);
    assert_eq!(v["activation"], "tanh");
    let fits = v["activation_fit"]["fits"].as_array().unwrap();
    assert_eq!(fits.len(), 9);
    for fit in fits {
        let want = if fit["activation"] == "tanh" { 8 } else { 0 };
        assert_eq!(fit["exact"], want, "{fit}");
    }
    assert!(so.contains("detected: tanh 8/8"), "{so}");
    // piped stderr: one plain line per stage
    assert!(se.contains("gradleak: activation: tanh fits"), "{se}");
    assert!(se.contains("gradleak: attack: 8 samples in"), "{se}");
    // a wrong activation: exit 1, one line saying so, no file
    let (o, r) = (dir.join("w.npy"), dir.join("w.json"));
    let mut a = attack_args(
        m.to_str().unwrap(),
        g.to_str().unwrap(),
        "sigmoid",
        o.to_str().unwrap(),
        r.to_str().unwrap(),
    );
    a.extend(["--search-starts", "8", "--seed-rounds", "1", "--loss", "ce"]);
    fails(&a, "activation");
    assert!(!o.exists() && !r.exists());
}

#[test]
fn a_gradient_no_activation_fits_is_refused() {
    let dir = tmpdir("nofit");
    let f = fixture();
    let m = f.join("model.safetensors");
    // the right shapes, random values: no activation's span test closes
    let mut k = 0u64;
    let g = dir.join("g.safetensors");
    convert(
        &f.join("gradient.safetensors"),
        &g,
        Dtype::F32,
        str::to_string,
        vec![],
    );
    let mut t = read_all(&g);
    for v in t.iter_mut().flat_map(|x| x.values.iter_mut()) {
        k = k
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *v = (k >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
    }
    let noise = dir.join("noise.safetensors");
    write_tensors(&noise, &t, Dtype::F32).unwrap();
    let o = dir.join("n.npy");
    let args = [
        "attack",
        "--model",
        m.to_str().unwrap(),
        "--gradient",
        noise.to_str().unwrap(),
        "--out",
        o.to_str().unwrap(),
        "--quiet",
    ];
    fails(&args, "no activation fits");
    assert!(!o.exists());
}

#[test]
fn quiet_prints_no_stage_lines() {
    let dir = tmpdir("quiet");
    let f = fixture();
    let (m, g) = (f.join("model.safetensors"), f.join("gradient.safetensors"));
    let (_, so, se) = attack_report(&dir, &m, &g, &["--activation", "elu", "--quiet"]);
    assert!(!se.contains("gradleak: "), "{se}");
    assert!(so.contains("s CPU)"), "{so}");
}
