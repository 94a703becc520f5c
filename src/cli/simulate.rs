//! `gradleak simulate`: one round end to end.

use super::values;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use gradleak::attack::Method;
use gradleak::model::{Activation, Init, Loss};
use gradleak::simulate::{self, SimConfig};

/// The setting of a simulated round (shared by `simulate`, `demo` and `sweep`).
#[derive(Args, Debug, Clone)]
pub struct SimArgs {
    /// Data: digits | gaussian:D | images:DIR[:S[:L]] (L tiling levels, default 3) | csv:FILE[:label=COL] | npy:FILE.
    #[arg(long, default_value = "digits")]
    pub data: String,
    /// Batch size B.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// First-layer width m.
    #[arg(long, default_value_t = 4096)]
    pub width: usize,
    /// Number of hidden layers.
    #[arg(long, default_value_t = 1)]
    pub depth: usize,
    /// Width of the hidden layers after the first.
    #[arg(long, default_value_t = 256)]
    pub hidden: usize,
    /// Activation between layers.
    #[arg(long, value_parser = values::activation(), default_value_t = Activation::Tanh)]
    pub activation: Activation,
    /// The client's loss (mean reduction).
    #[arg(long, value_parser = values::loss(), default_value_t = Loss::Ce)]
    pub loss: Loss,
    /// Output dimension K (classes for ce). Default: the data's classes, 10 for ce, 1 otherwise.
    #[arg(long)]
    pub classes: Option<usize>,
    /// Server's parameters (gaussian: the paper's law).
    #[arg(long, value_parser = values::init(), default_value_t = Init::Gaussian)]
    pub init: Init,
    /// Client's precision: f32 or f64.
    #[arg(long, default_value = "f64")]
    pub dtype: String,
    /// Seed of every random draw.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The attack (auto: the best available route for the case).
    #[arg(long, value_parser = values::method(), default_value_t = Method::Auto)]
    pub method: Method,
    /// Defence applied by the client, repeatable, in order: clip:C noise:SIGMA noise-rel:S
    /// prune:P topk:K quantize:BITS local-steps:E:LR (e.g. --defense clip:1 --defense noise:0.5).
    #[arg(long = "defense")]
    pub defenses: Vec<String>,
    /// Public prior over input values: mean=..,std=..,min=..,max=.. (default: the data's statistics).
    #[arg(long)]
    pub prior: Option<String>,
    #[command(flatten)]
    pub budget: super::Budget,
    /// Relative error under which a sample counts as recovered.
    #[arg(long, default_value_t = gradleak::metrics::DEFAULT_TOL)]
    pub tol: f64,
    /// Tensor attack: whiten with the `estimated` law of the weight rows or the server's `known` one.
    #[arg(long, default_value = "estimated")]
    pub tensor_law: String,
    /// Tensor attack: moment order 3 or 4 (auto: from the activation's Hermite coefficients).
    #[arg(long, default_value = "auto")]
    pub tensor_order: String,
    /// Tensor attack: `regression` on the Hermite features (default) or the paper's plain `stein` average.
    #[arg(long, default_value = "regression")]
    pub tensor_estimator: String,
}

impl SimArgs {
    pub fn config(&self) -> anyhow::Result<SimConfig> {
        let mut c = SimConfig::default();
        for (k, v) in [
            ("data", self.data.clone()),
            ("batch", self.batch.to_string()),
            ("width", self.width.to_string()),
            ("depth", self.depth.to_string()),
            ("hidden", self.hidden.to_string()),
            ("activation", self.activation.to_string()),
            ("loss", self.loss.to_string()),
            ("init", self.init.to_string()),
            ("dtype", self.dtype.clone()),
            ("seed", self.seed.to_string()),
            ("method", self.method.to_string()),
            ("defense", self.defenses.join("+")),
            ("tol", self.tol.to_string()),
            ("tensor-law", self.tensor_law.clone()),
            ("tensor-order", self.tensor_order.clone()),
            ("tensor-estimator", self.tensor_estimator.clone()),
        ] {
            c.set(k, &v)?;
        }
        if let Some(k) = self.classes {
            c.set("classes", &k.to_string())?;
        }
        if let Some(p) = &self.prior {
            c.set("prior", p)?;
        }
        self.budget.apply(&mut c.attack)?;
        Ok(c)
    }
}

#[derive(Args, Debug)]
pub struct SimulateArgs {
    #[command(flatten)]
    pub sim: SimArgs,
    /// Write the JSON report here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Write truth.npy, reconstruction.npy, model/gradient safetensors, report.json (and grid.png for images) here.
    #[arg(long)]
    pub save: Option<PathBuf>,
}

pub fn run(a: SimulateArgs) -> anyhow::Result<()> {
    let mut cfg = a.sim.config()?;
    // outputs are checked before the round runs
    if let Some(p) = &a.report {
        gradleak::io::outputs::check_writable([p.as_path()])?;
    }
    if let Some(d) = &a.save
        && d.exists()
        && !d.is_dir()
    {
        anyhow::bail!("--save {}: exists and is not a directory", d.display());
    }
    cfg.attack.set_observer(super::progress::Bars::default());
    let c0 = super::progress::cpu_seconds();
    let mut out = super::with_spinner("simulating", || simulate::run(&cfg))?;
    out.report.seconds.cpu = Some(super::progress::cpu_seconds() - c0);
    super::table::print_simulation(&out);
    if let Some(p) = &a.report {
        let json = serde_json::to_vec_pretty(&out.report)?;
        gradleak::io::write_atomic(p, &json).with_context(|| "writing the report")?;
        eprintln!("wrote {}", p.display());
    }
    if let Some(d) = &a.save {
        out.save(d)?;
        eprintln!("saved the round to {}", d.display());
    }
    Ok(())
}
