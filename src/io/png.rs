//! PNG output: grids of images (truth row above reconstruction row).

use std::path::Path;

use image::{ImageBuffer, Rgb};

use plotters::prelude::*;
use plotters::style::FontStyle;

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
    write_grid_labelled(path, rows, &[], shape, range, zoom)
}

/// Width in pixels of the caption column of a labelled grid.
const LABEL_WIDTH: usize = 96;

/// [`write_grid`] with a caption left of each row (e.g. "truth", "recovered").
pub fn write_grid_labelled(
    path: impl AsRef<Path>,
    rows: &[Vec<Option<Vec<f64>>>],
    labels: &[&str],
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
    let left = if labels.is_empty() { 0 } else { LABEL_WIDTH };
    let (cw, ch) = (shape.width * zoom + gap, shape.height * zoom + gap);
    let mut img = ImageBuffer::from_pixel(
        (left + cols * cw + gap) as u32,
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
                    img.put_pixel(
                        (left + gap + c * cw + x) as u32,
                        (gap + r * ch + y) as u32,
                        px,
                    );
                }
            }
        }
    }
    if !labels.is_empty() {
        let (w, h) = img.dimensions();
        let mut raw = img.into_raw();
        draw_captions(
            &mut raw,
            (w, h),
            labels
                .iter()
                .enumerate()
                .map(|(r, l)| (*l, (6, (gap + r * ch + ch / 2) as i32))),
        )?;
        img = ImageBuffer::from_raw(w, h, raw)
            .ok_or_else(|| Error::encode("the captioned grid", "buffer size"))?;
    }
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png)
        .map_err(|e| Error::encode(format!("cannot encode {}", path.display()), e))?;
    write_atomic(path, buf.get_ref())
}

/// DejaVu Sans (Bitstream Vera licence), embedded so plots and captions render on any machine.
static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");
static REGISTER: std::sync::Once = std::sync::Once::new();

/// Register the embedded font as "sans-serif" (once per process).
pub(crate) fn register_font() {
    REGISTER.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Draw text captions (left-aligned, vertically centred on each point) on an RGB8 buffer.
pub(crate) fn draw_captions<'a>(
    rgb: &mut [u8],
    size: (u32, u32),
    captions: impl Iterator<Item = (&'a str, (i32, i32))>,
) -> Result<()> {
    register_font();
    let root = BitMapBackend::with_buffer(rgb, size).into_drawing_area();
    let style = TextStyle::from(("sans-serif", 16).into_font())
        .color(&BLACK)
        .pos(plotters::style::text_anchor::Pos::new(
            plotters::style::text_anchor::HPos::Left,
            plotters::style::text_anchor::VPos::Center,
        ));
    for (text, at) in captions {
        root.draw_text(text, &style, at)
            .map_err(|e| Error::encode("drawing captions failed", e))?;
    }
    root.present()
        .map_err(|e| Error::encode("drawing captions failed", e))?;
    Ok(())
}
