//! Anisotropic total variation of images stored row-major with channels last
//! (Geiping et al. 2020's prior): mean |x(h+1, w) - x(h, w)| + mean |x(h, w+1) - x(h, w)|
//! over the batch, and its (sub)gradient.

use crate::io::png::ImageShape;

/// TV of `b` images in `x` (b * H * W * C values) and its gradient.
pub fn total_variation(x: &[f64], b: usize, s: ImageShape) -> (f64, Vec<f64>) {
    let (h, w, c) = (s.height, s.width, s.channels);
    let at = |n: usize, y: usize, xx: usize, ch: usize| n * h * w * c + (y * w + xx) * c + ch;
    let mut g = vec![0.0; x.len()];
    let nv = (b * h.saturating_sub(1) * w * c).max(1) as f64;
    let nh = (b * h * w.saturating_sub(1) * c).max(1) as f64;
    let mut f = 0.0;
    for n in 0..b {
        for y in 0..h {
            for xx in 0..w {
                for ch in 0..c {
                    let i = at(n, y, xx, ch);
                    if y + 1 < h {
                        let j = at(n, y + 1, xx, ch);
                        let d = x[j] - x[i];
                        f += d.abs() / nv;
                        g[j] += d.signum() / nv;
                        g[i] -= d.signum() / nv;
                    }
                    if xx + 1 < w {
                        let j = at(n, y, xx + 1, ch);
                        let d = x[j] - x[i];
                        f += d.abs() / nh;
                        g[j] += d.signum() / nh;
                        g[i] -= d.signum() / nh;
                    }
                }
            }
        }
    }
    (f, g)
}
