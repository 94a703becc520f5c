//! When a span search keeps a zero (docs/DESIGN.md, "Certificate"): F on the neurons it
//! polished on must be under the sample's own rounding floor (never above the global
//! one), and F re-solved on the held-back neurons, which no search screened, iterated
//! or polished on, must be under it too. Shared by the random-start search and the
//! seeding rounds, so a zero fitted to the search's neurons alone takes no slot.

// `!(x <= tol)` is deliberate: it also rejects NaN.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

use faer::Col;

use super::context::Context;
use super::floor::RoundingScale;
use super::signal::{Neurons, SignalModel};
use super::zero::best_residual;
use crate::attack::subspace::Subspace;

/// A zero over its own floor is kept (as a fit) only if F on the held-back neurons is
/// within this factor of F where it was polished: a zero fitted to the search's neurons
/// alone is far larger on the others.
pub const HELD_AGREEMENT: f64 = 10.0;

/// A zero over its own floor is kept as a fit only while F is below this too: F of a
/// wrong input is above 1e-4 (docs/DESIGN.md, "Span search"), while the global floor
/// EXACT_FACTOR eps kappa passes 1 on an ill-conditioned float32 gradient (kappa ~ 1e5:
/// photos B = 64), where it would keep any local minimum that agrees on the held-back
/// neurons, and such a fit takes the slot of a sample the search would still find.
pub const FIT_CAP: f64 = 1e-4;

/// The verdict on a polished zero.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Verdict {
    /// A true zero to the rounding of the gradient.
    Exact,
    /// Kept as a least-squares fit under known noise, or a zero under the global floor
    /// that agrees on the held-back neurons (never exact).
    Fit,
    /// Not kept.
    Rejected,
}

/// The rules and neuron sets of acceptance.
pub struct Acceptance<'a> {
    model: &'a SignalModel,
    sub: &'a Subspace,
    scale: &'a RoundingScale,
    /// All m neurons (the signal direction for the amplification).
    all: Neurons,
    /// Where zeros are polished and judged: every neuron but the held-back ones.
    pub kept: Neurons,
    /// The held-back neurons, when there are enough of them.
    pub held: Option<Neurons>,
    /// The global floor EXACT_FACTOR eps kappa (an upper bound on every own floor).
    floor: f64,
    /// Under known noise, F up to this is kept as a fit.
    accept: f64,
}

impl<'a> Acceptance<'a> {
    /// The rules of the run `ctx`; under known noise F up to `accept` is kept as a fit.
    pub fn new(ctx: &'a Context<'_>, accept: f64) -> Self {
        let (sub, order) = (ctx.sub, &ctx.order);
        let held = order.held_back();
        Acceptance {
            model: &ctx.model,
            sub,
            scale: &ctx.scale,
            all: Neurons::all(&sub.q),
            kept: Neurons::new(&sub.q, order.kept()),
            held: (!held.is_empty()).then(|| Neurons::new(&sub.q, held)),
            floor: ctx.floor,
            accept,
        }
    }

    /// The sample's own rounding floor of F, never above the global one.
    pub fn own_floor(&self, c: &Col<f64>, r: &Col<f64>) -> f64 {
        let s = self.model.signal_matrix(c, &self.all.rows) * r;
        let shat = &s * (1.0 / s.norm_l2().max(f64::MIN_POSITIVE));
        self.scale
            .floor(self.scale.amplification(self.sub, &shat))
            .min(self.floor)
    }

    /// F with its best output residual on the held-back neurons (None when none are held).
    pub fn held_residual(&self, c: &Col<f64>) -> Option<f64> {
        self.held
            .as_ref()
            .map(|h| best_residual(self.model, h, c).map_or(f64::INFINITY, |v| v.0))
    }

    /// Judge a zero polished on `kept`, with F = `f` there.
    pub fn judge(&self, c: &Col<f64>, r: &Col<f64>, f: f64) -> Verdict {
        let own = self.own_floor(c, r);
        if f <= own && self.held_residual(c).is_none_or(|h| h <= own) {
            Verdict::Exact
        } else if self.accept > self.floor && f <= self.accept {
            Verdict::Fit
        } else if f <= self.floor.min(FIT_CAP)
            && self
                .held_residual(c)
                .is_none_or(|h| h <= self.floor && h <= HELD_AGREEMENT * f.max(own))
        {
            // over its own floor but under the global one, and as small on the held-back
            // neurons: a true zero of a gradient carrying more than its own rounding
            // (e.g. a one-step update divided by lr); kept, never exact
            Verdict::Fit
        } else {
            Verdict::Rejected
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::subsample::Subsample;
    use super::super::testing::case;
    use super::*;
    use crate::Dtype;
    use crate::attack::subspace;
    use crate::attack::view::ServerView;
    use crate::model::{Activation, Targets};
    use crate::rng::{Salt, salted};

    /// A gradient that sample 0 explains on the search's neurons but not on the held-back
    /// ones (its rows there get an extra eps * delta_0j x~_0^T, which keeps rank B and
    /// the row space): sample 0 is a zero to rounding on the kept neurons, so a search
    /// judging there alone would keep it as exact; the held-back check rejects it. The
    /// untouched samples stay exact.
    #[test]
    fn a_zero_off_on_the_held_back_neurons_is_rejected() {
        let (view0, x, y) = case(Activation::Tanh, 1, 3, 4);
        let model0 = view0.model().unwrap();
        let mut grad = model0
            .gradient(x.as_ref(), &Targets::Classes(y), crate::model::Loss::Ce)
            .unwrap();
        let m = view0.width();
        let seed = 1;
        let order = Subsample::new(m, &mut salted(seed, Salt::SearchNeurons));
        let held = order.held_back();
        assert!(!held.is_empty());
        // delta_0j: sample 0's own first-layer signal
        let x0 = faer::Mat::from_fn(1, x.ncols(), |_, j| x[(0, j)]);
        let g0 = model0
            .gradient(
                x0.as_ref(),
                &Targets::Classes(vec![0]),
                crate::model::Loss::Ce,
            )
            .unwrap();
        let eps = 1e-7;
        for (q, &j) in held.iter().enumerate() {
            let sign = if q % 2 == 0 { 1.0 } else { -1.0 };
            let l0 = &mut grad.layers[0];
            for k in 0..x.ncols() {
                l0.weight[(j, k)] += eps * sign * g0.layers[0].weight[(j, k)];
            }
            if let (Some(b), Some(b0)) = (l0.bias.as_mut(), g0.layers[0].bias.as_ref()) {
                b[j] += eps * sign * b0[j];
            }
        }
        let view = ServerView::from_memory(&model0, &grad, Dtype::F64).unwrap();
        let sub = subspace::estimate(&view, &Default::default()).unwrap();
        assert_eq!(sub.batch, 3);
        let ctx = Context::new(&view, &sub, seed).unwrap();
        let (model, acc) = (&ctx.model, Acceptance::new(&ctx, 0.0));
        for i in 0..3 {
            let xi: Vec<f64> = (0..x.ncols()).map(|j| x[(i, j)]).collect();
            let c = model.coords.c_of_x(&xi);
            let (f, r) = best_residual(model, &acc.kept, &c).unwrap();
            let own = acc.own_floor(&c, &r);
            assert!(
                f <= own,
                "sample {i}: F on the kept neurons {f:e} > {own:e}"
            );
            let verdict = acc.judge(&c, &r, f);
            let h = acc.held_residual(&c).unwrap();
            if i == 0 {
                assert!(h > 10.0 * own, "held-back F {h:e} vs floor {own:e}");
                assert_eq!(verdict, Verdict::Rejected, "sample 0 (held-back F {h:e})");
            } else {
                assert_eq!(verdict, Verdict::Exact, "sample {i} (held-back F {h:e})");
            }
        }
    }
}
