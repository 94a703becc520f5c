//! Sequences from the solved pairs (docs/DESIGN.md, "Text: BERT"): the context of a true
//! pair i is its sequence's attention, so with z_q = 1 for the pairs q of that sequence
//! and 0 otherwise, every head h satisfies
//!
//! ```text
//! sum_q z_q exp(q^h_i . k^h_q / sqrt(d_h)) (v^h_q - c^h_i) = 0,
//! ```
//!
//! d homogeneous equations, linear in z over the solved pairs: z spans the null space of
//! A_i (d x Q), read as the eigenvector of A_i^T A_i of the smallest eigenvalue, scaled to
//! z_i = 1 and rounded.

use faer::{Mat, Side};

use super::bert::Bert;
use super::context::Solved;

/// A solved z is kept when every entry is within this of 0 or 1 (the midpoint would be
/// 0.5; a true pair's context is solved to the floor, so its z is near exact).
pub const ROUND_TOL: f64 = 0.25;

/// One pair's grouping evidence.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Grouping {
    pub position: usize,
    pub token: u32,
    /// Largest |z_q - round(z_q)|.
    pub rounding: f64,
    /// sqrt(lambda_2 / lambda_1) of A_i^T A_i: how well the null vector is separated.
    pub gap: f64,
    /// The group is a sequence: positions 0..n-1, one token each.
    pub valid: bool,
}

/// The distinct sequences the solved pairs' groups make, and each pair's evidence.
pub(crate) fn sequences(model: &Bert, solved: &[&Solved]) -> (Vec<Vec<u32>>, Vec<Grouping>) {
    let d = model.hidden();
    let heads = model.cfg.heads;
    let hd = d / heads;
    let scale = 1.0 / (hd as f64).sqrt();
    let n = solved.len();
    let pairs: Vec<(usize, u32)> = solved.iter().map(|s| (s.position, s.token)).collect();
    let xa = model.input_of(&pairs);
    let qkv = model.qkv(xa.subcols(0, d));
    let mut out: Vec<Vec<u32>> = Vec::new();
    let mut evidence = Vec::with_capacity(n);
    for (i, s) in solved.iter().enumerate() {
        // A_i: column q = [e^h_q (v^h_q - c^h_i)]_h
        let mut a = Mat::<f64>::zeros(d, n);
        for h in 0..heads {
            let sc: Vec<f64> = (0..n)
                .map(|q| {
                    (0..hd)
                        .map(|j| qkv[(i, h * hd + j)] * qkv[(q, d + h * hd + j)])
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let mx = sc.iter().copied().fold(f64::MIN, f64::max);
            for q in 0..n {
                let e = (sc[q] - mx).exp();
                for j in 0..hd {
                    a[(h * hd + j, q)] = e * (qkv[(q, 2 * d + h * hd + j)] - s.c[h * hd + j]);
                }
            }
        }
        let gram = a.transpose() * &a;
        let Ok(eig) = gram.self_adjoint_eigen(Side::Lower) else {
            continue;
        };
        let lam: Vec<f64> = eig.S().column_vector().iter().copied().collect();
        let gap = if n > 1 {
            (lam[1] / lam[0].max(f64::MIN_POSITIVE)).sqrt()
        } else {
            f64::INFINITY
        };
        let u = eig.U();
        let zi = u[(i, 0)];
        let z: Vec<f64> = (0..n).map(|q| u[(q, 0)] / zi).collect();
        let rounding = z.iter().map(|v| (v - v.round()).abs()).fold(0.0, f64::max);
        let members: Vec<usize> = (0..n).filter(|&q| z[q] > 0.5).collect();
        let mut seq: Vec<Option<u32>> = Vec::new();
        let mut valid = rounding <= ROUND_TOL && z.iter().all(|&v| v > -0.5 && v < 1.5);
        for &q in &members {
            let (p, t) = pairs[q];
            if seq.len() <= p {
                seq.resize(p + 1, None);
            }
            if seq[p].replace(t).is_some() {
                valid = false;
            }
        }
        valid &= seq.iter().all(Option::is_some);
        if valid {
            let ids: Vec<u32> = seq.into_iter().flatten().collect();
            if !out.contains(&ids) {
                out.push(ids);
            }
        }
        evidence.push(Grouping {
            position: s.position,
            token: s.token,
            rounding,
            gap,
            valid,
        });
    }
    (out, evidence)
}
