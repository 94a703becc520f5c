//! A [`Cnn`] from its description and named tensors (PyTorch's `state_dict` names),
//! eval-mode BatchNorm folded into the conv before it; the gradient read the same way
//! and mapped onto the folded parameters; and back to named tensors for writing.

use std::collections::BTreeMap;

use faer::{Col, Mat};

use super::kernels::Window;
use super::net::{Cnn, CnnGradient, Conv, Layer};
use super::spec::{LayerSpec, ModelSpec, Shape};
use crate::model::Dense;
use crate::{Error, Result};

/// Named tensors: shape and values in row-major order (a safetensors file, a state_dict).
pub type Tensors = BTreeMap<String, (Vec<usize>, Vec<f64>)>;

/// A BatchNorm folded into conv weights W' = s W, b' = s (b - mu) + beta with
/// s = gamma / sqrt(var + eps) per output channel; the gradient maps back as
/// dL/dW' = dL/dW / s and dL/db' = dL/dbeta.
#[derive(Clone, Debug, PartialEq)]
pub struct Fold {
    /// The BatchNorm's module name.
    pub name: String,
    pub scale: Vec<f64>,
    /// The BatchNorm has gamma and beta (its bias gradient is dL/db').
    pub affine: bool,
}

fn tensor<'a>(
    t: &'a Tensors,
    what: &'static str,
    name: &str,
    shape: &[usize],
) -> Result<&'a [f64]> {
    let (s, v) = t.get(name).ok_or_else(|| Error::MissingTensor {
        what,
        name: name.to_string(),
    })?;
    if s.as_slice() != shape {
        return Err(Error::Shape(format!(
            "{what} tensor '{name}' has shape {s:?}, the description says {shape:?}"
        )));
    }
    if v.iter().any(|x| !x.is_finite()) {
        return Err(Error::NonFinite(format!("{what} tensor '{name}'")));
    }
    Ok(v)
}

fn dense(
    t: &Tensors,
    what: &'static str,
    name: &str,
    shape: &[usize],
    rows: usize,
    bias: bool,
) -> Result<Dense<f64>> {
    let w = tensor(t, what, &format!("{name}.weight"), shape)?;
    let cols = w.len() / rows;
    let weight = Mat::from_fn(rows, cols, |i, j| w[i * cols + j]);
    let bias = if bias {
        let b = tensor(t, what, &format!("{name}.bias"), &[rows])?;
        Some(Col::from_fn(rows, |i| b[i]))
    } else {
        None
    };
    Ok(Dense { weight, bias })
}

fn window(s: Shape, out: Shape, k: [usize; 2], st: [usize; 2], p: [usize; 2]) -> Window {
    let (Shape::Image { c, h, w }, Shape::Image { h: oh, w: ow, .. }) = (s, out) else {
        unreachable!("ModelSpec::shapes checked image layers get images")
    };
    Window {
        c,
        h,
        w,
        kh: k[0],
        kw: k[1],
        sh: st[0],
        sw: st[1],
        ph: p[0],
        pw: p[1],
        oh,
        ow,
    }
}

impl Cnn<f64> {
    /// The model a description and its tensors define. Missing tensors, shapes that do
    /// not chain and train-mode layers are errors naming the layer.
    pub fn from_spec(spec: &ModelSpec, t: &Tensors) -> Result<(Cnn<f64>, Vec<Option<Fold>>)> {
        let shapes = spec.shapes()?;
        let [c, h, w] = spec.input;
        let input = Shape::Image { c, h, w };
        let (mut layers, mut out_shapes, mut names, mut folds) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (l, ls) in spec.layers.iter().enumerate() {
            let before = if l == 0 { input } else { shapes[l - 1] };
            let layer = match ls {
                LayerSpec::Conv2d {
                    name,
                    in_channels,
                    out_channels,
                    kernel,
                    stride,
                    padding,
                    bias,
                } => {
                    let shape = [*out_channels, *in_channels, kernel[0], kernel[1]];
                    let param = dense(t, "model", name, &shape, *out_channels, *bias)?;
                    names.push(name.clone());
                    folds.push(None);
                    Layer::Conv(Conv {
                        param,
                        window: window(before, shapes[l], *kernel, *stride, *padding),
                    })
                }
                LayerSpec::BatchNorm2d {
                    name,
                    num_features,
                    eps,
                    ..
                } => {
                    let n = *num_features;
                    let mean = tensor(t, "model", &format!("{name}.running_mean"), &[n])?;
                    let var = tensor(t, "model", &format!("{name}.running_var"), &[n])?;
                    let affine = t.contains_key(&format!("{name}.weight"));
                    let (gamma, beta) = if affine {
                        (
                            tensor(t, "model", &format!("{name}.weight"), &[n])?.to_vec(),
                            tensor(t, "model", &format!("{name}.bias"), &[n])?.to_vec(),
                        )
                    } else {
                        (vec![1.0; n], vec![0.0; n])
                    };
                    let scale: Vec<f64> =
                        (0..n).map(|o| gamma[o] / (var[o] + eps).sqrt()).collect();
                    if let Some(o) = scale.iter().position(|s| *s == 0.0 || !s.is_finite()) {
                        return Err(Error::Unsupported(format!(
                            "layer {l} '{name}' (BatchNorm2d): channel {o} has scale {} (gamma / sqrt(var + eps)); \
                             it cannot be folded into the conv",
                            scale[o]
                        )));
                    }
                    let Some(Layer::Conv(conv)) = layers.last_mut() else {
                        unreachable!("ModelSpec::shapes checked a BatchNorm2d follows a Conv2d")
                    };
                    if !affine && conv.param.bias.is_none() {
                        return Err(Error::Unsupported(format!(
                            "layer {l} '{name}' (BatchNorm2d without affine after a conv without bias): \
                             the folded bias has no gradient to read"
                        )));
                    }
                    let p = &mut conv.param;
                    let b0 = p.bias.clone();
                    for (o, &so) in scale.iter().enumerate().take(n) {
                        for j in 0..p.weight.ncols() {
                            p.weight[(o, j)] *= so;
                        }
                    }
                    p.bias = Some(Col::from_fn(n, |o| {
                        scale[o] * (b0.as_ref().map_or(0.0, |b| b[o]) - mean[o]) + beta[o]
                    }));
                    *folds.last_mut().expect("a conv before") = Some(Fold {
                        name: name.clone(),
                        scale,
                        affine,
                    });
                    *out_shapes.last_mut().expect("a conv before") = shapes[l];
                    continue;
                }
                LayerSpec::MaxPool2d {
                    kernel,
                    stride,
                    padding,
                } => Layer::MaxPool(window(before, shapes[l], *kernel, *stride, *padding)),
                LayerSpec::AvgPool2d {
                    kernel,
                    stride,
                    padding,
                } => Layer::AvgPool(window(before, shapes[l], *kernel, *stride, *padding)),
                LayerSpec::AdaptiveAvgPool2d { output } => {
                    let Shape::Image { h, w, .. } = before else {
                        unreachable!("checked")
                    };
                    let k = [h / output[0], w / output[1]];
                    Layer::AvgPool(window(before, shapes[l], k, k, [0, 0]))
                }
                LayerSpec::Flatten => Layer::Flatten,
                LayerSpec::Linear {
                    name,
                    in_features,
                    out_features,
                    bias,
                } => {
                    let param = dense(
                        t,
                        "model",
                        name,
                        &[*out_features, *in_features],
                        *out_features,
                        *bias,
                    )?;
                    names.push(name.clone());
                    folds.push(None);
                    Layer::Linear(param)
                }
                LayerSpec::Identity => continue,
                other => Layer::Act(
                    other
                        .activation()
                        .expect("the remaining kinds are activations"),
                ),
            };
            layers.push(layer);
            out_shapes.push(shapes[l]);
        }
        let cnn = Cnn {
            input,
            layers,
            shapes: out_shapes,
            names,
        };
        Ok((cnn, folds))
    }

    /// The parameters as named tensors ([O, C, KH, KW] conv weights), as PyTorch names them.
    pub fn to_tensors(&self) -> Tensors {
        tensors_of(self, self.params())
    }
}

fn tensors_of<'a>(cnn: &Cnn<f64>, params: impl Iterator<Item = &'a Dense<f64>>) -> Tensors {
    let mut out = Tensors::new();
    let shapes: Vec<Vec<usize>> = cnn
        .layers
        .iter()
        .filter_map(|l| match l {
            Layer::Conv(c) => Some(vec![
                c.param.outputs(),
                c.window.c,
                c.window.kh,
                c.window.kw,
            ]),
            Layer::Linear(d) => Some(vec![d.outputs(), d.inputs()]),
            _ => None,
        })
        .collect();
    for ((p, name), shape) in params.zip(&cnn.names).zip(shapes) {
        let (r, c) = p.weight.shape();
        let w: Vec<f64> = (0..r)
            .flat_map(|i| (0..c).map(move |j| (i, j)))
            .map(|(i, j)| p.weight[(i, j)])
            .collect();
        out.insert(format!("{name}.weight"), (shape, w));
        if let Some(b) = &p.bias {
            out.insert(
                format!("{name}.bias"),
                (vec![r], b.iter().copied().collect()),
            );
        }
    }
    out
}

impl CnnGradient<f64> {
    /// The gradient of `cnn` from named tensors; for a folded BatchNorm, the conv's
    /// weight gradient divided by the fold's scale and the BatchNorm's bias gradient.
    pub fn from_tensors(
        cnn: &Cnn<f64>,
        folds: &[Option<Fold>],
        t: &Tensors,
    ) -> Result<CnnGradient<f64>> {
        let mut params = Vec::new();
        let convs = cnn.layers.iter().filter_map(|l| match l {
            Layer::Conv(c) => Some((
                c.param.outputs(),
                vec![c.param.outputs(), c.window.c, c.window.kh, c.window.kw],
            )),
            Layer::Linear(d) => Some((d.outputs(), vec![d.outputs(), d.inputs()])),
            _ => None,
        });
        for (((rows, shape), name), (fold, model)) in
            convs.zip(&cnn.names).zip(folds.iter().zip(cnn.params()))
        {
            let Some(f) = fold else {
                params.push(dense(
                    t,
                    "gradient",
                    name,
                    &shape,
                    rows,
                    model.bias.is_some(),
                )?);
                continue;
            };
            let conv_bias = t.contains_key(&format!("{name}.bias"));
            let mut g = dense(t, "gradient", name, &shape, rows, conv_bias && !f.affine)?;
            for o in 0..rows {
                for j in 0..g.weight.ncols() {
                    g.weight[(o, j)] /= f.scale[o];
                }
            }
            g.bias = Some(if f.affine {
                let b = tensor(t, "gradient", &format!("{}.bias", f.name), &[rows])?;
                Col::from_fn(rows, |o| b[o])
            } else {
                let b = g.bias.take().expect("read above");
                Col::from_fn(rows, |o| b[o] / f.scale[o])
            });
            params.push(g);
        }
        Ok(CnnGradient { params })
    }

    /// The gradient as named tensors (the model's names and shapes).
    pub fn to_tensors(&self, cnn: &Cnn<f64>) -> Tensors {
        tensors_of(cnn, self.params.iter())
    }
}
