//! Subcommands. Each file turns flags into library calls; no numerics here.

mod activations;
mod attack;
mod attack_cnn;
mod audit;
mod bench;
mod client;
mod demo;
mod progress;
mod simulate;
mod sweep;
mod table;
mod text;
mod values;

use clap::{Parser, Subcommand};

/// How much does one gradient leak? Reconstruct a client's private batch from one
/// model gradient, exactly where the maths allows, and measure what defences change.
#[derive(Parser, Debug)]
#[command(name = "gradleak", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Compute the gradient a client would send (agrees with PyTorch).
    Client(client::ClientArgs),
    /// Reconstruct the batch from a model and a gradient held by the server.
    Attack(attack::AttackArgs),
    /// Simulate one round end to end: data, server's parameters, gradient, attack, metrics.
    Simulate(simulate::SimulateArgs),
    /// A small honest run on the embedded digits, with a table and a picture.
    Demo(demo::DemoArgs),
    /// Run a grid of simulations and write one CSV row per run (resumable), plus plots.
    Sweep(sweep::SweepArgs),
    /// The weakest strength of a defence at which no attack recovers a sample.
    Audit(audit::AuditArgs),
    /// Time the pipeline's stages on fixed cases (prints the machine and the command).
    Bench(bench::BenchArgs),
    /// Hermite coefficients E[act^(k+1)(z)] of every activation and the tensor order used.
    Activations(activations::ActivationsArgs),
    /// Text: a client's sentences from one transformer gradient (GPT-2).
    Text(text::TextArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Client(a) => client::run(a),
        Command::Attack(a) => attack::run(a),
        Command::Simulate(a) => simulate::run(a),
        Command::Demo(a) => demo::run(a),
        Command::Sweep(a) => sweep::run(a),
        Command::Audit(a) => audit::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Activations(a) => activations::run(a),
        Command::Text(a) => text::run(a),
    }
}

/// Clap's verdict on the command line: help and version as clap prints them (exit 0);
/// a usage error as one line on stderr, with the allowed values when clap lists them
/// (exit 1, like every other error).
pub fn usage_error(e: clap::Error) -> std::process::ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return std::process::ExitCode::SUCCESS;
    }
    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        let _ = e.print();
        return std::process::ExitCode::FAILURE;
    }
    eprintln!("gradleak: error: {}", one_line(&e.render().to_string()));
    std::process::ExitCode::FAILURE
}

/// Clap's rendered error on one line: the message and any "[possible values: ...]"
/// or "tip: ..." line, without the usage block and the "--help" hint.
fn one_line(rendered: &str) -> String {
    let mut parts = Vec::new();
    for line in rendered.lines().map(str::trim) {
        if line.is_empty() || line.starts_with("For more information") {
            continue;
        }
        if line.starts_with("Usage:") {
            break;
        }
        parts.push(line.strip_prefix("error: ").unwrap_or(line));
    }
    format!("{} (see --help)", parts.join(" "))
}

/// Parse a name with the library's own error (one line naming the choices).
pub fn parse<T: std::str::FromStr<Err = gradleak::Error>>(s: &str) -> anyhow::Result<T> {
    Ok(s.parse::<T>()?)
}

/// A spinner on stderr while `f` runs (hidden when stderr is not a terminal).
pub fn with_spinner<R>(msg: &str, f: impl FnOnce() -> R) -> R {
    let pb = indicatif::ProgressBar::new_spinner();
    pb.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
            .expect("valid template"),
    );
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(std::time::Duration::from_millis(120));
    let r = f();
    pb.finish_and_clear();
    r
}

/// Budgets of the iterative attacks (the defaults suit a laptop; raise them for hard cases).
#[derive(clap::Args, Debug, Clone)]
pub struct Budget {
    /// Optional wall-clock cap of the span search in seconds (default: none; the
    /// budget is counted in starts and rounds, so results do not depend on the machine).
    #[arg(long)]
    pub search_seconds: Option<f64>,
    /// Most Levenberg-Marquardt starts of the span search.
    #[arg(long)]
    pub search_starts: Option<usize>,
    /// Demixing (FastICA) rounds that seed the span search; 0 = random starts only.
    #[arg(long)]
    pub seed_rounds: Option<usize>,
    /// Threads polishing the seeds of a round (the output does not depend on it).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Iterations of the dlg (L-BFGS) and ig (Adam) baselines.
    #[arg(long)]
    pub baseline_iters: Option<usize>,
    /// Random starts of the dlg baseline.
    #[arg(long)]
    pub restarts: Option<usize>,
}

impl Budget {
    /// Apply the given budgets; reject values that cannot be meant.
    pub fn apply(&self, cfg: &mut gradleak::AttackConfig) -> anyhow::Result<()> {
        *cfg = self.apply_params(cfg.clone().into_params())?;
        Ok(())
    }

    /// Apply the given budgets to `p` and validate; errors name the flag.
    pub fn apply_params(
        &self,
        mut p: gradleak::AttackParams,
    ) -> anyhow::Result<gradleak::AttackConfig> {
        if let Some(s) = self.search_seconds {
            anyhow::ensure!(s.is_finite(), "--search-seconds must be a positive number");
            p = p.search_seconds(s);
        }
        if let Some(n) = self.search_starts {
            p = p.search_starts(n);
        }
        if let Some(n) = self.seed_rounds {
            p = p.seed_rounds(n);
        }
        if let Some(n) = self.threads {
            p = p.threads(n);
        }
        if let Some(n) = self.baseline_iters {
            p = p.baseline_iters(n);
        }
        if let Some(n) = self.restarts {
            p = p.restarts(n);
        }
        p.check()
            .map_err(|e| anyhow::anyhow!("{} ({})", e, flag_of(&e)))
    }
}

/// The command-line flag behind a parameter error.
pub fn flag_of(e: &gradleak::Error) -> &'static str {
    match e {
        gradleak::Error::Param { name, .. } => match *name {
            "batch" => "--batch",
            "noise_std" => "--noise-std",
            "prior" => "--prior",
            "search_starts" => "--search-starts",
            "search_seconds" => "--search-seconds",
            "threads" => "--threads",
            "baseline_iters" => "--baseline-iters",
            "restarts" => "--restarts",
            "classes" => "--classes",
            _ => "see --help",
        },
        gradleak::Error::Spec { kind, .. } => match *kind {
            "data spec" => "--data",
            "defence" => "--defense",
            "prior" => "--prior",
            "grid axis" => "--grid",
            "shard" => "--shard",
            _ => "see --help",
        },
        _ => "see --help",
    }
}

/// The one line printed for a failed command: the error chain, and the flag behind a
/// parameter or specification error.
pub fn error_line(e: &anyhow::Error) -> String {
    let flag = e
        .chain()
        .find_map(|c| c.downcast_ref::<gradleak::Error>())
        .filter(|g| {
            matches!(
                g,
                gradleak::Error::Param { .. } | gradleak::Error::Spec { .. }
            )
        })
        .map(flag_of)
        .filter(|f| *f != "see --help");
    match flag {
        Some(f) => format!("{e:#} ({f})"),
        None => format!("{e:#}"),
    }
}
