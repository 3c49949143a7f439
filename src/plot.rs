//! Pictures of runs: fault-latency CDFs, pages present over time, fault
//! rate over time. Drawn as SVG with `plotters`, rasterized to PNG with
//! `resvg` using an embedded DejaVu Sans, so no system fonts are needed.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::report::Report;

/// Picture size (SVG units; the PNG is twice as large).
const SIZE: (u32, u32) = (1200, 600);
/// Width of the legend panel on the right.
const LEGEND_W: u32 = 330;

/// Ten distinguishable colours (matplotlib's tab10).
const COLOURS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// One curve.
pub struct Series {
    /// Legend text.
    pub label: String,
    /// Points, in x order.
    pub points: Vec<(f64, f64)>,
}

fn style(i: usize) -> ShapeStyle {
    COLOURS[i % COLOURS.len()].stroke_width(2)
}

/// Past ten curves the colours repeat, dashed.
fn dashed(i: usize) -> bool {
    i >= COLOURS.len()
}

/// Draw series `i` on a chart.
fn draw_series<'a, X, Y>(
    ch: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    i: usize,
    s: &Series,
) -> Result<()>
where
    X: plotters::coord::ranged1d::Ranged<ValueType = f64>,
    Y: plotters::coord::ranged1d::Ranged<ValueType = f64>,
{
    let st = style(i);
    if dashed(i) {
        ch.draw_series(DashedLineSeries::new(s.points.iter().copied(), 8, 5, st)).map_err(err)?;
    } else {
        ch.draw_series(LineSeries::new(s.points.iter().copied(), st)).map_err(err)?;
    }
    Ok(())
}

/// The legend, in its own panel so it never hides a curve, under `title`.
fn draw_legend(area: &Area<'_>, title: Option<&str>, series: &[Series]) -> Result<()> {
    let font = ("sans-serif", 14).into_font();
    let mut top = 60;
    if let Some(t) = title {
        area.draw(&Text::new(t.to_string(), (6, top - 10), ("sans-serif", 14).into_font().style(FontStyle::Bold)))
            .map_err(err)?;
        top += 24;
    }
    let step = if series.len() > 20 { 16 } else { 22 };
    for (i, s) in series.iter().enumerate() {
        let y = top + i32::try_from(i).unwrap_or(0) * step;
        let st = style(i);
        if dashed(i) {
            for x in [6, 18, 30] {
                area.draw(&PathElement::new(vec![(x, y), (x + 7, y)], st)).map_err(err)?;
            }
        } else {
            area.draw(&PathElement::new(vec![(6, y), (38, y)], st)).map_err(err)?;
        }
        let label: String = if s.label.chars().count() > 44 {
            s.label.chars().take(43).chain(std::iter::once('…')).collect()
        } else {
            s.label.clone()
        };
        area.draw(&Text::new(label, (46, y - 8), font.clone())).map_err(err)?;
    }
    Ok(())
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing: {e:?}")
}

/// A chart of `series` with a log-scale x axis.
fn draw_log_x(root: &Area<'_>, title: &str, x_desc: &str, y_desc: &str, series: &[Series]) -> Result<()> {
    let (lo, hi) = x_bounds(series, 1.0);
    let (lo, hi) = (lo.max(0.1) / 1.2, hi * 1.2);
    let mut ch = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 24))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(60)
        .build_cartesian_2d((lo..hi).log_scale(), 0f64..1.0)
        .map_err(err)?;
    ch.configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&|v| format!("{v}"))
        .y_label_formatter(&|v| format!("{v:.1}"))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .draw()
        .map_err(err)?;
    for (i, s) in series.iter().enumerate() {
        draw_series(&mut ch, i, s)?;
    }
    Ok(())
}

/// A chart of `series` on linear axes, y from 0 to `y_max` (or the data's
/// maximum).
fn draw_linear(
    root: &Area<'_>,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
    y_max: Option<f64>,
) -> Result<()> {
    let (lo, hi) = x_bounds(series, 0.0);
    let lo = lo.min(0.0);
    let hi = if hi > lo { hi } else { lo + 1.0 };
    let ymax = y_max.unwrap_or_else(|| {
        let m = series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).fold(0.0, f64::max);
        if m > 0.0 { m * 1.1 } else { 1.0 }
    });
    let mut ch = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 24))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(lo..hi, 0f64..ymax)
        .map_err(err)?;
    ch.configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .y_label_formatter(&|v| short(*v))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .draw()
        .map_err(err)?;
    for (i, s) in series.iter().enumerate() {
        draw_series(&mut ch, i, s)?;
    }
    Ok(())
}

/// 1234567 -> "1.2M".
fn short(v: f64) -> String {
    let a = v.abs();
    if a >= 1e9 {
        format!("{:.1}G", v / 1e9)
    } else if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 10.0 || a == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn x_bounds(series: &[Series], default: f64) -> (f64, f64) {
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let (lo, hi) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), x| (l.min(x), h.max(x)));
    if lo.is_finite() { (lo, hi) } else { (default, default * 10.0 + 1.0) }
}

/// Render an SVG document to PNG at twice its size.
fn svg_to_png(svg: &str, path: &Path) -> Result<()> {
    let mut opt = resvg::usvg::Options::default();
    opt.fontdb_mut().load_font_data(dejavu::sans::regular().to_vec());
    opt.fontdb_mut().set_sans_serif_family("DejaVu Sans");
    opt.font_family = "DejaVu Sans".into();
    let tree = resvg::usvg::Tree::from_str(svg, &opt).context("parsing our own SVG")?;
    let size = tree.size().to_int_size().scale_by(2.0).context("scaling")?;
    let mut pm = resvg::tiny_skia::Pixmap::new(size.width(), size.height()).context("allocating the image")?;
    pm.fill(resvg::tiny_skia::Color::WHITE);
    resvg::render(&tree, resvg::tiny_skia::Transform::from_scale(2.0, 2.0), &mut pm.as_mut());
    pm.save_png(path).with_context(|| format!("writing {}", path.display()))
}

/// Draw a chart with `f` beside the legend of `series` and write
/// `<dir>/<name>.svg` and `.png`.
fn picture(
    dir: &Path,
    name: &str,
    legend_title: Option<&str>,
    series: &[Series],
    f: impl FnOnce(&Area<'_>) -> Result<()>,
) -> Result<Vec<PathBuf>> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (chart, legend) = root.split_horizontally(SIZE.0 - LEGEND_W);
        f(&chart)?;
        draw_legend(&legend, legend_title, series)?;
        root.present().map_err(err)?;
    }
    let (s, p) = (dir.join(format!("{name}.svg")), dir.join(format!("{name}.png")));
    std::fs::write(&s, &svg).with_context(|| format!("writing {}", s.display()))?;
    svg_to_png(&svg, &p)?;
    Ok(vec![s, p])
}

/// The CDF of a histogram given as (ns, count) buckets, in microseconds.
pub fn cdf_us(buckets: &[(u64, u64)]) -> Vec<(f64, f64)> {
    let total = buckets.iter().fold(0u64, |a, b| a.saturating_add(b.1));
    if total == 0 {
        return Vec::new();
    }
    let mut acc = 0u64;
    let mut v = Vec::with_capacity(buckets.len() + 1);
    #[allow(clippy::cast_precision_loss)]
    for &(ns, n) in buckets {
        if v.is_empty() {
            v.push((ns as f64 / 1e3, 0.0));
        }
        acc = acc.saturating_add(n);
        v.push((ns as f64 / 1e3, acc as f64 / total as f64));
    }
    v
}

/// The time series from the guest's resume on, starting at t = 0 with the
/// counters as they were at the resume.
fn after_resume(r: &Report) -> Vec<crate::timeline::Sample> {
    let t = &r.timeline;
    let first = t.iter().position(|s| s.t_ms >= 0.0).unwrap_or(t.len());
    let mut v = Vec::with_capacity(t.len() - first + 1);
    if first > 0 && t.get(first).is_none_or(|s| s.t_ms > 0.0) {
        v.push(crate::timeline::Sample { t_ms: 0.0, ..t[first - 1].clone() });
    }
    v.extend_from_slice(&t[first..]);
    v
}

/// Fault rate (faults per second) over time since resume, over windows of
/// at least `window_ms`.
pub fn fault_rate(r: &Report, window_ms: f64) -> Vec<(f64, f64)> {
    let t = after_resume(r);
    let mut v = Vec::new();
    let mut i = 0;
    for j in 1..t.len() {
        let dt = t[j].t_ms - t[i].t_ms;
        if dt >= window_ms || (j == t.len() - 1 && dt > 0.0) {
            #[allow(clippy::cast_precision_loss)]
            let n = t[j].faults.saturating_sub(t[i].faults) as f64;
            v.push(((t[i].t_ms + t[j].t_ms) / 2.0, n * 1e3 / dt));
            i = j;
        }
    }
    v
}

/// Share of pages present over time since resume.
pub fn present(r: &Report) -> Vec<(f64, f64)> {
    let total = r.postcopy.pages_total.max(1);
    #[allow(clippy::cast_precision_loss)]
    after_resume(r).iter().map(|s| (s.t_ms, s.pages_present as f64 / total as f64)).collect()
}

/// The rate window for a run: about 40 points over its postcopy phase, at
/// least two ticks.
fn rate_window(r: &Report) -> f64 {
    let span = r.timeline.last().map_or(0.0, |s| s.t_ms.max(0.0));
    (span / 40.0).max(2.0 * r.timeline_tick_ms).max(1.0)
}

/// Write the comparison pictures of `runs` (label, report) into `dir`, the
/// legend under `legend_title`; returns the files written.
pub fn write_all(dir: &Path, legend_title: Option<&str>, runs: &[(String, Report)]) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut files = Vec::new();
    let cdf: Vec<Series> = runs
        .iter()
        .map(|(l, r)| Series { label: l.clone(), points: cdf_us(&r.postcopy.fault_latency_hist) })
        .filter(|s| !s.points.is_empty())
        .collect();
    files.extend(picture(dir, "fault_latency_cdf", legend_title, &cdf, |a| {
        draw_log_x(a, "Fault latency (pager: fault read to page mapped)", "latency (us, log)", "share of faults", &cdf)
    })?);
    let stalls: Vec<Series> = runs
        .iter()
        .map(|(l, r)| Series { label: l.clone(), points: cdf_us(&r.guest.stall_latency_hist) })
        .filter(|s| !s.points.is_empty())
        .collect();
    if !stalls.is_empty() {
        files.extend(picture(dir, "guest_stall_cdf", legend_title, &stalls, |a| {
            draw_log_x(
                a,
                "Guest-observed stalls (accesses past the threshold)",
                "stall (us, log)",
                "share of stalls",
                &stalls,
            )
        })?);
    }
    let pres: Vec<Series> = runs.iter().map(|(l, r)| Series { label: l.clone(), points: present(r) }).collect();
    files.extend(picture(dir, "pages_present", legend_title, &pres, |a| {
        draw_linear(
            a,
            "Pages present after the guest resumed",
            "time since resume (ms)",
            "share of pages present",
            &pres,
            Some(1.0),
        )
    })?);
    let rate: Vec<Series> =
        runs.iter().map(|(l, r)| Series { label: l.clone(), points: fault_rate(r, rate_window(r)) }).collect();
    files.extend(picture(dir, "fault_rate", legend_title, &rate, |a| {
        draw_linear(a, "Fault rate after the guest resumed", "time since resume (ms)", "faults per second", &rate, None)
    })?);
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timeline::Sample;

    #[test]
    fn cdf_and_rates_from_known_inputs() {
        let c = cdf_us(&[(10_000, 1), (20_000, 2), (40_000, 1)]);
        assert_eq!(c, vec![(10.0, 0.0), (10.0, 0.25), (20.0, 0.75), (40.0, 1.0)]);
        assert!(cdf_us(&[]).is_empty());
        let mut r = Report::default();
        r.postcopy.pages_total = 100;
        r.timeline = (0..=10u32)
            .map(|i| Sample {
                t_ms: f64::from(i) * 10.0 - 20.0,
                faults: u64::from(i) * 5,
                pages_present: u64::from(i) * 10,
                ..Default::default()
            })
            .collect();
        // 5 faults per 10 ms = 500/s, measured over 20 ms windows after resume.
        let fr = fault_rate(&r, 20.0);
        assert_eq!(fr.len(), 4, "{fr:?}");
        assert!(fr.iter().all(|&(t, v)| t >= 0.0 && (v - 500.0).abs() < 1e-9), "{fr:?}");
        let p = present(&r);
        assert_eq!(p.first(), Some(&(0.0, 0.2)));
        assert_eq!(p.last(), Some(&(80.0, 1.0)));
        // A resume between two samples starts the curves at 0 with the
        // earlier sample's counters.
        for s in &mut r.timeline {
            s.t_ms += 5.0;
        }
        let p = present(&r);
        assert_eq!(p[0], (0.0, 0.1));
        assert_eq!(p[1], (5.0, 0.2));
    }
}
