//! `gradleak sweep --shard K/N` then `--merge`: the joined CSV is the one a single
//! process writes, row for row (wall-clock columns aside).

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_gradleak");

fn tmpdir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("gradleak-shard-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Tiny digits rounds (B <= 2, m = 64): a fraction of a second each.
const GRID: &[&str] = &[
    "sweep",
    "--data",
    "digits",
    "--width",
    "64",
    "--grid",
    "batch=1,2",
    "--grid",
    "activation=tanh,relu",
    "--grid",
    "seed=1,2,3",
];

fn run(extra: &[&str]) -> std::process::Output {
    let out = Command::new(BIN).args(GRID).args(extra).output().unwrap();
    assert!(
        out.status.success(),
        "{extra:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Rows without the two seconds columns (the only ones two runs may differ in).
fn rows(p: &Path) -> Vec<Vec<String>> {
    let (head, rows) = gradleak::sweep::read_csv(p).unwrap();
    let keep: Vec<usize> = (0..head.len())
        .filter(|&i| !head[i].starts_with("seconds_"))
        .collect();
    std::iter::once(head)
        .chain(rows)
        .map(|r| keep.iter().map(|&i| r[i].clone()).collect())
        .collect()
}

#[test]
fn shards_merge_to_the_single_process_csv() {
    let d = tmpdir();
    let s = |n: &str| d.join(n).to_str().unwrap().to_string();
    run(&["--csv", &s("single.csv")]);
    // shard 3 first: the merge must not depend on the order the jobs ran in
    for k in [3, 1, 2] {
        run(&[
            "--shard",
            &format!("{k}/3"),
            "--csv",
            &s(&format!("p{k}.csv")),
        ]);
        assert_eq!(rows(&d.join(format!("p{k}.csv"))).len(), 1 + 4);
    }
    run(&[
        "--csv",
        &s("merged.csv"),
        "--merge",
        &s("p2.csv"),
        &s("p3.csv"),
        &s("p1.csv"),
    ]);
    let single = rows(&d.join("single.csv"));
    assert_eq!(single.len(), 1 + 12);
    assert_eq!(rows(&d.join("merged.csv")), single);

    // a missing shard is an error and writes nothing
    let out = Command::new(BIN)
        .args(GRID)
        .args([
            "--csv",
            &s("bad.csv"),
            "--merge",
            &s("p1.csv"),
            &s("p2.csv"),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("4 of 12 grid runs"));
    assert!(!d.join("bad.csv").exists());
    let _ = std::fs::remove_dir_all(&d);
}
