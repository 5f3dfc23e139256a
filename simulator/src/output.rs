//! Writes a run's files: `report.json`, `report.html` and the plots.

use crate::plots;
use crate::report::{millis_text, Report};
use crate::scenario::Scenario;
use std::fmt::Write;
use std::path::Path;

/// Writes every report file into `dir` (created if missing); `scenario_path` is
/// how the user named the scenario, for the commands the verdict suggests.
pub fn write_report(dir: &Path, scenario: &Scenario, scenario_path: &str, report: &Report) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let json = serde_json::to_string_pretty(report).map_err(|e| e.to_string())? + "\n";
    let path = dir.join("report.json");
    std::fs::write(&path, json).map_err(|e| format!("{}: {e}", path.display()))?;
    let svgs = plots::charts(scenario, report)
        .iter()
        .map(|chart| chart.render(dir).map(|svg| (chart.caption.clone(), svg)))
        .collect::<Result<Vec<_>, _>>()?;
    let path = dir.join("report.html");
    let verdict = crate::verdict::verdict(report, scenario, scenario_path);
    std::fs::write(&path, html(scenario, report, &verdict, &svgs)).map_err(|e| format!("{}: {e}", path.display()))
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// What the figures mean, for a reader who did not write the scenario.
const GUIDE: &str = "<details><summary>How to read this report</summary><ul>\n\
<li><b>calls</b>: client calls that reached the gateway, the SDK's own retries included; each ends with one \
reason: <code>ok</code>, a limit (<code>rate-limit</code> and <code>token-limit</code> answer 429, <code>quota</code> \
and <code>token-quota</code> 403), <code>backend-error</code> (the backend's error status, after retries), \
<code>no-backend</code> (every breaker open: 503), <code>timeout</code> (504), <code>transport-failure</code> (500), \
<code>bad-response</code> (502) or <code>client-gone</code>.</li>\n\
<li><b>p50/p95/p99 ms</b>: latency of served calls only (calls that reached a backend), from arrival to the \
end of the response, retries and failover included; a refusal is answered at once and not counted \
(<code>report.json</code> has <code>refused</code>, <code>refused_ratio</code> and the <code>Retry-After</code> \
refusals carried).</li>\n\
<li><b>SDK retries</b>: calls that were a client's retry of a 429 or 5xx; <b>failovers</b>: calls that tried more \
than one backend; <b>tokens</b>: prompt plus completion tokens charged.</li>\n\
<li><b>Backends</b>: attempts the gateway sent to each deployment and how they ended.</li>\n</ul></details>\n";

/// A self-contained page: no scripts, no external files; the plots are inline SVG.
pub fn html(scenario: &Scenario, report: &Report, verdict: &[String], svgs: &[(String, String)]) -> String {
    let mut out = String::new();
    let kind = match report.mode {
        crate::report::Mode::Simulation => "simulation",
        crate::report::Mode::Live => "live run",
    };
    let title = format!("limitlab {kind}: {}", escape(&report.scenario));
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>\n<style>\
         body{{font-family:sans-serif;margin:2em;color:#222}} table{{border-collapse:collapse;margin:1em 0}} \
         th,td{{border:1px solid #ccc;padding:4px 8px;text-align:right}} th:first-child,td:first-child{{text-align:left}} \
         figure{{margin:1.5em 0}} svg{{max-width:100%;height:auto}}</style></head><body>\n<h1>{title}</h1>\n"
    );
    if let Some(d) = &scenario.description {
        let _ = writeln!(out, "<p>{}</p>", escape(d));
    }
    let _ = writeln!(
        out,
        "<p>seed {}, {} s of {} time from {}{}; report schema version {}.</p>",
        report.seed,
        report.duration_s,
        if report.mode == crate::report::Mode::Live { "wall-clock" } else { "simulated" },
        escape(&report.start),
        if report.complete { "" } else { " (stopped early: a partial run)" },
        report.schema_version
    );
    out.push_str("<h2>Verdict</h2>\n<ul>\n");
    for line in verdict {
        let _ = writeln!(out, "<li>{}</li>", escape(line));
    }
    out.push_str("</ul>\n");
    out.push_str(GUIDE);
    clients_table(&mut out, report);
    backends_table(&mut out, report);
    out.push_str("<h2>Plots</h2>\n");
    for (caption, svg) in svgs {
        let svg = svg.find("<svg").map_or(svg.as_str(), |i| &svg[i..]);
        let _ = writeln!(out, "<figure>{svg}<figcaption>{}</figcaption></figure>", escape(caption));
    }
    out.push_str("</body></html>\n");
    out
}

/// Each client's calls by outcome, retries, failovers, tokens and latency.
fn clients_table(out: &mut String, report: &Report) {
    let reasons: Vec<&str> = report.reasons_shown().into_iter().map(gateway_core::Reason::as_str).collect();
    out.push_str("<h2>Clients</h2>\n<table><tr><th>client</th><th>calls</th>");
    for r in &reasons {
        let _ = write!(out, "<th>{r}</th>");
    }
    out.push_str(
        "<th>SDK retries</th><th>failovers</th><th>tokens</th><th>p50 ms</th><th>p95 ms</th><th>p99 ms</th></tr>\n",
    );
    for c in &report.clients {
        let _ = write!(out, "<tr><td>{}</td><td>{}</td>", escape(&c.name), c.requests);
        for r in &reasons {
            let _ = write!(out, "<td>{}</td>", c.by_reason.get(r).copied().unwrap_or(0));
        }
        let _ = writeln!(
            out,
            "<td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            c.sdk_retries,
            c.failovers,
            c.prompt_tokens.saturating_add(c.completion_tokens),
            millis_text(c.latency_ms_p50),
            millis_text(c.latency_ms_p95),
            millis_text(c.latency_ms_p99)
        );
    }
    out.push_str("</table>\n");
}

/// Each backend's attempts and how they ended.
fn backends_table(out: &mut String, report: &Report) {
    out.push_str("<h2>Backends</h2>\n<table><tr><th>backend</th><th>attempts</th><th>ok</th><th>429</th><th>5xx</th><th>timeouts</th><th>resets</th></tr>\n");
    for b in &report.backends {
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&b.name),
            b.attempts,
            b.ok,
            b.throttled,
            b.errors_5xx,
            b.timeouts,
            b.transport_failures
        );
    }
    out.push_str("</table>\n");
}

/// Writes a sweep's files into `dir`: `sweep.json`, `sweep.csv`, the plots and `sweep.html`.
pub fn write_sweep(dir: &Path, result: &crate::sweep::SweepResult) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let json = serde_json::to_string_pretty(result).map_err(|e| e.to_string())? + "\n";
    std::fs::write(dir.join("sweep.json"), json).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("sweep.csv"), sweep_csv(result)).map_err(|e| e.to_string())?;
    let svgs = sweep_plots(dir, result)?;
    std::fs::write(dir.join("sweep.html"), sweep_html(result, &svgs)).map_err(|e| e.to_string())
}

fn sweep_csv(result: &crate::sweep::SweepResult) -> String {
    let names: Vec<&String> = result.points.first().map(|p| p.figures.keys().collect()).unwrap_or_default();
    let mut out = String::new();
    let mut header: Vec<String> = result.varies.iter().map(|v| v.path.clone()).collect();
    for n in &names {
        header.extend([format!("{n}_mean"), format!("{n}_min"), format!("{n}_max")]);
    }
    header.extend(["slo_pass_rate".to_owned(), "passes".to_owned()]);
    out.push_str(&header.join(","));
    out.push('\n');
    for p in &result.points {
        let mut row: Vec<String> = p.values.iter().map(|v| v.to_string()).collect();
        for n in &names {
            let s = &p.figures[*n];
            row.extend([s.mean.to_string(), s.min.to_string(), s.max.to_string()]);
        }
        row.extend([p.slo_pass_rate.to_string(), p.passes.to_string()]);
        out.push_str(&row.join(","));
        out.push('\n');
    }
    out
}

fn sweep_plots(dir: &Path, result: &crate::sweep::SweepResult) -> Result<Vec<(String, String)>, String> {
    let mut figures: Vec<(String, Option<f64>)> =
        result.slos.iter().map(|s| (s.figure.clone(), Some(s.bound))).collect();
    if figures.is_empty() {
        figures.push(("rejected_ratio".into(), None));
    }
    match result.varies.len() {
        1 => figures
            .iter()
            .enumerate()
            .map(|(i, (figure, bound))| {
                let series = |pick: fn(&crate::sweep::Spread) -> f64, name: &str| {
                    // A point with no value of the figure (latency where nothing
                    // was served) has no dot.
                    let points = result
                        .points
                        .iter()
                        .filter_map(|p| Some((p.values[0], pick(p.figures.get(figure)?))))
                        .collect();
                    (name.to_owned(), points)
                };
                let chart = plots::Chart {
                    file: format!("sweep-{i}"),
                    title: format!("{figure} against {}", result.varies[0].path),
                    x_label: result.varies[0].path.clone(),
                    y_label: figure.clone(),
                    series: vec![series(|s| s.mean, "mean over seeds")],
                    limits: bound.map(|b| ("SLO".to_owned(), b)).into_iter().collect(),
                    band: Some((series(|s| s.min, "min").1, series(|s| s.max, "max").1)),
                    caption: format!(
                        "The line is the mean of {figure} over the seeds of each point, the band its lowest and \
                         highest value; the horizontal line is the SLO's bound."
                    ),
                };
                chart.render(dir).map(|svg| (chart.caption.clone(), svg))
            })
            .collect(),
        2 => {
            let (x, y) = (&result.varies[0], &result.varies[1]);
            let rate = |i: usize, j: usize| result.points[i * y.values.len() + j].slo_pass_rate;
            let svg = plots::heatmap(dir, "sweep-pass-rate", (&x.path, &x.values), (&y.path, &y.values), &rate)?;
            let caption = format!(
                "The share of seeds on which every SLO held, for each pair of {} and {} (darker: more seeds pass).",
                x.path, y.path
            );
            Ok(vec![(caption, svg)])
        }
        _ => Ok(Vec::new()),
    }
}

fn sweep_html(result: &crate::sweep::SweepResult, svgs: &[(String, String)]) -> String {
    let mut out = String::new();
    let title = format!("limitlab sweep: {}", escape(&result.scenario));
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>\n<style>\
         body{{font-family:sans-serif;margin:2em;color:#222}} table{{border-collapse:collapse}} \
         th,td{{border:1px solid #ccc;padding:4px 8px;text-align:right}} .pass{{background:#e6f4e6}} \
         svg{{max-width:100%;height:auto}}</style></head><body>\n<h1>{title}</h1>\n"
    );
    let slos: Vec<String> = result.slos.iter().map(|s| escape(&s.text)).collect();
    let _ = writeln!(
        out,
        "<p>{} seeds per point; SLOs: {}; a point passes when every SLO holds on at least {:.0}% of seeds.</p>",
        result.seeds,
        if slos.is_empty() { "none".into() } else { slos.join(", ") },
        result.pass_share * 100.0
    );
    let answer = match result.recommended {
        Some(i) => format!("Recommended: {}", point_text(result, i)),
        None if result.slos.is_empty() => "No --slo given: nothing is recommended.".to_owned(),
        None => "No point meets the SLOs.".to_owned(),
    };
    let _ = writeln!(out, "<p><strong>{}</strong></p>\n<table><tr>", escape(&answer));
    for v in &result.varies {
        let _ = write!(out, "<th>{}</th>", escape(&v.path));
    }
    out.push_str("<th>SLO pass rate</th></tr>\n");
    for p in &result.points {
        let class = if p.passes { " class=\"pass\"" } else { "" };
        let _ = write!(out, "<tr{class}>");
        for v in &p.values {
            let _ = write!(out, "<td>{v}</td>");
        }
        let _ = writeln!(out, "<td>{:.0}%</td></tr>", p.slo_pass_rate * 100.0);
    }
    out.push_str("</table>\n");
    for (caption, svg) in svgs {
        let svg = svg.find("<svg").map_or(svg.as_str(), |i| &svg[i..]);
        let _ = writeln!(out, "<figure>{svg}<figcaption>{}</figcaption></figure>", escape(caption));
    }
    out.push_str("</body></html>\n");
    out
}

/// `path = value, ...` of a grid point, with each SLO's worst margin.
pub fn point_text(result: &crate::sweep::SweepResult, i: usize) -> String {
    let p = &result.points[i];
    let values: Vec<String> = result.varies.iter().zip(&p.values).map(|(v, x)| format!("{} = {x}", v.path)).collect();
    let margins: Vec<String> =
        result.slos.iter().zip(&p.margins).map(|(s, m)| format!("{} (worst margin {m:.4})", s.text)).collect();
    match margins.is_empty() {
        true => values.join(", "),
        false => format!("{}; {}", values.join(", "), margins.join(", ")),
    }
}
