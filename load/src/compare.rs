//! `limitlab compare A B`: two runs' reports side by side (a simulation and a
//! live run, or two live runs), each client's figures with their difference,
//! judged against tolerances.

use serde_json::Value;
use std::fmt::Write;
use std::path::Path;

#[derive(Clone, Copy, Debug)]
pub struct Tolerances {
    /// Relative difference allowed for counts and tokens.
    pub relative: f64,
    /// Calls two counts may differ by whatever their size (small counts).
    pub calls: u64,
    /// Relative difference allowed for latency percentiles.
    pub latency: f64,
}

/// What a figure measures, which sets how it is judged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Calls,
    Tokens,
    LatencyMs,
}

#[derive(Debug)]
pub struct Row {
    pub client: String,
    pub figure: String,
    pub a: Option<f64>,
    pub b: Option<f64>,
    /// `None`: not judged (a latency of a side that served nothing).
    pub within: Option<bool>,
}

pub struct Comparison {
    pub header: String,
    pub rows: Vec<Row>,
}

impl Comparison {
    pub fn within_tolerance(&self) -> bool {
        self.rows.iter().all(|r| r.within != Some(false))
    }

    pub fn beyond(&self) -> usize {
        self.rows.iter().filter(|r| r.within == Some(false)).count()
    }

    pub fn table(&self) -> String {
        let mut out = self.header.clone();
        let width = self.rows.iter().map(|r| r.client.len()).max().unwrap_or(6).max(6);
        let _ = writeln!(out, "{:<width$}  {:<28} {:>12} {:>12} {:>10}  verdict", "client", "figure", "A", "B", "diff");
        for r in &self.rows {
            let value = |v: Option<f64>| v.map_or("-".to_owned(), trim);
            let diff = match (r.a, r.b) {
                (Some(a), Some(b)) if a != 0.0 => format!("{:+.1}%", (b - a) / a * 100.0),
                (Some(a), Some(b)) => trim(b - a),
                _ => "-".to_owned(),
            };
            let verdict = match r.within {
                Some(true) => "ok",
                Some(false) => "BEYOND",
                None => "not judged",
            };
            let _ = writeln!(
                out,
                "{:<width$}  {:<28} {:>12} {:>12} {:>10}  {verdict}",
                r.client,
                r.figure,
                value(r.a),
                value(r.b),
                diff
            );
        }
        out
    }
}

fn trim(v: f64) -> String {
    match v.fract() == 0.0 && v.abs() < 1e15 {
        true => format!("{v:.0}"),
        false => format!("{v:.1}"),
    }
}

/// Reads `DIR/report.json`.
fn read(dir: &Path) -> Result<Value, String> {
    let path = dir.join("report.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let value: Value = serde_json::from_str(&text).map_err(|e| format!("{}: not a report: {e}", path.display()))?;
    match value.get("clients").and_then(Value::as_array) {
        Some(_) => Ok(value),
        None => Err(format!("{}: not a limitlab report (no `clients`)", path.display())),
    }
}

fn describe(name: &str, report: &Value) -> String {
    let mode = report["mode"].as_str().unwrap_or("simulation");
    let partial = if report["complete"].as_bool() == Some(false) { ", partial: stopped early" } else { "" };
    format!("{name}: {mode} of `{}`, seed {}{partial}\n", report["scenario"].as_str().unwrap_or("?"), report["seed"])
}

pub fn compare(a_dir: &Path, b_dir: &Path, tolerances: Tolerances) -> Result<Comparison, String> {
    let (a, b) = (read(a_dir)?, read(b_dir)?);
    let mut header = describe(&format!("A {}", a_dir.display()), &a) + &describe(&format!("B {}", b_dir.display()), &b);
    if a["scenario"] != b["scenario"] {
        header += "note: the two reports are of different scenarios\n";
    }
    let latency = match tolerances.latency.is_infinite() {
        true => "latency percentiles not judged".to_owned(),
        false => format!("latency percentiles within {}%", tolerances.latency * 100.0),
    };
    let _ = writeln!(
        header,
        "tolerance: counts within {}% or {} calls, tokens within {}%, {latency}",
        tolerances.relative * 100.0,
        tolerances.calls,
        tolerances.relative * 100.0,
    );
    let mut names: Vec<String> = Vec::new();
    for report in [&a, &b] {
        for c in report["clients"].as_array().into_iter().flatten() {
            let name = c["name"].as_str().unwrap_or_default().to_owned();
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    let mut rows = Vec::new();
    for name in &names {
        let (ca, cb) = (client(&a, name), client(&b, name));
        for (figure, kind) in figures(ca, cb) {
            let (va, vb) = (value(ca, &figure), value(cb, &figure));
            rows.push(Row { client: name.clone(), within: judge(kind, va, vb, tolerances), figure, a: va, b: vb });
        }
    }
    Ok(Comparison { header, rows })
}

fn client<'r>(report: &'r Value, name: &str) -> Option<&'r Value> {
    report["clients"].as_array()?.iter().find(|c| c["name"].as_str() == Some(name))
}

/// The figures compared for a client: calls, every reason either side saw,
/// tokens, retries, failovers and latency percentiles.
fn figures(a: Option<&Value>, b: Option<&Value>) -> Vec<(String, Kind)> {
    let mut list = vec![("requests".to_owned(), Kind::Calls)];
    let mut reasons: Vec<String> = Vec::new();
    for c in [a, b].into_iter().flatten() {
        for reason in c["by_reason"].as_object().into_iter().flatten().map(|(r, _)| r) {
            if !reasons.contains(reason) {
                reasons.push(reason.clone());
            }
        }
    }
    list.extend(reasons.into_iter().map(|r| (format!("by_reason.{r}"), Kind::Calls)));
    list.extend(
        [("prompt_tokens", Kind::Tokens), ("completion_tokens", Kind::Tokens)]
            .into_iter()
            .chain(["sdk_retries", "gateway_retries", "failovers", "served", "refused"].map(|f| (f, Kind::Calls)))
            .chain(["latency_ms_p50", "latency_ms_p95", "latency_ms_p99"].map(|f| (f, Kind::LatencyMs)))
            .map(|(f, k)| (f.to_owned(), k)),
    );
    list
}

/// A figure of a client; a reason the client never ended with counts 0, and a
/// client missing from a report has no figures at all.
fn value(c: Option<&Value>, figure: &str) -> Option<f64> {
    let c = c?;
    match figure.strip_prefix("by_reason.") {
        Some(reason) => Some(c["by_reason"][reason].as_f64().unwrap_or(0.0)),
        None => c[figure].as_f64(),
    }
}

fn judge(kind: Kind, a: Option<f64>, b: Option<f64>, t: Tolerances) -> Option<bool> {
    let (a, b) = match (a, b) {
        (Some(a), Some(b)) => (a, b),
        // A figure neither report has (an older schema) is not judged.
        (None, None) => return None,
        // A latency of a side that served nothing is not judged; the counts say why.
        _ if kind == Kind::LatencyMs => return None,
        _ => return Some(false),
    };
    if kind == Kind::LatencyMs && t.latency.is_infinite() {
        return None;
    }
    let diff = (a - b).abs();
    let scale = a.abs().max(b.abs());
    Some(match kind {
        Kind::Calls => diff <= (t.relative * scale).max(t.calls as f64),
        Kind::Tokens => diff <= t.relative * scale,
        Kind::LatencyMs => diff <= t.latency * scale,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Tolerances = Tolerances { relative: 0.01, calls: 2, latency: 0.25 };

    fn check(kind: Kind, a: f64, b: f64, within: bool) {
        assert_eq!(judge(kind, Some(a), Some(b), T), Some(within), "{kind:?} {a} vs {b}");
    }

    #[test]
    fn counts_agree_within_one_percent_or_two_calls_and_tokens_within_one_percent() {
        check(Kind::Calls, 1000.0, 1010.0, true);
        check(Kind::Calls, 1000.0, 1011.0, false);
        check(Kind::Calls, 5.0, 7.0, true);
        check(Kind::Calls, 5.0, 8.0, false);
        check(Kind::Tokens, 100_000.0, 100_999.0, true);
        check(Kind::Tokens, 100.0, 102.0, false);
        check(Kind::LatencyMs, 1000.0, 1200.0, true);
        check(Kind::LatencyMs, 1000.0, 1400.0, false);
        assert_eq!(judge(Kind::LatencyMs, None, Some(3.0), T), None);
        assert_eq!(judge(Kind::Calls, None, Some(3.0), T), Some(false));
        assert_eq!(judge(Kind::Calls, None, None, T), None);
        let unjudged = Tolerances { latency: f64::INFINITY, ..T };
        assert_eq!(judge(Kind::LatencyMs, Some(1.0), Some(100.0), unjudged), None);
    }
}
