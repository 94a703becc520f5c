//! The CNN attack from Python: a model description (the JSON `export_model` writes),
//! the state_dict and the gradient as {name: array}; the same library calls as
//! `gradleak attack --model DIR`.

use std::time::Instant;

use numpy::{PyArray1, PyArrayMethods, PyReadonlyArrayDyn};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use gradleak::attack::conv::ConvProblem;
use gradleak::model::cnn::{ModelSpec, Tensors};
use gradleak::report::AttackReport;
use gradleak::{Dtype, Error};

use crate::{attack_params, bad, err};

/// {name: float32 or float64 array of any shape} as named tensors, with the widest dtype.
fn tensors(d: &Bound<'_, PyDict>, what: &str) -> PyResult<(Tensors, Dtype)> {
    let mut out = Tensors::new();
    let mut dtype: Option<Dtype> = None;
    for (k, v) in d.iter() {
        let name: String = k.extract()?;
        let (shape, values, dt) = if let Ok(a) = v.extract::<PyReadonlyArrayDyn<'_, f64>>() {
            let a = a.as_array();
            (
                a.shape().to_vec(),
                a.iter().copied().collect::<Vec<f64>>(),
                Dtype::F64,
            )
        } else if let Ok(a) = v.extract::<PyReadonlyArrayDyn<'_, f32>>() {
            let a = a.as_array();
            (
                a.shape().to_vec(),
                a.iter().map(|&x| x as f64).collect(),
                Dtype::F32,
            )
        } else {
            return Err(bad(format!(
                "invalid argument: {what} tensor '{name}' is not a float32 or float64 array"
            )));
        };
        dtype = Some(dtype.map_or(dt, |d| d.max(dt)));
        out.insert(name, (shape, values));
    }
    Ok((out, dtype.unwrap_or(Dtype::F64)))
}

/// Attack a CNN gradient held in memory: the features entering the head.
#[pyfunction]
#[pyo3(signature = (description, model, gradient, loss=None, method="auto", batch=None, seed=1, precision=None))]
#[allow(clippy::too_many_arguments)]
pub fn attack_cnn<'py>(
    py: Python<'py>,
    description: &str,
    model: &Bound<'py, PyDict>,
    gradient: &Bound<'py, PyDict>,
    loss: Option<&str>,
    method: &str,
    batch: Option<usize>,
    seed: u64,
    precision: Option<&str>,
) -> PyResult<Bound<'py, PyDict>> {
    let t0 = Instant::now();
    let cfg = attack_params(method, seed, batch, loss)?
        .check()
        .map_err(err)?;
    let precision = precision
        .map(str::parse::<Dtype>)
        .transpose()
        .map_err(err)?;
    let spec = ModelSpec::from_json(description).map_err(err)?;
    let (mt, _) = tensors(model, "model")?;
    let (gt, storage) = tensors(gradient, "gradient")?;
    let p = ConvProblem::new(&spec, &mt, &gt, storage, precision).map_err(err)?;
    let rec = py
        .detach(|| gradleak::attack::run_conv(&p, &cfg))
        .map_err(err)?;
    let f = &rec.features;
    let (n, d) = (f.samples.len(), rec.feature_dim);
    let flat: Vec<f64> = f.samples.iter().flat_map(|s| s.x.iter().copied()).collect();
    let report = AttackReport::new(
        &p.view,
        &cfg,
        f,
        ("<memory>".into(), "<memory>".into()),
        t0.elapsed().as_secs_f64(),
    );
    let mut json = serde_json::to_value(&report).map_err(|e| bad(e.to_string()))?;
    json["cnn"] = serde_json::json!({
        "head_layer": rec.head_layer,
        "feature_dim": rec.feature_dim,
        "head_width": rec.head_width,
        "batch_limit": rec.batch_limit,
    });
    let out = PyDict::new(py);
    out.set_item("inputs", PyArray1::from_vec(py, flat).reshape([n, d])?)?;
    let labels: Vec<i64> = f
        .samples
        .iter()
        .map(|s| s.label.map_or(-1, |l| l as i64))
        .collect();
    out.set_item("labels", PyArray1::from_vec(py, labels))?;
    let exact: Vec<bool> = f.samples.iter().map(|s| s.exact).collect();
    out.set_item("exact", PyArray1::from_vec(py, exact))?;
    let res: Vec<f64> = f
        .samples
        .iter()
        .map(|s| s.residual.unwrap_or(f64::NAN))
        .collect();
    out.set_item("residuals", PyArray1::from_vec(py, res))?;
    out.set_item("batch_size", f.batch_estimated)?;
    out.set_item(
        "report_json",
        serde_json::to_string(&json).map_err(|e| err(Error::encode("report", e)))?,
    )?;
    Ok(out)
}
