//! The observed (non-zero) entries of a pruned or sparsified first-layer gradient, by
//! row and by column: the data of the completion ([`super::complete`]) and of its
//! observed-block seed ([`super::block`]).

use crate::Result;
use crate::attack::{ServerView, view::BLOCK_ROWS};

/// Observed entries by row and by column (each list ascending in the other index).
pub(super) struct Observed {
    pub(super) m: usize,
    pub(super) n: usize,
    pub(super) by_row: Vec<Vec<(usize, f64)>>,
    pub(super) by_col: Vec<Vec<(usize, f64)>>,
}

impl Observed {
    pub(super) fn of(view: &ServerView) -> Result<Self> {
        let (m, n) = (view.width(), view.input_dim() + 1);
        let mut by_row = vec![Vec::new(); m];
        let mut by_col = vec![Vec::new(); n];
        for start in (0..m).step_by(BLOCK_ROWS) {
            let r = start..(start + BLOCK_ROWS).min(m);
            let g = view.augmented_gradient_block(r.clone())?;
            for (a, j) in r.clone().enumerate() {
                for k in 0..n {
                    let v = g[(a, k)];
                    if v != 0.0 {
                        by_row[j].push((k, v));
                        by_col[k].push((j, v));
                    }
                }
            }
            view.first.grad_weight.release(r);
        }
        Ok(Observed {
            m,
            n,
            by_row,
            by_col,
        })
    }

    pub(super) fn count(&self) -> usize {
        self.by_row.iter().map(Vec::len).sum()
    }
}
