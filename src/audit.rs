//! Defence audit: for one setting (model, data, batch), the weakest strength of one
//! defence at which an attack recovers no sample, per attack and for the best of them.
//!
//! A probe is one simulated round (`simulate::run`) at one strength, recorded as a row
//! of a sweep CSV ([`Ledger`]), so an interrupted audit resumes. "Recovers a sample"
//! is [`Metrics::leaked_fraction`](crate::metrics::Metrics::leaked_fraction) > 0
//! (PSNR >= 20 dB for images, relative error <= 0.1 otherwise). The search runs on a
//! coordinate `u` that grows with the defence's strength (docs/DESIGN.md, "Audit"):
//! a grid of `u` for the plot, then bisection between the last leaking and the first
//! stopping grid point. It assumes leakage falls with strength; where a method leaks
//! again above a stopping point, the grid's last leaking point wins (conservative).

use serde::Serialize;

use crate::attack::Method;
use crate::defense::Defense;
use crate::simulate::KEYS;
use crate::simulate::SimConfig;
use crate::sweep::{Ledger, METRICS};
use crate::{Error, Result};

/// A defence with one free strength parameter.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Family {
    /// `noise-rel:S`, S on a log scale.
    NoiseRel,
    /// `clip:C` then `noise:Z`: the DP-SGD noise multiplier Z on a log scale, C fixed.
    DpSgd { clip: f64 },
    /// `prune:P`, on the log of the kept share 1 - P.
    Prune,
    /// `quantize:BITS`, fewer bits being stronger.
    Quantize,
    /// `local-steps:E:LR`, E steps at a fixed rate.
    LocalSteps { lr: f64 },
}

impl std::str::FromStr for Family {
    type Err = Error;
    /// `noise-rel`, `dp:C`, `prune`, `quantize`, `local-steps:LR`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = |reason: &str| Error::Spec {
            kind: "audited defence",
            spec: s.to_string(),
            reason: reason.to_string(),
        };
        let positive = |v: &str| {
            v.parse::<f64>()
                .ok()
                .filter(|x| *x > 0.0 && x.is_finite())
                .ok_or_else(|| bad("the fixed parameter must be a positive number"))
        };
        match s.split_once(':') {
            None if s == "noise-rel" => Ok(Family::NoiseRel),
            None if s == "prune" => Ok(Family::Prune),
            None if s == "quantize" => Ok(Family::Quantize),
            Some(("dp", c)) => Ok(Family::DpSgd { clip: positive(c)? }),
            Some(("local-steps", lr)) => Ok(Family::LocalSteps { lr: positive(lr)? }),
            None if s == "dp" => Err(bad("give the clipping norm: dp:C")),
            None if s == "local-steps" => Err(bad("give the learning rate: local-steps:LR")),
            _ => Err(Error::Unknown {
                kind: "audited defence",
                name: s.to_string(),
                expected: "noise-rel dp:C prune quantize local-steps:LR".into(),
            }),
        }
    }
}

impl Family {
    /// The spelling `FromStr` reads.
    pub fn spelling(&self) -> String {
        match self {
            Family::NoiseRel => "noise-rel".into(),
            Family::DpSgd { clip } => format!("dp:{clip}"),
            Family::Prune => "prune".into(),
            Family::Quantize => "quantize".into(),
            Family::LocalSteps { lr } => format!("local-steps:{lr}"),
        }
    }

    /// Name of the strength parameter, for tables and plot axes.
    pub fn parameter(&self) -> &'static str {
        match self {
            Family::NoiseRel => "relative noise S",
            Family::DpSgd { .. } => "noise multiplier Z",
            Family::Prune => "pruned share P",
            Family::Quantize => "bits",
            Family::LocalSteps { .. } => "local steps E",
        }
    }

    /// Default range of the strength parameter (weakest, strongest).
    pub fn default_range(&self) -> (f64, f64) {
        match self {
            Family::NoiseRel => (1e-6, 1.0),
            Family::DpSgd { .. } => (1e-3, 10.0),
            Family::Prune => (0.5, 0.999),
            Family::Quantize => (16.0, 1.0),
            Family::LocalSteps { .. } => (1.0, 32.0),
        }
    }

    /// Whether the parameter is an integer (bisection stops at adjacent integers).
    fn integer(&self) -> bool {
        matches!(self, Family::Quantize | Family::LocalSteps { .. })
    }

    /// Whether plots show the parameter on a log axis.
    pub fn log_axis(&self) -> bool {
        matches!(self, Family::NoiseRel | Family::DpSgd { .. })
    }

    /// The search coordinate of a parameter value (grows with strength).
    fn coordinate(&self, v: f64) -> f64 {
        match self {
            Family::NoiseRel | Family::DpSgd { .. } => v.log10(),
            Family::Prune => -(1.0 - v).log10(),
            Family::Quantize => -v,
            Family::LocalSteps { .. } => v,
        }
    }

    /// The parameter value at a coordinate: rounded to an integer, or to three
    /// significant digits (of 1 - P for pruning) so the spellings stay short.
    fn value(&self, u: f64) -> f64 {
        match self {
            Family::NoiseRel | Family::DpSgd { .. } => three_digits(10f64.powf(u)),
            Family::Prune => 1.0 - three_digits(10f64.powf(-u)),
            Family::Quantize => (-u).round(),
            Family::LocalSteps { .. } => u.round(),
        }
    }

    /// The client's defences at parameter value `v`.
    pub fn chain(&self, v: f64) -> Vec<Defense> {
        match *self {
            Family::NoiseRel => vec![Defense::NoiseRel(v)],
            Family::DpSgd { clip } => vec![Defense::Clip(clip), Defense::Noise(v)],
            Family::Prune => vec![Defense::Prune(v)],
            Family::Quantize => vec![Defense::Quantize(v as u32)],
            Family::LocalSteps { lr } => vec![Defense::LocalSteps(v as usize, lr)],
        }
    }

    /// Check a range (weakest, strongest): every value a valid defence, and the
    /// strongest end stronger than the weakest.
    pub fn check_range(&self, (lo, hi): (f64, f64)) -> Result<()> {
        for v in [lo, hi] {
            for d in self.chain(v) {
                d.check()?;
            }
            if !self.coordinate(v).is_finite() || (self.integer() && v.fract() != 0.0) {
                return Err(self.range_error(lo, hi, "each end must be a valid strength"));
            }
        }
        if self.coordinate(hi) <= self.coordinate(lo) {
            return Err(self.range_error(lo, hi, "the second value must be the stronger defence"));
        }
        Ok(())
    }

    fn range_error(&self, lo: f64, hi: f64, reason: &str) -> Error {
        Error::Spec {
            kind: "audit range",
            spec: format!("{lo}:{hi}"),
            reason: format!("{reason} ({}: {})", self.spelling(), self.parameter()),
        }
    }

    /// `n` parameter values from weakest to strongest, evenly spaced in the
    /// coordinate (duplicates after rounding removed).
    fn grid(&self, (lo, hi): (f64, f64), n: usize) -> Vec<f64> {
        let (a, b) = (self.coordinate(lo), self.coordinate(hi));
        let n = n.max(2);
        let mut out: Vec<f64> = (0..n)
            .map(|k| self.value(a + (b - a) * k as f64 / (n - 1) as f64))
            .collect();
        out.dedup();
        out
    }

    /// The value halfway (in the coordinate) between two values, or None when no
    /// integer lies strictly between them.
    fn midpoint(&self, weak: f64, strong: f64) -> Option<f64> {
        let m = self.value(0.5 * (self.coordinate(weak) + self.coordinate(strong)));
        (m != weak && m != strong).then_some(m)
    }
}

/// `x` (> 0) rounded to three significant digits.
fn three_digits(x: f64) -> f64 {
    let scale = 10f64.powi(2 - x.log10().floor() as i32);
    (x * scale).round() / scale
}

/// What one audit does.
#[derive(Clone, Debug)]
pub struct AuditConfig {
    /// The setting; its `defenses` must be empty and its method is replaced per probe.
    pub base: SimConfig,
    pub family: Family,
    /// (weakest, strongest) parameter values; `Family::default_range` when None.
    pub range: Option<(f64, f64)>,
    pub methods: Vec<Method>,
    /// Grid points per method (at least 2), weakest to strongest.
    pub grid_points: usize,
    /// Bisection steps between the last leaking and the first stopping grid point.
    pub bisections: usize,
}

/// One simulated round of the audit.
#[derive(Clone, Debug, Serialize)]
pub struct Probe {
    pub method: Method,
    /// The parameter value and the defences it stands for.
    pub value: f64,
    pub defense: String,
    /// Share of the batch recovered recognisably (see the module doc).
    pub leaked_fraction: f64,
    /// ||g' - g|| / ||g|| of the defended gradient.
    pub gradient_relative_change: Option<f64>,
    /// DP-SGD's epsilon at delta = [`DP_DELTA`](crate::defense::dp::DP_DELTA), for `dp:C`.
    pub epsilon: Option<f64>,
    /// The run's error, if it failed (counted as nothing leaked).
    pub error: Option<String>,
    /// Whether this probe ran now (false: read back from the CSV).
    pub ran: bool,
}

impl Probe {
    fn leaks(&self) -> bool {
        self.leaked_fraction > 0.0
    }
}

/// Where one method stops leaking.
#[derive(Clone, Debug, Serialize)]
pub struct MethodVerdict {
    pub method: Method,
    /// The weakest tried value at which nothing leaked, with every stronger grid
    /// value also stopping; None when the method still leaks at the strongest value.
    pub stops_at: Option<f64>,
    /// The strongest tried value below `stops_at` at which something leaked; None
    /// when nothing leaked even at the weakest value.
    pub last_leak: Option<f64>,
    pub gradient_relative_change: Option<f64>,
    pub epsilon: Option<f64>,
}

/// The audit's result.
#[derive(Clone, Debug, Serialize)]
pub struct AuditReport {
    /// The family's spelling (`dp:1`, `noise-rel`, ...).
    pub audited: String,
    pub family: Family,
    pub parameter: &'static str,
    pub range: (f64, f64),
    pub methods: Vec<MethodVerdict>,
    /// The weakest value that stops every method (the strongest of their stopping
    /// values); None when some method leaks at the strongest value.
    pub stops_every_method: Option<f64>,
    /// The method that needed it.
    pub hardest_method: Option<Method>,
    pub probes: Vec<Probe>,
}

/// Run the audit, recording every probe in `csv` (resumes from rows already there).
/// `on_probe` sees each probe as it completes (progress).
pub fn run(
    cfg: &AuditConfig,
    csv: &std::path::Path,
    mut on_probe: impl FnMut(&Probe),
) -> Result<AuditReport> {
    if !cfg.base.defenses.is_empty() {
        return Err(Error::Invalid(
            "an audit sets the client's defence itself: give the setting without one".into(),
        ));
    }
    if cfg.methods.is_empty() {
        return Err(Error::Empty("an audit needs at least one method"));
    }
    let range = cfg.range.unwrap_or(cfg.family.default_range());
    cfg.family.check_range(range)?;
    let mut ledger = Ledger::open(csv)?;
    let mut probes = Vec::new();
    let mut methods = Vec::new();
    for &method in &cfg.methods {
        let mut probe = |v: f64| -> Result<Probe> {
            let p = run_probe(&mut ledger, cfg, method, v)?;
            on_probe(&p);
            probes.push(p.clone());
            Ok(p)
        };
        methods.push(search(
            &cfg.family,
            range,
            cfg.grid_points,
            cfg.bisections,
            method,
            &mut probe,
        )?);
    }
    let hardest = if methods.iter().all(|m| m.stops_at.is_some()) {
        let u = |m: &&MethodVerdict| cfg.family.coordinate(m.stops_at.unwrap_or(f64::NAN));
        methods.iter().max_by(|a, b| u(a).total_cmp(&u(b)))
    } else {
        None
    };
    Ok(AuditReport {
        audited: cfg.family.spelling(),
        family: cfg.family,
        parameter: cfg.family.parameter(),
        range,
        stops_every_method: hardest.and_then(|m| m.stops_at),
        hardest_method: hardest.map(|m| m.method),
        methods,
        probes,
    })
}

/// Grid, then bisection, for one method; `probe(v)` runs the round at value `v`.
fn search(
    family: &Family,
    range: (f64, f64),
    grid_points: usize,
    bisections: usize,
    method: Method,
    probe: &mut impl FnMut(f64) -> Result<Probe>,
) -> Result<MethodVerdict> {
    let grid: Vec<Probe> = family
        .grid(range, grid_points)
        .into_iter()
        .map(&mut *probe)
        .collect::<Result<_>>()?;
    let verdict = |stop: Option<&Probe>, leak: Option<f64>| MethodVerdict {
        method,
        stops_at: stop.map(|p| p.value),
        last_leak: leak,
        gradient_relative_change: stop.and_then(|p| p.gradient_relative_change),
        epsilon: stop.and_then(|p| p.epsilon),
    };
    let Some(last) = grid.iter().rposition(Probe::leaks) else {
        return Ok(verdict(grid.first(), None));
    };
    let Some(first_stop) = grid.get(last + 1) else {
        return Ok(verdict(None, Some(grid[last].value)));
    };
    let (mut weak, mut strong) = (grid[last].value, first_stop.clone());
    for _ in 0..bisections {
        let Some(mid) = family.midpoint(weak, strong.value) else {
            break;
        };
        let p = probe(mid)?;
        if p.leaks() {
            weak = mid;
        } else {
            strong = p;
        }
    }
    Ok(verdict(Some(&strong), Some(weak)))
}

fn run_probe(ledger: &mut Ledger, cfg: &AuditConfig, method: Method, v: f64) -> Result<Probe> {
    let mut c = cfg.base.clone();
    c.attack.method = method;
    c.defenses = cfg.family.chain(v);
    let (row, ran) = ledger.row(&c)?;
    let col = |name: &str| {
        let k = METRICS
            .iter()
            .position(|m| *m == name)
            .expect("a metric column");
        row.get(KEYS.len() + k).filter(|s| !s.is_empty())
    };
    let num = |name: &str| col(name).and_then(|s| s.parse::<f64>().ok());
    Ok(Probe {
        method,
        value: v,
        defense: c
            .defenses
            .iter()
            .map(Defense::spelling)
            .collect::<Vec<_>>()
            .join("+"),
        leaked_fraction: num("leaked_fraction").unwrap_or(0.0),
        gradient_relative_change: num("gradient_relative_change"),
        epsilon: num("epsilon"),
        error: col("error").cloned(),
        ran,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(method: Method, v: f64, leaks: bool) -> Probe {
        Probe {
            method,
            value: v,
            defense: String::new(),
            leaked_fraction: if leaks { 0.5 } else { 0.0 },
            gradient_relative_change: Some(v),
            epsilon: None,
            error: None,
            ran: true,
        }
    }

    /// With leakage stopping at S = 3e-3, the grid brackets it and bisection narrows
    /// the bracket to within a factor 10^(1.5 / 2^5) of the threshold (and the rounding
    /// to three digits).
    #[test]
    fn bisection_brackets_the_threshold() {
        let f = Family::NoiseRel;
        let mut seen = Vec::new();
        let mut probe = |v: f64| {
            seen.push(v);
            Ok(fake(Method::Auto, v, v < 3e-3))
        };
        let r = search(&f, f.default_range(), 5, 5, Method::Auto, &mut probe).unwrap();
        let (stop, leak) = (r.stops_at.unwrap(), r.last_leak.unwrap());
        assert!(leak < 3e-3 && stop >= 3e-3, "{leak} {stop}");
        assert!((stop / leak).log10() <= 1.5 / 32.0 + 0.005, "{leak} {stop}");
        assert_eq!(seen.len(), 5 + 5);
        assert_eq!(r.gradient_relative_change, Some(stop));
    }

    /// Integer parameters stop at adjacent integers; fewer bits is stronger.
    #[test]
    fn integer_families_stop_at_adjacent_values() {
        let f = Family::Quantize;
        let mut probe = |v: f64| Ok(fake(Method::Dlg, v, v >= 6.0));
        let r = search(&f, f.default_range(), 4, 10, Method::Dlg, &mut probe).unwrap();
        assert_eq!((r.last_leak, r.stops_at), (Some(6.0), Some(5.0)));
        // never stopped / always stopped
        let mut always = |v: f64| Ok(fake(Method::Dlg, v, true));
        let r = search(&f, f.default_range(), 4, 3, Method::Dlg, &mut always).unwrap();
        assert_eq!((r.stops_at, r.last_leak), (None, Some(1.0)));
        let mut never = |v: f64| Ok(fake(Method::Dlg, v, false));
        let r = search(&f, f.default_range(), 4, 3, Method::Dlg, &mut never).unwrap();
        assert_eq!((r.stops_at, r.last_leak), (Some(16.0), None));
    }

    #[test]
    fn families_parse_and_map_values_both_ways() {
        for s in ["noise-rel", "dp:1", "prune", "quantize", "local-steps:0.1"] {
            let f: Family = s.parse().unwrap();
            assert_eq!(f.spelling(), s);
            let (lo, hi) = f.default_range();
            f.check_range((lo, hi)).unwrap();
            for v in [lo, hi] {
                assert!(
                    (f.value(f.coordinate(v)) - v).abs() <= 1e-12 * v.abs(),
                    "{s} {v}"
                );
            }
            assert!(f.check_range((hi, lo)).is_err(), "{s}");
        }
        assert!("dp".parse::<Family>().is_err());
        assert!("dp:-1".parse::<Family>().is_err());
        assert!("blur".parse::<Family>().is_err());
        assert!(Family::Prune.check_range((0.5, 1.5)).is_err());
        assert!(Family::Quantize.check_range((8.5, 2.0)).is_err());
        assert_eq!(
            Family::LocalSteps { lr: 0.1 }.grid((1.0, 3.0), 5),
            vec![1.0, 2.0, 3.0]
        );
    }
}
