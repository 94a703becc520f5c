#![allow(clippy::needless_range_loop)] // index loops mirror the formulas of a generator
//! Write a large two-layer tanh model and its cross-entropy gradient as f32
//! safetensors without holding either in memory (for the tensor attack's memory
//! measurement, docs/EXPERIMENTS.tensor.md). Rows of W are regenerated from a
//! per-row seed in each pass.
//!
//!     cargo run --release --example big_gradient -- DIR [m] [d] [B] [K]

use std::io::{BufWriter, Write};

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

fn row(j: usize, d: usize) -> (Vec<f32>, f32) {
    let mut r = ChaCha8Rng::seed_from_u64(0xb16 ^ (j as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let bound = 1.0 / (d as f64).sqrt();
    let w: Vec<f32> = (0..d)
        .map(|_| (r.random::<f64>() * 2.0 - 1.0) as f32 * bound as f32)
        .collect();
    let b = (r.random::<f64>() * 2.0 - 1.0) as f32 * bound as f32;
    (w, b)
}

/// w . x + b of an f32 row on an input, summed in f64 (both passes compute it so).
fn pre_activation(w: &[f32], b: f32, x: &[f64]) -> f64 {
    w.iter()
        .zip(x)
        .map(|(&wv, &xv)| wv as f64 * xv)
        .sum::<f64>()
        + b as f64
}

fn header(entries: &[(&str, Vec<usize>)]) -> Vec<u8> {
    let mut off = 0usize;
    let mut parts = Vec::new();
    for (name, shape) in entries {
        let n: usize = shape.iter().product::<usize>() * 4;
        let s: Vec<String> = shape.iter().map(|v| v.to_string()).collect();
        parts.push(format!(
            "\"{name}\":{{\"dtype\":\"F32\",\"shape\":[{}],\"data_offsets\":[{off},{}]}}",
            s.join(","),
            off + n
        ));
        off += n;
    }
    let mut h = format!("{{{}}}", parts.join(",")).into_bytes();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out
}

fn put(w: &mut impl Write, v: &[f32]) {
    for x in v {
        w.write_all(&x.to_le_bytes()).unwrap();
    }
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(&a[1]);
    let arg = |i: usize, dflt: usize| a.get(i).map_or(dflt, |s| s.parse().unwrap());
    let (m, d, bsz, k) = (arg(2, 100_000), arg(3, 3072), arg(4, 8), arg(5, 10));
    std::fs::create_dir_all(&dir).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let x: Vec<Vec<f64>> = (0..bsz)
        .map(|_| (0..d).map(|_| StandardNormal.sample(&mut rng)).collect())
        .collect();
    let labels: Vec<usize> = (0..bsz).map(|_| rng.random_range(0..k)).collect();
    let ab = 1.0 / (m as f64).sqrt();
    let amat: Vec<Vec<f64>> = (0..k)
        .map(|_| {
            (0..m)
                .map(|_| (rng.random::<f64>() * 2.0 - 1.0) * ab)
                .collect()
        })
        .collect();
    let c: Vec<f64> = (0..k)
        .map(|_| (rng.random::<f64>() * 2.0 - 1.0) * ab)
        .collect();
    // pass 1: outputs (computed in f32 weights, f64 sums)
    let mut out = vec![c.clone(); bsz];
    for j in 0..m {
        let (w, b) = row(j, d);
        for i in 0..bsz {
            let zz = pre_activation(&w, b, &x[i]);
            let h = zz.tanh();
            for o in 0..k {
                out[i][o] += amat[o][j] * h;
            }
        }
    }
    let resid: Vec<Vec<f64>> = (0..bsz)
        .map(|i| {
            let mx = out[i].iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = out[i].iter().map(|v| (v - mx).exp()).collect();
            let s: f64 = e.iter().sum();
            (0..k)
                .map(|o| (e[o] / s - f64::from(o == labels[i])) / bsz as f64)
                .collect()
        })
        .collect();
    let names = [
        ("0.weight", vec![m, d]),
        ("0.bias", vec![m]),
        ("2.weight", vec![k, m]),
        ("2.bias", vec![k]),
    ];
    let mut mf = BufWriter::new(std::fs::File::create(dir.join("model.safetensors")).unwrap());
    let mut gf = BufWriter::new(std::fs::File::create(dir.join("gradient.safetensors")).unwrap());
    mf.write_all(&header(&names)).unwrap();
    gf.write_all(&header(&names)).unwrap();
    let mut gb = vec![0f32; m];
    let mut hsum = vec![vec![0f64; m]; k]; // dL/dA_oj = sum_i r_io tanh(z_ij)
    for j in 0..m {
        let (w, b) = row(j, d);
        put(&mut mf, &w);
        let mut g = vec![0f64; d];
        let mut gbj = 0.0;
        for i in 0..bsz {
            let zz = pre_activation(&w, b, &x[i]);
            let t = zz.tanh();
            let q: f64 = (0..k).map(|o| amat[o][j] * resid[i][o]).sum();
            let delta = q * (1.0 - t * t);
            for (gv, xv) in g.iter_mut().zip(&x[i]) {
                *gv += delta * xv;
            }
            gbj += delta;
            for o in 0..k {
                hsum[o][j] += resid[i][o] * t;
            }
        }
        gb[j] = gbj as f32;
        put(&mut gf, &g.iter().map(|&v| v as f32).collect::<Vec<_>>());
    }
    put(&mut mf, &(0..m).map(|j| row(j, d).1).collect::<Vec<_>>());
    put(&mut gf, &gb);
    for o in 0..k {
        put(
            &mut mf,
            &amat[o].iter().map(|&v| v as f32).collect::<Vec<_>>(),
        );
        put(
            &mut gf,
            &hsum[o].iter().map(|&v| v as f32).collect::<Vec<_>>(),
        );
    }
    put(&mut mf, &c.iter().map(|&v| v as f32).collect::<Vec<_>>());
    let gc: Vec<f32> = (0..k)
        .map(|o| (0..bsz).map(|i| resid[i][o]).sum::<f64>() as f32)
        .collect();
    put(&mut gf, &gc);
    mf.flush().unwrap();
    gf.flush().unwrap();
    let flat: Vec<f64> = x.iter().flatten().copied().collect();
    let xm = faer::Mat::from_fn(bsz, d, |i, j| flat[i * d + j]);
    gradleak::io::npy::write_matrix(dir.join("truth.npy"), &xm).unwrap();
    eprintln!(
        "wrote {} (m = {m}, d = {d}, B = {bsz}, K = {k})",
        dir.display()
    );
}
