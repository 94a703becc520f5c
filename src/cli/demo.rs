//! `gradleak demo`: the main job on a fresh machine, on the embedded digits.

use super::values;
use std::path::PathBuf;

use clap::Args;

use gradleak::attack::Method;
use gradleak::simulate::{self, SimConfig};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Output directory (report.json, grid.png, truth/reconstruction .npy).
    #[arg(long, default_value = "gradleak-demo")]
    out: PathBuf,
    /// Attack method (default: the best available).
    #[arg(long, value_parser = values::method(), default_value_t = Method::Auto)]
    method: Method,
    /// Batch size.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// First-layer width.
    #[arg(long, default_value_t = 4096)]
    width: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

pub fn run(a: DemoArgs) -> anyhow::Result<()> {
    let mut cfg = SimConfig::default();
    cfg.set("method", a.method.name())?;
    cfg.set("seed", &a.seed.to_string())?;
    cfg.set("init", "torch-default")?;
    cfg.batch = a.batch;
    cfg.width = a.width;
    cfg.attack.set_observer(super::progress::Bars::default());
    println!(
        "gradleak demo: a client trains on {} handwritten digits (UCI, embedded), one gradient of a \
         64-{}-10 tanh network with PyTorch's default initialisation; the server attacks it with `{}`.",
        cfg.batch,
        cfg.width,
        cfg.attack.method()
    );
    let c0 = super::progress::cpu_seconds();
    let mut out = super::with_spinner("running the round", || simulate::run(&cfg))?;
    out.report.seconds.cpu = Some(super::progress::cpu_seconds() - c0);
    super::table::print_simulation(&out);
    out.save(&a.out)?;
    println!(
        "wrote {}/report.json and {}/grid.png (top: truth, bottom: reconstruction)",
        a.out.display(),
        a.out.display()
    );
    Ok(())
}
