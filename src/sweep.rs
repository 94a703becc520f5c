//! Grids of simulated rounds: one CSV row per run, resumable (rows already in the
//! CSV are skipped), each row the full setting plus its metrics.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use crate::simulate::{self, KEYS, SimConfig};
use crate::{Error, Result};

mod csv;
pub mod shard;

pub use csv::{csv_line, csv_split, header, read_csv, setting};
pub use shard::{Shard, merge};

/// Metric columns written after the setting.
pub const METRICS: &[&str] = &[
    "batch_estimated",
    "median_rel_error",
    "max_rel_error",
    "recovered_fraction",
    "exact_fraction",
    "missing",
    "label_accuracy",
    "mean_psnr",
    "min_psnr",
    "leaked_fraction",
    "gradient_relative_change",
    "epsilon",
    "seconds_attack",
    "seconds_total",
    "error",
];

/// One axis of the grid: a `SimConfig` key and its values.
#[derive(Clone, Debug)]
pub struct Axis {
    pub key: String,
    pub values: Vec<String>,
}

impl std::str::FromStr for Axis {
    type Err = Error;
    /// `key=v1,v2,...` (for `prior`, values are separated by `;`).
    fn from_str(s: &str) -> Result<Self> {
        let (k, v) = s.split_once('=').ok_or_else(|| Error::Spec {
            kind: "grid axis",
            spec: s.to_string(),
            reason: "expected key=v1,v2,...".into(),
        })?;
        if !KEYS.contains(&k) {
            return Err(Error::Unknown {
                kind: "grid key",
                name: k.into(),
                expected: KEYS.join(" "),
            });
        }
        let sep = if k == "prior" { ';' } else { ',' };
        let values: Vec<String> = v
            .split(sep)
            .map(|x| x.trim().to_string())
            .filter(|x| !x.is_empty())
            .collect();
        if values.is_empty() {
            return Err(Error::Spec {
                kind: "grid axis",
                spec: s.to_string(),
                reason: "no values".into(),
            });
        }
        Ok(Axis {
            key: k.into(),
            values,
        })
    }
}

/// Every configuration of the grid (the last axis varies fastest).
pub fn expand(base: &SimConfig, axes: &[Axis]) -> Result<Vec<SimConfig>> {
    let mut out = vec![base.clone()];
    for ax in axes {
        let mut next = Vec::with_capacity(out.len() * ax.values.len());
        for c in &out {
            for v in &ax.values {
                let mut c = c.clone();
                c.set(&ax.key, v)?;
                next.push(c);
            }
        }
        out = next;
    }
    Ok(out)
}

fn metric_row(out: &Result<simulate::SimOutput>) -> Vec<String> {
    let f = |v: Option<f64>| v.map_or(String::new(), |x| format!("{x:.6e}"));
    match out {
        Ok(o) => {
            let r = &o.report;
            let matched: Vec<_> = r.per_sample.iter().filter(|p| p.exact.is_some()).collect();
            let exact = matched.iter().filter(|p| p.exact == Some(true)).count() as f64
                / r.batch_true as f64;
            let min_psnr = r
                .per_sample
                .iter()
                .filter_map(|p| p.metrics.psnr)
                .fold(None, |a: Option<f64>, b| Some(a.map_or(b, |a| a.min(b))));
            vec![
                r.batch_estimated.to_string(),
                f(Some(r.median_rel_error)),
                f(Some(r.max_rel_error)),
                f(Some(r.recovered_fraction)),
                f(Some(exact)),
                r.missing.to_string(),
                f(r.label_accuracy),
                f(r.mean_psnr),
                f(min_psnr),
                f(Some(o.metrics.leaked_fraction(o.image.is_some()))),
                f(r.defense.as_ref().map(|d| d.relative_change)),
                f(r.defense.as_ref().and_then(|d| d.epsilon)),
                format!("{:.3}", r.seconds.attack),
                format!("{:.3}", r.seconds.total),
                String::new(),
            ]
        }
        Err(e) => {
            let mut v = vec![String::new(); METRICS.len() - 1];
            v.push(e.to_string());
            v
        }
    }
}

/// Simulate one configuration: its setting followed by its metrics (or its error).
pub fn run_row(c: &SimConfig) -> Vec<String> {
    let mut row = setting(c);
    row.extend(metric_row(&simulate::run(c)));
    row
}

/// A sweep CSV open for appending: the rows already in it, by setting, and the file.
/// Interrupted sweeps and audits resume from it.
pub struct Ledger {
    path: std::path::PathBuf,
    rows: HashMap<Vec<String>, Vec<String>>,
    file: std::fs::File,
}

impl Ledger {
    /// Open `csv`, creating it with the header when it does not exist; an existing
    /// file must have this version's header.
    pub fn open(csv: &Path) -> Result<Self> {
        let head = header();
        let mut rows = HashMap::new();
        if csv.exists() {
            let (h, old) = read_csv(csv)?;
            if h != head {
                return Err(Error::format(
                    csv,
                    "existing CSV has different columns (another grid or version); write to a new file",
                ));
            }
            rows.extend(old.into_iter().map(|r| (r[..KEYS.len()].to_vec(), r)));
        } else {
            crate::io::write_atomic(csv, format!("{}\n", head.join(",")).as_bytes())?;
        }
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(csv)
            .map_err(|e| Error::io(csv, e))?;
        Ok(Ledger {
            path: csv.to_path_buf(),
            rows,
            file,
        })
    }

    /// Whether the CSV already has a row for this setting.
    pub fn contains(&self, c: &SimConfig) -> bool {
        self.rows.contains_key(&setting(c))
    }

    /// The row of `c` (setting, then metrics): read from the CSV when it is there,
    /// else simulated and appended (flushed before returning). The flag says whether
    /// it ran.
    pub fn row(&mut self, c: &SimConfig) -> Result<(Vec<String>, bool)> {
        let key = setting(c);
        if let Some(r) = self.rows.get(&key) {
            return Ok((r.clone(), false));
        }
        let row = run_row(c);
        writeln!(self.file, "{}", csv_line(&row))
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))?;
        self.rows.insert(key, row.clone());
        Ok((row, true))
    }
}

/// Run every configuration not yet in `csv`, appending one row per run.
/// `on_row` is called after each run (progress).
pub fn run(
    configs: &[SimConfig],
    csv: &Path,
    mut on_row: impl FnMut(usize, usize, &[String]),
) -> Result<usize> {
    let mut ledger = Ledger::open(csv)?;
    let todo: Vec<&SimConfig> = configs.iter().filter(|c| !ledger.contains(c)).collect();
    let total = todo.len();
    for (i, c) in todo.into_iter().enumerate() {
        let (row, _) = ledger.row(c)?;
        on_row(i + 1, total, &row);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every key has a canonical spelling, and setting a config from it round-trips
    /// (a key added to `KEYS` without a spelling would panic here, not in a user's sweep).
    #[test]
    fn every_key_round_trips_through_its_spelling() {
        let base = SimConfig::default();
        let vals = setting(&base);
        assert_eq!(vals.len(), KEYS.len());
        let mut c = SimConfig::default();
        for (k, v) in KEYS.iter().zip(&vals) {
            if matches!(*k, "classes" | "prior") {
                continue; // "default" / "data" mean "not set"
            }
            c.set(k, v).unwrap_or_else(|e| panic!("{k}={v}: {e}"));
        }
        assert_eq!(setting(&c), vals);
        let axes: Vec<Axis> = vec![
            "batch=1,2".parse().unwrap(),
            "defense=none,prune:0.5+topk:3".parse().unwrap(),
        ];
        let grid = expand(&base, &axes).unwrap();
        assert_eq!(grid.len(), 4);
        assert_eq!(
            setting(&grid[3])[KEYS.iter().position(|k| *k == "defense").unwrap()],
            "prune:0.5+topk:3"
        );
        assert_eq!(csv_split("a,\"b,c\",d"), vec!["a", "b,c", "d"]);
    }
}
