//! Arithmetic on whole gradients (every layer's weight and bias): norms, distances,
//! a x + y, zeros shaped like a model; shared by the defences and the attacks.

use faer::Mat;

use super::{Dense, Gradient, Mlp};

/// Root mean square over every entry of the gradient.
pub fn rms(g: &Gradient<f64>) -> f64 {
    g.norm() / (g.len().max(1) as f64).sqrt()
}

/// ||a - b|| over all parameters.
pub(crate) fn distance(a: &Gradient<f64>, b: &Gradient<f64>) -> f64 {
    let mut s = 0.0;
    for (x, y) in a.layers.iter().zip(&b.layers) {
        s += (&x.weight - &y.weight).squared_norm_l2();
        if let (Some(u), Some(v)) = (&x.bias, &y.bias) {
            s += (u - v).squared_norm_l2();
        }
    }
    s.sqrt()
}

pub(crate) fn count_zeros(g: &Gradient<f64>) -> usize {
    let mut n = 0;
    for_each_tensor_ref(g, |v| n += v.iter().filter(|&&x| x == 0.0).count());
    n
}

/// Call `f` on every tensor (each weight and each bias separately) as a flat vector,
/// writing the result back.
pub(crate) fn for_each_tensor(g: &mut Gradient<f64>, mut f: impl FnMut(&mut [f64])) {
    for layer in &mut g.layers {
        let (r, c) = layer.weight.shape();
        let mut v: Vec<f64> = (0..c)
            .flat_map(|j| (0..r).map(move |i| (i, j)))
            .map(|(i, j)| layer.weight[(i, j)])
            .collect();
        f(&mut v);
        layer.weight = Mat::from_fn(r, c, |i, j| v[j * r + i]);
        if let Some(b) = &mut layer.bias {
            let mut v: Vec<f64> = b.iter().copied().collect();
            f(&mut v);
            for (i, x) in v.into_iter().enumerate() {
                b[i] = x;
            }
        }
    }
}

pub(crate) fn for_each_tensor_ref(g: &Gradient<f64>, mut f: impl FnMut(&[f64])) {
    for layer in &g.layers {
        let (r, c) = layer.weight.shape();
        let v: Vec<f64> = (0..c)
            .flat_map(|j| (0..r).map(move |i| (i, j)))
            .map(|(i, j)| layer.weight[(i, j)])
            .collect();
        f(&v);
        if let Some(b) = &layer.bias {
            f(&b.iter().copied().collect::<Vec<_>>());
        }
    }
}

/// a += s * b, over every parameter.
pub(crate) fn axpy(a: &mut Gradient<f64>, s: f64, b: &Gradient<f64>) {
    for (x, y) in a.layers.iter_mut().zip(&b.layers) {
        x.weight += faer::Scale(s) * &y.weight;
        if let (Some(u), Some(v)) = (&mut x.bias, &y.bias) {
            *u += faer::Scale(s) * v;
        }
    }
}

/// g *= s, over every parameter.
pub(crate) fn for_each_layer_scale(g: &mut Gradient<f64>, s: f64) {
    for l in &mut g.layers {
        l.weight *= faer::Scale(s);
        if let Some(b) = &mut l.bias {
            *b *= faer::Scale(s);
        }
    }
}

/// A gradient of zeros shaped like `model`.
pub(crate) fn zeros_like(model: &Mlp<f64>) -> Gradient<f64> {
    Gradient {
        layers: model
            .layers
            .iter()
            .map(|l| Dense {
                weight: Mat::zeros(l.weight.nrows(), l.weight.ncols()),
                bias: l.bias.as_ref().map(|b| faer::Col::zeros(b.nrows())),
            })
            .collect(),
    }
}
