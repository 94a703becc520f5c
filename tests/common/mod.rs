//! Shared helpers for the integration tests: the PyTorch fixture cases (and the CNN
//! fixtures, [`cnn`]).

#![allow(dead_code)]

pub mod cnn;

use std::path::{Path, PathBuf};

use gradleak::model::{Activation, Loss};

/// One PyTorch-made case: model, gradient, truth, and what case.json says.
pub struct Case {
    pub dir: PathBuf,
    pub name: String,
    pub activation: Activation,
    pub loss: Loss,
    pub batch: usize,
}

fn loss_of(s: &str) -> Loss {
    if s.contains("CrossEntropy") || s == "ce" {
        Loss::Ce
    } else if s.contains("BCE") || s == "bce" {
        Loss::Bce
    } else {
        Loss::Mse
    }
}

fn cases_in(root: &Path) -> Vec<Case> {
    let Ok(rd) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("case.json").exists())
        .collect();
    dirs.sort();
    dirs.into_iter()
        .map(|dir| {
            let j: serde_json::Value =
                serde_json::from_slice(&std::fs::read(dir.join("case.json")).unwrap()).unwrap();
            Case {
                name: dir.file_name().unwrap().to_string_lossy().into(),
                activation: j["activation"].as_str().unwrap().parse().unwrap(),
                loss: loss_of(j["loss"].as_str().unwrap()),
                batch: j["batch"].as_u64().unwrap() as usize,
                dir,
            }
        })
        .collect()
}

/// The shared fixtures (../shared/fixtures/pytorch, beside the checkout).
pub fn shared_cases() -> Vec<Case> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/pytorch");
    let c = cases_in(&root);
    assert!(
        !c.is_empty(),
        "no fixtures at {}: CI runs with ../shared beside the checkout",
        root.display()
    );
    c
}

/// The fixtures made by scripts/make_fixtures.py (tests/fixtures/pytorch).
pub fn own_cases() -> Vec<Case> {
    let c = cases_in(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pytorch"));
    assert!(c.len() >= 10, "tests/fixtures/pytorch is incomplete");
    c
}

pub fn all_cases() -> Vec<Case> {
    let mut c = shared_cases();
    c.extend(own_cases());
    c
}
