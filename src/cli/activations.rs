//! `gradleak activations`: the Hermite coefficients the tensor attack relies on.

use clap::Args;

use gradleak::attack::moment::hermite;

#[derive(Args, Debug)]
pub struct ActivationsArgs {
    /// Mean of the pre-activation law N(mean, sd^2).
    #[arg(long, default_value_t = hermite::DEFAULT_LAW.0, allow_hyphen_values = true)]
    mean: f64,
    /// Standard deviation of the pre-activation law.
    #[arg(long, default_value_t = hermite::DEFAULT_LAW.1)]
    sd: f64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(a: ActivationsArgs) -> anyhow::Result<()> {
    let rows = hermite::table(a.mean, a.sd)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "pre-activation z ~ N({}, {}^2); strength = |E[act'(z) He_k(g)]| / sqrt(k! E[act'(z)^2]); order used when strength >= {}",
        a.mean,
        a.sd,
        hermite::ORDER_THRESHOLD
    );
    println!(
        "{:>11} {:>11} {:>11} {:>11} {:>11}   {:>7} {:>7} {:>7} {:>7}  {:>5}",
        "activation",
        "E[act']",
        "E[act'']",
        "E[act''']",
        "E[act'''']",
        "str k=0",
        "k=1",
        "k=2",
        "k=3",
        "order"
    );
    for r in rows {
        let d = &r.derivative_means;
        let s = &r.strengths;
        println!(
            "{:>11} {:>11.4e} {:>11.4e} {:>11.4e} {:>11.4e}   {:>7.3} {:>7.3} {:>7.3} {:>7.3}  {:>5}",
            r.activation,
            d[0],
            d[1],
            d[2],
            d[3],
            s[0],
            s[1],
            s[2],
            s[3],
            r.order.map_or("-".into(), |o| o.to_string())
        );
    }
    Ok(())
}
