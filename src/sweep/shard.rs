//! Splitting a grid over independent jobs (`--shard K/N`) and joining their CSVs
//! back in grid order (`--merge`).
//!
//! Shard K of N takes the runs whose grid index i has i mod N = K - 1: round robin,
//! so the expensive corners of a grid (the last axis varies fastest) spread over
//! the jobs. The merge looks every grid row up by its setting, so the merged file is
//! the one a single process would have written, whatever order the shards ran in.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::csv::{csv_line, header, read_csv, setting};
use crate::simulate::{KEYS, SimConfig};
use crate::{Error, Result};

/// One of N equal parts of a grid, K counted from 1 (as Slurm array indices often are).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = Error;
    /// `K/N` with 1 <= K <= N.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::Spec {
            kind: "shard",
            spec: s.to_string(),
            reason: "expected K/N with 1 <= K <= N".into(),
        };
        let (k, n) = s.split_once('/').ok_or_else(bad)?;
        let index: usize = k.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if index == 0 || index > count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl Shard {
    /// Whether the run at grid index `i` belongs to this shard.
    pub fn contains(&self, i: usize) -> bool {
        i % self.count == self.index - 1
    }

    /// This shard's part of `configs`, in grid order.
    pub fn select(&self, configs: &[SimConfig]) -> Vec<SimConfig> {
        configs
            .iter()
            .enumerate()
            .filter(|(i, _)| self.contains(*i))
            .map(|(_, c)| c.clone())
            .collect()
    }
}

/// Join sweep CSVs into `out` in the order of `configs` (the same grid the shards
/// ran). Every grid run must be in some input and every input row in the grid; a
/// run present twice keeps its first row. Returns the number of rows written.
pub fn merge(configs: &[SimConfig], inputs: &[PathBuf], out: &Path) -> Result<usize> {
    if inputs.is_empty() {
        return Err(Error::Empty("nothing to merge: no input CSV"));
    }
    let head = header();
    let mut rows: HashMap<Vec<String>, Vec<String>> = HashMap::new();
    for p in inputs {
        let (h, rs) = read_csv(p)?;
        if h != head {
            return Err(Error::format(p, "not a sweep CSV of this gradleak version"));
        }
        for r in rs {
            rows.entry(r[..KEYS.len()].to_vec()).or_insert(r);
        }
    }
    let mut text = format!("{}\n", head.join(","));
    let mut missing = 0;
    let mut first_missing = None;
    for c in configs {
        let key = setting(c);
        match rows.remove(&key) {
            Some(r) => {
                text.push_str(&csv_line(&r));
                text.push('\n');
            }
            None => {
                missing += 1;
                first_missing.get_or_insert(key);
            }
        }
    }
    if missing > 0 {
        return Err(Error::ShardsMissing {
            missing,
            total: configs.len(),
            first: first_missing.unwrap_or_default().join(","),
        });
    }
    if !rows.is_empty() {
        return Err(Error::ShardsForeign { rows: rows.len() });
    }
    crate::io::write_atomic(out, text.as_bytes())?;
    Ok(configs.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_partition_the_grid_and_parse_strictly() {
        let s: Vec<Shard> = (1..=3).map(|k| format!("{k}/3").parse().unwrap()).collect();
        for i in 0..10 {
            assert_eq!(s.iter().filter(|sh| sh.contains(i)).count(), 1, "index {i}");
        }
        assert!(s[0].contains(0) && s[1].contains(4) && s[2].contains(8));
        for bad in ["0/3", "4/3", "1", "a/b", "1/0"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
    }
}
