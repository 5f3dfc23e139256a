//! The report's plots, drawn with plotters as SVG (inlined in the HTML) and PNG.

use crate::report::{MinuteStats, Report};
use crate::scenario::Scenario;
use gateway_core::Limit;
use plotters::prelude::*;
use std::path::Path;

/// The points of one line.
pub type Line = Vec<(f64, f64)>;

/// A line chart: named series of (x, y) points, and named horizontal limit lines.
pub struct Chart {
    pub file: String,
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<(String, Line)>,
    pub limits: Vec<(String, f64)>,
    /// A shaded band between two lines (min and max over seeds), drawn first.
    pub band: Option<(Line, Line)>,
    /// What the plot shows and how to read it, under it in the HTML (the title
    /// is already in the picture).
    pub caption: String,
}

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The font is compiled in, so text renders the same on every machine.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

impl Chart {
    fn draw<DB: DrawingBackend>(&self, root: DrawingArea<DB, plotters::coord::Shift>) -> Result<(), String> {
        let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
        root.fill(&WHITE).map_err(err)?;
        let points = self.series.iter().flat_map(|s| s.1.iter());
        let x_max = points.clone().map(|p| p.0).fold(1e-9, f64::max);
        let limit_max = self.limits.iter().map(|l| l.1).fold(0.0, f64::max);
        let y_max = points.map(|p| p.1).fold(limit_max, f64::max).max(1e-9) * 1.1;
        let mut chart = ChartBuilder::on(&root)
            .caption(&self.title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(self.x_label.as_str())
            .y_desc(self.y_label.as_str())
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(err)?;
        if let Some((low, high)) = &self.band {
            let outline: Vec<(f64, f64)> = low.iter().chain(high.iter().rev()).copied().collect();
            chart
                .draw_series([Polygon::new(outline, Palette99::pick(0).mix(0.2).filled())])
                .map_err(err)?
                .label("min-max over seeds")
                .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 18, y + 5)], Palette99::pick(0).mix(0.2).filled()));
        }
        for (i, (name, points)) in self.series.iter().enumerate() {
            let color = Palette99::pick(i).stroke_width(2);
            chart
                .draw_series(LineSeries::new(points.iter().copied(), color))
                .map_err(err)?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], Palette99::pick(i).stroke_width(2)));
        }
        for (name, y) in &self.limits {
            let line = RED.stroke_width(1);
            chart
                .draw_series(LineSeries::new([(0.0, *y), (x_max, *y)], line))
                .map_err(err)?
                .label(format!("limit: {name}"))
                .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], RED));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(err)?;
        root.present().map_err(err)
    }

    /// Writes `<file>.svg` and `<file>.png` into `dir` and returns the SVG text.
    pub fn render(&self, dir: &Path) -> Result<String, String> {
        register_font();
        let mut svg = String::new();
        self.draw(SVGBackend::with_string(&mut svg, (900, 420)).into_drawing_area())?;
        let svg_path = dir.join(format!("{}.svg", self.file));
        std::fs::write(&svg_path, &svg).map_err(|e| format!("{}: {e}", svg_path.display()))?;
        let png_path = dir.join(format!("{}.png", self.file));
        self.draw(BitMapBackend::new(&png_path, (900, 420)).into_drawing_area())?;
        Ok(svg)
    }
}

/// The report's charts, in the order the HTML shows them.
pub fn charts(scenario: &Scenario, report: &Report) -> Vec<Chart> {
    let client_tokens = report
        .clients
        .iter()
        .enumerate()
        .map(|(c, stats)| (stats.name.clone(), per_minute(report, |m| m.client_tokens[c] as f64)))
        .collect();
    vec![
        requests_chart(report),
        client_tokens_chart(report, client_tokens, key_token_limits(scenario)),
        backend_tokens_chart(scenario, report),
        latency_chart(report),
        backend_failures_chart(report),
    ]
}

/// One point a minute of the run: the minute, and `value` of its figures.
fn per_minute(report: &Report, value: impl Fn(&MinuteStats) -> f64) -> Line {
    report.minutes.iter().map(|m| (m.minute as f64, value(m))).collect()
}

/// One line per backend, of the figure `pick` gives for each backend a minute.
fn per_backend(report: &Report, pick: fn(&MinuteStats) -> &Vec<u64>) -> Vec<(String, Line)> {
    let line = |b: usize| per_minute(report, |m| pick(m)[b] as f64);
    report.backends.iter().enumerate().map(|(b, stats)| (stats.name.clone(), line(b))).collect()
}

/// The policy's per-key token limits, as lines to draw: name and tokens a minute.
fn key_token_limits(scenario: &Scenario) -> Vec<(String, f64)> {
    let limits = &scenario.gateway.policy().limits;
    let per_key = |l: &Limit| match l {
        Limit::AzureOpenAiTokenLimit(t) | Limit::LlmTokenLimit(t) => {
            t.tokens_per_minute.map(|tpm| (format!("{} per key", l.element()), tpm as f64))
        }
        _ => None,
    };
    limits.iter().filter_map(per_key).collect()
}

fn requests_chart(report: &Report) -> Chart {
    let reasons = gateway_core::Reason::ALL.map(gateway_core::Reason::as_str);
    let seen = |r: &&&str| report.minutes.iter().any(|m| m.by_reason.contains_key(**r));
    let line = |r: &str| per_minute(report, |m| m.by_reason.get(r).copied().unwrap_or(0) as f64 / 60.0);
    Chart {
        file: "requests".into(),
        title: "Client calls per second by outcome".into(),
        x_label: "minute".into(),
        y_label: "calls per second".into(),
        series: reasons.iter().filter(seen).map(|r| (r.to_string(), line(r))).collect(),
        limits: Vec::new(),
        band: None,
        caption: "Each line is one way calls ended, per second, averaged over each minute: ok, each limit's \
                  refusals, the backends' errors. A limit line rising while ok falls is a limit biting."
            .into(),
    }
}

fn backend_tokens_chart(scenario: &Scenario, report: &Report) -> Chart {
    Chart {
        file: "backend-tokens".into(),
        title: "Tokens per minute per backend".into(),
        x_label: "minute".into(),
        y_label: "tokens per minute".into(),
        series: per_backend(report, |m| &m.backend_tokens),
        limits: scenario.backends.iter().map(|b| (format!("{} TPM", b.name), b.tpm as f64)).collect(),
        band: None,
        caption: "Tokens each deployment served per minute, against its TPM: a line at its limit means the \
                  deployment throttles (429s, below)."
            .into(),
    }
}

fn latency_chart(report: &Report) -> Chart {
    let cdf = |c: &crate::report::ClientReport| c.latency_ms_cdf.iter().map(|&(q, ms)| (ms, q)).collect();
    Chart {
        file: "latency-cdf".into(),
        title: "Latency CDF per client".into(),
        x_label: "latency (ms)".into(),
        y_label: "share of calls".into(),
        series: report.clients.iter().map(|c| (c.name.clone(), cdf(c))).collect(),
        limits: Vec::new(),
        band: None,
        caption: "For each client, the share of its served calls (calls that reached a backend) that took at \
                  most a given latency; refusals, answered at once, are not counted. A line further right is \
                  slower."
            .into(),
    }
}

fn backend_failures_chart(report: &Report) -> Chart {
    let mut failures = per_backend(report, |m| &m.backend_throttled);
    failures.iter_mut().for_each(|s| s.0 = format!("{} 429", s.0));
    let mut errors = per_backend(report, |m| &m.backend_5xx);
    errors.iter_mut().for_each(|s| s.0 = format!("{} 5xx", s.0));
    failures.extend(errors);
    failures.push(("failovers".into(), per_minute(report, |m| m.failovers as f64)));
    Chart {
        file: "backend-failures".into(),
        title: "Backend 429s, 5xx and failovers per minute".into(),
        x_label: "minute".into(),
        y_label: "per minute".into(),
        series: failures,
        limits: Vec::new(),
        band: None,
        caption: "Per minute: each deployment's 429s and 5xx answers, and the client calls that failed over to \
                  another backend."
            .into(),
    }
}

/// Tokens per minute per client. With a per-key token limit in the policy, the
/// busiest caller key of each client is drawn against it (a per-key limit drawn
/// against a client's summed keys would look broken when no key is); without
/// one, each client's keys together.
fn client_tokens_chart(report: &Report, sums: Vec<(String, Line)>, key_limits: Vec<(String, f64)>) -> Chart {
    let per_key = report.minutes.first().is_some_and(|m| !m.busiest_key_tokens.is_empty());
    if !per_key {
        return Chart {
            file: "client-tokens".into(),
            title: "Tokens per minute per client (all its keys)".into(),
            x_label: "minute".into(),
            y_label: "tokens per minute".into(),
            series: sums,
            limits: Vec::new(),
            band: None,
            caption: "Tokens charged per minute to each client, all its caller keys together.".into(),
        };
    }
    let line = |c: usize| per_minute(report, |m| m.busiest_key_tokens[c] as f64);
    let series = report.clients.iter().enumerate().map(|(c, stats)| (stats.name.clone(), line(c))).collect();
    Chart {
        file: "client-tokens".into(),
        title: "Busiest caller key's tokens per minute, per client".into(),
        x_label: "minute".into(),
        y_label: "tokens in the minute".into(),
        series,
        limits: key_limits,
        band: None,
        caption: "For each client, the most tokens any one of its caller keys (subscription, else IP) was charged \
                  in each minute, against the policy's per-key token limit: a line at the limit is a key the \
                  limit stops."
            .into(),
    }
}

/// A heatmap of the SLO pass rate over two varied parameters, as SVG and PNG.
pub fn heatmap(
    dir: &Path,
    file: &str,
    x: (&str, &[f64]),
    y: (&str, &[f64]),
    rate: &dyn Fn(usize, usize) -> f64,
) -> Result<String, String> {
    register_font();
    let draw = |root: DrawingArea<_, _>| -> Result<(), String> { draw_heatmap(root, x, y, rate) };
    let mut svg = String::new();
    draw(SVGBackend::with_string(&mut svg, (900, 600)).into_drawing_area())?;
    std::fs::write(dir.join(format!("{file}.svg")), &svg).map_err(|e| e.to_string())?;
    let png = dir.join(format!("{file}.png"));
    draw_heatmap(BitMapBackend::new(&png, (900, 600)).into_drawing_area(), x, y, rate)?;
    Ok(svg)
}

fn draw_heatmap<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    x: (&str, &[f64]),
    y: (&str, &[f64]),
    rate: &dyn Fn(usize, usize) -> f64,
) -> Result<(), String> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("SLO pass rate over seeds", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(0..x.1.len(), 0..y.1.len())
        .map_err(err)?;
    let xs = x.1.to_vec();
    let ys = y.1.to_vec();
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc(x.0)
        .y_desc(y.0)
        .x_labels(xs.len().min(12))
        .y_labels(ys.len().min(12))
        .x_label_formatter(&|i| xs.get(*i).map_or(String::new(), |v| format!("{v}")))
        .y_label_formatter(&|i| ys.get(*i).map_or(String::new(), |v| format!("{v}")))
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(err)?;
    for i in 0..x.1.len() {
        for j in 0..y.1.len() {
            let r = rate(i, j);
            // Red (0%) to green (100%).
            let color = RGBColor((255.0 * (1.0 - r)) as u8, (200.0 * r) as u8, 60);
            chart.draw_series([Rectangle::new([(i, j), (i + 1, j + 1)], color.filled())]).map_err(err)?;
        }
    }
    root.present().map_err(err)
}
