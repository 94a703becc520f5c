//! The convolutional client agrees with PyTorch on fixtures PyTorch made
//! (scripts/make_cnn_fixtures.py): every layer kind, BatchNorm folded, f32 and f64;
//! and its gradient agrees with finite differences of its own loss.

use std::path::{Path, PathBuf};

use faer::Mat;
use gradleak::Dtype;
use gradleak::io::cnn::{read_model_dir, read_tensors};
use gradleak::io::safetensors::read_batch;
use gradleak::model::cnn::{Cnn, CnnGradient};
use gradleak::model::{Loss, Targets, cast_mat};

fn cases() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cnn");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}; run scripts/make_cnn_fixtures.py", root.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("case.json").exists())
        .collect();
    v.sort();
    assert_eq!(v.len(), 5, "expected the five committed CNN fixtures");
    v
}

struct Case {
    cnn: Cnn<f64>,
    torch: CnnGradient<f64>,
    x: Mat<f64>,
    y: Vec<usize>,
    dtype: Dtype,
}

fn load(dir: &Path) -> Case {
    let (spec, t, dtype) = read_model_dir(dir).unwrap();
    let (cnn, folds) = Cnn::from_spec(&spec, &t).unwrap();
    let (g, gdt) = read_tensors(&dir.join("gradient.safetensors")).unwrap();
    assert_eq!(gdt, dtype);
    let torch = CnnGradient::from_tensors(&cnn, &folds, &g).unwrap();
    let b = read_batch(dir.join("batch.safetensors")).unwrap();
    let y = b.y.unwrap();
    Case {
        cnn,
        torch,
        x: b.x,
        y: (0..y.nrows()).map(|i| y[(i, 0)] as usize).collect(),
        dtype,
    }
}

fn rel(a: &Mat<f64>, b: &Mat<f64>) -> f64 {
    (a - b).norm_l2() / b.norm_l2().max(f64::MIN_POSITIVE)
}

/// Both sides compute in the fixture's dtype but sum in different orders (and
/// gradleak runs a folded BatchNorm): the difference is a few ulps of the accumulated
/// sums, ~1e-7 relative in f32 (the bound is 1e-6) and ~1e-15 in f64 (1e-12).
#[test]
fn cnn_gradient_matches_pytorch_per_tensor() {
    for dir in cases() {
        let c = load(&dir);
        let t = Targets::Classes(c.y.clone());
        let ours: CnnGradient<f64> = match c.dtype {
            Dtype::F32 => {
                let m: Cnn<f32> = c.cnn.cast();
                let x: Mat<f32> = cast_mat(c.x.as_ref());
                m.gradient(&x, &t, Loss::Ce).unwrap().cast()
            }
            _ => c.cnn.gradient(&c.x, &t, Loss::Ce).unwrap(),
        };
        let tol = if c.dtype == Dtype::F32 { 1e-6 } else { 1e-12 };
        assert_eq!(ours.params.len(), c.torch.params.len());
        for (k, (a, b)) in ours.params.iter().zip(&c.torch.params).enumerate() {
            let name = &c.cnn.names[k];
            let ew = rel(&a.weight, &b.weight);
            assert!(
                ew <= tol,
                "{}: '{name}' weight gradient differs by {ew:e}",
                dir.display()
            );
            let (ab, bb) = (a.bias.as_ref().unwrap(), b.bias.as_ref().unwrap());
            let eb = (ab - bb).norm_l2() / bb.norm_l2();
            eprintln!("{}: '{name}' weight {ew:.1e} bias {eb:.1e}", dir.display());
            assert!(
                eb <= tol,
                "{}: '{name}' bias gradient differs by {eb:e}",
                dir.display()
            );
        }
    }
}

/// The analytic gradient against a central difference of the loss, at a few entries
/// of every parameter layer of the f64 model with every layer kind. Truncation is
/// O(h^2 L''') ~ 1e-12 and roundoff ~ eps / h ~ 1e-10, so 1e-7 of the gradient's
/// scale is only broken by a wrong derivative.
#[test]
fn cnn_gradient_matches_finite_differences() {
    let dir = cases()
        .into_iter()
        .find(|d| d.ends_with("zoo-f64"))
        .unwrap();
    let c = load(&dir);
    let t = Targets::Classes(c.y.clone());
    let g = c.cnn.gradient(&c.x, &t, Loss::Ce).unwrap();
    let scale = g
        .params
        .iter()
        .map(|p| p.weight.squared_norm_l2())
        .sum::<f64>()
        .sqrt();
    let h = 1e-6;
    for k in 0..g.params.len() {
        let (rows, cols) = g.params[k].weight.shape();
        for (i, j) in [(0, 0), (rows - 1, cols - 1), (rows / 2, cols / 2)] {
            let loss_at = |delta: f64| {
                let mut m = c.cnn.clone();
                m.params_mut().nth(k).unwrap().weight[(i, j)] += delta;
                m.loss(&c.x, &t, Loss::Ce).unwrap()
            };
            let fd = (loss_at(h) - loss_at(-h)) / (2.0 * h);
            let an = g.params[k].weight[(i, j)];
            assert!(
                (fd - an).abs() <= 1e-7 * scale + 1e-10,
                "param {k} w({i},{j}): {an} vs {fd}"
            );
        }
        let loss_at = |delta: f64| {
            let mut m = c.cnn.clone();
            m.params_mut().nth(k).unwrap().bias.as_mut().unwrap()[rows - 1] += delta;
            m.loss(&c.x, &t, Loss::Ce).unwrap()
        };
        let fd = (loss_at(h) - loss_at(-h)) / (2.0 * h);
        let an = g.params[k].bias.as_ref().unwrap()[rows - 1];
        assert!(
            (fd - an).abs() <= 1e-7 * scale + 1e-10,
            "param {k} bias: {an} vs {fd}"
        );
    }
}

/// A gradient file that lacks a tensor, and a description with an unknown layer, are
/// one-line errors naming it.
#[test]
fn missing_tensors_and_unknown_layers_are_named() {
    let dir = cases()
        .into_iter()
        .find(|d| d.ends_with("zoo-f64"))
        .unwrap();
    let (spec, t, _) = read_model_dir(&dir).unwrap();
    let mut t2 = t.clone();
    t2.remove("1.running_var");
    let e = Cnn::from_spec(&spec, &t2).unwrap_err().to_string();
    assert_eq!(e, "the model has no tensor '1.running_var'");
    let (cnn, folds) = Cnn::from_spec(&spec, &t).unwrap();
    let (mut g, _) = read_tensors(&dir.join("gradient.safetensors")).unwrap();
    g.remove("11.weight");
    let e = CnnGradient::from_tensors(&cnn, &folds, &g)
        .unwrap_err()
        .to_string();
    assert_eq!(e, "the gradient has no tensor '11.weight'");
    let text = std::fs::read_to_string(dir.join("model.json"))
        .unwrap()
        .replacen("\"GELU\"", "\"Dropout\"", 1);
    let e = gradleak::model::cnn::ModelSpec::from_json(&text)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("unknown layer 'Dropout (layer 5)'"), "{e}");
    assert!(!e.contains('\n'));
}
