//! `gradleak audit`: the weakest strength of a defence that stops every attack.

use super::values;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use gradleak::attack::Method;
use gradleak::audit::{self, AuditConfig, AuditReport, Family};
use gradleak::plot::{PlotSpec, Series, line_plot};

use super::simulate::SimArgs;

#[derive(Args, Debug)]
pub struct AuditArgs {
    /// The setting (model, data, batch, ...); the defence is what the audit varies.
    #[command(flatten)]
    sim: SimArgs,
    /// The defence to audit: noise-rel | dp:C (clip C, then DP-SGD noise) | prune |
    /// quantize | local-steps:LR.
    #[arg(long = "audit-defense", value_name = "FAMILY")]
    family: String,
    /// Weakest and strongest parameter value, WEAK:STRONG (e.g. 1e-6:1 for noise-rel,
    /// 16:1 for quantize). Default: the family's range.
    #[arg(long, value_name = "WEAK:STRONG")]
    range: Option<String>,
    /// Attacks to run at each strength (comma-separated).
    #[arg(
        long,
        value_parser = values::method(),
        value_delimiter = ',',
        default_value = "auto,tensor,dlg"
    )]
    methods: Vec<Method>,
    /// Strengths tried per method before bisection (evenly spaced, at least 2).
    #[arg(long, default_value_t = 5)]
    grid_points: usize,
    /// Bisection steps between the last leaking and the first stopping strength.
    #[arg(long, default_value_t = 3)]
    bisections: usize,
    /// Every probe, one sweep row each (resumes from rows already there).
    #[arg(long)]
    csv: PathBuf,
    /// Leaked share against strength, one line per method, to this PNG.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// The audit's result as JSON.
    #[arg(long)]
    report: Option<PathBuf>,
}

pub fn run(a: AuditArgs) -> anyhow::Result<()> {
    if a.sim.method != Method::Auto {
        anyhow::bail!("audit runs every method of --methods; drop --method");
    }
    if !a.sim.defenses.is_empty() {
        anyhow::bail!("audit varies the defence itself (--audit-defense); drop --defense");
    }
    if a.grid_points < 2 {
        anyhow::bail!("--grid-points must be at least 2");
    }
    let family: Family = super::parse(&a.family).context("--audit-defense")?;
    let range = a.range.as_deref().map(parse_range).transpose()?;
    let cfg = AuditConfig {
        base: a.sim.config()?,
        family,
        range,
        methods: a.methods.clone(),
        grid_points: a.grid_points,
        bisections: a.bisections,
    };
    let started = std::time::Instant::now();
    let report = audit::run(&cfg, &a.csv, |p| {
        let note = match (&p.error, p.ran) {
            (Some(e), _) => format!(" (failed: {e})"),
            (None, false) => " (from the CSV)".into(),
            (None, true) => String::new(),
        };
        eprintln!(
            "[{:>6.0} s] {:<8} {:<28} leaked {:>5.1} %{note}",
            started.elapsed().as_secs_f64(),
            p.method.name(),
            p.defense,
            100.0 * p.leaked_fraction
        );
    })?;
    print_report(&report);
    if let Some(p) = &a.plot {
        plot(&report, p)?;
        eprintln!("wrote {}", p.display());
    }
    if let Some(p) = &a.report {
        let json = serde_json::to_vec_pretty(&report)?;
        gradleak::io::write_atomic(p, &json).context("writing the report")?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}

fn parse_range(s: &str) -> anyhow::Result<(f64, f64)> {
    let num = |t: &str| t.trim().parse::<f64>().ok().filter(|v| v.is_finite());
    s.split_once(':')
        .and_then(|(a, b)| Some((num(a)?, num(b)?)))
        .ok_or_else(|| anyhow::anyhow!("--range '{s}': expected WEAK:STRONG, two numbers"))
}

fn print_report(r: &AuditReport) {
    let f = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.3e}"));
    println!(
        "audit of {} ({}) from {} to {}",
        r.family.spelling(),
        r.parameter,
        r.range.0,
        r.range.1
    );
    println!(
        "{:<8} {:>12} {:>12} {:>16} {:>12}",
        "method", "stops at", "last leak", "gradient change", "epsilon"
    );
    for m in &r.methods {
        println!(
            "{:<8} {:>12} {:>12} {:>16} {:>12}",
            m.method.name(),
            m.stops_at
                .map_or("not stopped".into(), |v| format!("{v:.3e}")),
            f(m.last_leak),
            f(m.gradient_relative_change),
            f(m.epsilon)
        );
    }
    match (r.stops_every_method, r.hardest_method) {
        (Some(v), Some(m)) => println!(
            "weakest {} that stops every method: {v:.3e} (set by {})",
            r.parameter,
            m.name()
        ),
        _ => println!("no tried {} stops every method: widen --range", r.parameter),
    }
}

fn plot(r: &AuditReport, path: &std::path::Path) -> anyhow::Result<()> {
    let series: Vec<Series> = r
        .methods
        .iter()
        .map(|m| {
            let mut points: Vec<_> = r
                .probes
                .iter()
                .filter(|p| p.method == m.method)
                .map(|p| {
                    (
                        p.value,
                        p.leaked_fraction,
                        p.leaked_fraction,
                        p.leaked_fraction,
                    )
                })
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            points.dedup_by(|a, b| a.0 == b.0);
            Series {
                name: m.method.name().to_string(),
                points,
            }
        })
        .collect();
    let spec = PlotSpec {
        title: format!("audit: {}", r.family.spelling()),
        x_label: r.parameter.to_string(),
        y_label: "share of the batch recovered".into(),
        log_x: r.family.log_axis(),
        log_y: false,
        categories: None,
    };
    line_plot(path, &spec, &series)?;
    Ok(())
}
