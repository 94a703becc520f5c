//! `gradleak simulate`: one round end to end.

use super::values;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

use gradleak::attack::AttackParams;
use gradleak::attack::Method;
use gradleak::model::cnn::Architecture;
use gradleak::model::{Activation, Init, Loss};
use gradleak::simulate::cnn::{CnnModel, CnnSimConfig};
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
    /// First-layer width m [default: 4096].
    #[arg(long)]
    pub width: Option<usize>,
    /// Number of hidden layers [default: 1].
    #[arg(long)]
    pub depth: Option<usize>,
    /// Width of the hidden layers after the first [default: 256].
    #[arg(long)]
    pub hidden: Option<usize>,
    /// Activation between layers [default: tanh; relu for --model].
    #[arg(long, value_parser = values::activation())]
    pub activation: Option<Activation>,
    /// The client's loss (mean reduction).
    #[arg(long, value_parser = values::loss(), default_value_t = Loss::Ce)]
    pub loss: Loss,
    /// Output dimension K (classes for ce). Default: the data's classes, 10 for ce, 1 otherwise.
    #[arg(long)]
    pub classes: Option<usize>,
    /// Server's parameters (gaussian: the paper's law) [default: gaussian; torch-default for --model].
    #[arg(long, value_parser = values::init())]
    pub init: Option<Init>,
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
    /// Tensor attack: whiten with the `estimated` law of the weight rows or the server's `known` one [default: estimated].
    #[arg(long)]
    pub tensor_law: Option<String>,
    /// Tensor attack: moment order 3 or 4 (auto: from the activation's Hermite coefficients) [default: auto].
    #[arg(long)]
    pub tensor_order: Option<String>,
    /// Tensor attack: `regression` on the Hermite features (default) or the paper's plain `stein` average.
    #[arg(long)]
    pub tensor_estimator: Option<String>,
}

impl SimArgs {
    pub fn config(&self) -> anyhow::Result<SimConfig> {
        let mut c = SimConfig::default();
        let d = SimConfig::default();
        let opt = |v: &Option<String>, default: &str| v.clone().unwrap_or_else(|| default.into());
        for (k, v) in [
            ("data", self.data.clone()),
            ("batch", self.batch.to_string()),
            ("width", self.width.unwrap_or(d.width).to_string()),
            ("depth", self.depth.unwrap_or(d.depth).to_string()),
            ("hidden", self.hidden.unwrap_or(d.hidden).to_string()),
            (
                "activation",
                self.activation.unwrap_or(d.activation).to_string(),
            ),
            ("loss", self.loss.to_string()),
            ("init", self.init.unwrap_or(d.init).to_string()),
            ("dtype", self.dtype.clone()),
            ("seed", self.seed.to_string()),
            ("method", self.method.to_string()),
            ("defense", self.defenses.join("+")),
            ("tol", self.tol.to_string()),
            ("tensor-law", opt(&self.tensor_law, "estimated")),
            ("tensor-order", opt(&self.tensor_order, "auto")),
            (
                "tensor-estimator",
                opt(&self.tensor_estimator, "regression"),
            ),
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

impl SimArgs {
    /// The round with a convolutional client; MLP-only options given on the command
    /// line are refused (the CNN's layers, activation, init and loss are fixed).
    fn cnn_config(&self, model: &str, pixels: bool) -> anyhow::Result<CnnSimConfig> {
        let m = match model.parse::<Architecture>() {
            Ok(a) => CnnModel::Builtin(a),
            Err(_) if gradleak::io::cnn::is_model_dir(std::path::Path::new(model)) => {
                CnnModel::Folder(model.into())
            }
            Err(_) => anyhow::bail!(
                "--model {model}: not lenet, convnet or a model folder (model.json + model.safetensors)"
            ),
        };
        let folder = matches!(m, CnnModel::Folder(_));
        let fixed = if folder {
            "the folder fixes the model"
        } else {
            "the architecture is fixed, PyTorch's default init"
        };
        for (flag, given) in [
            ("--width", self.width.is_some()),
            ("--depth", self.depth.is_some()),
            ("--hidden", self.hidden.is_some()),
            (
                "--init",
                self.init.is_some_and(|i| folder || i != Init::TorchDefault),
            ),
            (
                "--activation",
                self.activation
                    .is_some_and(|a| folder || a != Activation::Relu),
            ),
            ("--classes", folder && self.classes.is_some()),
        ] {
            anyhow::ensure!(
                !given,
                "--model {model}: {flag} does not apply to a CNN client ({fixed}{})",
                if folder { "" } else { "; ReLU only" }
            );
        }
        for (flag, given) in [
            ("--defense", !self.defenses.is_empty()),
            ("--prior", self.prior.is_some()),
            ("--tensor-law", self.tensor_law.is_some()),
            ("--tensor-order", self.tensor_order.is_some()),
            ("--tensor-estimator", self.tensor_estimator.is_some()),
        ] {
            anyhow::ensure!(
                !given,
                "--model {model}: {flag} is not supported with a CNN client (undefended, exact route on the head)"
            );
        }
        anyhow::ensure!(
            self.loss == Loss::Ce,
            "--model {model}: the CNN client trains with cross-entropy only (--loss ce), not {}",
            self.loss
        );
        anyhow::ensure!(
            self.method == Method::Auto,
            "--model {model}: the CNN attack is the exact route on the head (--method auto), not {}",
            self.method
        );
        let attack = self
            .budget
            .apply_params(AttackParams::new(Method::Auto).seed(self.seed))?;
        Ok(CnnSimConfig {
            data: super::parse(&self.data)?,
            batch: self.batch,
            model: m,
            classes: self.classes,
            dtype: super::parse(&self.dtype)?,
            seed: self.seed,
            tol: self.tol,
            pixels,
            attack,
        })
    }
}

#[derive(Args, Debug)]
pub struct SimulateArgs {
    #[command(flatten)]
    pub sim: SimArgs,
    /// A convolutional client instead of the MLP: lenet | convnet | DIR (a model folder
    /// from gradleak.export_model). Photo crops (--data images:DIR), ReLU, cross-entropy,
    /// PyTorch's default init; the attack recovers the features entering the head.
    #[arg(long)]
    pub model: Option<String>,
    /// With --model: also recover the pixels below the features (the data's mean image
    /// fills what the gradient leaves free).
    #[arg(long)]
    pub pixels: bool,
    /// Write the JSON report here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Write truth.npy, reconstruction.npy, model/gradient safetensors, report.json (and grid.png for images) here.
    #[arg(long)]
    pub save: Option<PathBuf>,
}

impl SimulateArgs {
    /// Refuse a report or save folder that cannot be written, before the round runs.
    fn check_outputs(&self) -> anyhow::Result<()> {
        if let Some(p) = &self.report {
            gradleak::io::outputs::check_writable([p.as_path()])?;
        }
        if let Some(d) = &self.save
            && d.exists()
            && !d.is_dir()
        {
            anyhow::bail!("--save {}: exists and is not a directory", d.display());
        }
        Ok(())
    }

    /// Write the round's JSON report (`--report`) and its files (`--save`, with `save`).
    fn write_outputs(
        &self,
        report: &impl serde::Serialize,
        save: impl FnOnce(&Path) -> gradleak::Result<()>,
    ) -> anyhow::Result<()> {
        if let Some(p) = &self.report {
            let json = serde_json::to_vec_pretty(report)?;
            gradleak::io::write_atomic(p, &json).with_context(|| "writing the report")?;
            eprintln!("wrote {}", p.display());
        }
        if let Some(d) = &self.save {
            save(d)?;
            eprintln!("saved the round to {}", d.display());
        }
        Ok(())
    }
}

pub fn run(a: SimulateArgs) -> anyhow::Result<()> {
    if let Some(model) = &a.model {
        return run_cnn(&a, model);
    }
    anyhow::ensure!(!a.pixels, "--pixels needs --model lenet|convnet|DIR");
    let mut cfg = a.sim.config()?;
    a.check_outputs()?;
    cfg.attack.set_observer(super::progress::Bars::default());
    let c0 = super::progress::cpu_seconds();
    let mut out = super::with_spinner("simulating", || simulate::run(&cfg))?;
    out.report.seconds.cpu = Some(super::progress::cpu_seconds() - c0);
    super::table::print_simulation(&out);
    a.write_outputs(&out.report, |d| out.save(d))
}

fn run_cnn(a: &SimulateArgs, model: &str) -> anyhow::Result<()> {
    let mut cfg = a.sim.cnn_config(model, a.pixels)?;
    a.check_outputs()?;
    cfg.attack.set_observer(super::progress::Bars::default());
    let c0 = super::progress::cpu_seconds();
    let mut out = super::with_spinner("simulating", || gradleak::simulate::cnn::run(&cfg))?;
    out.report.seconds.cpu = Some(super::progress::cpu_seconds() - c0);
    super::table::print_cnn_simulation(&out.report);
    a.write_outputs(&out.report, |d| out.save(d))
}
