//! Where the client's private inputs come from (`--data SPEC`).
//!
//! | spec | what |
//! |---|---|
//! | `digits` | UCI handwritten digits, 8x8, embedded in the binary, scaled to [0, 1] |
//! | `gaussian:D` | i.i.d. N(0, 1/D) vectors of dimension D |
//! | `images:DIR[:S[:L]]` | deterministic square crops of the photos in DIR, S x S RGB in [0, 1]; L tiling levels (default 3) |
//! | `csv:FILE[:label=COL]` | a numeric table, standardised per column |
//! | `npy:FILE` | a 2-D float array, rows are samples |

mod images;
pub(crate) use images::image_name;
mod table;

use std::path::PathBuf;

use faer::Mat;
use rand::seq::SliceRandom;
use rand_distr::{Distribution, Normal};

use crate::io::png::ImageShape;
use crate::{Error, Result};

/// The UCI digits (E. Alpaydin, C. Kaynak; CC BY 4.0), 1797 x 65, as shipped in scikit-learn.
static DIGITS_CSV_GZ: &[u8] = include_bytes!("../../assets/digits.csv.gz");

/// A parsed `--data` argument.
#[derive(Clone, Debug, PartialEq)]
pub enum DataSpec {
    Digits,
    Gaussian {
        dim: usize,
    },
    Images {
        dir: PathBuf,
        size: usize,
        /// Tiling levels: the centred square, then tiles of 1/2, 1/4, ... of its side.
        levels: usize,
    },
    Csv {
        path: PathBuf,
        label: Option<String>,
    },
    Npy {
        path: PathBuf,
    },
}

/// Default side of image crops.
pub const DEFAULT_IMAGE_SIZE: usize = 32;
/// Default number of tiling levels of image crops (side, 1/2, 1/4).
pub const DEFAULT_IMAGE_LEVELS: usize = 3;
/// Most tiling levels (tiles of 1/128 of the side).
pub const MAX_IMAGE_LEVELS: usize = 8;

impl std::str::FromStr for DataSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| Error::Spec {
            kind: "data spec",
            spec: s.to_string(),
            reason: why.to_string(),
        };
        let (kind, rest) = s.split_once(':').unwrap_or((s, ""));
        match kind {
            "digits" if rest.is_empty() => Ok(DataSpec::Digits),
            "gaussian" => {
                let dim: usize = rest
                    .parse()
                    .map_err(|_| bad("expected gaussian:D with D a positive integer"))?;
                if dim == 0 {
                    return Err(bad("the dimension must be at least 1"));
                }
                Ok(DataSpec::Gaussian { dim })
            }
            "images" => {
                if rest.is_empty() {
                    return Err(bad("expected images:DIR[:S[:L]]"));
                }
                // trailing numeric fields: S, then L
                let number = |t: &str| -> Option<usize> {
                    (!t.is_empty() && t.chars().all(|c| c.is_ascii_digit()))
                        .then(|| t.parse().ok())
                        .flatten()
                };
                let mut dir = rest;
                let mut nums = Vec::new();
                while nums.len() < 2 {
                    match dir.rsplit_once(':') {
                        Some((d, n)) if number(n).is_some() => {
                            nums.push(number(n).unwrap_or(0));
                            dir = d;
                        }
                        Some((_, n)) if n.chars().all(|c| c.is_ascii_digit()) => {
                            return Err(bad("expected images:DIR[:S[:L]] with S, L integers"));
                        }
                        _ => break,
                    }
                }
                nums.reverse();
                let size = nums.first().copied().unwrap_or(DEFAULT_IMAGE_SIZE);
                let levels = nums.get(1).copied().unwrap_or(DEFAULT_IMAGE_LEVELS);
                if size == 0 {
                    return Err(bad("the image size S must be at least 1"));
                }
                if !(1..=MAX_IMAGE_LEVELS).contains(&levels) {
                    return Err(bad(&format!(
                        "the tiling levels L (images:DIR:S:L) must be 1 to {MAX_IMAGE_LEVELS}"
                    )));
                }
                Ok(DataSpec::Images {
                    dir: dir.into(),
                    size,
                    levels,
                })
            }
            "csv" => {
                if rest.is_empty() {
                    return Err(bad("expected csv:FILE[:label=COL]"));
                }
                match rest.rsplit_once(":label=") {
                    Some((f, col)) => Ok(DataSpec::Csv {
                        path: f.into(),
                        label: Some(col.to_string()),
                    }),
                    None => Ok(DataSpec::Csv {
                        path: rest.into(),
                        label: None,
                    }),
                }
            }
            "npy" if !rest.is_empty() => Ok(DataSpec::Npy { path: rest.into() }),
            _ => Err(Error::Unknown {
                kind: "data spec",
                name: s.to_string(),
                expected: "digits gaussian:D images:DIR[:S[:L]] csv:FILE[:label=COL] npy:FILE"
                    .into(),
            }),
        }
    }
}

/// A loaded data set: rows are samples.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// Human-readable name (the spec).
    pub name: String,
    /// n x d.
    pub x: Mat<f64>,
    /// Class labels when the data set has them.
    pub labels: Option<Vec<usize>>,
    /// Number of classes when labels exist.
    pub classes: Option<usize>,
    /// Known value range (images: [0, 1]) for PSNR and plots.
    pub range: Option<(f64, f64)>,
    /// Image layout when rows are images.
    pub image: Option<ImageShape>,
}

/// The private batch drawn from a data set.
#[derive(Clone, Debug)]
pub struct Batch {
    /// B x d, each row a real row of the data set.
    pub x: Mat<f64>,
    pub labels: Option<Vec<usize>>,
    /// Row indices into the data set.
    pub indices: Vec<usize>,
}

/// Summary statistics of a data set, used as the server's public prior.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct PriorStats {
    /// Mean over all entries (a scalar prior mean xbar).
    pub mean: f64,
    /// Standard deviation over all entries.
    pub std: f64,
    pub min: f64,
    pub max: f64,
    /// E||x||^2.
    pub sq_norm: f64,
    /// E||x - xbar||^2.
    pub centred_sq_norm: f64,
}

impl DataSpec {
    /// Load the data. `generated_rows` is how many rows to draw for `gaussian:D`.
    pub fn load(&self, generated_rows: usize, rng: &mut impl rand::Rng) -> Result<Dataset> {
        match self {
            DataSpec::Digits => {
                let t =
                    table::parse_table(std::path::Path::new("digits.csv.gz"), DIGITS_CSV_GZ, None)?;
                let n = t.values.nrows();
                let d = t.values.ncols() - 1;
                let x = Mat::from_fn(n, d, |i, j| t.values[(i, j)] / 16.0);
                let labels: Vec<usize> = (0..n).map(|i| t.values[(i, d)] as usize).collect();
                Ok(Dataset {
                    name: "digits".into(),
                    x,
                    labels: Some(labels),
                    classes: Some(10),
                    range: Some((0.0, 1.0)),
                    image: Some(ImageShape {
                        height: 8,
                        width: 8,
                        channels: 1,
                    }),
                })
            }
            DataSpec::Gaussian { dim } => {
                let n = Normal::new(0.0, 1.0 / (*dim as f64).sqrt()).expect("finite");
                Ok(Dataset {
                    name: format!("gaussian:{dim}"),
                    x: Mat::from_fn(generated_rows.max(1), *dim, |_, _| n.sample(rng)),
                    labels: None,
                    classes: None,
                    range: None,
                    image: None,
                })
            }
            DataSpec::Images { dir, size, levels } => images::load_crops(dir, *size, *levels),
            DataSpec::Csv { path, label } => table::load_csv(path, label.as_deref()),
            DataSpec::Npy { path } => {
                let x = crate::io::npy::read_matrix(path)?;
                if x.nrows() == 0 || x.ncols() == 0 {
                    return Err(Error::Shape(format!("{}: empty array", path.display())));
                }
                Ok(Dataset {
                    name: format!("npy:{}", path.display()),
                    x,
                    labels: None,
                    classes: None,
                    range: None,
                    image: None,
                })
            }
        }
    }
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.x.nrows()
    }
    pub fn is_empty(&self) -> bool {
        self.x.nrows() == 0
    }
    pub fn dim(&self) -> usize {
        self.x.ncols()
    }

    /// Draw `b` distinct rows with the seeded generator.
    pub fn draw_batch(&self, b: usize, rng: &mut impl rand::Rng) -> Result<Batch> {
        if b == 0 {
            return Err(Error::Empty("the batch size must be at least 1"));
        }
        if b > self.len() {
            return Err(Error::NotEnoughRows {
                requested: b,
                data: self.name.clone(),
                rows: self.len(),
            });
        }
        let mut idx: Vec<usize> = (0..self.len()).collect();
        idx.shuffle(rng);
        idx.truncate(b);
        let x = Mat::from_fn(b, self.dim(), |i, j| self.x[(idx[i], j)]);
        let labels = self
            .labels
            .as_ref()
            .map(|l| idx.iter().map(|&i| l[i]).collect());
        Ok(Batch {
            x,
            labels,
            indices: idx,
        })
    }

    /// The mean of every coordinate over the data set (its mean image).
    pub fn mean_image(&self) -> Vec<f64> {
        let n = self.x.nrows().max(1) as f64;
        (0..self.dim())
            .map(|j| self.x.col(j).iter().sum::<f64>() / n)
            .collect()
    }

    /// Mean, spread and norms of the data, as a server's public prior.
    pub fn prior_stats(&self) -> PriorStats {
        let (n, d) = self.x.shape();
        let count = (n * d) as f64;
        let mut sum = 0.0;
        let (mut min, mut max) = (f64::INFINITY, f64::NEG_INFINITY);
        let mut sq = 0.0;
        for j in 0..d {
            for i in 0..n {
                let v = self.x[(i, j)];
                sum += v;
                sq += v * v;
                min = min.min(v);
                max = max.max(v);
            }
        }
        let mean = sum / count;
        let var = (sq / count - mean * mean).max(0.0);
        PriorStats {
            mean,
            std: var.sqrt(),
            min,
            max,
            sq_norm: sq / n as f64,
            centred_sq_norm: var * d as f64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn specs_parse_and_bad_ones_are_errors() {
        assert_eq!("digits".parse::<DataSpec>().unwrap(), DataSpec::Digits);
        assert_eq!(
            "gaussian:64".parse::<DataSpec>().unwrap(),
            DataSpec::Gaussian { dim: 64 }
        );
        assert_eq!(
            "images:/a/b:16".parse::<DataSpec>().unwrap(),
            DataSpec::Images {
                dir: "/a/b".into(),
                size: 16,
                levels: 3
            }
        );
        assert_eq!(
            "images:/a/b:32:5".parse::<DataSpec>().unwrap(),
            DataSpec::Images {
                dir: "/a/b".into(),
                size: 32,
                levels: 5
            }
        );
        assert_eq!(
            "images:/a/b".parse::<DataSpec>().unwrap(),
            DataSpec::Images {
                dir: "/a/b".into(),
                size: 32,
                levels: 3
            }
        );
        assert_eq!(
            "csv:t.csv:label=target".parse::<DataSpec>().unwrap(),
            DataSpec::Csv {
                path: "t.csv".into(),
                label: Some("target".into())
            }
        );
        for bad in [
            "gaussian",
            "gaussian:0",
            "gaussian:x",
            "mnist",
            "images",
            "images:/a:32:0",
            "images:/a:32:9",
            "images:/a:0",
            "npy:",
        ] {
            assert!(bad.parse::<DataSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn digits_are_embedded_scaled_and_labelled() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let d = DataSpec::Digits.load(0, &mut rng).unwrap();
        assert_eq!(d.x.shape(), (1797, 64));
        let s = d.prior_stats();
        assert_eq!((s.min, s.max), (0.0, 1.0));
        // first row of the UCI file: 0,0,5,13,9,1,0,0,... label 0
        assert_eq!(d.x[(0, 2)], 5.0 / 16.0);
        assert_eq!(d.labels.as_ref().unwrap()[0], 0);
    }

    #[test]
    fn batches_are_real_distinct_rows_and_reproducible() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let d = DataSpec::Digits.load(0, &mut rng).unwrap();
        let b1 = d
            .draw_batch(16, &mut rand_chacha::ChaCha8Rng::seed_from_u64(7))
            .unwrap();
        let b2 = d
            .draw_batch(16, &mut rand_chacha::ChaCha8Rng::seed_from_u64(7))
            .unwrap();
        assert_eq!(b1.indices, b2.indices);
        let mut u = b1.indices.clone();
        u.sort();
        u.dedup();
        assert_eq!(u.len(), 16);
        for (i, &r) in b1.indices.iter().enumerate() {
            for j in 0..64 {
                assert_eq!(b1.x[(i, j)], d.x[(r, j)]);
            }
        }
        assert!(matches!(
            d.draw_batch(5000, &mut rng),
            Err(Error::NotEnoughRows {
                requested: 5000,
                ..
            })
        ));
        assert!(matches!(d.draw_batch(0, &mut rng), Err(Error::Empty(_))));
    }
}
