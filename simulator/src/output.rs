//! Writes a run's files: `report.json`, `report.html` and the plots.

use crate::plots;
use crate::report::Report;
use crate::scenario::Scenario;
use std::fmt::Write;
use std::path::Path;

/// Writes every report file into `dir` (created if missing).
pub fn write_report(dir: &Path, scenario: &Scenario, report: &Report) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let json = serde_json::to_string_pretty(report).map_err(|e| e.to_string())? + "\n";
    let path = dir.join("report.json");
    std::fs::write(&path, json).map_err(|e| format!("{}: {e}", path.display()))?;
    let svgs = plots::charts(scenario, report)
        .iter()
        .map(|chart| chart.render(dir).map(|svg| (chart.title.clone(), svg)))
        .collect::<Result<Vec<_>, _>>()?;
    let path = dir.join("report.html");
    std::fs::write(&path, html(scenario, report, &svgs)).map_err(|e| format!("{}: {e}", path.display()))
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A self-contained page: no scripts, no external files; the plots are inline SVG.
pub fn html(scenario: &Scenario, report: &Report, svgs: &[(String, String)]) -> String {
    let mut out = String::new();
    let title = format!("aigw simulation: {}", escape(&report.scenario));
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
        "<p>seed {}, {} s of simulated time from {}; report schema version {}.</p>",
        report.seed,
        report.duration_s,
        escape(&report.start),
        report.schema_version
    );
    let reasons = ["ok", "rate-limit", "quota", "token-limit", "token-quota", "backend", "no-backend", "timeout"];
    out.push_str("<h2>Clients</h2>\n<table><tr><th>client</th><th>calls</th>");
    for r in reasons {
        let _ = write!(out, "<th>{r}</th>");
    }
    out.push_str(
        "<th>SDK retries</th><th>failovers</th><th>tokens</th><th>p50 ms</th><th>p95 ms</th><th>p99 ms</th></tr>\n",
    );
    for c in &report.clients {
        let _ = write!(out, "<tr><td>{}</td><td>{}</td>", escape(&c.name), c.requests);
        for r in reasons {
            let _ = write!(out, "<td>{}</td>", c.by_reason.get(r).copied().unwrap_or(0));
        }
        let _ = writeln!(
            out,
            "<td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td><td>{:.1}</td><td>{:.1}</td></tr>",
            c.sdk_retries,
            c.failovers,
            c.prompt_tokens + c.completion_tokens,
            c.latency_ms_p50,
            c.latency_ms_p95,
            c.latency_ms_p99
        );
    }
    out.push_str("</table>\n<h2>Backends</h2>\n<table><tr><th>backend</th><th>attempts</th><th>ok</th><th>429</th><th>5xx</th><th>timeouts</th><th>resets</th></tr>\n");
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
    out.push_str("</table>\n<h2>Plots</h2>\n");
    for (title, svg) in svgs {
        let svg = svg.find("<svg").map_or(svg.as_str(), |i| &svg[i..]);
        let _ = writeln!(out, "<figure>{svg}<figcaption>{}</figcaption></figure>", escape(title));
    }
    out.push_str("</body></html>\n");
    out
}
