//! Pruning and top-k, first step of the completion: the rank and a start from a fully
//! observed block (docs/DESIGN.md, "Defended gradients: missing entries").
//!
//! A magnitude mask keeps the largest entries of G~ = Delta^T X~, so the neurons with
//! the largest error signal are observed on nearly every input coordinate: the
//! most-observed rows share many columns observed in all of them (photos, B = 8,
//! m = 4096, prune:0.9: the 64 most-observed rows share 1534 of 3073 columns). That
//! block of G~ is known exactly, so its numerical rank is B when both its sides exceed
//! B, and its leading left singular vectors are the factor U on its rows.

use faer::Mat;

use super::observed::Observed;
use crate::Result;
use crate::attack::ServerView;

/// A fully observed block of the first-layer gradient: every (row, column) pair of it
/// is an observed entry.
#[derive(Clone, Debug)]
pub struct Block {
    pub rows: Vec<usize>,
    pub cols: Vec<usize>,
}

/// Rows taken in decreasing order of their observed count; the columns observed in all
/// rows taken so far shrink as rows are added. The block kept is the first with the
/// largest min(rows, columns).
pub(super) fn find(obs: &Observed) -> Block {
    let mut order: Vec<usize> = (0..obs.m).collect();
    order.sort_by_key(|&j| std::cmp::Reverse(obs.by_row[j].len()));
    let mut common = vec![true; obs.n];
    let mut seen = vec![false; obs.n];
    let mut best = (0, 0, Vec::new());
    for (taken, &j) in order.iter().enumerate() {
        seen.iter_mut().for_each(|s| *s = false);
        for &(k, _) in &obs.by_row[j] {
            seen[k] = true;
        }
        common.iter_mut().zip(&seen).for_each(|(c, s)| *c &= *s);
        let ncols = common.iter().filter(|&&c| c).count();
        if (taken + 1).min(ncols) > best.0 {
            let cols = (0..obs.n).filter(|&k| common[k]).collect();
            best = ((taken + 1).min(ncols), taken + 1, cols);
        }
        if ncols <= taken + 1 {
            // more rows only shrink the columns further below the rows
            break;
        }
    }
    let (_, nrows, cols) = best;
    Block {
        rows: order[..nrows].to_vec(),
        cols,
    }
}

/// The block's numerical rank r (singular values above the rounding floor of the
/// subspace estimate, `subspace::floor`) and the factor U started from it (m x r,
/// row-major: U_R = left singular vectors times singular values on the block's rows,
/// zero elsewhere). None when the block shows no drop below the floor inside it (the
/// rank is then not determined by it) or the rank exceeds `max_rank`.
pub(super) fn seed(
    view: &ServerView,
    obs: &Observed,
    block: &Block,
    max_rank: usize,
) -> Result<Option<(usize, Vec<f64>)>> {
    let (nr, nc) = (block.rows.len(), block.cols.len());
    if nr < 2 || nc < 2 {
        return Ok(None);
    }
    let mut at = vec![usize::MAX; obs.n];
    for (c, &k) in block.cols.iter().enumerate() {
        at[k] = c;
    }
    let mut g = Mat::<f64>::zeros(nr, nc);
    for (a, &j) in block.rows.iter().enumerate() {
        for &(k, v) in &obs.by_row[j] {
            if at[k] != usize::MAX {
                g[(a, at[k])] = v;
            }
        }
    }
    let svd = g.thin_svd().map_err(|e| {
        crate::Error::Numerical(format!("SVD of the observed block of the gradient: {e:?}"))
    })?;
    let s = svd.S().column_vector();
    let floor =
        crate::attack::subspace::floor(view.dtype, nr, nc, g.norm_l2(), s[0], view.noise_std);
    let r = (0..s.nrows()).filter(|&i| s[i] > floor).count();
    if r == 0 || r >= nr.min(nc) || r > max_rank {
        return Ok(None);
    }
    let mut u = vec![0.0; obs.m * r];
    for (a, &j) in block.rows.iter().enumerate() {
        for p in 0..r {
            u[j * r + p] = svd.U()[(a, p)] * s[p];
        }
    }
    Ok(Some((r, u)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::defense::Defense;

    /// On a magnitude-pruned gradient the block is fully observed, and its rank is the
    /// batch size: its entries are the clean gradient's, a rank-B matrix.
    #[test]
    fn the_block_is_observed_and_reads_the_batch_size() {
        let b = 4;
        let (_, view) = super::super::defended_round(vec![Defense::Prune(0.9)], b, 512);
        let obs = Observed::of(&view).unwrap();
        let block = find(&obs);
        let observed = |j: usize, k: usize| obs.by_row[j].iter().any(|&(c, _)| c == k);
        for &j in &block.rows {
            for &k in &block.cols {
                assert!(observed(j, k), "({j}, {k}) of the block is not observed");
            }
        }
        eprintln!("block {} x {}", block.rows.len(), block.cols.len());
        assert!(block.rows.len().min(block.cols.len()) > b);
        let (r, u) = seed(&view, &obs, &block, 16)
            .unwrap()
            .expect("a rank from the block");
        assert_eq!(r, b);
        // U is zero off the block's rows
        let on: std::collections::HashSet<usize> = block.rows.iter().copied().collect();
        for j in (0..obs.m).filter(|j| !on.contains(j)) {
            assert!(u[j * r..(j + 1) * r].iter().all(|&v| v == 0.0));
        }
    }
}
