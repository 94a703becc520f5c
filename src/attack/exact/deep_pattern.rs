//! Deep piecewise-linear nets (docs/DESIGN.md, "Deep piecewise-linear nets"): the
//! pattern search on the top hidden layer, then the inputs layer by layer downwards.
//!
//! Layer l's gradient is G_l = sum_i delta_{l,i} a~_{l,i}^T, rank B for every hidden
//! layer, so its row space holds each sample's input to that layer. The top hidden
//! layer with the output layer above it is a one-hidden-layer problem on the inputs
//! a_{t,i}: the pattern search recovers them with r_i. Below, a_{l+1} = act(z_l) fixes
//! z_l on every neuron with a_{l+1} away from 0 (ReLU: the active ones), and
//! z_l = W~_l V_l c is linear in the B coordinates of a~_l = V_l c in the row space of
//! G_l: one least-squares solve per sample and layer, down to x.

use faer::linalg::solvers::SolveLstsq;
use faer::{Col, Mat};

use super::labels;
use super::pattern;
use super::signal::Coordinates;
use crate::attack::evidence::SearchStats;
use crate::attack::params::AttackConfig;
use crate::attack::reconstruction::{Sample, Stage};
use crate::attack::subspace::{self, Subspace};
use crate::attack::verdict::{Candidate, Claim};
use crate::attack::view::{FirstLayer, Rows, ServerView};
use crate::model::{Activation, LEAKY_SLOPE};
use crate::{Error, Result};

/// A neuron's known post-activation fixes its pre-activation only when it is away from
/// the kink: |a| above this share of the layer's RMS (the recovered a carries the
/// gradient's rounding, ~1e-7 relative in f32, so true zeros come back as tiny values).
pub const KINK_SHARE: f64 = 1e-4;

/// The network from layer `l` (>= 1) up, as a view whose first layer is layer l.
pub fn view_from(view: &ServerView, l: usize) -> ServerView {
    let w = &view.upper[l - 1];
    let g = &view.upper_grad[l - 1];
    ServerView {
        activation: view.activation,
        dtype: view.dtype,
        first: FirstLayer {
            weight: Rows::Memory(w.weight.clone()),
            bias: w.bias.clone(),
            grad_weight: Rows::Memory(g.weight.clone()),
            grad_bias: g.bias.clone(),
        },
        upper: view.upper[l..].to_vec(),
        upper_grad: view.upper_grad[l..].to_vec(),
        noise_std: view.noise_std,
        defenses: view.defenses.clone(),
    }
}

/// The equation a neuron's known output gives: (slope, a) with slope z = a, None near
/// the kink. Leaky ReLU's negative side keeps its slope in the row, so the rounding of
/// a is not amplified by 1 / slope.
fn equation(act: Activation, a: f64, tau: f64) -> Option<(f64, f64)> {
    if a.abs() <= tau {
        return None;
    }
    match act {
        Activation::Relu => (a > 0.0).then_some((1.0, a)),
        Activation::LeakyRelu => Some((if a > 0.0 { 1.0 } else { LEAKY_SLOPE }, a)),
        _ => None,
    }
}

/// Multiple of the dtype's eps the relative misfit of a descent step may reach for an
/// exact sample (the certificate then checks the batch against every layer).
pub const MISFIT_EPS: f64 = 1e3;

/// One layer down: given a_{l+1} (the layer's outputs), the input a_l in the row space
/// of G_l. `p` = W~_l V (m_l x r), `coords` of V. Returns (a_l, relative misfit).
fn down(
    act: Activation,
    p: &Mat<f64>,
    coords: &Coordinates,
    out: &[f64],
) -> Option<(Vec<f64>, f64)> {
    let rms = (out.iter().map(|v| v * v).sum::<f64>() / out.len() as f64).sqrt();
    let tau = KINK_SHARE * rms;
    let eqs: Vec<(usize, f64, f64)> = out
        .iter()
        .enumerate()
        .filter_map(|(j, &a)| equation(act, a, tau).map(|(w, a)| (j, w, a)))
        .collect();
    let nb = coords.n.ncols();
    if eqs.len() < nb + 1 {
        return None;
    }
    let pn = p * &coords.n;
    let pc0 = p * &coords.c0;
    let lhs = Mat::from_fn(eqs.len(), nb, |i, k| eqs[i].1 * pn[(eqs[i].0, k)]);
    let rhs = Col::from_fn(eqs.len(), |i| eqs[i].2 - eqs[i].1 * pc0[eqs[i].0]);
    let t = lhs.qr().solve_lstsq(&rhs);
    let fit = &lhs * &t - &rhs;
    let zn = eqs.iter().map(|e| e.2 * e.2).sum::<f64>().sqrt();
    let misfit = fit.norm_l2() / zn.max(f64::MIN_POSITIVE);
    let c = coords.c_of_t(&t);
    Some((coords.x_of_c(&c), misfit))
}

/// Row space of one layer's gradient and the projected weights of that layer.
struct Layer {
    coords: Coordinates,
    p: Mat<f64>,
}

impl Layer {
    fn new(view: &ServerView, sub: &Subspace) -> Result<Self> {
        let coords = Coordinates::new(&sub.v)?;
        let m = view.width();
        let w = view.augmented_weight_block(0..m)?;
        let p = &w * &sub.v;
        Ok(Layer { coords, p })
    }
}

/// The samples of a deep ReLU / leaky-ReLU net, and the top layer's search figures.
/// `sub` is the first layer's subspace.
pub fn search(
    view: &ServerView,
    sub: &Subspace,
    cfg: &AttackConfig,
) -> Result<(Vec<Sample>, SearchStats, usize)> {
    let depth = view.depth();
    if depth < 2 {
        return Err(Error::Unsupported(
            "the deep pattern route needs two or more hidden layers".into(),
        ));
    }
    let top_l = depth - 1; // index of the top hidden layer among all layers
    let top = view_from(view, top_l);
    let mut opts = cfg.subspace_options();
    let top_sub = subspace::estimate(&top, &opts)?;
    let batch = top_sub.batch;
    opts.batch = None;
    let (zeros, stats, model) = pattern::search(&top, &top_sub, cfg)?;
    let scaled = labels::output_residuals(&top_sub, &model, &zeros);
    let lab = labels::assign(cfg.loss, &scaled, view.outputs());
    // row spaces of the layers below the top, from the top down to the first
    let mut layers: Vec<Layer> = Vec::with_capacity(top_l);
    for l in (0..top_l).rev() {
        if l == 0 {
            layers.push(Layer::new(view, sub)?);
        } else {
            let v = view_from(view, l);
            let s = subspace::estimate(&v, &opts)?;
            layers.push(Layer::new(&v, &s)?);
        }
    }
    let mut samples = Vec::with_capacity(zeros.len());
    for (i, z) in zeros.iter().enumerate() {
        let mut a = model.coords.x_of_c(&z.c);
        let mut misfit = 0.0f64;
        let mut ok = true;
        for layer in &layers {
            match down(view.activation, &layer.p, &layer.coords, &a) {
                Some((below, mf)) => {
                    a = below;
                    misfit = misfit.max(mf);
                }
                None => {
                    ok = false;
                    break;
                }
            }
        }
        if !ok {
            continue;
        }
        samples.push(
            Candidate {
                x: a,
                residual: Some(z.residual.max(misfit)),
                stage: Stage::Pattern,
                label: lab.get(i).copied().flatten(),
                output_residual: scaled.get(i).map(|r| r.iter().copied().collect()),
                claim: Claim::Accepted(z.accepted && misfit <= MISFIT_EPS * view.dtype.epsilon()),
            }
            .judge(),
        );
    }
    Ok((samples, stats, batch))
}

#[cfg(test)]
mod tests {
    use super::super::testing::case;
    use crate::attack::params::{AttackConfig, Method};
    use crate::model::Activation;

    /// One hidden layer is not this route's problem: a typed error, not a panic.
    #[test]
    fn one_hidden_layer_is_refused() {
        let (view, _, _) = case(Activation::Relu, 1, 3, 11);
        let sub = crate::attack::subspace::estimate(&view, &Default::default()).unwrap();
        let cfg = AttackConfig::new(Method::Span, 3);
        assert!(super::search(&view, &sub, &cfg).is_err());
    }
}
