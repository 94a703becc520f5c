//! `images:DIR[:S[:L]]`: deterministic square crops of photos, resized to S x S RGB.
//!
//! Each photo (sorted by file name) gives crops at L scales (default 3): the largest
//! centred square, then non-overlapping tiles of half, a quarter, ... of that side
//! (tiles smaller than S are not made).
//! Values are in [0, 1]; grey photos are replicated to three channels.

use std::path::Path;

use faer::Mat;
use image::imageops::FilterType;

use super::Dataset;
use crate::io::png::ImageShape;
use crate::{Error, Result};

pub(super) fn load_crops(dir: &Path, size: usize, levels: usize) -> Result<Dataset> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut files: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::NoPhotos {
            dir: dir.to_path_buf(),
        });
    }
    let mut rows: Vec<Vec<f64>> = Vec::new();
    for f in &files {
        let img = image::open(f)
            .map_err(|e| Error::format(f, format!("cannot decode image ({e})")))?
            .to_rgb8();
        let (w, h) = (img.width() as usize, img.height() as usize);
        let side = w.min(h);
        for level in 0..levels {
            let s = side >> level;
            if s < size {
                break;
            }
            let (nx, ny) = (w / s, h / s);
            let (ox, oy) = ((w - nx * s) / 2, (h - ny * s) / 2);
            for ty in 0..ny {
                for tx in 0..nx {
                    let crop = image::imageops::crop_imm(
                        &img,
                        (ox + tx * s) as u32,
                        (oy + ty * s) as u32,
                        s as u32,
                        s as u32,
                    )
                    .to_image();
                    let small = image::imageops::resize(
                        &crop,
                        size as u32,
                        size as u32,
                        FilterType::Triangle,
                    );
                    rows.push(small.as_raw().iter().map(|&v| v as f64 / 255.0).collect());
                }
            }
        }
    }
    let d = size * size * 3;
    Ok(Dataset {
        name: image_name(dir, size, levels),
        x: Mat::from_fn(rows.len(), d, |i, j| rows[i][j]),
        labels: None,
        classes: None,
        range: Some((0.0, 1.0)),
        image: Some(ImageShape {
            height: size,
            width: size,
            channels: 3,
        }),
    })
}

/// The spec's name: `images:DIR:S`, with `:L` when L is not the default.
pub(crate) fn image_name(dir: &Path, size: usize, levels: usize) -> String {
    if levels == super::DEFAULT_IMAGE_LEVELS {
        format!("images:{}:{size}", dir.display())
    } else {
        format!("images:{}:{size}:{levels}", dir.display())
    }
}
