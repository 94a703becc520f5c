//! The description of a convolutional client (`model.json`): the layers in forward
//! order, parameter layers named by their PyTorch module names, and the shape checks
//! that make a description trustworthy before any tensor is read.

use serde::{Deserialize, Serialize};

use crate::model::Activation;
use crate::{Error, Result};

/// Version tag written into every description.
pub const FORMAT: &str = "gradleak-cnn/1";

/// The layer kinds a description may hold (the `type` field), in the error's order.
pub const LAYER_KINDS: [&str; 13] = [
    "Conv2d",
    "BatchNorm2d",
    "ReLU",
    "LeakyReLU",
    "Tanh",
    "Sigmoid",
    "GELU",
    "MaxPool2d",
    "AvgPool2d",
    "AdaptiveAvgPool2d",
    "Flatten",
    "Linear",
    "Identity",
];

/// One layer of the description, as `export_model` writes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum LayerSpec {
    Conv2d {
        name: String,
        in_channels: usize,
        out_channels: usize,
        kernel: [usize; 2],
        #[serde(default = "one2")]
        stride: [usize; 2],
        #[serde(default)]
        padding: [usize; 2],
        bias: bool,
    },
    /// Eval-mode batch normalisation (running statistics); folded into the conv before it.
    BatchNorm2d {
        name: String,
        num_features: usize,
        eps: f64,
        /// Train-mode statistics depend on the private batch: refused.
        #[serde(default)]
        training: bool,
    },
    ReLU,
    LeakyReLU {
        #[serde(default = "leaky")]
        negative_slope: f64,
    },
    Tanh,
    Sigmoid,
    GELU,
    MaxPool2d {
        kernel: [usize; 2],
        stride: [usize; 2],
        #[serde(default)]
        padding: [usize; 2],
    },
    AvgPool2d {
        kernel: [usize; 2],
        stride: [usize; 2],
        #[serde(default)]
        padding: [usize; 2],
    },
    AdaptiveAvgPool2d {
        output: [usize; 2],
    },
    Flatten,
    Linear {
        name: String,
        in_features: usize,
        out_features: usize,
        bias: bool,
    },
    /// A layer that does nothing (eval-mode Dropout, nn.Identity).
    Identity,
}

fn one2() -> [usize; 2] {
    [1, 1]
}
fn leaky() -> f64 {
    crate::model::LEAKY_SLOPE
}

/// A whole description: the input image shape (channels, height, width) and the layers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub format: String,
    /// (C, H, W) of one input; inputs are flattened in this (PyTorch's) order.
    pub input: [usize; 3],
    pub layers: Vec<LayerSpec>,
}

/// The shape of one sample between layers: an image (C, H, W) or a flat vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Shape {
    Image { c: usize, h: usize, w: usize },
    Flat(usize),
}

impl Shape {
    /// Values per sample.
    pub fn len(self) -> usize {
        match self {
            Shape::Image { c, h, w } => c * h * w,
            Shape::Flat(n) => n,
        }
    }
    pub fn is_empty(self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Shape::Image { c, h, w } => write!(f, "{c}x{h}x{w}"),
            Shape::Flat(n) => write!(f, "{n}"),
        }
    }
}

/// Output side of a window of `k` with `stride` and `pad` on `n` (PyTorch's floor rule).
pub fn window_out(n: usize, k: usize, stride: usize, pad: usize) -> Option<usize> {
    if stride == 0 || k == 0 || n + 2 * pad < k {
        return None;
    }
    Some((n + 2 * pad - k) / stride + 1)
}

impl LayerSpec {
    /// The `type` name.
    pub fn kind(&self) -> &'static str {
        match self {
            LayerSpec::Conv2d { .. } => "Conv2d",
            LayerSpec::BatchNorm2d { .. } => "BatchNorm2d",
            LayerSpec::ReLU => "ReLU",
            LayerSpec::LeakyReLU { .. } => "LeakyReLU",
            LayerSpec::Tanh => "Tanh",
            LayerSpec::Sigmoid => "Sigmoid",
            LayerSpec::GELU => "GELU",
            LayerSpec::MaxPool2d { .. } => "MaxPool2d",
            LayerSpec::AvgPool2d { .. } => "AvgPool2d",
            LayerSpec::AdaptiveAvgPool2d { .. } => "AdaptiveAvgPool2d",
            LayerSpec::Flatten => "Flatten",
            LayerSpec::Linear { .. } => "Linear",
            LayerSpec::Identity => "Identity",
        }
    }

    /// The element-wise activation this layer is, if it is one.
    pub fn activation(&self) -> Option<Activation> {
        match self {
            LayerSpec::ReLU => Some(Activation::Relu),
            LayerSpec::LeakyReLU { .. } => Some(Activation::LeakyRelu),
            LayerSpec::Tanh => Some(Activation::Tanh),
            LayerSpec::Sigmoid => Some(Activation::Sigmoid),
            LayerSpec::GELU => Some(Activation::Gelu),
            _ => None,
        }
    }

    /// The output shape for input `s`; `at` names the layer in errors.
    pub fn output(&self, s: Shape, at: &str) -> Result<Shape> {
        let image = |s: Shape| match s {
            Shape::Image { c, h, w } => Ok((c, h, w)),
            Shape::Flat(n) => Err(Error::Shape(format!(
                "{at} ({}) takes an image but gets a flat vector of {n}",
                self.kind()
            ))),
        };
        let window = |(c, h, w): (usize, usize, usize),
                      k: [usize; 2],
                      st: [usize; 2],
                      p: [usize; 2]| {
            if 2 * p[0] > k[0] || 2 * p[1] > k[1] {
                return Err(Error::Shape(format!(
                    "{at} ({}): padding {p:?} is more than half the kernel {k:?}",
                    self.kind()
                )));
            }
            match (
                window_out(h, k[0], st[0], p[0]),
                window_out(w, k[1], st[1], p[1]),
            ) {
                (Some(oh), Some(ow)) => Ok((c, oh, ow)),
                _ => Err(Error::Shape(format!(
                    "{at} ({}): kernel {k:?} stride {st:?} padding {p:?} does not fit a {h}x{w} input",
                    self.kind()
                ))),
            }
        };
        match self {
            LayerSpec::Conv2d {
                in_channels,
                out_channels,
                kernel,
                stride,
                padding,
                ..
            } => {
                let (c, h, w) = image(s)?;
                if c != *in_channels {
                    return Err(Error::Shape(format!(
                        "{at} (Conv2d) takes {in_channels} channels, the layer below gives {c}"
                    )));
                }
                let (oh, ow) = match (
                    window_out(h, kernel[0], stride[0], padding[0]),
                    window_out(w, kernel[1], stride[1], padding[1]),
                ) {
                    (Some(oh), Some(ow)) => (oh, ow),
                    _ => {
                        return Err(Error::Shape(format!(
                            "{at} (Conv2d): kernel {kernel:?} stride {stride:?} padding {padding:?} does not fit a {h}x{w} input"
                        )));
                    }
                };
                Ok(Shape::Image {
                    c: *out_channels,
                    h: oh,
                    w: ow,
                })
            }
            LayerSpec::BatchNorm2d { num_features, .. } => {
                let (c, _, _) = image(s)?;
                if c != *num_features {
                    return Err(Error::Shape(format!(
                        "{at} (BatchNorm2d) normalises {num_features} channels, the layer below gives {c}"
                    )));
                }
                Ok(s)
            }
            LayerSpec::MaxPool2d {
                kernel,
                stride,
                padding,
            }
            | LayerSpec::AvgPool2d {
                kernel,
                stride,
                padding,
            } => {
                let (c, h, w) = window(image(s)?, *kernel, *stride, *padding)?;
                Ok(Shape::Image { c, h, w })
            }
            LayerSpec::AdaptiveAvgPool2d { output } => {
                let (c, h, w) = image(s)?;
                if output[0] == 0 || output[1] == 0 || h % output[0] != 0 || w % output[1] != 0 {
                    return Err(Error::Unsupported(format!(
                        "{at} (AdaptiveAvgPool2d): output {output:?} does not divide the {h}x{w} input \
                         (gradleak takes the case that is a plain AvgPool2d)"
                    )));
                }
                Ok(Shape::Image {
                    c,
                    h: output[0],
                    w: output[1],
                })
            }
            LayerSpec::Flatten => Ok(Shape::Flat(s.len())),
            LayerSpec::Linear {
                in_features,
                out_features,
                ..
            } => match s {
                Shape::Flat(n) if n == *in_features => Ok(Shape::Flat(*out_features)),
                Shape::Flat(n) => Err(Error::Shape(format!(
                    "{at} (Linear) takes {in_features} features, the layer below gives {n}"
                ))),
                Shape::Image { .. } => Err(Error::Shape(format!(
                    "{at} (Linear) gets an image {s}: put a Flatten before it"
                ))),
            },
            LayerSpec::ReLU
            | LayerSpec::LeakyReLU { .. }
            | LayerSpec::Tanh
            | LayerSpec::Sigmoid
            | LayerSpec::GELU
            | LayerSpec::Identity => Ok(s),
        }
    }
}

impl ModelSpec {
    /// Parse `model.json`: an unknown layer type is named, a train-mode layer refused.
    pub fn from_json(text: &str) -> Result<ModelSpec> {
        let bad = |reason: String| Error::Spec {
            kind: "model description",
            spec: "model.json".into(),
            reason,
        };
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| bad(format!("not JSON ({e})")))?;
        let layers = value
            .get("layers")
            .and_then(|l| l.as_array())
            .ok_or_else(|| bad("no 'layers' list".into()))?;
        for (i, l) in layers.iter().enumerate() {
            let kind = l.get("type").and_then(|t| t.as_str()).unwrap_or("");
            if !LAYER_KINDS.contains(&kind) {
                let named = l.get("name").and_then(|n| n.as_str());
                return Err(Error::Unknown {
                    kind: "layer",
                    name: match named {
                        Some(n) => format!("{kind} ({n}, layer {i})"),
                        None => format!("{kind} (layer {i})"),
                    },
                    expected: LAYER_KINDS.join(" "),
                });
            }
        }
        let spec: ModelSpec = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
        if spec.format != FORMAT {
            return Err(bad(format!("format '{}' is not '{FORMAT}'", spec.format)));
        }
        spec.shapes()?;
        Ok(spec)
    }

    /// The JSON text `export_model` writes.
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self).map_err(|e| Error::encode("model description", e))
    }

    /// Shape after each layer (`shapes()[l]` is layer l's output), checked to chain;
    /// refuses what the gradient would make depend on state the server lacks.
    pub fn shapes(&self) -> Result<Vec<Shape>> {
        let [c, h, w] = self.input;
        if c * h * w == 0 {
            return Err(Error::Shape(format!(
                "input shape {:?} is empty",
                self.input
            )));
        }
        let mut s = Shape::Image { c, h, w };
        let mut out = Vec::with_capacity(self.layers.len());
        for (i, l) in self.layers.iter().enumerate() {
            let at = match l {
                LayerSpec::Conv2d { name, .. }
                | LayerSpec::BatchNorm2d { name, .. }
                | LayerSpec::Linear { name, .. } => format!("layer {i} '{name}'"),
                _ => format!("layer {i}"),
            };
            match l {
                LayerSpec::BatchNorm2d { training: true, .. } => {
                    return Err(Error::Unsupported(format!(
                        "{at} is a BatchNorm2d in training mode: its batch statistics are private; \
                         call model.eval() (running statistics) before computing the gradient"
                    )));
                }
                LayerSpec::BatchNorm2d { .. }
                    if !matches!(
                        i.checked_sub(1).map(|p| &self.layers[p]),
                        Some(LayerSpec::Conv2d { .. })
                    ) =>
                {
                    return Err(Error::Unsupported(format!(
                        "{at} (BatchNorm2d) does not follow a Conv2d: gradleak folds it into the conv before it"
                    )));
                }
                LayerSpec::LeakyReLU { negative_slope }
                    if *negative_slope != crate::model::LEAKY_SLOPE =>
                {
                    return Err(Error::Unsupported(format!(
                        "{at}: LeakyReLU(negative_slope={negative_slope}): gradleak's leaky_relu has slope {} only",
                        crate::model::LEAKY_SLOPE
                    )));
                }
                _ => {}
            }
            s = l.output(s, &at)?;
            out.push(s);
        }
        match s {
            Shape::Flat(_) => Ok(out),
            Shape::Image { .. } => Err(Error::Shape(format!(
                "the model ends with an image {s}; gradleak attacks a classifier ending in Linear"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lenet() -> ModelSpec {
        ModelSpec {
            format: FORMAT.into(),
            input: [3, 32, 32],
            layers: vec![
                LayerSpec::Conv2d {
                    name: "c1".into(),
                    in_channels: 3,
                    out_channels: 6,
                    kernel: [5, 5],
                    stride: [1, 1],
                    padding: [0, 0],
                    bias: true,
                },
                LayerSpec::ReLU,
                LayerSpec::MaxPool2d {
                    kernel: [2, 2],
                    stride: [2, 2],
                    padding: [0, 0],
                },
                LayerSpec::Flatten,
                LayerSpec::Linear {
                    name: "fc".into(),
                    in_features: 6 * 14 * 14,
                    out_features: 10,
                    bias: true,
                },
            ],
        }
    }

    #[test]
    fn shapes_chain_and_round_trip_through_json() {
        let s = lenet();
        let shapes = s.shapes().unwrap();
        assert_eq!(shapes[0], Shape::Image { c: 6, h: 28, w: 28 });
        assert_eq!(shapes[2], Shape::Image { c: 6, h: 14, w: 14 });
        assert_eq!(*shapes.last().unwrap(), Shape::Flat(10));
        assert_eq!(ModelSpec::from_json(&s.to_json().unwrap()).unwrap(), s);
    }

    #[test]
    fn unknown_layers_and_bad_shapes_are_named() {
        let mut text = lenet().to_json().unwrap();
        text = text.replacen("\"Flatten\"", "\"Dropout\"", 1);
        let e = ModelSpec::from_json(&text).unwrap_err().to_string();
        assert!(e.contains("unknown layer 'Dropout (layer 3)'"), "{e}");
        let mut s = lenet();
        s.layers[4] = LayerSpec::Linear {
            name: "fc".into(),
            in_features: 100,
            out_features: 10,
            bias: true,
        };
        let e = s.shapes().unwrap_err().to_string();
        assert!(
            e.contains("'fc' (Linear) takes 100 features, the layer below gives 1176"),
            "{e}"
        );
        let mut s = lenet();
        s.layers.insert(
            1,
            LayerSpec::BatchNorm2d {
                name: "bn1".into(),
                num_features: 6,
                eps: 1e-5,
                training: true,
            },
        );
        let e = s.shapes().unwrap_err().to_string();
        assert!(e.contains("'bn1' is a BatchNorm2d in training mode"), "{e}");
    }
}
