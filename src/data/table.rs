//! Numeric tables: comma-, semicolon- or whitespace-separated, optionally gzipped,
//! with or without a header row.

use std::io::Read;
use std::path::Path;

use faer::Mat;

use super::Dataset;
use crate::{Error, Result};

pub(super) struct Table {
    pub header: Option<Vec<String>>,
    pub values: Mat<f64>,
}

fn split(line: &str) -> Vec<&str> {
    if line.contains(',') {
        line.split(',').map(str::trim).collect()
    } else if line.contains(';') {
        line.split(';').map(str::trim).collect()
    } else {
        line.split_whitespace().collect()
    }
}

/// Parse a table from raw (possibly gzipped) bytes.
pub(super) fn parse_table(path: &Path, raw: &[u8], _hint: Option<()>) -> Result<Table> {
    let text = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut s = String::new();
        flate2::read::GzDecoder::new(raw)
            .read_to_string(&mut s)
            .map_err(|e| Error::format(path, format!("bad gzip stream ({e})")))?;
        s
    } else {
        String::from_utf8(raw.to_vec()).map_err(|_| Error::format(path, "not UTF-8 text"))?
    };
    let mut header: Option<Vec<String>> = None;
    let mut rows: Vec<Vec<f64>> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let cells = split(line);
        let parsed: std::result::Result<Vec<f64>, _> = cells
            .iter()
            .map(|c| c.trim_matches('"').parse::<f64>())
            .collect();
        match parsed {
            Ok(v) => {
                if let Some(first) = rows.first()
                    && first.len() != v.len()
                {
                    return Err(Error::format(
                        path,
                        format!(
                            "line {}: {} columns, expected {}",
                            n + 1,
                            v.len(),
                            first.len()
                        ),
                    ));
                }
                if v.iter().any(|x| !x.is_finite()) {
                    return Err(Error::NonFinite(format!(
                        "{} line {}",
                        path.display(),
                        n + 1
                    )));
                }
                rows.push(v);
            }
            Err(_) if rows.is_empty() && header.is_none() => {
                header = Some(
                    cells
                        .iter()
                        .map(|c| c.trim_matches('"').to_string())
                        .collect(),
                );
            }
            Err(_) => {
                return Err(Error::format(
                    path,
                    format!("line {}: non-numeric value", n + 1),
                ));
            }
        }
    }
    if rows.is_empty() {
        return Err(Error::format(path, "no numeric rows"));
    }
    let (n, d) = (rows.len(), rows[0].len());
    if let Some(h) = &header
        && h.len() != d
    {
        return Err(Error::format(
            path,
            format!("header has {} names, rows have {d} values", h.len()),
        ));
    }
    Ok(Table {
        header,
        values: Mat::from_fn(n, d, |i, j| rows[i][j]),
    })
}

/// `csv:FILE[:label=COL]`: standardise every feature column to mean 0, sd 1.
/// COL is a header name or a 0-based column index; its values must be integers
/// and become class labels.
pub(super) fn load_csv(path: &Path, label: Option<&str>) -> Result<Dataset> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let t = parse_table(path, &raw, None)?;
    let (n, d) = t.values.shape();
    let label_col = match label {
        None => None,
        Some(col) => {
            let by_name = t
                .header
                .as_ref()
                .and_then(|h| h.iter().position(|c| c == col));
            let idx = by_name
                .or_else(|| col.parse::<usize>().ok())
                .ok_or_else(|| Error::Invalid(format!("{}: no column '{col}'", path.display())))?;
            if idx >= d {
                return Err(Error::Invalid(format!(
                    "{}: column {idx} out of range ({d} columns)",
                    path.display()
                )));
            }
            Some(idx)
        }
    };
    let feats: Vec<usize> = (0..d).filter(|&j| Some(j) != label_col).collect();
    if feats.is_empty() {
        return Err(Error::Shape(format!(
            "{}: no feature columns",
            path.display()
        )));
    }
    let mut x = Mat::zeros(n, feats.len());
    for (k, &j) in feats.iter().enumerate() {
        let mean = (0..n).map(|i| t.values[(i, j)]).sum::<f64>() / n as f64;
        let var = (0..n)
            .map(|i| (t.values[(i, j)] - mean).powi(2))
            .sum::<f64>()
            / n as f64;
        let sd = if var > 0.0 { var.sqrt() } else { 1.0 };
        for i in 0..n {
            x[(i, k)] = (t.values[(i, j)] - mean) / sd;
        }
    }
    let (labels, classes) = match label_col {
        None => (None, None),
        Some(j) => {
            let mut l = Vec::with_capacity(n);
            for i in 0..n {
                let v = t.values[(i, j)];
                if v < 0.0 || v.fract() != 0.0 {
                    return Err(Error::Invalid(format!(
                        "{}: label column holds {v}, expected class indices 0, 1, ...",
                        path.display()
                    )));
                }
                l.push(v as usize);
            }
            let k = l.iter().max().map_or(0, |m| m + 1);
            (Some(l), Some(k.max(2)))
        }
    };
    Ok(Dataset {
        name: format!("csv:{}", path.display()),
        x,
        labels,
        classes,
        range: None,
        image: None,
    })
}
