//! `gradleak bench`: wall-clock timings of the pipeline's stages on fixed cases,
//! printed with the machine and the command so every number can be reproduced.

use std::time::Instant;

use clap::Args;

use gradleak::attack::{self, AttackParams, ServerView, SubspaceOptions};
use gradleak::simulate::{self, SimConfig};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Repetitions per case (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Methods to time on the digits case (comma-separated).
    #[arg(long, default_value = "analytic,auto")]
    methods: String,
    /// Also time the streaming subspace on a 100000 x 3073 gradient (slow).
    #[arg(long)]
    large: bool,
    /// Also run the large-batch exact cases (photos B = 64 and 128; minutes each).
    #[arg(long)]
    scale: bool,
    /// Directory of the photos for the large-batch cases.
    #[arg(long, default_value = "../shared/data/images")]
    images: String,
    /// Directory of the nine photos for the B = 128 case.
    #[arg(long, default_value = "../shared/data/photos")]
    photos: String,
}

/// The large-batch exact cases: (data, activation, batch, width).
fn scale_cases(a: &BenchArgs) -> Vec<(String, &'static str, usize, usize)> {
    let images = format!("images:{}:32", a.images);
    let photos = format!("images:{}:32", a.photos);
    vec![
        (images.clone(), "tanh", 64, 8192),
        (images, "relu", 64, 8192),
        (photos.clone(), "tanh", 128, 16384),
        (photos, "relu", 128, 16384),
    ]
}

/// One large case: the recovered count and each stage's seconds.
fn run_scale_case(data: &str, act: &str, b: usize, m: usize) -> anyhow::Result<()> {
    let mut c = SimConfig::default();
    let (bs, ms) = (b.to_string(), m.to_string());
    for (k, v) in [
        ("data", data),
        ("activation", act),
        ("batch", bs.as_str()),
        ("width", ms.as_str()),
        ("init", "torch-default"),
        ("dtype", "f64"),
        ("tol", "1e-6"),
        ("method", "auto"),
    ] {
        c.set(k, v)?;
    }
    let out = simulate::run(&c)?;
    let r = &out.report;
    let diag = &r.attack.diagnostics;
    let (seed_s, search_s) = diag
        .search
        .as_ref()
        .map_or((0.0, 0.0), |s| (s.seed_seconds, s.seconds));
    let recovered = (r.recovered_fraction * b as f64).round() as usize;
    println!(
        "simulate --data {data} --batch {b} --width {m} --activation {act} --init torch-default --dtype f64 --tol 1e-6"
    );
    println!(
        "    recovered {recovered}/{b}, gradient {:.1} s, attack {:.1} s (seeding {:.1} s, \
         search after it {:.1} s, subspace and the rest {:.1} s)",
        r.seconds.gradient,
        r.seconds.attack,
        seed_s,
        search_s - seed_s,
        r.seconds.attack - search_s,
    );
    Ok(())
}

pub(super) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "{cpu}, {cores} logical cores, {} {}",
        std::env::consts::OS,
        std::env::consts::ARCH
    )
}

fn median_secs(repeat: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let mut t = Vec::with_capacity(repeat);
    for _ in 0..repeat.max(1) {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64());
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    let cmd: Vec<String> = std::env::args().collect();
    println!("machine: {}", machine());
    println!("command: {}", cmd.join(" "));
    println!(
        "build: {}",
        if cfg!(debug_assertions) {
            "debug (numbers not representative)"
        } else {
            "release"
        }
    );
    println!("{:<58} {:>10}", "case", "seconds");

    let mut cfg = SimConfig::default();
    cfg.set("method", "analytic")?;
    let base = simulate::run(&cfg)?;
    let model = base.model.clone();
    let t = gradleak::model::Targets::Classes(base.batch.labels.clone().unwrap_or_default());
    let s = median_secs(a.repeat, || {
        model.gradient(base.batch.x.as_ref(), &t, gradleak::model::Loss::Ce)?;
        Ok(())
    })?;
    println!(
        "{:<58} {:>10.4}",
        "client gradient, digits B=8, 64-4096-10 tanh, f64", s
    );
    let view = ServerView::from_memory(&base.model, &base.gradient, base.report.dtype.parse()?)?;
    let s = median_secs(a.repeat, || {
        attack::subspace::estimate(&view, &SubspaceOptions::default())?;
        Ok(())
    })?;
    println!("{:<58} {:>10.4}", "subspace (thin SVD), 4096 x 65", s);
    for m in a.methods.split(',').filter(|m| !m.is_empty()) {
        let acfg = AttackParams::new(super::parse(m)?).seed(1).check()?;
        let s = median_secs(a.repeat, || {
            attack::run(&view, &acfg)?;
            Ok(())
        })?;
        println!(
            "{:<58} {:>10.4}",
            format!("attack --method {m}, digits B=8, m=4096"),
            s
        );
    }
    if a.scale {
        for (data, act, b, m) in scale_cases(&a) {
            run_scale_case(&data, act, b, m)?;
        }
    }
    if a.large {
        let mut c = SimConfig::default();
        for (k, v) in [
            ("data", "gaussian:3072"),
            ("width", "100000"),
            ("batch", "8"),
            ("method", "analytic"),
            ("dtype", "f32"),
        ] {
            c.set(k, v)?;
        }
        let out = simulate::run(&c)?;
        let view = ServerView::from_memory(&out.model, &out.gradient, gradleak::Dtype::F32)?;
        let s = median_secs(1, || {
            attack::subspace::estimate(&view, &SubspaceOptions::default())?;
            Ok(())
        })?;
        println!(
            "{:<58} {:>10.4}",
            "subspace (randomized, streaming), 100000 x 3073", s
        );
    }
    Ok(())
}
