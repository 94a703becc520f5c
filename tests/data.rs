//! Data specs on the real files in ../shared/data.

use std::path::Path;

use gradleak::data::DataSpec;
use rand::SeedableRng;

fn rng() -> rand_chacha::ChaCha8Rng {
    rand_chacha::ChaCha8Rng::seed_from_u64(3)
}

fn shared(p: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data")
        .join(p)
        .display()
        .to_string()
}

#[test]
fn photos_give_deterministic_rgb_crops_in_unit_range() {
    let spec: DataSpec = format!("images:{}:16", shared("images")).parse().unwrap();
    let a = spec.load(0, &mut rng()).unwrap();
    let b = spec.load(0, &mut rng()).unwrap();
    assert_eq!(a.x, b.x);
    assert_eq!(a.dim(), 16 * 16 * 3);
    // 4 photos, 3 scales: at least 64 crops so that B = 64 batches exist
    assert!(a.len() >= 64, "{} crops", a.len());
    let s = a.prior_stats();
    assert!(s.min >= 0.0 && s.max <= 1.0 && s.std > 0.1, "{s:?}");
    // crops differ from each other (no duplicated tiles)
    for i in 1..a.len() {
        let diff: f64 = (0..a.dim())
            .map(|j| (a.x[(i, j)] - a.x[(0, j)]).abs())
            .sum();
        assert!(diff > 1.0, "crop {i} equals crop 0");
    }
    assert_eq!(a.image.unwrap().channels, 3);
}

#[test]
fn csv_is_standardised_per_column_and_labels_are_read() {
    let spec: DataSpec = format!("csv:{}", shared("diabetes_data_raw.csv.gz"))
        .parse()
        .unwrap();
    let d = spec.load(0, &mut rng()).unwrap();
    assert_eq!(d.x.shape(), (442, 10));
    for j in 0..10 {
        let mean: f64 = (0..442).map(|i| d.x[(i, j)]).sum::<f64>() / 442.0;
        let var: f64 = (0..442).map(|i| (d.x[(i, j)] - mean).powi(2)).sum::<f64>() / 442.0;
        assert!(
            mean.abs() < 1e-12 && (var - 1.0).abs() < 1e-12,
            "column {j}: {mean} {var}"
        );
    }
    // column 1 is sex (1 or 2): usable as a label only after it is made 0-based, so
    // it is rejected here as "2 classes" would silently be 3
    let spec: DataSpec = format!("csv:{}:label=1", shared("diabetes_data_raw.csv.gz"))
        .parse()
        .unwrap();
    let d = spec.load(0, &mut rng()).unwrap();
    assert_eq!(d.dim(), 9);
    assert_eq!(d.classes, Some(3));
    let spec: DataSpec = format!("csv:{}:label=age", shared("diabetes_data_raw.csv.gz"))
        .parse()
        .unwrap();
    assert!(spec.load(0, &mut rng()).is_err());
}

#[test]
fn gaussian_has_variance_one_over_d() {
    let spec: DataSpec = "gaussian:50".parse().unwrap();
    let d = spec.load(400, &mut rng()).unwrap();
    let s = d.prior_stats();
    // 20000 draws: the sample variance of N(0, 1/50) has sd 0.02 * sqrt(2/20000) = 2e-4
    assert!(
        (s.std * s.std - 0.02).abs() < 5.0 * 2e-4,
        "{}",
        s.std * s.std
    );
    assert!((s.sq_norm - 1.0).abs() < 0.05);
}

#[test]
fn npy_rows_are_the_data() {
    let dir = std::env::temp_dir().join(format!("gradleak-data-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let m = faer::Mat::from_fn(5, 3, |i, j| (i * 3 + j) as f64);
    let p = dir.join("x.npy");
    gradleak::io::npy::write_matrix(&p, &m).unwrap();
    let d: DataSpec = format!("npy:{}", p.display()).parse().unwrap();
    let ds = d.load(0, &mut rng()).unwrap();
    assert_eq!(ds.x, m);
    let b = ds.draw_batch(5, &mut rng()).unwrap();
    let mut idx = b.indices.clone();
    idx.sort();
    assert_eq!(idx, vec![0, 1, 2, 3, 4]);
    let _ = std::fs::remove_dir_all(&dir);
}
