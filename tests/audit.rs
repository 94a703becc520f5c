//! `gradleak audit` end to end on a small digits setting: the bracket it reports is
//! backed by its own probes, a rerun resumes from the CSV, bad input is one line.

use std::path::PathBuf;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_gradleak");

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gradleak-audit-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const SETTING: &[&str] = &[
    "audit",
    "--data",
    "digits",
    "--batch",
    "2",
    "--width",
    "256",
    "--init",
    "torch-default",
    "--methods",
    "auto",
    "--grid-points",
    "3",
    "--bisections",
    "2",
];

#[test]
fn audit_brackets_the_stopping_noise_and_resumes() {
    let dir = tmpdir("noise");
    let (csv, png, json) = (dir.join("a.csv"), dir.join("a.png"), dir.join("a.json"));
    let run = || {
        let out = Command::new(BIN)
            .args(SETTING)
            .args(["--audit-defense", "noise-rel", "--range", "1e-8:10"])
            .arg("--csv")
            .arg(&csv)
            .arg("--plot")
            .arg(&png)
            .arg("--report")
            .arg(&json)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{err}");
        err
    };
    run();
    let rows = std::fs::read_to_string(&csv).unwrap().lines().count();
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let probes = r["probes"].as_array().unwrap();
    assert_eq!(rows, 1 + probes.len());
    let leaked = |v: f64| {
        probes
            .iter()
            .find(|p| p["value"].as_f64() == Some(v))
            .and_then(|p| p["leaked_fraction"].as_f64())
            .unwrap()
    };
    // At 1e-8 of the gradient's RMS the exact route recovers both digits (its error
    // is linear in the noise, about 4x the level); at 10x the RMS nothing survives.
    assert_eq!(leaked(1e-8), 1.0);
    assert_eq!(leaked(10.0), 0.0);
    let m = &r["methods"][0];
    let (stop, leak) = (
        m["stops_at"].as_f64().unwrap(),
        m["last_leak"].as_f64().unwrap(),
    );
    assert!(leak < stop, "{leak} {stop}");
    assert!(leaked(leak) > 0.0 && leaked(stop) == 0.0);
    assert_eq!(r["stops_every_method"].as_f64(), Some(stop));
    assert!(m["gradient_relative_change"].as_f64().unwrap() > 0.0);
    assert_eq!(&std::fs::read(&png).unwrap()[1..4], b"PNG");
    // A rerun reads every probe back from the CSV and runs nothing new.
    let err = run();
    assert_eq!(err.matches("(from the CSV)").count(), probes.len(), "{err}");
    assert_eq!(std::fs::read_to_string(&csv).unwrap().lines().count(), rows);
}

#[test]
fn bad_audit_settings_are_one_line_errors() {
    let dir = tmpdir("bad");
    let csv = dir.join("a.csv");
    let csv = csv.to_str().unwrap();
    for (extra, needle) in [
        (&["--audit-defense", "blur"][..], "blur"),
        (
            &["--audit-defense", "noise-rel", "--range", "1:1e-6"][..],
            "stronger",
        ),
        (
            &["--audit-defense", "noise-rel", "--range", "abc"][..],
            "--range",
        ),
        (
            &["--audit-defense", "prune", "--defense", "prune:0.5"][..],
            "--defense",
        ),
        (&["--audit-defense", "dp"][..], "dp:C"),
    ] {
        let mut args: Vec<&str> = SETTING.to_vec();
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--csv", csv]);
        let out = Command::new(BIN).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{extra:?}: {err}");
        assert!(err.contains(needle), "{extra:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
