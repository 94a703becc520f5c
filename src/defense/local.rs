//! Several local steps (FedAvg-style): the client runs E steps of full-batch gradient
//! descent with rate LR and sends its weight change; the server divides it by -LR,
//! so E = 1 is the gradient itself and E > 1 is the sum of the E step gradients.

use super::ClientContext;
use crate::Result;
use crate::model::Gradient;
use crate::model::ops::{axpy, zeros_like};

/// (w_0 - w_E) / LR after E steps w_{t+1} = w_t - LR g(w_t) on the client's batch.
pub fn local_update(ctx: &ClientContext<'_>, steps: usize, lr: f64) -> Result<Gradient<f64>> {
    let mut model = ctx.model.clone();
    let mut total = zeros_like(ctx.model);
    for _ in 0..steps {
        let g = model.gradient(ctx.x.as_ref(), ctx.targets, ctx.loss)?;
        axpy(&mut total, 1.0, &g);
        for (w, d) in model.layers.iter_mut().zip(&g.layers) {
            w.weight -= faer::Scale(lr) * &d.weight;
            if let (Some(b), Some(db)) = (&mut w.bias, &d.bias) {
                *b -= faer::Scale(lr) * db;
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{ce_context, client};
    use super::super::{Defense, apply, distance};
    use super::*;
    use crate::model::Loss;
    use rand::SeedableRng;

    #[test]
    fn one_local_step_is_the_gradient_and_two_add_the_second_step() {
        let (model, x, t) = client(7);
        let ctx = ce_context(&model, &x, &t);
        let g0 = model.gradient(x.as_ref(), &t, Loss::Ce).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let (g, r) = apply(&[Defense::LocalSteps(1, 0.3)], &ctx, g0.clone(), &mut rng).unwrap();
        assert_eq!(g, g0);
        assert_eq!(r.relative_change, 0.0);
        // E = 2: g(w0) + g(w0 - lr g(w0))
        let lr = 0.3;
        let mut m1 = model.clone();
        for (w, d) in m1.layers.iter_mut().zip(&g0.layers) {
            w.weight -= faer::Scale(lr) * &d.weight;
            *w.bias.as_mut().unwrap() -= faer::Scale(lr) * d.bias.as_ref().unwrap();
        }
        let mut want = g0.clone();
        axpy(
            &mut want,
            1.0,
            &m1.gradient(x.as_ref(), &t, Loss::Ce).unwrap(),
        );
        let got = local_update(&ctx, 2, lr).unwrap();
        assert!(distance(&got, &want) < 1e-15 * want.norm().max(1e-300) * 10.0);
        assert!(distance(&got, &g0) > 0.1 * g0.norm());
    }
}
