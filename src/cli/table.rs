//! Readable tables on stdout.

use gradleak::attack::conv::LayerSolve;
use gradleak::metrics::SampleMetrics;
use gradleak::report::PerSample;
use gradleak::simulate::SimOutput;

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map_or("-".into(), |x| format!("{x:.prec$e}"))
}

/// One truth's cells in a per-sample table.
struct TruthCells {
    /// Relative error, "missing" where no sample was matched.
    error: String,
    cosine: String,
    /// PSNR in dB, empty where the data has no known range.
    psnr: String,
    /// Recovered/true label, "!" where they differ, "-" where unknown.
    label: String,
}

impl TruthCells {
    fn of(m: &SampleMetrics) -> Self {
        TruthCells {
            error: m.rel_error.map_or("missing".into(), |e| format!("{e:.3e}")),
            cosine: m.cosine.map_or("-".into(), |c| format!("{c:.6}")),
            psnr: m.psnr.map_or(String::new(), |p| format!("{p:.1}")),
            label: match (m.label_true, m.label_recovered) {
                (Some(t), Some(g)) => format!("{g}/{t}{}", if g == t { "" } else { "!" }),
                (Some(t), None) => format!("-/{t}"),
                _ => "-".into(),
            },
        }
    }
}

/// The matched sample's own cells in a round's table: residual, exact, stage.
fn attack_cells(p: &PerSample) -> (String, &'static str, &'static str) {
    (
        fmt_opt(p.residual, 2),
        p.exact.map_or("-", |e| if e { "yes" } else { "no" }),
        p.stage.map_or("-", |s| s.name()),
    )
}

/// " | label accuracy N%" where labels were compared, else nothing.
fn label_accuracy(a: Option<f64>) -> String {
    a.map_or(String::new(), |a| {
        format!(" | label accuracy {:.0}%", 100.0 * a)
    })
}

/// " (N s CPU)" where the round's CPU time was measured, else nothing.
fn cpu(c: Option<f64>) -> String {
    c.map_or(String::new(), |c| format!(" ({c:.2} s CPU)"))
}

/// Per-sample table and summary of a simulated round.
pub fn print_simulation(out: &SimOutput) {
    let r = &out.report;
    println!(
        "{} | B = {} (estimated {}) | d = {} | m = {} | depth {} | {} | {} | init {} | {} | method {}",
        r.data,
        r.batch_true,
        r.batch_estimated,
        r.dim,
        r.width,
        r.depth,
        r.activation,
        r.loss,
        r.init,
        r.dtype,
        r.method
    );
    if !r.defenses.is_empty() {
        println!("defences: {:?}", r.defenses);
    }
    let psnr = r.mean_psnr.is_some();
    println!(
        "{:>6} {:>12} {:>10} {:>8} {:>12} {:>6} {:>10} {:>7}",
        "sample",
        "rel.error",
        "cosine",
        if psnr { "PSNR dB" } else { "" },
        "residual",
        "exact",
        "stage",
        "label"
    );
    for p in &r.per_sample {
        let c = TruthCells::of(&p.metrics);
        let (residual, exact, stage) = attack_cells(p);
        println!(
            "{:>6} {:>12} {:>10} {:>8} {:>12} {:>6} {:>10} {:>7}",
            p.metrics.truth, c.error, c.cosine, c.psnr, residual, exact, stage, c.label,
        );
    }
    println!(
        "median rel. error {:.3e} | max {:.3e} | recovered within {:.0e}: {}/{} | missing {}{}{} | attack {:.2} s, total {:.2} s{}",
        r.median_rel_error,
        r.max_rel_error,
        r.tol,
        (r.recovered_fraction * r.batch_true as f64).round(),
        r.batch_true,
        r.missing,
        label_accuracy(r.label_accuracy),
        r.mean_psnr
            .map_or(String::new(), |p| format!(" | mean PSNR {p:.1} dB")),
        r.seconds.attack,
        r.seconds.total,
        cpu(r.seconds.cpu)
    );
    if let Some(c) = &r.attack.certificate {
        println!("{}", certificate_line(c));
        for p in &r.per_sample {
            if let Some(w) = &p.why {
                println!("  sample {}: {w}", p.metrics.truth);
            }
        }
    }
    for n in &r.attack.notes {
        println!("note: {n}");
    }
}

/// The certificate in one line: certified or not, the batch closure and why.
pub fn certificate_line(c: &gradleak::attack::evidence::Certificate) -> String {
    format!(
        "certified: {} | closure residual {} (tolerance {:.1e}) | {}",
        if c.certified { "yes" } else { "no" },
        c.closure_residual
            .map_or("-".into(), |r| format!("{r:.2e}")),
        c.closure_tolerance,
        c.why
    )
}

/// Matched metrics of a reconstruction against a true batch (`attack --truth`).
pub fn print_matched(m: &gradleak::metrics::Metrics) {
    let psnr = m.mean_psnr.is_some();
    println!(
        "{:>6} {:>12} {:>10} {:>8} {:>7}",
        "truth",
        "rel.error",
        "cosine",
        if psnr { "PSNR dB" } else { "" },
        "label"
    );
    for s in &m.per_sample {
        let c = TruthCells::of(s);
        // without true labels the recovered one is still shown
        let label = match (s.label_true, s.label_recovered) {
            (None, Some(g)) => g.to_string(),
            _ => c.label,
        };
        println!(
            "{:>6} {:>12} {:>10} {:>8} {:>7}",
            s.truth, c.error, c.cosine, c.psnr, label,
        );
    }
    println!(
        "median rel. error {:.3e} | max {:.3e} | recovered within {:.0e}: {}/{} | missing {} | unmatched {}{}",
        m.median_rel_error,
        m.max_rel_error,
        m.tol,
        (m.recovered_fraction * m.per_sample.len() as f64).round(),
        m.per_sample.len(),
        m.missing,
        m.unmatched,
        label_accuracy(m.label_accuracy),
    );
}

/// A CNN round: the setting, the features per sample, the certificate, and the pixels.
pub fn print_cnn_simulation(r: &gradleak::report::CnnSimulationReport) {
    let f = &r.features;
    println!(
        "{} | {} on {}x{}x{} | B = {} (estimated {}) | head '{}' {} -> {} (limit {}) | {} | init {} | {} | method {}",
        r.data,
        r.model,
        r.input[0],
        r.input[1],
        r.input[2],
        r.batch_true,
        r.batch_estimated,
        r.head_layer,
        r.feature_dim,
        r.head_width,
        r.batch_limit,
        r.loss,
        r.init,
        r.dtype,
        r.method
    );
    println!(
        "{:>6} {:>12} {:>10} {:>12} {:>6} {:>10} {:>7}",
        "sample", "feat.error", "cosine", "residual", "exact", "stage", "label"
    );
    for p in &f.per_sample {
        let c = TruthCells::of(&p.metrics);
        let (residual, exact, stage) = attack_cells(p);
        println!(
            "{:>6} {:>12} {:>10} {:>12} {:>6} {:>10} {:>7}",
            p.metrics.truth, c.error, c.cosine, residual, exact, stage, c.label,
        );
    }
    println!(
        "features: median rel. error {:.3e} | max {:.3e} | recovered within {:.0e}: {}/{} | exact {} | missing {}{} | attack {:.2} s, total {:.2} s{}",
        f.median_rel_error,
        f.max_rel_error,
        r.tol,
        (f.recovered_fraction * r.batch_true as f64).round(),
        r.batch_true,
        f.exact,
        f.missing,
        label_accuracy(f.label_accuracy),
        r.seconds.attack,
        r.seconds.total,
        cpu(r.seconds.cpu)
    );
    if let Some(c) = &r.attack.certificate {
        println!("{}", certificate_line(c));
    }
    for n in &r.attack.notes {
        println!("note: {n}");
    }
    if let Some(why) = &r.pixels_skipped {
        println!("pixels: not run: {why}");
    }
    if let Some(px) = &r.pixels {
        println!(
            "pixels: exact {} | feature closure {:.1e}{} | max rel. error {:.2e}, median {:.2e} | mean PSNR {} (prior alone {}) | {:.2} s",
            px.exact,
            px.feature_closure,
            if px.guessed_pooling {
                " | max pooling's kept positions guessed"
            } else {
                ""
            },
            px.max_rel_error,
            px.median_rel_error,
            px.mean_psnr.map_or("-".into(), |p| format!("{p:.1} dB")),
            px.prior_psnr.map_or("-".into(), |p| format!("{p:.1} dB")),
            px.seconds
        );
        print_pixel_layers(&px.layers, false);
    }
}

/// The pixel stage's table, one line per solved layer (with `steps`, the solver's
/// iterations too) and a line for each TV fill.
pub fn print_pixel_layers(layers: &[LayerSolve], steps: bool) {
    println!(
        " layer            unknowns  forward  gradient  free>=   free(est)  determined  residual{}",
        if steps { "  steps" } else { "" }
    );
    for l in layers {
        println!(
            " {:<16} {:>8} {:>8} {:>9} {:>7} {:>11.1} {:>11} {:>9.1e}{}",
            l.name,
            l.unknowns,
            l.forward_equations,
            l.gradient_equations,
            l.free_at_least,
            l.free_estimate,
            l.determined,
            l.residual,
            if steps {
                format!(" {:>6}", l.iterations)
            } else {
                String::new()
            }
        );
        if let Some(t) = &l.tv {
            println!(
                "   TV fill: TV {:.4e} -> {:.4e} in {} steps; residual {:.1e} -> {:.1e}",
                t.tv_start, t.tv_end, t.iterations, l.residual, t.residual_end
            );
        }
    }
}
