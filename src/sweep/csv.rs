//! Sweep CSV files: a configuration's canonical setting (its key columns), the
//! header, and reading and writing lines (double-quoted fields allowed).

use std::path::Path;

use super::METRICS;
use crate::simulate::{KEYS, SimConfig};
use crate::{Error, Result};

/// Canonical value of every key of a configuration, in `KEYS` order.
pub fn setting(c: &SimConfig) -> Vec<String> {
    KEYS.iter()
        .map(|k| match *k {
            "data" => data_name(&c.data),
            "batch" => c.batch.to_string(),
            "width" => c.width.to_string(),
            "depth" => c.depth.to_string(),
            "hidden" => c.hidden.to_string(),
            "activation" => c.activation.to_string(),
            "loss" => c.loss.to_string(),
            "classes" => c.classes.map_or("default".into(), |k| k.to_string()),
            "init" => c.init.to_string(),
            "dtype" => c.dtype.to_string(),
            "seed" => c.seed.to_string(),
            "method" => c.attack.method.to_string(),
            "defense" => {
                if c.defenses.is_empty() {
                    "none".into()
                } else {
                    c.defenses
                        .iter()
                        .map(crate::defense::Defense::spelling)
                        .collect::<Vec<_>>()
                        .join("+")
                }
            }
            "tol" => c.tol.to_string(),
            "prior" => c.attack.prior.map_or("data".into(), |p| {
                format!("mean={};std={};min={};max={}", p.mean, p.std, p.min, p.max)
            }),
            "attack-batch" => c.attack.batch.map_or("auto".into(), |b| b.to_string()),
            "tensor-law" => if c.attack.tensor.use_known_law {
                "known"
            } else {
                "estimated"
            }
            .into(),
            "tensor-order" => c
                .attack
                .tensor
                .order
                .map_or("auto".into(), |o| o.to_string()),
            "tensor-estimator" => if c.attack.tensor.plain_moments {
                "stein"
            } else {
                "regression"
            }
            .into(),
            _ => unreachable!("every key is listed"),
        })
        .collect()
}

fn data_name(d: &crate::data::DataSpec) -> String {
    use crate::data::DataSpec::*;
    match d {
        Digits => "digits".into(),
        Gaussian { dim } => format!("gaussian:{dim}"),
        Images { dir, size, levels } => crate::data::image_name(dir, *size, *levels),
        Csv { path, label } => format!(
            "csv:{}{}",
            path.display(),
            label
                .as_ref()
                .map_or(String::new(), |l| format!(":label={l}"))
        ),
        Npy { path } => format!("npy:{}", path.display()),
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Split one CSV line (double-quoted fields allowed).
pub fn csv_split(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(ch) = chars.next() {
        match (ch, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => out.push(std::mem::take(&mut cur)),
            _ => cur.push(ch),
        }
    }
    out.push(cur);
    out
}

/// The header of a sweep CSV.
pub fn header() -> Vec<String> {
    KEYS.iter().chain(METRICS).map(|s| s.to_string()).collect()
}

/// Read a sweep CSV: header and rows (rows with the wrong number of fields, e.g. a
/// line cut by an interrupted run, are skipped).
pub fn read_csv(path: &Path) -> Result<(Vec<String>, Vec<Vec<String>>)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut lines = text.lines();
    let head = csv_split(
        lines
            .next()
            .ok_or_else(|| Error::format(path, "empty CSV"))?,
    );
    let rows = lines
        .map(csv_split)
        .filter(|r| r.len() == head.len())
        .collect();
    Ok((head, rows))
}

/// One CSV line (no newline) of a row.
pub fn csv_line(row: &[String]) -> String {
    row.iter()
        .map(|s| csv_field(s))
        .collect::<Vec<_>>()
        .join(",")
}
