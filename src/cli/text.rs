//! `gradleak text`: a client's sentences from one transformer gradient.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use gradleak::text::{self, TextParams};

#[derive(Args, Debug)]
pub struct TextArgs {
    #[command(subcommand)]
    command: TextCommand,
}

#[derive(Subcommand, Debug)]
enum TextCommand {
    /// Recover the sequences of a batch from the gradient of a Hugging Face transformer
    /// (GPT-2), with a certificate.
    Attack(AttackArgs),
    /// Time the stages on one gradient, and the token filter against the direct
    /// per-position computation.
    Bench(BenchArgs),
}

#[derive(Args, Debug)]
pub struct AttackArgs {
    /// The model folder `save_pretrained` wrote: config.json and model.safetensors.
    #[arg(long)]
    model: PathBuf,
    /// A safetensors file of parameter name -> gradient (`model.named_parameters()` names).
    #[arg(long)]
    gradient: PathBuf,
    /// A tokenizer.json to decode with (default for GPT-2's vocabulary: GPT-2's BPE, embedded).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// One JSON line per recovered sequence: {"ids": [...], "text": "...", "exact": bool}.
    #[arg(long)]
    out: PathBuf,
    /// The JSON report: "certified", per-stage evidence, seconds.
    #[arg(long)]
    report: Option<PathBuf>,
    /// No stage lines on stderr.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    gradient: PathBuf,
    /// Positions timed for the direct per-position filter.
    #[arg(long, default_value_t = 2)]
    direct_positions: usize,
}

pub fn run(a: TextArgs) -> Result<()> {
    match a.command {
        TextCommand::Attack(a) => attack(a),
        TextCommand::Bench(a) => bench(a),
    }
}

fn check_out(path: &std::path::Path) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    if !dir.is_dir() {
        bail!("{}: the output folder does not exist", dir.display());
    }
    Ok(())
}

fn attack(a: AttackArgs) -> Result<()> {
    check_out(&a.out)?;
    if let Some(r) = &a.report {
        check_out(r)?;
    }
    let params = TextParams {
        tokenizer: a.tokenizer.clone(),
    };
    let quiet = a.quiet;
    let mut progress = |line: &str| {
        if !quiet {
            eprintln!("{line}");
        }
    };
    let report = text::attack_with_progress(&a.model, &a.gradient, &params, &mut progress)?;
    let jsonl = report.to_jsonl();
    let rep = a
        .report
        .as_ref()
        .map(|_| serde_json::to_string_pretty(&report).context("report"))
        .transpose()?;
    gradleak::io::write_atomic(&a.out, jsonl.as_bytes())?;
    if let (Some(path), Some(rep)) = (&a.report, rep)
        && let Err(e) = gradleak::io::write_atomic(path, rep.as_bytes())
    {
        let _ = std::fs::remove_file(&a.out);
        return Err(e.into());
    }
    let exact = report.sequences.iter().filter(|s| s.exact).count();
    println!(
        "recovered {} sequences ({} exact), certified: {}",
        report.sequences.len(),
        exact,
        if report.certified { "yes" } else { "no" }
    );
    for s in &report.sequences {
        println!(
            "{} {:>3} tokens  {}",
            if s.exact { "exact" } else { "     " },
            s.ids.len(),
            s.text.as_deref().unwrap_or("(no tokenizer)")
        );
    }
    for n in &report.notes {
        println!("note: {n}");
    }
    Ok(())
}

fn bench(a: BenchArgs) -> Result<()> {
    let cmd: Vec<String> = std::env::args().collect();
    println!("machine: {}", super::bench::machine());
    println!("command: {}", cmd.join(" "));
    if cfg!(debug_assertions) {
        println!("build: debug (numbers not representative)");
    }
    let r = text::bench::run(&a.model, &a.gradient, a.direct_positions)?;
    println!("{r}");
    Ok(())
}
