//! PNG line plots of sweep results: one line per series (median over seeds) with a
//! shaded min-max band. Text uses the embedded DejaVu Sans (no system fonts needed).

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;

use crate::sweep::read_csv;
use crate::{Error, Result};

/// Tableau's ten colours: distinct on white and for common colour blindness.
const COLORS: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

const WIDTH: u32 = 900;
const HEIGHT: u32 = 600;

/// One line: (x, median, min, max) per x.
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64, f64, f64)>,
}

/// Axes and labels.
#[derive(Clone, Debug, Default)]
pub struct PlotSpec {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub log_x: bool,
    pub log_y: bool,
    /// Names of categorical x positions 0, 1, 2, ... (when x is not numeric).
    pub categories: Option<Vec<String>>,
}

fn plot_err(e: impl std::fmt::Display) -> Error {
    Error::encode("plotting failed", e)
}

/// Numeric value of a setting for the x axis: the number itself, or the last number in
/// a spelling such as `noise-rel:0.001` or `gaussian:64`.
pub fn numeric(v: &str) -> Option<f64> {
    v.parse::<f64>()
        .ok()
        .or_else(|| v.rsplit([':', '+']).next().and_then(|t| t.parse().ok()))
}

/// A tick label: plain decimals between 0.01 and 10^4, else short scientific
/// notation (`1e-6`, `2.5e-3`).
fn tick(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 || (1e-2..1e4).contains(&a) {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        let s = format!("{v:.2e}");
        let (m, e) = s.split_once('e').unwrap_or((&s, "0"));
        format!("{}e{e}", m.trim_end_matches('0').trim_end_matches('.'))
    }
}

/// Series from a sweep CSV: x = a setting, y = a metric, one series per value of
/// `series` (or one in all), aggregated over the remaining rows (seeds) by median
/// and min-max. `filters` keep only rows with key == value.
pub fn series_from_csv(
    csv: &Path,
    x: &str,
    y: &str,
    series: Option<&str>,
    filters: &[(String, String)],
) -> Result<(Vec<Series>, Option<Vec<String>>)> {
    let (head, rows) = read_csv(csv)?;
    let col = |k: &str| {
        head.iter()
            .position(|h| h == k)
            .ok_or_else(|| Error::Unknown {
                kind: "CSV column",
                name: k.into(),
                expected: head.join(" "),
            })
    };
    let (xi, yi) = (col(x)?, col(y)?);
    let si = series.map(col).transpose()?;
    let fi: Vec<(usize, &str)> = filters
        .iter()
        .map(|(k, v)| col(k).map(|c| (c, v.as_str())))
        .collect::<Result<_>>()?;
    let rows: Vec<&Vec<String>> = rows
        .iter()
        .filter(|r| fi.iter().all(|(c, v)| r[*c] == *v))
        .collect();
    let numeric_x = rows.iter().all(|r| numeric(&r[xi]).is_some());
    let mut cats: Vec<String> = Vec::new();
    if !numeric_x {
        for r in &rows {
            if !cats.contains(&r[xi]) {
                cats.push(r[xi].clone());
            }
        }
    }
    let mut groups: BTreeMap<String, BTreeMap<u64, Vec<f64>>> = BTreeMap::new();
    for r in &rows {
        let Ok(yv) = r[yi].parse::<f64>() else {
            continue;
        };
        if !yv.is_finite() {
            continue;
        }
        let xv = if numeric_x {
            numeric(&r[xi]).expect("checked")
        } else {
            cats.iter().position(|c| *c == r[xi]).expect("collected") as f64
        };
        let name = si.map_or_else(|| y.to_string(), |s| format!("{}={}", head[s], r[s]));
        groups
            .entry(name)
            .or_default()
            .entry(xv.to_bits())
            .or_default()
            .push(yv);
    }
    let mut out = Vec::new();
    for (name, pts) in groups {
        let mut points: Vec<(f64, f64, f64, f64)> = pts
            .into_iter()
            .map(|(xb, mut v)| {
                v.sort_by(f64::total_cmp);
                let n = v.len();
                let med = if n % 2 == 1 {
                    v[n / 2]
                } else {
                    0.5 * (v[n / 2 - 1] + v[n / 2])
                };
                (f64::from_bits(xb), med, v[0], v[n - 1])
            })
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        out.push(Series { name, points });
    }
    if out.is_empty() {
        return Err(Error::NoNumericRows {
            csv: csv.to_path_buf(),
            column: y.to_string(),
        });
    }
    Ok((out, (!numeric_x).then_some(cats)))
}

fn range(vals: impl Iterator<Item = f64>, log: bool) -> (f64, f64) {
    let v: Vec<f64> = vals
        .filter(|v| v.is_finite() && (!log || *v > 0.0))
        .collect();
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() {
        return if log { (1e-3, 1.0) } else { (0.0, 1.0) };
    }
    if log {
        (lo / 1.5, hi * 1.5)
    } else {
        let pad = ((hi - lo) * 0.05).max(1e-12);
        (lo - pad, hi + pad)
    }
}

/// Draw the series to a PNG file (written atomically).
pub fn line_plot(path: impl AsRef<Path>, spec: &PlotSpec, series: &[Series]) -> Result<()> {
    crate::io::png::register_font();
    let mut buf = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
        let ys = series
            .iter()
            .flat_map(|s| s.points.iter().flat_map(|p| [p.2, p.3]));
        let (x0, x1) = match &spec.categories {
            Some(c) => (-0.5, c.len() as f64 - 0.5),
            None => range(xs, spec.log_x),
        };
        let (y0, y1) = range(ys, spec.log_y);
        let mut builder = ChartBuilder::on(&root);
        builder
            .caption(&spec.title, ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(75);
        let cats = spec.categories.clone();
        let xfmt = move |v: &f64| match &cats {
            Some(c) => {
                let i = v.round();
                if (v - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < c.len() {
                    c[i as usize].clone()
                } else {
                    String::new()
                }
            }
            None => tick(*v),
        };
        let yfmt = |v: &f64| tick(*v);
        macro_rules! draw {
            ($chart:expr) => {{
                let mut chart = $chart;
                let mut mesh = chart.configure_mesh();
                mesh.x_desc(spec.x_label.as_str())
                    .y_desc(spec.y_label.as_str())
                    .x_label_formatter(&xfmt)
                    .y_label_formatter(&yfmt);
                if spec.categories.is_some() {
                    mesh.x_labels(spec.categories.as_ref().map_or(10, |c| c.len() * 2 + 1));
                }
                mesh.draw().map_err(plot_err)?;
                for (k, s) in series.iter().enumerate() {
                    let (r, g, b) = COLORS[k % COLORS.len()];
                    let color = RGBColor(r, g, b).to_rgba();
                    if s.points.iter().any(|p| p.2 != p.3) {
                        let mut band: Vec<(f64, f64)> =
                            s.points.iter().map(|p| (p.0, p.3)).collect();
                        band.extend(s.points.iter().rev().map(|p| (p.0, p.2)));
                        chart
                            .draw_series(std::iter::once(Polygon::new(
                                band,
                                color.mix(0.15).filled(),
                            )))
                            .map_err(plot_err)?;
                    }
                    chart
                        .draw_series(LineSeries::new(
                            s.points.iter().map(|p| (p.0, p.1)),
                            color.stroke_width(2),
                        ))
                        .map_err(plot_err)?
                        .label(s.name.clone())
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                        });
                    chart
                        .draw_series(
                            s.points
                                .iter()
                                .map(|p| Circle::new((p.0, p.1), 3, color.filled())),
                        )
                        .map_err(plot_err)?;
                }
                chart
                    .configure_series_labels()
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK)
                    .label_font(("sans-serif", 15))
                    .draw()
                    .map_err(plot_err)?;
            }};
        }
        match (spec.log_x && spec.categories.is_none(), spec.log_y) {
            (true, true) => draw!(
                builder
                    .build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())
                    .map_err(plot_err)?
            ),
            (true, false) => draw!(
                builder
                    .build_cartesian_2d((x0..x1).log_scale(), y0..y1)
                    .map_err(plot_err)?
            ),
            (false, true) => draw!(
                builder
                    .build_cartesian_2d(x0..x1, (y0..y1).log_scale())
                    .map_err(plot_err)?
            ),
            (false, false) => draw!(
                builder
                    .build_cartesian_2d(x0..x1, y0..y1)
                    .map_err(plot_err)?
            ),
        }
        root.present().map_err(plot_err)?;
    }
    let img =
        image::RgbImage::from_raw(WIDTH, HEIGHT, buf).ok_or_else(|| plot_err("buffer size"))?;
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png)
        .map_err(plot_err)?;
    crate::io::write_atomic(path.as_ref(), png.get_ref())
}

#[cfg(test)]
mod tests {
    #[test]
    fn tick_labels_are_short_and_keep_small_values() {
        let t = super::tick;
        assert_eq!(t(1e-6), "1e-6");
        assert_eq!(t(2.5e-3), "2.5e-3");
        assert_eq!(t(0.5), "0.5");
        assert_eq!(t(0.0), "0");
        assert_eq!(t(-0.75), "-0.75");
        assert_eq!(t(12345.0), "1.23e4");
    }
}
