//! The alternating-projection polish for piecewise-linear activations (ReLU, leaky
//! ReLU): from an activation pattern to a stable pattern and its signal coefficients
//! (docs/DESIGN.md, "Piecewise-linear activations"). Used by the pattern search
//! (`pattern.rs`) and its seeding rounds (`pattern_rounds.rs`).

// `!(x > 0.0)` is deliberate throughout: it also rejects NaN.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

use faer::linalg::solvers::{Solve, SolveLstsq};
use faer::{Col, Mat};

use super::floor::{EVAL_FACTOR, RoundingScale};
use super::signal::{Neurons, SignalModel};
use super::zero::{Zero, best_residual_of};
use crate::attack::evidence::SearchStats;
use crate::attack::subspace::Subspace;
use crate::model::{Activation, LEAKY_SLOPE};

/// Alternating-projection sweeps per start (a correct pattern is stable after a few).
pub const MAX_SWEEPS: usize = 30;
/// Patterns differing on fewer than this share of neurons are the same sample.
pub const SAME_PATTERN: f64 = 1e-3;

/// The two slopes of a piecewise-linear activation.
pub fn slopes(act: Activation) -> Option<(f64, f64)> {
    match act {
        Activation::Relu => Some((0.0, 1.0)),
        Activation::LeakyRelu => Some((LEAKY_SLOPE, 1.0)),
        _ => None,
    }
}

/// Alternating projections on `neurons` from pattern `pat` (one entry per neuron of
/// `neurons`), until F reaches `stop` or the pattern is stable; Some((pattern, unit r,
/// F)) when F is then under `floor`.
///
/// `stop` is the lowest rounding floor any sample can have ([`RoundingScale::floor`] at
/// amplification 0), not the global floor: on an ill-conditioned float32 gradient the
/// global floor 200 eps kappa is far above the F of a pattern a few neurons off the truth
/// (PyTorch photos B = 64: floor 4e-2, such patterns 3e-5-9e-3, the true ones <= 1.4e-6),
/// and stopping there left 61 of 64 seeds a few neurons short of a sample, all then
/// rejected by their own floor. The true pattern is a fixed point of the sweep, so
/// sweeping on costs it nothing but the check.
pub(crate) fn alternate(
    a: &Mat<f64>,
    neurons: &Neurons,
    mut pat: Vec<bool>,
    (lo, hi): (f64, f64),
    (stop, floor): (f64, f64),
    stats: &mut SearchStats,
) -> Option<(Vec<bool>, Col<f64>, f64)> {
    let n = neurons.len();
    let mid = 0.5 * (lo + hi);
    for _ in 0..MAX_SWEEPS {
        stats.lm_iterations += 1;
        let mmat = Mat::from_fn(
            n,
            a.nrows(),
            |i, k| if pat[i] { hi } else { lo } * a[(k, neurons.rows[i])],
        );
        let (f, r) = best_residual_of(&mmat, neurons)?;
        if f <= stop.min(floor) {
            return Some((pat, r, f));
        }
        let ar: Vec<f64> = neurons
            .rows
            .iter()
            .map(|&j| (0..a.nrows()).map(|k| a[(k, j)] * r[k]).sum())
            .collect();
        let s = &mmat * &r;
        let y = &s - neurons.perp(&s);
        let gamma = (y.transpose() * &s) / s.squared_norm_l2().max(f64::MIN_POSITIVE);
        let new: Vec<bool> = (0..n)
            .map(|i| {
                if ar[i].abs() < 1e-300 {
                    pat[i]
                } else {
                    y[i] / (gamma * ar[i]) > mid
                }
            })
            .collect();
        if new == pat {
            return (f <= floor).then_some((pat, r, f));
        }
        pat = new;
    }
    None
}

/// Sweeps of the realisable alternation ([`Alternation::run_in`]).
pub const REALISE_SWEEPS: usize = 30;
/// Newton steps of one logistic fit in [`separate`].
const SEPARATE_STEPS: usize = 10;

/// The u whose hyperplanes sign(Z u) best give `labels`: Newton on the weighted logistic
/// loss sum_j w_j log(1 + exp(-y_j z_j)), z = Z u, with a ridge towards `u0` (scaled so
/// that the median |z| is 1; only the signs of z matter).
fn separate(zb: &Mat<f64>, labels: &[bool], weights: &[f64], u0: &Col<f64>) -> Col<f64> {
    let (m, k) = zb.shape();
    let z0 = zb * u0;
    let mut az: Vec<f64> = z0.iter().map(|v| v.abs()).collect();
    az.sort_by(f64::total_cmp);
    let med = az[m / 2];
    if !(med > 0.0) {
        return u0.clone();
    }
    let u0 = u0 * (1.0 / med);
    let wsum: f64 = weights.iter().sum();
    let lambda = 1e-3 * wsum.max(1.0) / k as f64;
    let mut u = u0.clone();
    for _ in 0..SEPARATE_STEPS {
        let z = zb * &u;
        let mut g = (&u - &u0) * lambda;
        let mut h = Mat::<f64>::identity(k, k) * lambda;
        let mut wz = Mat::<f64>::zeros(m, k);
        for j in 0..m {
            if weights[j] == 0.0 {
                continue;
            }
            let y = if labels[j] { 1.0 } else { -1.0 };
            let t = y * z[j];
            // sigma(-t), computed without overflow
            let sm = if t > 0.0 {
                (-t).exp() / (1.0 + (-t).exp())
            } else {
                1.0 / (1.0 + t.exp())
            };
            let gj = -weights[j] * y * sm;
            let hj = weights[j] * sm * (1.0 - sm);
            for q in 0..k {
                g[q] += gj * zb[(j, q)];
                wz[(j, q)] = hj.sqrt() * zb[(j, q)];
            }
        }
        h += wz.transpose() * &wz;
        let step = h.partial_piv_lu().solve(&g);
        if !step.iter().all(|v| v.is_finite()) {
            break;
        }
        u -= &step;
        if step.norm_l2() <= 1e-10 * u.norm_l2() {
            break;
        }
    }
    u
}

/// A found activation pattern: (pattern on every neuron, unit r, F).
pub(crate) type Found = (Vec<bool>, Col<f64>, f64);

/// What the alternation from one start reads (shared, read-only).
pub(crate) struct Alternation<'a> {
    pub a: &'a Mat<f64>,
    pub q: &'a Mat<f64>,
    pub small: &'a Neurons,
    pub all: &'a Neurons,
    pub slopes: (f64, f64),
    pub floor: f64,
    pub floor_small: f64,
    /// Where a sweep may stop early: the lowest per-sample floor (see [`alternate`]).
    pub stop: f64,
    pub model: &'a SignalModel,
    /// Per-sample rounding floors (docs/DESIGN.md, "Certificate"): a pattern is kept only
    /// under its own floor, so a wrong pattern under the global floor takes no slot.
    pub scale: &'a RoundingScale,
    pub sub: &'a Subspace,
}

impl Alternation<'_> {
    /// Alternate on the subsample from the pattern of c (fewer hyperplanes: row-point
    /// patterns agree more), then lift the signal to every neuron through its
    /// coordinates in Q and finish there. Returns the exact pattern if any, and the sweeps.
    pub(crate) fn run_from(&self, c: &Col<f64>) -> (Option<Found>, usize) {
        let (lo, hi) = self.slopes;
        let mid = 0.5 * (lo + hi);
        let a = self.a;
        let small = self.small;
        let mut stats = SearchStats::default();
        let zs = self.model.z(c, &small.rows);
        let pat0: Vec<bool> = zs.iter().map(|&z| z > 0.0).collect();
        let Some((ps, rs, _)) = alternate(
            a,
            small,
            pat0,
            self.slopes,
            (self.stop, self.floor_small),
            &mut stats,
        ) else {
            return (None, stats.lm_iterations);
        };
        let ss = Col::from_fn(ps.len(), |i| {
            let j = small.rows[i];
            (if ps[i] { hi } else { lo }) * (0..a.nrows()).map(|k| a[(k, j)] * rs[k]).sum::<f64>()
        });
        let b = self.q.ncols();
        let qs = Mat::from_fn(small.len(), b, |i, k| self.q[(small.rows[i], k)]);
        let coef = qs.qr().solve_lstsq(&ss);
        let y = self.q * &coef;
        let ar = a.transpose() * &rs;
        let pat_full: Vec<bool> = (0..self.q.nrows())
            .map(|j| {
                if ar[j].abs() < 1e-300 {
                    false
                } else {
                    y[j] / ar[j] > mid
                }
            })
            .collect();
        let res = alternate(
            a,
            self.all,
            pat_full,
            self.slopes,
            (self.stop, self.floor),
            &mut stats,
        );
        (res, stats.lm_iterations)
    }

    /// The realisable alternation: from c in the span of `basis` (B x k, orthonormal
    /// columns; the row space of the missing samples' c), each sweep's pattern is
    /// replaced by sign(P basis u) for the u whose hyperplanes best separate it
    /// (weighted logistic fit, [`separate`]), so every pattern tried is one an input in
    /// that space has. Finishes with [`alternate`] on every neuron (same checks).
    pub(crate) fn run_in(&self, c: &Col<f64>, basis: &Mat<f64>) -> (Option<Found>, usize) {
        let (lo, hi) = self.slopes;
        let mid = 0.5 * (lo + hi);
        let a = self.a;
        let all = self.all;
        let m = all.len();
        let k = basis.ncols();
        let mut stats = SearchStats::default();
        // z = P c is linear in c: column i of zb is P basis_i
        let mut zb = Mat::<f64>::zeros(m, k);
        for i in 0..k {
            let zi = self.model.z(&basis.col(i).to_owned(), &all.rows);
            for (j, v) in zi.into_iter().enumerate() {
                zb[(j, i)] = v;
            }
        }
        let mut u = basis.transpose() * c;
        let mut pat: Vec<bool> = (&zb * &u).iter().map(|&z| z > 0.0).collect();
        for _ in 0..REALISE_SWEEPS {
            stats.lm_iterations += 1;
            let mmat = Mat::from_fn(m, a.nrows(), |i, q| {
                (if pat[i] { hi } else { lo }) * a[(q, all.rows[i])]
            });
            let Some((f, r)) = best_residual_of(&mmat, all) else {
                break;
            };
            if f <= self.stop.min(self.floor) {
                break;
            }
            let ar = a.transpose() * &r;
            let sv = &mmat * &r;
            let y = &sv - all.perp(&sv);
            let gamma = (y.transpose() * &sv) / sv.squared_norm_l2().max(f64::MIN_POSITIVE);
            let arn = ar.norm_l2() / (m as f64).sqrt();
            let (labels, weights): (Vec<bool>, Vec<f64>) = (0..m)
                .map(|j| {
                    let arj = ar[all.rows[j]];
                    if !(arj.abs() > 1e-6 * arn) {
                        (pat[j], 0.0)
                    } else {
                        let rho = y[j] / (gamma * arj);
                        (rho > mid, ((rho - mid).abs() / (hi - lo)).min(1.0))
                    }
                })
                .unzip();
            u = separate(&zb, &labels, &weights, &u);
            let new: Vec<bool> = (&zb * &u).iter().map(|&z| z > 0.0).collect();
            if new == pat {
                break;
            }
            pat = new;
        }
        let res = alternate(
            a,
            all,
            pat,
            self.slopes,
            (self.stop, self.floor),
            &mut stats,
        );
        (res, stats.lm_iterations)
    }

    /// F of a found pattern is under its own rounding floor SAMPLE_FACTOR u (1 + amp) plus
    /// the f64 evaluation's EVAL_FACTOR u_64 (1 + amp), and under the global floor.
    pub(crate) fn own_floor(&self, pat: &[bool], r: &Col<f64>, f: f64) -> bool {
        let s = self.signal(pat, r);
        let ns = s.norm_l2();
        if !(ns > 0.0) {
            return false;
        }
        let amp = self.scale.amplification(self.sub, &(s * (1.0 / ns)));
        let eval = EVAL_FACTOR * (f64::EPSILON / 2.0) * (1.0 + amp);
        f <= (self.scale.floor(amp) + eval).min(self.floor)
    }

    /// A pattern with no active neuron (or, for ReLU, fewer than B) carries no sample.
    pub(crate) fn degenerate(&self, pat: &[bool]) -> bool {
        let active = pat.iter().filter(|&&p| p).count();
        active == 0 || (self.slopes.0 == 0.0 && active < self.q.ncols())
    }

    /// The pattern was found before (differs on at most `SAME_PATTERN` of the neurons).
    pub(crate) fn duplicate(&self, found: &[Found], pat: &[bool]) -> bool {
        let m = pat.len();
        found.iter().any(|(p, _, _)| {
            p.iter().zip(pat).filter(|(a, b)| a != b).count() as f64 <= SAME_PATTERN * m as f64
        })
    }

    /// The signal p (.) (A^T r) on every neuron.
    pub(crate) fn signal(&self, pat: &[bool], r: &Col<f64>) -> Col<f64> {
        let (lo, hi) = self.slopes;
        let a = self.a;
        Col::from_fn(pat.len(), |j| {
            (if pat[j] { hi } else { lo }) * (0..a.nrows()).map(|k| a[(k, j)] * r[k]).sum::<f64>()
        })
    }

    /// Inputs of the found samples when some patterns are missing: the found signals
    /// plus a basis of what is left of the column space, (I - P_f) GV, stand in for S.
    /// The missing signals' overlap with the found ones then biases each c_i, so these
    /// samples are approximate (never marked exact) but consistent with their patterns.
    pub(crate) fn partial_inputs(
        &self,
        sub: &Subspace,
        gv: &Mat<f64>,
        found: &[Found],
    ) -> Vec<Zero> {
        if found.is_empty() {
            return Vec::new();
        }
        let b = gv.ncols();
        let rest = deflate(self, gv, found);
        let Ok(svd) = rest.thin_svd() else {
            return Vec::new();
        };
        let u = svd.U();
        let mut extra = Mat::zeros(gv.nrows(), b - found.len());
        for i in 0..b - found.len() {
            extra.col_mut(i).copy_from(u.col(i));
        }
        let mut zeros = self.inputs_with(sub, gv, found, &extra);
        for z in &mut zeros {
            z.accepted = false;
        }
        zeros
    }

    /// Inputs from all B signals: G~ V = S diag(alpha) C^T, so diag(alpha) C^T = S^+ G~ V;
    /// each c_i is normalised by its bias coordinate and must reproduce its own pattern.
    pub(crate) fn inputs(&self, sub: &Subspace, gv: &Mat<f64>, found: &[Found]) -> Vec<Zero> {
        self.inputs_with(sub, gv, found, &Mat::zeros(gv.nrows(), 0))
    }

    /// As [`Self::inputs`], with `extra` columns standing in for signals not found.
    fn inputs_with(
        &self,
        sub: &Subspace,
        gv: &Mat<f64>,
        found: &[Found],
        extra: &Mat<f64>,
    ) -> Vec<Zero> {
        let (m, b) = gv.shape();
        let nf = found.len();
        let mut s = Mat::zeros(m, nf + extra.ncols());
        for (i, (p, r, _)) in found.iter().enumerate() {
            s.col_mut(i).copy_from(self.signal(p, r));
        }
        for i in 0..extra.ncols() {
            s.col_mut(nf + i).copy_from(extra.col(i));
        }
        let sts = s.transpose() * &s;
        let rhs = s.transpose() * gv;
        let w = sts.partial_piv_lu().solve(&rhs); // B x B, row i = alpha_i c_i^T
        let vl = Col::from_fn(b, |k| sub.v[(sub.v.nrows() - 1, k)]);
        let rows: Vec<usize> = (0..m).collect();
        let mut zeros = Vec::new();
        for (i, (p, r, f)) in found.iter().enumerate() {
            let row = Col::from_fn(b, |k| w[(i, k)]);
            let scale = row.transpose() * &vl;
            if !(scale.abs() > 0.0) {
                continue;
            }
            let c = &row * (1.0 / scale);
            let zc = self.model.z(&c, &rows);
            let agree = zc.iter().zip(p).filter(|(z, p)| (**z > 0.0) == **p).count();
            zeros.push(Zero {
                c,
                r: r.clone(),
                residual: *f,
                accepted: *f <= self.floor && agree == m && found.len() == b,
            });
        }
        zeros
    }
}

/// (I - P_f) GV: the projected gradient with the found signals' directions removed;
/// its rows mix only the missing samples' coordinates.
pub(crate) fn deflate(alt: &Alternation<'_>, gv: &Mat<f64>, found: &[Found]) -> Mat<f64> {
    if found.is_empty() {
        return gv.clone();
    }
    let mut s = Mat::zeros(gv.nrows(), found.len());
    for (i, (p, r, _)) in found.iter().enumerate() {
        s.col_mut(i).copy_from(alt.signal(p, r));
    }
    let qf = s.qr().compute_thin_Q();
    let proj = qf.transpose() * gv;
    gv - &qf * &proj
}

#[cfg(test)]
mod tests {
    use super::super::signal::{Neurons, SignalModel};
    use super::super::testing::case;
    use super::*;
    use crate::attack::subspace;

    /// A global floor above the F of a nearly right pattern (as 200 eps kappa is on an
    /// ill-conditioned float32 gradient) does not stop the sweep: from the true pattern
    /// with neurons flipped it sweeps on to the true pattern, under the tight `stop`.
    #[test]
    fn sweeps_past_a_loose_floor_to_the_true_pattern() {
        let (view, x, _) = case(Activation::Relu, 1, 5, 3);
        let sub = subspace::estimate(&view, &Default::default()).unwrap();
        let model = SignalModel::new(&view, &sub).unwrap();
        let a = model.output_weights().unwrap().clone();
        let all = Neurons::all(&sub.q);
        let rows: Vec<usize> = (0..model.width()).collect();
        let stop = RoundingScale::new(&view).unwrap().floor(0.0);
        for i in 0..x.nrows() {
            let xi: Vec<f64> = (0..x.ncols()).map(|j| x[(i, j)]).collect();
            let truth: Vec<bool> = model
                .z(&model.coords.c_of_x(&xi), &rows)
                .iter()
                .map(|&z| z > 0.0)
                .collect();
            let mut start = truth.clone();
            for j in (0..rows.len()).step_by(40) {
                start[j] = !start[j];
            }
            let mut stats = SearchStats::default();
            let (pat, _, f) = alternate(&a, &all, start, (0.0, 1.0), (stop, 1.0), &mut stats)
                .expect("a pattern under the loose floor");
            assert!(
                pat == truth,
                "sample {i}: stopped off the truth at F = {f:e}"
            );
            assert!(f <= stop, "sample {i}: F = {f:e} above {stop:e}");
        }
    }

    /// `separate` nearly recovers a separable labelling: labels from sign(Z u*), started
    /// 30 % off u*, it returns a u with the same signs on all but 1 % of the rows (the
    /// ridge towards the start leaves rows at the margin), a fifth of the start's errors.
    #[test]
    fn separate_finds_a_separating_direction() {
        use rand::SeedableRng;
        use rand_distr::{Distribution, StandardNormal};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let (m, k) = (300, 6);
        let z: Mat<f64> = Mat::from_fn(m, k, |_, _| StandardNormal.sample(&mut rng));
        let ustar: Col<f64> = Col::from_fn(k, |_| StandardNormal.sample(&mut rng));
        let labels: Vec<bool> = (&z * &ustar).iter().map(|&v| v > 0.0).collect();
        let noise: Col<f64> = Col::from_fn(k, |_| StandardNormal.sample(&mut rng));
        let u0 = &ustar + &noise * (0.3 * ustar.norm_l2() / noise.norm_l2());
        let start: Vec<bool> = (&z * &u0).iter().map(|&v| v > 0.0).collect();
        assert!(start != labels, "the start must be off the labels");
        let u = separate(&z, &labels, &vec![1.0; m], &u0);
        let got: Vec<bool> = (&z * &u).iter().map(|&v| v > 0.0).collect();
        let wrong = got.iter().zip(&labels).filter(|(a, b)| a != b).count();
        let before = start.iter().zip(&labels).filter(|(a, b)| a != b).count();
        assert!(
            wrong <= m / 100 && 5 * wrong <= before,
            "{wrong} of {m} rows on the wrong side (start: {before})"
        );
    }

    /// The realisable alternation from a perturbed true input, in the full row space,
    /// returns the true pattern under the tight stop.
    #[test]
    fn realisable_alternation_returns_the_true_pattern() {
        use rand::SeedableRng;
        use rand_distr::{Distribution, StandardNormal};
        let (view, x, _) = case(Activation::Relu, 1, 5, 3);
        let sub = subspace::estimate(&view, &Default::default()).unwrap();
        let model = SignalModel::new(&view, &sub).unwrap();
        let a = model.output_weights().unwrap().clone();
        let all = Neurons::all(&sub.q);
        let rows: Vec<usize> = (0..model.width()).collect();
        let scale = RoundingScale::new(&view).unwrap();
        let floor = super::super::floor::exact_floor(&view, &sub);
        let alt = Alternation {
            a: &a,
            q: &sub.q,
            small: &all,
            all: &all,
            slopes: (0.0, 1.0),
            floor,
            floor_small: floor,
            stop: scale.floor(0.0),
            model: &model,
            scale: &scale,
            sub: &sub,
        };
        let b = sub.batch;
        let basis = Mat::<f64>::identity(b, b);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for i in 0..x.nrows() {
            let xi: Vec<f64> = (0..x.ncols()).map(|j| x[(i, j)]).collect();
            let c = model.coords.c_of_x(&xi);
            let truth: Vec<bool> = model.z(&c, &rows).iter().map(|&z| z > 0.0).collect();
            let noise: Col<f64> = Col::from_fn(b, |_| StandardNormal.sample(&mut rng));
            let start = &c + &noise * (0.05 * c.norm_l2() / noise.norm_l2());
            let (res, _) = alt.run_in(&start, &basis);
            let (pat, _, f) = res.expect("a pattern under the floor");
            assert!(pat == truth, "sample {i}: another pattern (F = {f:e})");
            assert!(f <= alt.stop, "sample {i}: F = {f:e}");
        }
    }
}
