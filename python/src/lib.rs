//! `gradleak._native`: the Rust library seen from Python. Arrays in, arrays and a
//! JSON report out; everything else (reading torch modules, the `Reconstruction`
//! class) is in the pure-Python package next to this crate.

mod cnn;
mod sweep;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use faer::{Col, Mat};
use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2};
use pyo3::create_exception;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use gradleak::attack::{
    AttackConfig, AttackParams, Cancel, Flow, Observer, Reconstruction, Sample, ServerView, Stage,
};
use gradleak::model::{Activation, Dense, Gradient, Loss, Mlp};
use gradleak::report::AttackReport;
use gradleak::{Dtype, Error};

create_exception!(
    gradleak,
    GradleakError,
    PyValueError,
    "Bad input or a failed attack: the one-line message the command line prints."
);

/// The library's error as a Python exception (its one-line message).
pub(crate) fn err(e: Error) -> PyErr {
    GradleakError::new_err(e.to_string())
}

pub(crate) fn bad(msg: impl Into<String>) -> PyErr {
    GradleakError::new_err(msg.into())
}

/// A 2-D float32 or float64 array as an f64 matrix, with its dtype.
fn matrix(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<(Mat<f64>, Dtype)> {
    if let Ok(a) = obj.extract::<PyReadonlyArray2<'_, f64>>() {
        let v = a.as_array();
        return Ok((
            Mat::from_fn(v.nrows(), v.ncols(), |i, j| v[(i, j)]),
            Dtype::F64,
        ));
    }
    if let Ok(a) = obj.extract::<PyReadonlyArray2<'_, f32>>() {
        let v = a.as_array();
        return Ok((
            Mat::from_fn(v.nrows(), v.ncols(), |i, j| v[(i, j)] as f64),
            Dtype::F32,
        ));
    }
    Err(bad(format!(
        "{what}: expected a 2-D float32 or float64 array"
    )))
}

/// A 1-D float32 or float64 array as an f64 column, with its dtype.
fn vector(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<(Col<f64>, Dtype)> {
    if let Ok(a) = obj.extract::<PyReadonlyArray1<'_, f64>>() {
        let v = a.as_array();
        return Ok((Col::from_fn(v.len(), |i| v[i]), Dtype::F64));
    }
    if let Ok(a) = obj.extract::<PyReadonlyArray1<'_, f32>>() {
        let v = a.as_array();
        return Ok((Col::from_fn(v.len(), |i| v[i] as f64), Dtype::F32));
    }
    Err(bad(format!(
        "{what}: expected a 1-D float32 or float64 array"
    )))
}

/// `[(weight, bias or None), ...]` as layers, and the widest dtype seen.
fn layers(list: &Bound<'_, PyList>, what: &str) -> PyResult<(Vec<Dense<f64>>, Vec<Dtype>)> {
    let mut out = Vec::with_capacity(list.len());
    let mut dtypes = Vec::new();
    for (l, item) in list.iter().enumerate() {
        let (w, b): (Bound<'_, PyAny>, Bound<'_, PyAny>) = item.extract()?;
        let (weight, dw) = matrix(&w, &format!("{what} of layer {l} (weight)"))?;
        dtypes.push(dw);
        let bias = if b.is_none() {
            None
        } else {
            let (b, db) = vector(&b, &format!("{what} of layer {l} (bias)"))?;
            dtypes.push(db);
            Some(b)
        };
        out.push(Dense { weight, bias });
    }
    Ok((out, dtypes))
}

/// Progress of the long stages, one line on stderr per stage (`progress=True`).
#[derive(Default)]
struct ProgressPrinter;

impl Observer for ProgressPrinter {
    fn begin(&self, stage: &str, total: u64) {
        eprintln!("gradleak: {stage} ({total} steps)");
    }
    fn advance(&self, _done: u64, _detail: Option<f64>) -> Flow {
        Flow::Continue
    }
}

/// Run the attack on another thread with the GIL released; poll for Ctrl-C and
/// cancel the search when it comes.
fn run_interruptible(
    py: Python<'_>,
    view: &ServerView,
    cfg: &AttackConfig,
) -> PyResult<Reconstruction> {
    let cancel = cfg.cancel_token().clone();
    let (res, interrupt) = py.detach(|| {
        std::thread::scope(|s| {
            let (tx, rx) = mpsc::channel();
            let worker = std::thread::Builder::new()
                .name("gradleak-attack".into())
                .stack_size(16 << 20)
                .spawn_scoped(s, move || {
                    let _ = tx.send(gradleak::attack::run(view, cfg));
                });
            if let Err(e) = worker {
                return (
                    Err(Error::Numerical(format!("could not start a thread: {e}"))),
                    None,
                );
            }
            let mut interrupt: Option<PyErr> = None;
            loop {
                match rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(r) => return (r, interrupt),
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        if interrupt.is_none()
                            && let Err(e) = Python::attach(|py| py.check_signals())
                        {
                            cancel.cancel();
                            interrupt = Some(e);
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        return (
                            Err(Error::Numerical("the attack thread panicked".into())),
                            interrupt,
                        );
                    }
                }
            }
        })
    });
    if let Some(e) = interrupt {
        return Err(e);
    }
    res.map_err(err)
}

/// The parameters every in-memory attack takes: the method, seed, batch size and loss
/// by name, and a fresh cancel flag.
pub(crate) fn attack_params(
    method: &str,
    seed: u64,
    batch: Option<usize>,
    loss: Option<&str>,
) -> PyResult<AttackParams> {
    let mut params = AttackParams::new(method.parse().map_err(err)?)
        .seed(seed)
        .cancel(Cancel::new());
    if let Some(b) = batch {
        params = params.batch(b);
    }
    if let Some(l) = loss {
        params = params.loss(l.parse::<Loss>().map_err(err)?);
    }
    Ok(params)
}

/// Attack a gradient held in memory. Returns a dict the Python layer wraps.
#[pyfunction]
#[pyo3(signature = (model, gradient, activation, loss=None, method="auto", batch=None, seed=1, prior=None, noise_std=None, progress=false))]
#[allow(clippy::too_many_arguments)]
fn attack<'py>(
    py: Python<'py>,
    model: &Bound<'py, PyList>,
    gradient: &Bound<'py, PyList>,
    activation: &str,
    loss: Option<&str>,
    method: &str,
    batch: Option<usize>,
    seed: u64,
    prior: Option<&str>,
    noise_std: Option<f64>,
    progress: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let t0 = Instant::now();
    let act: Activation = activation.parse().map_err(err)?;
    let mut params = attack_params(method, seed, batch, loss)?;
    if let Some(p) = prior {
        params = params.prior(p.parse().map_err(err)?);
    }
    if let Some(s) = noise_std {
        params = params.noise_std(s);
    }
    if progress {
        params = params.observer(ProgressPrinter);
    }
    let cfg = params.check().map_err(err)?;
    let (mlayers, _) = layers(model, "model")?;
    let (glayers, gdtypes) = layers(gradient, "gradient")?;
    if mlayers.len() != glayers.len() {
        return Err(err(Error::Shape(format!(
            "the model has {} Linear layers, the gradient {}",
            mlayers.len(),
            glayers.len()
        ))));
    }
    if gdtypes.windows(2).any(|w| w[0] != w[1]) {
        return Err(bad(
            "shape mismatch: the gradient mixes float32 and float64 tensors",
        ));
    }
    let dtype = gdtypes.first().copied().unwrap_or(Dtype::F64);
    let mlp = Mlp::new(mlayers, act).map_err(err)?;
    let grad = Gradient { layers: glayers };
    let mut view = ServerView::from_memory(&mlp, &grad, dtype).map_err(err)?;
    // a float32 gradient handed over as float64 is attacked at float32's floor
    view.dtype = gradleak::attack::precision::detect(
        &view.first.grad_weight,
        view.first.grad_bias.as_ref(),
        dtype,
    )
    .map_err(err)?;
    view.noise_std = noise_std;
    let rec = run_interruptible(py, &view, &cfg)?;

    let (n, d) = (rec.samples.len(), view.input_dim());
    let flat: Vec<f64> = rec
        .samples
        .iter()
        .flat_map(|s| s.x.iter().copied())
        .collect();
    let inputs = PyArray1::from_vec(py, flat).reshape([n, d])?;
    let labels: Vec<i64> = rec
        .samples
        .iter()
        .map(|s| s.label.map_or(-1, |l| l as i64))
        .collect();
    let exact: Vec<bool> = rec.samples.iter().map(|s| s.exact).collect();
    let residuals: Vec<f64> = rec
        .samples
        .iter()
        .map(|s| s.residual.unwrap_or(f64::NAN))
        .collect();
    let report = report(&view, &cfg, &rec, t0.elapsed().as_secs_f64());
    let json = serde_json::to_string(&report).map_err(|e| bad(e.to_string()))?;
    let out = PyDict::new(py);
    out.set_item("inputs", inputs)?;
    out.set_item("labels", PyArray1::from_vec(py, labels))?;
    out.set_item("exact", PyArray1::from_vec(py, exact))?;
    out.set_item("residuals", PyArray1::from_vec(py, residuals))?;
    out.set_item("batch_size", rec.batch_estimated)?;
    out.set_item("report_json", json)?;
    Ok(out)
}

/// The command line's `attack` report, for arrays held in memory.
fn report(
    view: &ServerView,
    cfg: &AttackConfig,
    rec: &Reconstruction,
    seconds: f64,
) -> AttackReport {
    AttackReport::new(
        view,
        cfg,
        rec,
        ("<memory>".into(), "<memory>".into()),
        seconds,
    )
}

/// Match a reconstruction to the truth and score it; returns the metrics as JSON.
#[pyfunction]
#[pyo3(signature = (truth, inputs, labels, tol, data_range=None, true_labels=None))]
fn evaluate(
    truth: &Bound<'_, PyAny>,
    inputs: &Bound<'_, PyAny>,
    labels: Vec<i64>,
    tol: f64,
    data_range: Option<(f64, f64)>,
    true_labels: Option<Vec<usize>>,
) -> PyResult<String> {
    let (t, _) = matrix(truth, "truth")?;
    let (x, _) = matrix(inputs, "reconstruction")?;
    if !(tol > 0.0 && tol.is_finite()) {
        return Err(bad("invalid argument: tol must be a positive number"));
    }
    if labels.len() != x.nrows() {
        return Err(err(Error::Shape(format!(
            "{} labels for {} recovered samples",
            labels.len(),
            x.nrows()
        ))));
    }
    if !gradleak::model::mat_is_finite(t.as_ref()) {
        return Err(err(Error::NonFinite("truth".into())));
    }
    let samples: Vec<Sample> = (0..x.nrows())
        .map(|i| Sample {
            x: (0..x.ncols()).map(|j| x[(i, j)]).collect(),
            residual: None,
            exact: false,
            stage: Stage::Span,
            label: usize::try_from(labels[i]).ok(),
            output_residual: None,
        })
        .collect();
    if let Some(l) = &true_labels
        && l.len() != t.nrows()
    {
        return Err(err(Error::Shape(format!(
            "{} true labels for {} true samples",
            l.len(),
            t.nrows()
        ))));
    }
    let m = gradleak::metrics::evaluate(&t, &samples, data_range, tol, true_labels.as_deref())
        .map_err(err)?;
    serde_json::to_string(&m).map_err(|e| bad(e.to_string()))
}

/// Load a data spec (`digits`, `images:DIR:S`, ...) as (x, labels or None, image
/// shape (h, w, c) or None, value range or None).
#[pyfunction]
#[pyo3(signature = (spec, rows=64, seed=1))]
#[allow(clippy::type_complexity)]
fn load_data<'py>(
    py: Python<'py>,
    spec: &str,
    rows: usize,
    seed: u64,
) -> PyResult<(
    Bound<'py, PyAny>,
    Option<Bound<'py, PyArray1<i64>>>,
    Option<(usize, usize, usize)>,
    Option<(f64, f64)>,
)> {
    let spec: gradleak::data::DataSpec = spec.parse().map_err(err)?;
    let mut rng = gradleak::rng::stream(seed, gradleak::rng::Stream::Data);
    let data = py.detach(|| spec.load(rows, &mut rng)).map_err(err)?;
    let (n, d) = data.x.shape();
    let flat: Vec<f64> = (0..n)
        .flat_map(|i| (0..d).map(move |j| (i, j)))
        .map(|(i, j)| data.x[(i, j)])
        .collect();
    let x = PyArray1::from_vec(py, flat).reshape([n, d])?.into_any();
    let labels = data
        .labels
        .map(|l| PyArray1::from_vec(py, l.into_iter().map(|v| v as i64).collect()));
    let image = data.image.map(|s| (s.height, s.width, s.channels));
    Ok((x, labels, image, data.range))
}

/// The transformer text attack on files: a `save_pretrained` folder (config.json,
/// model.safetensors), a safetensors of parameter name -> gradient, and optionally a
/// tokenizer.json. Returns the JSON report (`"certified"`, `"sequences"`, per-stage
/// evidence) as a string; gradleak.text wraps it.
#[pyfunction]
#[pyo3(signature = (model_dir, gradient, tokenizer=None))]
fn text_attack(
    py: Python<'_>,
    model_dir: &str,
    gradient: &str,
    tokenizer: Option<&str>,
) -> PyResult<String> {
    let (m, g) = (
        std::path::PathBuf::from(model_dir),
        std::path::PathBuf::from(gradient),
    );
    let t = tokenizer.map(std::path::PathBuf::from);
    py.detach(|| gradleak::text::attack_json(&m, &g, t.as_deref()))
        .map_err(|e| bad(e.to_string()))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("GradleakError", m.py().get_type::<GradleakError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(attack, m)?)?;
    m.add_function(wrap_pyfunction!(cnn::attack_cnn, m)?)?;
    m.add_function(wrap_pyfunction!(evaluate, m)?)?;
    m.add_function(wrap_pyfunction!(load_data, m)?)?;
    m.add_function(wrap_pyfunction!(text_attack, m)?)?;
    sweep::register(m)?;
    Ok(())
}
