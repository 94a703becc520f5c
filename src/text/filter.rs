//! The token filter (docs/DESIGN.md, "Text: the token filter"): for each position p,
//! the tokens t whose first-block input x~_tp = (LN_1(e_t + w_p), 1) lies in the span of
//! the first block's c_attn gradient.
//!
//! LN_1 is affine after centring and one scalar: with C the centring, a_t = gamma * C e_t,
//! b_p = gamma * C w_p, c = (beta, 1) and N the complement basis,
//! N^T x~_tp = (N^T a_t + N^T b_p) / sigma_tp + N^T c, sigma_tp^2 = ||C(e_t + w_p)||^2 / d + eps.
//! So N^T a_t is one product of the whole vocabulary with N, computed once, and each
//! position costs inner products: O(V k) instead of O(V d k).

use faer::{Col, Mat};

use super::causal::Causal;
use super::gpt2::Embeddings;
use super::span::RowSpan;

/// A screen passes every candidate whose expanded distance is under this multiple of tau
/// (or `SCREEN_MIN`); the survivors' distances are then computed directly. The expanded
/// form cancels O(d) terms, so it is only trusted to about 1e-8 relative in f64.
const SCREEN_FACTOR: f64 = 10.0;
const SCREEN_MIN: f64 = 1e-6;

/// The tokens that passed at each position, with their distances.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PositionTokens {
    pub position: usize,
    pub tokens: Vec<u32>,
    /// Relative distance of each passing token's input from the span (<= tau).
    #[serde(skip)]
    pub distances: Vec<f64>,
    /// Largest distance of a passing token.
    pub max_distance: f64,
    /// Smallest distance of a token that did not pass (the margin).
    pub min_rejected: f64,
}

/// Per-vocabulary quantities computed once.
///
/// The products are taken with M, the smaller of the complement basis N (k columns) and
/// the span basis U (rank columns): ||N^T x~||^2 = ||x~||^2 - ||U^T x~||^2, so when the
/// rank is below k the V x d x rank product replaces the V x d x k one.
pub(crate) struct TokenFilter<'a> {
    model: Embeddings<'a>,
    span: &'a RowSpan,
    /// M is the span basis U (the distance is taken as ||x~||^2 - ||U^T x~||^2).
    on_span: bool,
    /// C e_t (V x d).
    ce: Mat<f64>,
    /// M_top^T (gamma * C e_t) (V x m).
    pa: Mat<f64>,
    ee: Vec<f64>,
    gaga: Vec<f64>,
    bga: Vec<f64>,
    papa: Vec<f64>,
    papc: Vec<f64>,
    /// M^T c.
    pc: Col<f64>,
    gamma: Vec<f64>,
}

/// Subtract each row's mean (LayerNorm's centring C).
pub(crate) fn centre_rows(x: &mut Mat<f64>) {
    let d = x.ncols() as f64;
    for i in 0..x.nrows() {
        let m = (0..x.ncols()).map(|j| x[(i, j)]).sum::<f64>() / d;
        for j in 0..x.ncols() {
            x[(i, j)] -= m;
        }
    }
}

impl<'a> TokenFilter<'a> {
    pub fn new(model: Embeddings<'a>, span: &'a RowSpan) -> Self {
        let d = model.hidden();
        let gamma = model.ln.gamma.clone();
        let beta = &model.ln.beta;
        let mut ce = model.wte.clone();
        centre_rows(&mut ce);
        let ga = Mat::from_fn(ce.nrows(), d, |i, j| ce[(i, j)] * gamma[j]);
        let on_span = span.rank < span.complement.ncols();
        let m = if on_span {
            span.basis.as_ref()
        } else {
            span.complement.as_ref()
        };
        let pa = &ga * m.subrows(0, d);
        let v = ce.nrows();
        let row_sq =
            |m: &Mat<f64>, i: usize| (0..m.ncols()).map(|j| m[(i, j)] * m[(i, j)]).sum::<f64>();
        let ee = (0..v).map(|i| row_sq(&ce, i)).collect();
        let gaga = (0..v).map(|i| row_sq(&ga, i)).collect();
        let bga = (0..v)
            .map(|i| (0..d).map(|j| beta[j] * ga[(i, j)]).sum())
            .collect();
        let papa = (0..v).map(|i| row_sq(&pa, i)).collect();
        let k = m.ncols();
        let pc = Col::from_fn(k, |c| {
            (0..d).map(|j| m[(j, c)] * beta[j]).sum::<f64>() + m[(d, c)]
        });
        let papc = (0..v)
            .map(|i| (0..k).map(|c| pa[(i, c)] * pc[c]).sum())
            .collect();
        TokenFilter {
            model,
            span,
            on_span,
            ce,
            pa,
            ee,
            gaga,
            bga,
            papa,
            papc,
            pc,
            gamma,
        }
    }

    fn products_basis(&self) -> faer::MatRef<'_, f64> {
        if self.on_span {
            self.span.basis.as_ref()
        } else {
            self.span.complement.as_ref()
        }
    }

    /// The expanded (screening) distance of every token at position `p`.
    pub fn screen(&self, p: usize) -> Vec<f64> {
        let d = self.model.hidden();
        let beta = &self.model.ln.beta;
        let mut cw: Vec<f64> = (0..d).map(|j| self.model.wpe[(p, j)]).collect();
        let m = cw.iter().sum::<f64>() / d as f64;
        cw.iter_mut().for_each(|x| *x -= m);
        let gb: Vec<f64> = (0..d).map(|j| cw[j] * self.gamma[j]).collect();
        let m = self.products_basis();
        let k = m.ncols();
        let pb: Vec<f64> = (0..k)
            .map(|c| (0..d).map(|j| m[(j, c)] * gb[j]).sum())
            .collect();
        let ww: f64 = cw.iter().map(|x| x * x).sum();
        let gbgb: f64 = gb.iter().map(|x| x * x).sum();
        let bgb: f64 = (0..d).map(|j| beta[j] * gb[j]).sum();
        let pbpb: f64 = pb.iter().map(|x| x * x).sum();
        let pbpc: f64 = (0..k).map(|c| pb[c] * self.pc[c]).sum();
        let pcpc: f64 = (0..k).map(|c| self.pc[c] * self.pc[c]).sum();
        let bb: f64 = beta.iter().map(|x| x * x).sum();
        let cw_col = Col::from_fn(d, |j| cw[j]);
        let gb_col = Col::from_fn(d, |j| gb[j]);
        let pb_col = Col::from_fn(k, |c| pb[c]);
        let ew = &self.ce * &cw_col;
        // (gamma C e_t) . (gamma C w_p) = sum_j ce_tj gamma_j^2 cw_j
        let g2cw = Col::from_fn(d, |j| self.gamma[j] * gb_col[j]);
        let gagb = &self.ce * &g2cw;
        let papb = &self.pa * &pb_col;
        (0..self.ce.nrows())
            .map(|t| {
                let s2 = (self.ee[t] + 2.0 * ew[t] + ww) / d as f64 + self.model.ln.eps;
                let s = s2.sqrt();
                // ||M^T x~||^2 and ||x~||^2, expanded
                let proj = (self.papa[t] + 2.0 * papb[t] + pbpb) / s2
                    + 2.0 * (self.papc[t] + pbpc) / s
                    + pcpc;
                let den = (self.gaga[t] + 2.0 * gagb[t] + gbgb) / s2
                    + 2.0 * (self.bga[t] + bgb) / s
                    + bb
                    + 1.0;
                let num = if self.on_span { den - proj } else { proj };
                (num.max(0.0) / den).sqrt()
            })
            .collect()
    }

    /// The tokens whose input at `p` lies within tau of the span: screened by the
    /// expanded form, then each survivor's distance computed directly.
    pub fn at(&self, p: usize) -> PositionTokens {
        // nothing past max_tau is accepted, whatever its own threshold: a weak direction's
        // large worst case would let the whole vocabulary through the screen
        let tau = self.span.tau.min(self.span.max_tau());
        let screen = self.screen(p);
        let cut = (SCREEN_FACTOR * tau).max(SCREEN_MIN);
        let near: Vec<u32> = (0..screen.len())
            .filter(|&t| screen[t] <= cut)
            .map(|t| t as u32)
            .collect();
        let mut min_rejected = screen
            .iter()
            .copied()
            .filter(|&s| s > cut)
            .fold(f64::INFINITY, f64::min);
        let mut tokens = Vec::new();
        let mut distances = Vec::new();
        if !near.is_empty() {
            let x = self.model.input(&near, p);
            let tests = self.span.test(x.as_ref());
            for (i, &t) in near.iter().enumerate() {
                if self.span.accepts(tests[i]) {
                    tokens.push(t);
                    distances.push(tests[i].distance);
                } else {
                    min_rejected = min_rejected.min(tests[i].distance);
                }
            }
        }
        let max_distance = distances.iter().copied().fold(0.0, f64::max);
        PositionTokens {
            position: p,
            tokens,
            distances,
            max_distance,
            min_rejected,
        }
    }

    /// The direct computation at one position (for the bench): normalise and project
    /// the whole vocabulary at `p`.
    pub fn direct(&self, p: usize) -> Vec<f64> {
        let all: Vec<u32> = (0..self.ce.nrows() as u32).collect();
        let x = self.model.input(&all, p);
        self.span
            .test(x.as_ref())
            .into_iter()
            .map(|t| t.distance)
            .collect()
    }
}

/// LLaMA's filter: block 0 sees RMSNorm(e_t) with no position, so one direct pass over
/// the vocabulary gives the bag of distinct tokens (returned as position 0).
pub(crate) fn bag(model: &super::llama::Llama, span: &RowSpan) -> PositionTokens {
    const CHUNK: u32 = 4096;
    let v = model.cfg.vocab as u32;
    let (mut tokens, mut distances) = (Vec::new(), Vec::new());
    let mut min_rejected = f64::INFINITY;
    for start in (0..v).step_by(CHUNK as usize) {
        let ids: Vec<u32> = (start..(start + CHUNK).min(v)).collect();
        let x = model.block0_input(&ids, 0);
        for (i, t) in span.test(x.as_ref()).into_iter().enumerate() {
            if span.accepts(t) {
                tokens.push(ids[i]);
                distances.push(t.distance);
            } else {
                min_rejected = min_rejected.min(t.distance);
            }
        }
    }
    let max_distance = distances.iter().copied().fold(0.0, f64::max);
    PositionTokens {
        position: 0,
        tokens,
        distances,
        max_distance,
        min_rejected,
    }
}
