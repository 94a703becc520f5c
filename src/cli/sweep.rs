//! `gradleak sweep`: a grid of simulated rounds to CSV, and plots from the CSV.

use std::path::PathBuf;

use clap::Args;

use gradleak::plot::{PlotSpec, line_plot, series_from_csv};
use gradleak::sweep::{self, Axis};

use super::simulate::SimArgs;

#[derive(Args, Debug)]
pub struct SweepArgs {
    /// The fixed part of the setting (every simulate flag); --grid overrides per run.
    #[command(flatten)]
    sim: SimArgs,
    /// A grid axis: key=v1,v2,... (keys: data batch width depth hidden activation loss classes
    /// init dtype seed method defense tol prior). Repeatable; the product is run.
    #[arg(long = "grid")]
    grid: Vec<String>,
    /// Results, one row per run. Rows already there are skipped (resume).
    #[arg(long)]
    csv: PathBuf,
    /// Draw a plot of the CSV to this PNG (after the runs).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// x axis of the plot: a setting key (numeric, or categories).
    #[arg(long, default_value = "width")]
    x: String,
    /// y axis of the plot: a metric column (median_rel_error, recovered_fraction, mean_psnr, seconds_attack, ...).
    #[arg(long, default_value = "median_rel_error")]
    y: String,
    /// One line per value of this setting key.
    #[arg(long)]
    series: Option<String>,
    /// Keep only rows with key=value when plotting (repeatable).
    #[arg(long = "filter")]
    filter: Vec<String>,
    #[arg(long)]
    log_x: bool,
    #[arg(long)]
    log_y: bool,
    /// Plot title.
    #[arg(long, default_value = "")]
    title: String,
    /// Only plot the existing CSV; run nothing.
    #[arg(long)]
    plot_only: bool,
    /// Run only part K of N of the grid (1 <= K <= N; runs i with i mod N = K - 1),
    /// e.g. one task of a Slurm array; join the parts with --merge.
    #[arg(long, value_name = "K/N")]
    shard: Option<String>,
    /// Join these shard CSVs into --csv in grid order (give the same setting and --grid
    /// flags as the shards); runs nothing.
    #[arg(long, value_name = "CSV", num_args = 1.., conflicts_with_all = ["shard", "plot_only"])]
    merge: Vec<std::path::PathBuf>,
}

pub fn run(a: SweepArgs) -> anyhow::Result<()> {
    if !a.merge.is_empty() {
        let axes: Vec<Axis> = a.grid.iter().map(|g| g.parse()).collect::<Result<_, _>>()?;
        let configs = sweep::expand(&a.sim.config()?, &axes)?;
        let n = sweep::merge(&configs, &a.merge, &a.csv)?;
        eprintln!(
            "merged {n} runs from {} files into {}",
            a.merge.len(),
            a.csv.display()
        );
    } else if !a.plot_only {
        let axes: Vec<Axis> = a.grid.iter().map(|g| g.parse()).collect::<Result<_, _>>()?;
        let base = a.sim.config()?;
        let mut configs = sweep::expand(&base, &axes)?;
        if let Some(s) = &a.shard {
            configs = super::parse::<sweep::Shard>(s)?.select(&configs);
        }
        let pb = indicatif::ProgressBar::new(configs.len() as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} runs [{elapsed} < {eta}] {msg}",
            )
            .expect("valid template"),
        );
        let ran = sweep::run(&configs, &a.csv, |i, total, row| {
            pb.set_length(total as u64);
            pb.set_position(i as u64);
            let err = row.last().filter(|e| !e.is_empty());
            pb.set_message(err.map_or(String::new(), |e| format!("last run failed: {e}")));
        })?;
        pb.finish_and_clear();
        eprintln!(
            "{ran} runs done ({} in the grid); results in {}",
            configs.len(),
            a.csv.display()
        );
    }
    if let Some(p) = &a.plot {
        let filters = a
            .filter
            .iter()
            .map(|f| {
                f.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| anyhow::anyhow!("--filter takes key=value"))?;
        let (series, categories) =
            series_from_csv(&a.csv, &a.x, &a.y, a.series.as_deref(), &filters)?;
        let spec = PlotSpec {
            title: if a.title.is_empty() {
                format!("{} vs {}", a.y, a.x)
            } else {
                a.title.clone()
            },
            x_label: a.x.clone(),
            y_label: a.y.clone(),
            log_x: a.log_x,
            log_y: a.log_y,
            categories,
        };
        line_plot(p, &spec, &series)?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}
