//! The built-in convolutional clients of `simulate`: LeNet and the VGG-style ConvNet of
//! `scripts/make_cnn_fixtures.py` as descriptions (parameter layers named by their
//! `nn.Sequential` index, as PyTorch's `state_dict` names them), and PyTorch's default
//! initialisation of a description from a seeded generator.

use rand_distr::{Distribution, Uniform};

use super::build::Tensors;
use super::spec::{FORMAT, LayerSpec, ModelSpec, Shape};
use crate::{Error, Result};

/// A built-in architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// conv5-6, ReLU, maxpool2, conv5-16, ReLU, maxpool2, fc 400-120-84-K (on 3x32x32).
    Lenet,
    /// Three conv3 (padding 1) blocks of 32, 64, 64 channels, each ReLU and maxpool2,
    /// then fc 1024-1024-K with ReLU (on 3x32x32).
    Convnet,
}

impl Architecture {
    pub const ALL: [Architecture; 2] = [Architecture::Lenet, Architecture::Convnet];

    pub fn name(self) -> &'static str {
        match self {
            Architecture::Lenet => "lenet",
            Architecture::Convnet => "convnet",
        }
    }

    /// The description on inputs of shape (C, H, W) with `classes` outputs; the first
    /// Linear takes whatever the conv part gives (400 and 1024 on 3x32x32).
    pub fn spec(self, input: [usize; 3], classes: usize) -> Result<ModelSpec> {
        let conv = |i: usize, o: usize, k: usize, p: usize| LayerSpec::Conv2d {
            name: String::new(),
            in_channels: i,
            out_channels: o,
            kernel: [k, k],
            stride: [1, 1],
            padding: [p, p],
            bias: true,
        };
        let pool = || LayerSpec::MaxPool2d {
            kernel: [2, 2],
            stride: [2, 2],
            padding: [0, 0],
        };
        let c = input[0];
        let (body, hidden): (Vec<LayerSpec>, &[usize]) = match self {
            Architecture::Lenet => (
                vec![
                    conv(c, 6, 5, 0),
                    LayerSpec::ReLU,
                    pool(),
                    conv(6, 16, 5, 0),
                    LayerSpec::ReLU,
                    pool(),
                ],
                &[120, 84],
            ),
            Architecture::Convnet => (
                vec![
                    conv(c, 32, 3, 1),
                    LayerSpec::ReLU,
                    pool(),
                    conv(32, 64, 3, 1),
                    LayerSpec::ReLU,
                    pool(),
                    conv(64, 64, 3, 1),
                    LayerSpec::ReLU,
                    pool(),
                ],
                &[1024],
            ),
        };
        let mut layers = body;
        layers.push(LayerSpec::Flatten);
        // the width of the flattened conv output, from the shapes of the part so far
        let mut s = Shape::Image {
            c: input[0],
            h: input[1],
            w: input[2],
        };
        for (i, l) in layers.iter().enumerate() {
            s = l.output(s, &format!("{} layer {i}", self.name()))?;
        }
        let mut fan_in = s.len();
        for (k, &out) in hidden.iter().chain(std::iter::once(&classes)).enumerate() {
            if k > 0 {
                layers.push(LayerSpec::ReLU);
            }
            layers.push(LayerSpec::Linear {
                name: String::new(),
                in_features: fan_in,
                out_features: out,
                bias: true,
            });
            fan_in = out;
        }
        // PyTorch's names in an nn.Sequential: the layer's index
        for (i, l) in layers.iter_mut().enumerate() {
            if let LayerSpec::Conv2d { name, .. } | LayerSpec::Linear { name, .. } = l {
                *name = i.to_string();
            }
        }
        let spec = ModelSpec {
            format: FORMAT.into(),
            input,
            layers,
        };
        spec.shapes()?;
        Ok(spec)
    }
}

impl std::str::FromStr for Architecture {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Architecture::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| Error::Unknown {
                kind: "architecture",
                name: s.into(),
                expected: "lenet convnet".into(),
            })
    }
}

impl std::fmt::Display for Architecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// PyTorch's default parameters for every layer of `spec`, layer by layer, weight then
/// bias: `Conv2d` and `Linear` weights `kaiming_uniform_(a = sqrt(5))`, i.e.
/// U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = C KH KW (or in_features), biases
/// U(-1/sqrt(fan_in), 1/sqrt(fan_in)); `BatchNorm2d` at its identity (mean 0, var 1,
/// gamma 1, beta 0).
pub fn torch_default(spec: &ModelSpec, rng: &mut impl rand::Rng) -> Result<Tensors> {
    spec.shapes()?;
    let mut t = Tensors::new();
    let mut uniform = |name: &str, shape: Vec<usize>, fan_in: usize, t: &mut Tensors| {
        let bound = 1.0 / (fan_in as f64).sqrt();
        let u = Uniform::new(-bound, bound).expect("fan_in >= 1 after shapes()");
        let n = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| u.sample(rng)).collect();
        t.insert(name.to_string(), (shape, v));
    };
    for l in &spec.layers {
        match l {
            LayerSpec::Conv2d {
                name,
                in_channels,
                out_channels,
                kernel,
                bias,
                ..
            } => {
                let fan_in = in_channels * kernel[0] * kernel[1];
                let shape = vec![*out_channels, *in_channels, kernel[0], kernel[1]];
                uniform(&format!("{name}.weight"), shape, fan_in, &mut t);
                if *bias {
                    uniform(&format!("{name}.bias"), vec![*out_channels], fan_in, &mut t);
                }
            }
            LayerSpec::Linear {
                name,
                in_features,
                out_features,
                bias,
            } => {
                let shape = vec![*out_features, *in_features];
                uniform(&format!("{name}.weight"), shape, *in_features, &mut t);
                if *bias {
                    uniform(
                        &format!("{name}.bias"),
                        vec![*out_features],
                        *in_features,
                        &mut t,
                    );
                }
            }
            LayerSpec::BatchNorm2d {
                name, num_features, ..
            } => {
                let n = *num_features;
                for (field, v) in [
                    ("running_mean", 0.0),
                    ("running_var", 1.0),
                    ("weight", 1.0),
                    ("bias", 0.0),
                ] {
                    t.insert(format!("{name}.{field}"), (vec![n], vec![v; n]));
                }
            }
            _ => {}
        }
    }
    Ok(t)
}

/// The description of the model `Cnn::from_spec` builds from `spec`: every
/// `BatchNorm2d` dropped and the conv before it given a bias (the folded parameters).
pub fn folded(spec: &ModelSpec) -> ModelSpec {
    let mut layers: Vec<LayerSpec> = Vec::with_capacity(spec.layers.len());
    for l in &spec.layers {
        match l {
            LayerSpec::BatchNorm2d { .. } => {
                if let Some(LayerSpec::Conv2d { bias, .. }) = layers.last_mut() {
                    *bias = true;
                }
            }
            LayerSpec::Identity => {}
            other => layers.push(other.clone()),
        }
    }
    ModelSpec {
        format: spec.format.clone(),
        input: spec.input,
        layers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cnn::{Cnn, Layer};
    use rand::SeedableRng;

    #[test]
    fn lenet_and_convnet_have_the_fixture_script_layers() {
        let l = Architecture::Lenet.spec([3, 32, 32], 10).unwrap();
        let s = l.shapes().unwrap();
        // conv 6x28x28, pool 6x14x14, conv 16x10x10, pool 16x5x5 = 400
        assert_eq!(s[5], Shape::Image { c: 16, h: 5, w: 5 });
        let names: Vec<&str> = l
            .layers
            .iter()
            .filter_map(|x| match x {
                LayerSpec::Conv2d { name, .. } | LayerSpec::Linear { name, .. } => {
                    Some(name.as_str())
                }
                _ => None,
            })
            .collect();
        assert_eq!(names, ["0", "3", "7", "9", "11"]);
        assert!(matches!(
            l.layers[7],
            LayerSpec::Linear {
                in_features: 400,
                out_features: 120,
                ..
            }
        ));
        let c = Architecture::Convnet.spec([3, 32, 32], 10).unwrap();
        assert!(matches!(
            c.layers[10],
            LayerSpec::Linear {
                in_features: 1024,
                out_features: 1024,
                ..
            }
        ));
        assert_eq!(*c.shapes().unwrap().last().unwrap(), Shape::Flat(10));
        assert!(Architecture::Lenet.spec([3, 8, 8], 10).is_err());
    }

    #[test]
    fn torch_default_bounds_are_one_over_root_fan_in() {
        let spec = Architecture::Lenet.spec([3, 32, 32], 10).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let t = torch_default(&spec, &mut rng).unwrap();
        for (name, fan_in) in [("0", 75.0), ("3", 150.0), ("7", 400.0), ("11", 84.0)] {
            let bound = 1.0 / f64::sqrt(fan_in);
            for part in ["weight", "bias"] {
                let (_, v) = &t[&format!("{name}.{part}")];
                let max = v.iter().fold(0.0f64, |m, x| m.max(x.abs()));
                // within the bound, and reaching near it (n >= 6 draws of U(-b, b))
                assert!(max <= bound && max > 0.5 * bound, "{name}.{part}: {max}");
            }
        }
        let (cnn, _) = Cnn::from_spec(&spec, &t).unwrap();
        assert_eq!(
            cnn.layers
                .iter()
                .filter(|l| matches!(l, Layer::Conv(_)))
                .count(),
            2
        );
    }
}
