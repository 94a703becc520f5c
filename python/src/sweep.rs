//! Sweeps from Python: the grid is re-expanded from (fixed keys, axes) wherever a
//! run executes, so a task ships only its index.

use pyo3::prelude::*;

use gradleak::simulate::SimConfig;
use gradleak::sweep::{self, Axis};

use crate::err;

fn grid(fixed: &[(String, String)], axes: &[(String, Vec<String>)]) -> PyResult<Vec<SimConfig>> {
    let mut base = SimConfig::default();
    for (k, v) in fixed {
        base.set(k, v).map_err(err)?;
    }
    let axes: Vec<Axis> = axes
        .iter()
        .map(|(k, vs)| format!("{k}={}", vs.join(if k == "prior" { ";" } else { "," })).parse())
        .collect::<Result<_, _>>()
        .map_err(err)?;
    sweep::expand(&base, &axes).map_err(err)
}

/// Column names of a sweep CSV.
#[pyfunction]
fn sweep_header() -> Vec<String> {
    sweep::header()
}

/// Number of runs in the grid (and a check of every key and value).
#[pyfunction]
fn sweep_len(fixed: Vec<(String, String)>, axes: Vec<(String, Vec<String>)>) -> PyResult<usize> {
    Ok(grid(&fixed, &axes)?.len())
}

/// Run grid index `index` and return its CSV line (no newline); the GIL is released.
#[pyfunction]
fn sweep_line(
    py: Python<'_>,
    fixed: Vec<(String, String)>,
    axes: Vec<(String, Vec<String>)>,
    index: usize,
) -> PyResult<String> {
    let configs = grid(&fixed, &axes)?;
    let c = configs.get(index).ok_or_else(|| {
        crate::GradleakError::new_err(format!(
            "invalid argument: grid index {index} out of {} runs",
            configs.len()
        ))
    })?;
    Ok(py.detach(|| sweep::csv_line(&sweep::run_row(c))))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(sweep_header, m)?)?;
    m.add_function(wrap_pyfunction!(sweep_len, m)?)?;
    m.add_function(wrap_pyfunction!(sweep_line, m)?)?;
    Ok(())
}
