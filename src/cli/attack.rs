//! `gradleak attack`: what a server can reconstruct from the files it holds.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use faer::Mat;

use gradleak::attack::{self, AttackParams, Method, ServerView};
use gradleak::io::{npy, write_atomic};
use gradleak::model::{Activation, Loss};
use gradleak::report::AttackReport;

#[derive(Args, Debug)]
pub struct AttackArgs {
    /// The model the server sent (safetensors).
    #[arg(long)]
    model: PathBuf,
    /// The gradient the client returned (safetensors, same names).
    #[arg(long)]
    gradient: PathBuf,
    /// The model's activation.
    #[arg(long, value_enum)]
    activation: Activation,
    /// The attack (auto: the best available route for the case).
    #[arg(long, value_enum, default_value_t = Method::Auto)]
    method: Method,
    /// Force the batch size instead of estimating it from the gradient's rank.
    #[arg(long)]
    batch: Option<usize>,
    /// The client's loss, if known: enables label recovery rules and baselines.
    #[arg(long, value_enum)]
    loss: Option<Loss>,
    /// Public prior over input values: mean=..,std=..,min=..,max=..
    #[arg(long)]
    prior: Option<String>,
    /// Public prior mean image (.npy, 1 x d; n x d gives the mean of its rows): starts of
    /// the labelled joint fit when the inputs are rank-deficient.
    #[arg(long)]
    prior_image: Option<PathBuf>,
    /// Known noise standard deviation per gradient entry (a defence's noise).
    #[arg(long)]
    noise_std: Option<f64>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[command(flatten)]
    budget: super::Budget,
    /// Reconstruction: rows are recovered samples (any order), float64 .npy.
    #[arg(long)]
    out: PathBuf,
    /// JSON report (without it, the per-sample table is printed only).
    #[arg(long)]
    report: Option<PathBuf>,
    /// Recovered labels as int64 .npy (-1 where unknown), in the order of --out.
    #[arg(long)]
    labels: Option<PathBuf>,
}

pub fn run(a: AttackArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let act = a.activation;
    let mut p = AttackParams::new(a.method)
        .seed(a.seed)
        .observer(super::progress::Bars::default());
    if let Some(b) = a.batch {
        p = p.batch(b);
    }
    if let Some(l) = a.loss {
        p = p.loss(l);
    }
    if let Some(pr) = a.prior.as_deref().map(super::parse).transpose()? {
        p = p.prior(pr);
    }
    if let Some(path) = &a.prior_image {
        let m = npy::read_matrix(path)?;
        let n = m.nrows().max(1) as f64;
        p = p.prior_image(
            (0..m.ncols())
                .map(|j| m.col(j).iter().sum::<f64>() / n)
                .collect(),
        );
    }
    if let Some(s) = a.noise_std {
        p = p.noise_std(s);
    }
    let cfg = a.budget.apply_params(p)?;
    let view = ServerView::from_files(&a.model, &a.gradient, act)?;
    let rec = super::with_spinner("attacking", || attack::run(&view, &cfg))?;
    let d = view.input_dim();
    let n = rec.samples.len();
    let x = Mat::from_fn(n, d, |i, j| rec.samples[i].x[j]);
    let labels: Vec<Option<usize>> = rec.samples.iter().map(|s| s.label).collect();
    let report = AttackReport::new(
        &view,
        &cfg,
        &rec,
        (
            a.model.display().to_string(),
            a.gradient.display().to_string(),
        ),
        t0.elapsed().as_secs_f64(),
    );
    npy::write_matrix(&a.out, &x)?;
    if let Some(r) = &a.report {
        write_atomic(r, &serde_json::to_vec_pretty(&report)?)?;
    }
    if let Some(p) = &a.labels {
        let l: Vec<i64> = labels.iter().map(|l| l.map_or(-1, |v| v as i64)).collect();
        npy::write_labels(p, &l)?;
    }
    println!(
        "batch size {} ({}); recovered {} ({} exact), missing {}; {:.2} s",
        rec.batch_estimated,
        match rec.rank_rule {
            Some(gradleak::attack::RankRule::Threshold) => "numerical rank",
            Some(gradleak::attack::RankRule::LargestGap) => "largest singular-value gap",
            Some(gradleak::attack::RankRule::Forced) => "given by --batch",
            None => "not estimated",
        },
        n,
        report.exact,
        rec.missing(),
        report.seconds
    );
    if let Some(c) = &rec.certificate {
        println!("{}", super::table::certificate_line(c));
    }
    for (i, s) in report.samples.iter().enumerate() {
        println!(
            "  sample {i}: residual {} exact {} stage {}{}{}",
            s.residual.map_or("-".into(), |r| format!("{r:.2e}")),
            if s.exact { "yes" } else { "no" },
            s.stage,
            s.label.map_or(String::new(), |l| format!(" label {l}")),
            s.why.as_ref().map_or(String::new(), |w| format!(": {w}"))
        );
    }
    for n in &rec.notes {
        println!("note: {n}");
    }
    match &a.report {
        Some(r) => eprintln!("wrote {} and {}", a.out.display(), r.display()),
        None => eprintln!("wrote {}", a.out.display()),
    }
    Ok(())
}
