//! The arithmetic of the image layers on a batch held as B x (C*H*W) rows (PyTorch's
//! C, H, W order): convolution by im2col (one matrix product for the whole batch) and
//! its adjoint col2im, max and average pooling with their backward passes.

use faer::Mat;

use crate::Real;

/// Where a window slides: input C x H x W, kernel KH x KW, stride, zero padding, and the
/// output side OH x OW it gives (PyTorch's floor rule).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub sh: usize,
    pub sw: usize,
    pub ph: usize,
    pub pw: usize,
    pub oh: usize,
    pub ow: usize,
}

impl Window {
    /// Output positions per channel, P = OH * OW.
    pub fn positions(&self) -> usize {
        self.oh * self.ow
    }
    /// Entries of one patch, C * KH * KW (a row of the conv weight).
    pub fn patch(&self) -> usize {
        self.c * self.kh * self.kw
    }
    /// Input index (c, y, x) read by output position p at kernel offset (i, j), if
    /// inside the image (outside: the zero padding).
    #[inline]
    pub fn source(&self, c: usize, p: usize, i: usize, j: usize) -> Option<usize> {
        let (oy, ox) = (p / self.ow, p % self.ow);
        let y = (oy * self.sh + i).checked_sub(self.ph)?;
        let x = (ox * self.sw + j).checked_sub(self.pw)?;
        (y < self.h && x < self.w).then(|| (c * self.h + y) * self.w + x)
    }
}

/// The patches of every sample, (B * P) x (C * KH * KW): row s * P + p is the patch
/// output position p of sample s reads, columns in the weight's (c, i, j) order.
pub fn im2col<T: Real>(x: &Mat<T>, win: &Window) -> Mat<T> {
    let (b, p, k) = (x.nrows(), win.positions(), win.patch());
    let mut cols = Mat::<T>::zeros(b * p, k);
    for c in 0..win.c {
        for i in 0..win.kh {
            for j in 0..win.kw {
                let col = (c * win.kh + i) * win.kw + j;
                for pos in 0..p {
                    if let Some(src) = win.source(c, pos, i, j) {
                        for s in 0..b {
                            cols[(s * p + pos, col)] = x[(s, src)];
                        }
                    }
                }
            }
        }
    }
    cols
}

/// The adjoint of [`im2col`]: patch values summed back into B x (C*H*W) images.
pub fn col2im<T: Real>(cols: &Mat<T>, batch: usize, win: &Window) -> Mat<T> {
    let p = win.positions();
    let mut x = Mat::<T>::zeros(batch, win.c * win.h * win.w);
    for c in 0..win.c {
        for i in 0..win.kh {
            for j in 0..win.kw {
                let col = (c * win.kh + i) * win.kw + j;
                for pos in 0..p {
                    if let Some(src) = win.source(c, pos, i, j) {
                        for s in 0..batch {
                            x[(s, src)] += cols[(s * p + pos, col)];
                        }
                    }
                }
            }
        }
    }
    x
}

/// (B * P) x O outputs of a product back to B x (O * P) rows, plus the bias.
pub fn positions_to_rows<T: Real>(
    z: &Mat<T>,
    batch: usize,
    p: usize,
    bias: Option<&[T]>,
) -> Mat<T> {
    let o = z.ncols();
    Mat::from_fn(batch, o * p, |s, k| {
        let (ch, pos) = (k / p, k % p);
        z[(s * p + pos, ch)] + bias.map_or(T::from_f64(0.0), |b| b[ch])
    })
}

/// B x (O * P) rows to (B * P) x O (the inverse layout of [`positions_to_rows`]).
pub fn rows_to_positions<T: Real>(d: &Mat<T>, p: usize) -> Mat<T> {
    let (b, o) = (d.nrows(), d.ncols() / p);
    Mat::from_fn(b * p, o, |r, ch| d[(r / p, ch * p + r % p)])
}

/// Max pooling; also returns, per output entry, the input index it kept (the first
/// maximum in scan order, as PyTorch; padding is -inf and never kept).
pub fn max_pool<T: Real>(x: &Mat<T>, win: &Window) -> (Mat<T>, Vec<usize>) {
    let (b, p) = (x.nrows(), win.positions());
    let mut out = Mat::<T>::zeros(b, win.c * p);
    let mut arg = vec![0usize; b * win.c * p];
    for s in 0..b {
        for c in 0..win.c {
            for pos in 0..p {
                let mut best: Option<(usize, T)> = None;
                for i in 0..win.kh {
                    for j in 0..win.kw {
                        if let Some(src) = win.source(c, pos, i, j) {
                            let v = x[(s, src)];
                            if best.is_none_or(|(_, m)| v > m || v.to_f64().is_nan()) {
                                best = Some((src, v));
                            }
                        }
                    }
                }
                let (src, v) = best.expect("a window with padding < kernel / 2 covers the image");
                out[(s, c * p + pos)] = v;
                arg[(s * win.c + c) * p + pos] = src;
            }
        }
    }
    (out, arg)
}

/// Backward of max pooling: each output's signal goes to the input it kept.
pub fn max_pool_back<T: Real>(d: &Mat<T>, arg: &[usize], win: &Window) -> Mat<T> {
    let (b, p) = (d.nrows(), win.positions());
    let mut dx = Mat::<T>::zeros(b, win.c * win.h * win.w);
    for s in 0..b {
        for k in 0..win.c * p {
            dx[(s, arg[s * win.c * p + k])] += d[(s, k)];
        }
    }
    dx
}

/// Average pooling, padding counted as zeros in the mean (PyTorch's
/// `count_include_pad=True`).
pub fn avg_pool<T: Real>(x: &Mat<T>, win: &Window) -> Mat<T> {
    let (b, p) = (x.nrows(), win.positions());
    let scale = T::from_f64(1.0 / (win.kh * win.kw) as f64);
    Mat::from_fn(b, win.c * p, |s, k| {
        let (c, pos) = (k / p, k % p);
        let mut acc = T::from_f64(0.0);
        for i in 0..win.kh {
            for j in 0..win.kw {
                if let Some(src) = win.source(c, pos, i, j) {
                    acc += x[(s, src)];
                }
            }
        }
        acc * scale
    })
}

/// Backward of average pooling (its adjoint).
pub fn avg_pool_back<T: Real>(d: &Mat<T>, win: &Window) -> Mat<T> {
    let (b, p) = (d.nrows(), win.positions());
    let scale = T::from_f64(1.0 / (win.kh * win.kw) as f64);
    let mut dx = Mat::<T>::zeros(b, win.c * win.h * win.w);
    for s in 0..b {
        for k in 0..win.c * p {
            let (c, pos) = (k / p, k % p);
            let v = d[(s, k)] * scale;
            for i in 0..win.kh {
                for j in 0..win.kw {
                    if let Some(src) = win.source(c, pos, i, j) {
                        dx[(s, src)] += v;
                    }
                }
            }
        }
    }
    dx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn win() -> Window {
        Window {
            c: 2,
            h: 5,
            w: 4,
            kh: 3,
            kw: 2,
            sh: 2,
            sw: 1,
            ph: 1,
            pw: 1,
            oh: 3,
            ow: 5,
        }
    }

    /// col2im is the adjoint of im2col: <im2col(x), y> = <x, col2im(y)> for any x, y.
    #[test]
    fn col2im_is_the_adjoint_of_im2col() {
        let w = win();
        let x = Mat::from_fn(3, w.c * w.h * w.w, |i, j| ((i * 7 + j) as f64 * 0.3).sin());
        let cols = im2col(&x, &w);
        let y = Mat::from_fn(cols.nrows(), cols.ncols(), |i, j| {
            ((i + 3 * j) as f64 * 0.7).cos()
        });
        let back = col2im(&y, 3, &w);
        let lhs: f64 = (0..cols.ncols())
            .map(|j| {
                (0..cols.nrows())
                    .map(|i| cols[(i, j)] * y[(i, j)])
                    .sum::<f64>()
            })
            .sum();
        let rhs: f64 = (0..x.ncols())
            .map(|j| (0..3).map(|i| x[(i, j)] * back[(i, j)]).sum::<f64>())
            .sum();
        assert!(
            (lhs - rhs).abs() < 1e-12 * lhs.abs().max(1.0),
            "{lhs} vs {rhs}"
        );
    }

    /// Average pooling's backward is its adjoint, and max pooling routes to the maximum.
    #[test]
    fn pooling_backward_passes_are_adjoints() {
        let w = Window {
            c: 2,
            h: 4,
            w: 4,
            kh: 2,
            kw: 2,
            sh: 2,
            sw: 2,
            ph: 0,
            pw: 0,
            oh: 2,
            ow: 2,
        };
        let x = Mat::from_fn(2, 32, |i, j| ((i * 5 + j) as f64 * 0.9).sin());
        let d = Mat::from_fn(2, 8, |i, j| (i + j) as f64 - 3.0);
        let y = avg_pool(&x, &w);
        let dx = avg_pool_back(&d, &w);
        let lhs: f64 = (0..8)
            .map(|j| (0..2).map(|i| y[(i, j)] * d[(i, j)]).sum::<f64>())
            .sum();
        let rhs: f64 = (0..32)
            .map(|j| (0..2).map(|i| x[(i, j)] * dx[(i, j)]).sum::<f64>())
            .sum();
        assert!((lhs - rhs).abs() < 1e-12);
        let (m, arg) = max_pool(&x, &w);
        for s in 0..2 {
            for k in 0..8 {
                assert_eq!(m[(s, k)], x[(s, arg[s * 8 + k])]);
            }
        }
    }
}
