//! PNG output: grids of images (truth row above reconstruction row).

use std::path::Path;

use image::{ImageBuffer, Rgb};

use super::write_atomic;
use crate::{Error, Result};

/// Shape of one flattened image: height, width, channels (1 or 3), stored
/// row-major with channels last (as the data loaders flatten them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ImageShape {
    pub height: usize,
    pub width: usize,
    pub channels: usize,
}

impl ImageShape {
    pub fn len(&self) -> usize {
        self.height * self.width * self.channels
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Write rows of flattened images (values in `range`, clamped) as one PNG grid,
/// each image scaled up by `zoom`, with a 2-pixel gap. `None` entries are drawn grey
/// (a sample that was not recovered).
pub fn write_grid(
    path: impl AsRef<Path>,
    rows: &[Vec<Option<Vec<f64>>>],
    shape: ImageShape,
    range: (f64, f64),
    zoom: usize,
) -> Result<()> {
    let path = path.as_ref();
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    if cols == 0 || shape.is_empty() {
        return Err(Error::Empty("nothing to draw"));
    }
    let gap = 2;
    let (cw, ch) = (shape.width * zoom + gap, shape.height * zoom + gap);
    let mut img = ImageBuffer::from_pixel(
        (cols * cw + gap) as u32,
        (rows.len() * ch + gap) as u32,
        Rgb([255u8, 255, 255]),
    );
    let (lo, hi) = range;
    for (r, row) in rows.iter().enumerate() {
        for (c, cell) in row.iter().enumerate() {
            for y in 0..shape.height * zoom {
                for x in 0..shape.width * zoom {
                    let px = match cell {
                        None => Rgb([128, 128, 128]),
                        Some(v) => {
                            let base = ((y / zoom) * shape.width + x / zoom) * shape.channels;
                            let to8 = |t: f64| {
                                ((t - lo) / (hi - lo) * 255.0).round().clamp(0.0, 255.0) as u8
                            };
                            if shape.channels == 3 {
                                Rgb([to8(v[base]), to8(v[base + 1]), to8(v[base + 2])])
                            } else {
                                let g = to8(v[base]);
                                Rgb([g, g, g])
                            }
                        }
                    };
                    img.put_pixel((gap + c * cw + x) as u32, (gap + r * ch + y) as u32, px);
                }
            }
        }
    }
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png)
        .map_err(|e| Error::encode(format!("cannot encode {}", path.display()), e))?;
    write_atomic(path, buf.get_ref())
}
