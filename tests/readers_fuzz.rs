//! Every reader on arbitrary and mutated bytes (truncations, bit flips, lying header
//! lengths, dtype and shape lies): an error value or a valid result, never a panic and
//! never an allocation out of proportion to the file (a counting allocator records the
//! largest single request of each case). Seeded, so a failure names a reproducible
//! case; the command line gets the same treatment in `cli.rs`.

use std::path::{Path, PathBuf};

use gradleak::io::npy;
use gradleak::io::safetensors::{TensorFile, read_batch, read_gradient, read_model};
use gradleak::model::Activation;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The system allocator, recording the largest single request on this thread.
struct Counting;

thread_local! {
    static LARGEST: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let _ = LARGEST.try_with(|c| c.set(c.get().max(layout.size())));
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        let _ = LARGEST.try_with(|c| c.set(c.get().max(new)));
        unsafe { std::alloc::System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Largest allocation a reader may make for a file of `len` bytes: the file itself as
/// f64 values (8x an f32 file) and its copy into a matrix, plus a fixed margin.
fn allocation_cap(len: usize) -> usize {
    16 * len + (1 << 20)
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/pytorch/digits-b1-tanh-ce")
        .join(name)
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gradleak-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

/// One mutation of `bytes`, chosen by `rng`.
fn mutate(bytes: &[u8], rng: &mut ChaCha8Rng) -> Vec<u8> {
    let mut b = bytes.to_vec();
    match rng.random_range(0..6) {
        // truncate anywhere
        0 => b.truncate(rng.random_range(0..b.len())),
        // flip a few bits anywhere
        1 => {
            for _ in 0..rng.random_range(1..8) {
                let i = rng.random_range(0..b.len());
                b[i] ^= 1 << rng.random_range(0..8);
            }
        }
        // flip bits in the header (where lengths, dtypes and shapes live)
        2 => {
            let n = b.len().min(400);
            for _ in 0..rng.random_range(1..4) {
                let i = rng.random_range(0..n);
                b[i] ^= 1 << rng.random_range(0..8);
            }
        }
        // a lying length prefix (safetensors) or header (npy): huge, zero or off by a little
        3 => {
            let v: u64 = match rng.random_range(0..3) {
                0 => u64::MAX - rng.random_range(0..1000),
                1 => 0,
                _ => u64::from_le_bytes(b[..8].try_into().unwrap())
                    .wrapping_add(rng.random_range(0..64))
                    .wrapping_sub(32),
            };
            b[..8].copy_from_slice(&v.to_le_bytes());
        }
        // replace digits in the header: shapes and offsets lie
        4 => {
            let n = b.len().min(400);
            for c in b.iter_mut().take(n) {
                if c.is_ascii_digit() && rng.random_range(0..8) == 0 {
                    *c = b'0' + rng.random_range(0..10) as u8;
                }
            }
        }
        // arbitrary bytes
        _ => {
            let n = rng.random_range(0..256);
            b = (0..n).map(|_| rng.random_range(0..=255u8)).collect();
        }
    }
    b
}

/// Cases per reader: cheap in a debug build, enough to hit every branch above often.
const CASES: u64 = 300;

fn each_case(src: &[u8], name: &str, mut check: impl FnMut(&Path)) {
    let path = tmp(name);
    for seed in 0..CASES {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let bytes = mutate(src, &mut rng);
        std::fs::write(&path, &bytes).unwrap();
        LARGEST.with(|c| c.set(0));
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&path)));
        assert!(r.is_ok(), "{name}: case seed {seed} panicked");
        let largest = LARGEST.with(|c| c.get());
        assert!(
            largest <= allocation_cap(src.len().max(bytes.len())),
            "{name}: case seed {seed} allocated {largest} bytes at once for a {}-byte file",
            bytes.len()
        );
    }
}

#[test]
fn safetensors_readers_never_panic() {
    let model_bytes = std::fs::read(fixture("model.safetensors")).unwrap();
    let grad_bytes = std::fs::read(fixture("gradient.safetensors")).unwrap();
    let batch_bytes = std::fs::read(fixture("batch.safetensors")).unwrap();
    let (model, _) = read_model(fixture("model.safetensors"), Activation::Tanh).unwrap();
    each_case(&model_bytes, "m.safetensors", |p| {
        if let Ok(f) = TensorFile::open(p) {
            let names: Vec<String> = f.names().map(String::from).collect();
            for n in &names {
                let _ = f.values(n);
                let _ = f.matrix(n);
                let _ = f.mapped(n).and_then(|m| m.to_mat());
            }
            let _ = f.layer_indices();
            let _ = f.common_dtype();
        }
        let _ = read_model(p, Activation::Tanh);
    });
    each_case(&grad_bytes, "g.safetensors", |p| {
        let _ = read_gradient(p, &model);
    });
    each_case(&batch_bytes, "b.safetensors", |p| {
        let _ = read_batch(p);
    });
}

#[test]
fn npy_reader_never_panics() {
    let src = tmp("src.npy");
    let m = faer::Mat::from_fn(5, 3, |i, j| (i * 3 + j) as f64);
    npy::write_matrix(&src, &m).unwrap();
    let bytes = std::fs::read(&src).unwrap();
    assert_eq!(npy::read_matrix(&src).unwrap(), m);
    each_case(&bytes, "x.npy", |p| {
        let _ = npy::read_matrix(p);
    });
}
