//! The pixels below the features (docs/DESIGN.md, "Pixels: the conv stage"): from
//! the recovered features h_i and their signals dL/dh_i, down the layers below the
//! head, solving each conv layer's equations in its input ([`ConvEquations`]) with
//! CGLS started at the prior, so that what the gradient leaves free keeps the
//! prior's value; a second solve from a randomly moved start counts those directions.

use faer::Mat;
use rand_distr::{Distribution, StandardNormal};
use serde::Serialize;

use super::ConvProblem;
use super::equations::{ConvEquations, PoolEquations};
use super::tv;
use crate::attack::reconstruction::{Reconstruction, Sample, Stage};
use rand_chacha::ChaCha8Rng;

use crate::model::cnn::{Conv, Layer, kernels};
use crate::model::{Activation, LEAKY_SLOPE, Loss, Targets};
use crate::numerics::cgls::{self, LinearMap};
use crate::rng::{Salt, salted};
use crate::{Dtype, Error, Result};

/// CGLS steps per layer solve at most, by default (`PixelOptions::iterations`).
pub const ITERATIONS: usize = 20_000;
/// Projected descent steps of the TV fill, by default.
pub const TV_ITERATIONS: usize = 200;
/// CGLS stops when ||A^T r|| is this share of ||A^T b|| (near f64's floor: the
/// equations of a determined layer are consistent to the gradient's rounding).
pub const TOLERANCE: f64 = 1e-14;
/// A ReLU output above this share of its layer's RMS is active (recovered zeros come
/// back at the rounding of the features, ~eps of the scale).
pub const ACTIVE_SHARE: f64 = 1e-4;
/// A layer is determined when a random move of the start survives the solve by at
/// most this share of its norm (the solve keeps exactly the part of the move in the
/// equations' null space).
pub const UNIQUE_SHARE: f64 = 1e-6;
/// A solve whose equations fit worse than this (relative) is inconsistent: a guessed
/// kept position or activation pattern above it is wrong, so its values do not become
/// equations of the layer below (the f32 determined case fits to 1.5e-7).
pub const CONSISTENT: f64 = 1e-5;
/// Rounds of the whole walk when max pooling's kept positions are guessed (each walk
/// starts from the pixels of the last).
pub const POOL_ROUNDS: usize = 4;
/// Rounds of the alternation between a conv's solve and the kept positions of the max
/// pooling above it (the kept positions are the argmax of the solved input's output).
pub const KEPT_ROUNDS: usize = 20;
/// The recovered pixels are exact when every layer is determined, nothing was guessed
/// and the features of the recovered pixels match h to this many eps of the dtype (the
/// solves amplify the features' rounding by their conditioning: 6e-13 = 2.7e3 eps on
/// LeNet without pools, f64, B = 1).
pub const CLOSURE_FACTOR: f64 = 1e4;

/// What fills the directions the gradient leaves free at the pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Fill {
    /// The prior image (CGLS from it keeps its value in the null space).
    Prior,
    /// The prior, then the least total variation among the images with the same
    /// equations (`tv::fill`), `iterations` descent steps.
    Tv { iterations: usize },
}

/// The pixel stage's budgets and fill.
#[derive(Clone, Copy, Debug)]
pub struct PixelOptions {
    /// CGLS steps per solve at most: a cap below convergence leaves part of the start's
    /// move in the equations' range, so the probe over-counts free directions and the
    /// layer cannot be `determined`.
    pub iterations: usize,
    pub fill: Fill,
}

impl Default for PixelOptions {
    fn default() -> Self {
        PixelOptions {
            iterations: ITERATIONS,
            fill: Fill::Prior,
        }
    }
}

/// TV_eps of the pixel layer's solve before and after the TV fill, and its equations'
/// relative residual after (before: `LayerSolve::residual`).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct TvReport {
    pub tv_start: f64,
    pub tv_end: f64,
    pub residual_end: f64,
    pub iterations: usize,
}

/// One layer's solve: what it had, and what it left free.
#[derive(Clone, Debug, Serialize)]
pub struct LayerSolve {
    /// Runtime layer index and kind (`conv` with its PyTorch name, `avgpool`).
    pub layer: usize,
    pub name: String,
    /// Unknowns B * len(input); equations from known outputs and from the weight gradient.
    pub unknowns: usize,
    pub forward_equations: usize,
    pub gradient_equations: usize,
    /// max(0, unknowns - equations): free directions whatever the rank.
    pub free_at_least: usize,
    /// unknowns * ||kept move||^2 / ||move||^2: the free directions the solve found.
    pub free_estimate: f64,
    pub determined: bool,
    /// ||A a - b|| / ||b|| at the solution, and CGLS steps.
    pub residual: f64,
    pub iterations: usize,
    /// The TV fill, at the pixel layer when it is not determined and `Fill::Tv`.
    pub tv: Option<TvReport>,
}

/// The recovered pixels (rows in the order of the features' samples) and the layers' solves.
#[derive(Clone, Debug, Serialize)]
pub struct Pixels {
    #[serde(skip)]
    pub x: Mat<f64>,
    pub layers: Vec<LayerSolve>,
    /// Max pooling's kept positions were read off an estimate, not from the gradient.
    pub guessed_pooling: bool,
    pub rounds: usize,
    /// ||phi(x) - h|| / ||h|| of the recovered pixels.
    pub feature_closure: f64,
    pub exact: bool,
}

impl Pixels {
    /// The recovered images as samples to match against the true pixels, each with the
    /// label the head found for its features (`features`, the reconstruction the
    /// pixels were recovered from).
    pub fn samples(&self, features: &Reconstruction) -> Vec<Sample> {
        (0..self.x.nrows())
            .map(|i| Sample {
                x: self.x.row(i).iter().copied().collect(),
                residual: None,
                exact: self.exact,
                stage: Stage::Pattern,
                label: features.samples[i].label,
                output_residual: None,
            })
            .collect()
    }
}

/// What is known about one layer's output while walking down: values (estimates where
/// not known), which entries are equations, and dL/d output.
struct State {
    val: Mat<f64>,
    known: Vec<bool>,
    delta: Mat<f64>,
}

/// Pixels from the head's reconstruction (every sample found, with labels for `loss`)
/// with `prior` (one image, C*H*W values) filling what the gradient leaves free.
pub fn recover(
    p: &ConvProblem,
    features: &Reconstruction,
    loss: Loss,
    prior: &[f64],
    dtype: Dtype,
    seed: u64,
    opts: &PixelOptions,
) -> Result<Pixels> {
    let b = features.samples.len();
    if b == 0 || b < features.batch_estimated {
        return Err(Error::Unsupported(format!(
            "the pixel stage needs every sample's features; {} of {} found",
            b, features.batch_estimated
        )));
    }
    if prior.len() != p.cnn.input_dim() {
        return Err(Error::Shape(format!(
            "the prior image has {} values, the model takes {}",
            prior.len(),
            p.cnn.input_dim()
        )));
    }
    let d = p.head.feature_dim();
    let h = Mat::from_fn(b, d, |i, k| features.samples[i].x[k]);
    let targets = match loss {
        Loss::Ce => Targets::Classes(
            features
                .samples
                .iter()
                .map(|s| s.label)
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| Error::Unsupported("the pixel stage needs every label".into()))?,
        ),
        other => {
            return Err(Error::Unsupported(format!(
                "the pixel stage reads dL/dh from the labels (ce); {other} has none"
            )));
        }
    };
    let bw = p.head.model.backward_loss(h.as_ref(), &targets, loss)?;
    let dh = &bw.deltas[0] * &p.head.model.layers[0].weight;
    let mut x = Mat::from_fn(b, prior.len(), |_, k| prior[k]);
    let pooled = p.cnn.layers[..p.head.start]
        .iter()
        .any(|l| matches!(l, Layer::MaxPool(_)));
    let rounds = if pooled { POOL_ROUNDS } else { 1 };
    let mut layers = Vec::new();
    let mut done = 0;
    for _ in 0..rounds {
        let (next, solves) = descend(p, &h, &dh, &x, seed, opts)?;
        x = next;
        layers = solves;
        done += 1;
    }
    let fw = p.cnn.forward(&x)?;
    let got = &fw.outputs[p.head.start - 1];
    let feature_closure = (got - &h).norm_l2() / h.norm_l2().max(f64::MIN_POSITIVE);
    let exact = !pooled
        && layers.iter().all(|l| l.determined)
        && feature_closure <= CLOSURE_FACTOR * dtype.epsilon();
    Ok(Pixels {
        x,
        layers,
        guessed_pooling: pooled,
        rounds: done,
        feature_closure,
        exact,
    })
}

/// One walk down from the features, with `guide` (the current estimate of the pixels)
/// giving max pooling's first kept positions and the start of every solve.
fn descend(
    p: &ConvProblem,
    h: &Mat<f64>,
    dh: &Mat<f64>,
    guide: &Mat<f64>,
    seed: u64,
    opts: &PixelOptions,
) -> Result<(Mat<f64>, Vec<LayerSolve>)> {
    let cnn = &p.cnn;
    let fw = cnn.forward(guide)?;
    let mut st = State {
        val: h.clone(),
        known: vec![true; h.nrows() * h.ncols()],
        delta: dh.clone(),
    };
    let mut solves = Vec::new();
    let mut rng = salted(seed, Salt::Pixels);
    let below_of = |l: usize| if l == 0 { guide } else { &fw.outputs[l - 1] };
    let mut l = p.head.start;
    while l > 0 {
        l -= 1;
        let below = below_of(l);
        // conv, activation, max pooling: the kept positions alternate with the conv's solve
        if let (Layer::MaxPool(w), Some(Layer::Act(a)), Some(Layer::Conv(c))) = (
            &cnn.layers[l],
            l.checked_sub(1).map(|k| &cnn.layers[k]),
            l.checked_sub(2).map(|k| &cnn.layers[k]),
        ) {
            let mut kept = fw.kept[l].clone();
            let conv_in = below_of(l - 2);
            for _ in 0..KEPT_ROUNDS {
                let pre = through_activation(*a, unpool(&st, &kept, w, below), &fw.outputs[l - 2])?;
                let (val, _, _, _) = solve_conv(p, l - 2, c, &pre, conv_in, None, opts)?;
                let z = conv_output(c, &val);
                let act = Mat::from_fn(z.nrows(), z.ncols(), |i, j| a.eval(z[(i, j)]));
                let (_, next) = kernels::max_pool(&act, w);
                if next == kept {
                    break;
                }
                kept = next;
            }
            let pre = through_activation(*a, unpool(&st, &kept, w, below), &fw.outputs[l - 2])?;
            let (val, solve, delta, known) =
                solve_conv(p, l - 2, c, &pre, conv_in, Some(&mut rng), opts)?;
            solves.push(solve);
            st = State { val, known, delta };
            l -= 2;
            continue;
        }
        st = match &cnn.layers[l] {
            Layer::Flatten => st,
            Layer::Act(a) => through_activation(*a, st, below)?,
            Layer::MaxPool(w) => unpool(&st, &fw.kept[l], w, below),
            Layer::AvgPool(w) => {
                let eq = PoolEquations {
                    window: *w,
                    batch: below.nrows(),
                    known: st.known.clone(),
                };
                let rhs: Vec<f64> = (0..st.known.len())
                    .filter(|&i| st.known[i])
                    .map(|i| st.val[(i / st.val.ncols(), i % st.val.ncols())])
                    .collect();
                let (val, solve, known) =
                    solve_probed(&eq, &rhs, below, Some(&mut rng), opts.iterations);
                solves.push(LayerSolve {
                    layer: l,
                    name: "avgpool".into(),
                    forward_equations: eq.rows(),
                    gradient_equations: 0,
                    ..solve
                });
                State {
                    known,
                    delta: kernels::avg_pool_back(&st.delta, w),
                    val,
                }
            }
            Layer::Conv(c) => {
                let (val, solve, delta, known) =
                    solve_conv(p, l, c, &st, below, Some(&mut rng), opts)?;
                solves.push(solve);
                State { val, known, delta }
            }
            Layer::Linear(_) => {
                return Err(Error::Unsupported(format!(
                    "layer {l}: a Linear layer below the head"
                )));
            }
        };
    }
    Ok((st.val, solves))
}

/// Down through max pooling with kept positions `kept`: each output's value and signal
/// go to the input it kept; the other inputs keep `below`'s values and are unknown.
fn unpool(st: &State, kept: &[usize], w: &kernels::Window, below: &Mat<f64>) -> State {
    let n = below.ncols();
    let m = st.val.ncols();
    let mut val = below.clone();
    let mut known = vec![false; below.nrows() * n];
    for s in 0..below.nrows() {
        for k in 0..m {
            let src = kept[s * m + k];
            val[(s, src)] = st.val[(s, k)];
            known[s * n + src] = st.known[s * m + k];
        }
    }
    State {
        val,
        known,
        delta: kernels::max_pool_back(&st.delta, kept, w),
    }
}

/// The conv's output on `a` (B x len(input)), bias included.
fn conv_output(c: &Conv<f64>, a: &Mat<f64>) -> Mat<f64> {
    let z = &kernels::im2col(a, &c.window) * c.param.weight.transpose();
    let bias: Option<Vec<f64>> = c.param.bias.as_ref().map(|b| b.iter().copied().collect());
    kernels::positions_to_rows(&z, a.nrows(), c.window.positions(), bias.as_deref())
}

/// A conv layer's solved input, its report, dL/d input and which entries are fixed.
type ConvSolve = (Mat<f64>, LayerSolve, Mat<f64>, Vec<bool>);

/// Conv layer `l`'s input from its output state, started at `below`; with `probe`, the
/// free directions are counted. Returns the input, the solve, dL/d input and which
/// input entries the equations fix (the layer below takes only those as known).
fn solve_conv(
    p: &ConvProblem,
    l: usize,
    c: &Conv<f64>,
    st: &State,
    below: &Mat<f64>,
    probe: Option<&mut ChaCha8Rng>,
    opts: &PixelOptions,
) -> Result<ConvSolve> {
    let cnn = &p.cnn;
    let param = cnn.layers[..l]
        .iter()
        .filter(|x| x.param().is_some())
        .count();
    let grad = &p.grad.params[param].weight;
    let (bsz, pos, o) = (below.nrows(), c.window.positions(), c.param.weight.nrows());
    let dz = kernels::rows_to_positions(&st.delta, pos);
    let bias = |ch: usize| c.param.bias.as_ref().map_or(0.0, |b| b[ch]);
    let z = Mat::from_fn(bsz * pos, o, |r, ch| {
        st.val[(r / pos, ch * pos + r % pos)] - bias(ch)
    });
    let known: Vec<bool> = (0..bsz * pos * o)
        .map(|i| {
            let (r, ch) = (i / o, i % o);
            st.known[(r / pos) * o * pos + ch * pos + r % pos]
        })
        .collect();
    let mut eq = ConvEquations {
        window: c.window,
        batch: bsz,
        weight: &c.param.weight,
        dz,
        known,
        w_forward: 1.0,
        w_gradient: 1.0,
    };
    let raw = eq.rhs(&z, grad);
    let nf = eq.forward_count();
    let unit = |v: &[f64]| 1.0 / v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-300);
    eq.w_forward = if nf > 0 { unit(&raw[..nf]) } else { 1.0 };
    eq.w_gradient = unit(&raw[nf..]);
    let rhs = eq.rhs(&z, grad);
    let probed = probe.is_some();
    let (mut val, mut solve, fixed) = solve_probed(&eq, &rhs, below, probe, opts.iterations);
    if let (0, true, false, Fill::Tv { iterations }) = (l, probed, solve.determined, opts.fill) {
        let (b, n) = (val.nrows(), val.ncols());
        let im = tv::Images {
            batch: b,
            c: c.window.c,
            h: c.window.h,
            w: c.window.w,
        };
        let start: Vec<f64> = (0..b * n).map(|i| val[(i / n, i % n)]).collect();
        let tvo = tv::TvOptions {
            iterations,
            cgls_iterations: opts.iterations,
        };
        let f = tv::fill(&eq, &rhs, &start, im, tvo);
        val = Mat::from_fn(b, n, |s, k| f.x[s * n + k]);
        solve.tv = Some(TvReport {
            tv_start: f.tv_start,
            tv_end: f.tv_end,
            residual_end: f.residual_end,
            iterations: f.iterations,
        });
    }
    let delta = if l > 0 {
        kernels::col2im(&(&eq.dz * &c.param.weight), bsz, &c.window)
    } else {
        Mat::zeros(0, 0)
    };
    let solve = LayerSolve {
        layer: l,
        name: format!("conv '{}'", cnn.names[param]),
        forward_equations: nf,
        gradient_equations: eq.gradient_count(),
        ..solve
    };
    Ok((val, solve, delta, fixed))
}

/// Solve from `start` (B x n) and from `start` plus a random move; the part of the move
/// that survives lies in the equations' null space and counts the free directions, and
/// an entry it leaves unmoved is fixed by the equations (e_k is orthogonal to the null
/// space). Without `probe` every entry counts as fixed.
fn solve_probed<A: LinearMap>(
    eq: &A,
    rhs: &[f64],
    start: &Mat<f64>,
    probe: Option<&mut ChaCha8Rng>,
    iterations: usize,
) -> (Mat<f64>, LayerSolve, Vec<bool>) {
    let (b, n) = (start.nrows(), start.ncols());
    let x0: Vec<f64> = (0..b * n).map(|i| start[(i / n, i % n)]).collect();
    let sol = cgls::solve(eq, rhs, &x0, TOLERANCE, iterations);
    let scale = (x0.iter().map(|v| v * v).sum::<f64>() / x0.len().max(1) as f64)
        .sqrt()
        .max(1e-3);
    let mut fixed = vec![true; b * n];
    let (share, steps) = match probe {
        None => (f64::NAN, 0),
        Some(rng) => {
            let mv: Vec<f64> = (0..x0.len())
                .map(|_| {
                    let g: f64 = StandardNormal.sample(&mut *rng);
                    scale * g
                })
                .collect();
            let x1: Vec<f64> = x0.iter().zip(&mv).map(|(a, m)| a + m).collect();
            let moved = cgls::solve(eq, rhs, &x1, TOLERANCE, iterations);
            let kept: f64 = moved
                .x
                .iter()
                .zip(&sol.x)
                .map(|(a, c)| (a - c).powi(2))
                .sum();
            let total: f64 = mv.iter().map(|v| v * v).sum();
            for (f, (a, c)) in fixed.iter_mut().zip(moved.x.iter().zip(&sol.x)) {
                *f = (a - c).abs() <= UNIQUE_SHARE * scale && sol.residual <= CONSISTENT;
            }
            ((kept / total).sqrt(), moved.iterations)
        }
    };
    let equations = eq.rows();
    let val = Mat::from_fn(b, n, |s, k| sol.x[s * n + k]);
    (
        val,
        LayerSolve {
            layer: 0,
            name: String::new(),
            unknowns: b * n,
            forward_equations: 0,
            gradient_equations: 0,
            free_at_least: (b * n).saturating_sub(equations),
            free_estimate: (b * n) as f64 * share * share,
            determined: share <= UNIQUE_SHARE,
            residual: sol.residual,
            iterations: sol.iterations.max(steps),
            tv: None,
        },
        fixed,
    )
}

/// Down through an activation: its input where the output determines it (everywhere
/// for an invertible one; ReLU where active), and dL/dz = dL/da act'(z).
fn through_activation(a: Activation, st: State, below: &Mat<f64>) -> Result<State> {
    let (b, n) = (st.val.nrows(), st.val.ncols());
    let mut val = below.clone();
    let mut known = st.known.clone();
    let rms = (st.val.squared_norm_l2() / (b * n).max(1) as f64).sqrt();
    let mut slope = Mat::<f64>::zeros(b, n);
    for s in 0..b {
        for k in 0..n {
            let v = st.val[(s, k)];
            let i = s * n + k;
            let (z, d) = match a {
                Activation::Identity => (v, 1.0),
                Activation::Relu => {
                    if v > ACTIVE_SHARE * rms {
                        (v, 1.0)
                    } else {
                        known[i] = false;
                        (below[(s, k)].min(0.0), 0.0)
                    }
                }
                Activation::LeakyRelu => {
                    if v > 0.0 {
                        (v, 1.0)
                    } else {
                        (v / LEAKY_SLOPE, LEAKY_SLOPE)
                    }
                }
                Activation::Tanh => {
                    let t = v.clamp(-1.0 + 1e-16, 1.0 - 1e-16);
                    (t.atanh(), 1.0 - t * t)
                }
                Activation::Sigmoid => {
                    let t = v.clamp(1e-300, 1.0 - 1e-16);
                    ((t / (1.0 - t)).ln(), t * (1.0 - t))
                }
                other => {
                    return Err(Error::Unsupported(format!(
                        "the pixel stage inverts relu, leaky_relu, tanh, sigmoid and identity; not {other}"
                    )));
                }
            };
            val[(s, k)] = z;
            slope[(s, k)] = d;
        }
    }
    let delta = Mat::from_fn(b, n, |s, k| st.delta[(s, k)] * slope[(s, k)]);
    Ok(State { val, known, delta })
}
