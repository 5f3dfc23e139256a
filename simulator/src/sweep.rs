//! `limitlab sweep`: run a scenario over a grid of values and many seeds, and find the
//! cheapest grid point that meets the SLOs.

use crate::report::Report;
use crate::scenario::Scenario;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// One `--vary PATH=VALUES`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Vary {
    pub path: String,
    pub values: Vec<f64>,
}

/// Parses `PATH=1000,2000,5000` or `PATH=1000..20000:1000` (inclusive of the end).
pub fn parse_vary(spec: &str) -> Result<Vary, String> {
    let (path, values) = spec.split_once('=').ok_or_else(|| format!("`{spec}`: use --vary PATH=VALUES"))?;
    let number = |s: &str| s.trim().parse::<f64>().map_err(|_| format!("`{spec}`: `{}` is not a number", s.trim()));
    let values = match values.split_once("..") {
        Some((from, rest)) => {
            let (to, step) =
                rest.split_once(':').ok_or_else(|| format!("`{spec}`: a range needs a step: FROM..TO:STEP"))?;
            let (from, to, step) = (number(from)?, number(to)?, number(step)?);
            if step.is_nan() || step <= 0.0 || to < from || (to - from) / step > 10_000.0 {
                return Err(format!("`{spec}`: need FROM <= TO and a step above 0 giving at most 10,000 values"));
            }
            let n = ((to - from) / step + 1e-9).floor() as usize;
            (0..=n).map(|i| from + step * i as f64).collect()
        }
        None => values.split(',').map(number).collect::<Result<Vec<_>, _>>()?,
    };
    if values.is_empty() {
        return Err(format!("`{spec}`: no values"));
    }
    Ok(Vary { path: path.trim().to_owned(), values })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Op {
    #[serde(rename = "<=")]
    Le,
    #[serde(rename = "<")]
    Lt,
    #[serde(rename = ">=")]
    Ge,
    #[serde(rename = ">")]
    Gt,
}

/// One `--slo FIGURE OP BOUND`, e.g. `client.chat.latency_ms_p99<=4000`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Slo {
    pub text: String,
    pub figure: String,
    pub op: Op,
    pub bound: f64,
}

impl Slo {
    pub fn holds(&self, value: f64) -> bool {
        match self.op {
            Op::Le => value <= self.bound,
            Op::Lt => value < self.bound,
            Op::Ge => value >= self.bound,
            Op::Gt => value > self.bound,
        }
    }

    /// How far inside the bound a value is (negative: outside).
    pub fn margin(&self, value: f64) -> f64 {
        match self.op {
            Op::Le | Op::Lt => self.bound - value,
            Op::Ge | Op::Gt => value - self.bound,
        }
    }
}

pub fn parse_slo(text: &str) -> Result<Slo, String> {
    for (token, op) in [("<=", Op::Le), (">=", Op::Ge), ("<", Op::Lt), (">", Op::Gt)] {
        if let Some((figure, bound)) = text.split_once(token) {
            let bound = bound.trim().parse().map_err(|_| format!("`{text}`: `{}` is not a number", bound.trim()))?;
            return Ok(Slo { text: text.to_owned(), figure: canonical_figure(figure.trim()), op, bound });
        }
    }
    Err(format!("`{text}`: write an SLO as FIGURE<=NUMBER (or <, >=, >), e.g. rejected_ratio<=0.01"))
}

/// `latency_p99_ms` and `latency_ms_p99` name the same figure.
fn canonical_figure(figure: &str) -> String {
    let mut out = figure.to_owned();
    for p in ["p50", "p95", "p99"] {
        out = out.replace(&format!("latency_{p}_ms"), &format!("latency_ms_{p}"));
    }
    out
}

/// Every figure of a report by name: overall, `client.NAME.FIELD`, `backend.NAME.FIELD`.
pub fn figures(report: &Report) -> BTreeMap<String, f64> {
    let mut f = BTreeMap::new();
    let (mut requests, mut ok) = (0u64, 0u64);
    for c in &report.clients {
        let p = format!("client.{}", c.name);
        let c_ok = c.by_reason.get("ok").copied().unwrap_or(0);
        requests += c.requests;
        ok += c_ok;
        f.insert(format!("{p}.requests"), c.requests as f64);
        f.insert(format!("{p}.ok"), c_ok as f64);
        f.insert(format!("{p}.rejected_ratio"), c.rejected_ratio);
        // Latency of served calls; with none served there is no figure, and NaN
        // fails every SLO on it (a run that serves nothing meets no latency goal).
        f.insert(format!("{p}.latency_ms_p50"), c.latency_ms_p50.unwrap_or(f64::NAN));
        f.insert(format!("{p}.latency_ms_p95"), c.latency_ms_p95.unwrap_or(f64::NAN));
        f.insert(format!("{p}.latency_ms_p99"), c.latency_ms_p99.unwrap_or(f64::NAN));
        f.insert(format!("{p}.served"), c.served as f64);
        f.insert(format!("{p}.refused_ratio"), c.refused_ratio);
        f.insert(format!("{p}.sdk_retries"), c.sdk_retries as f64);
        f.insert(format!("{p}.failovers"), c.failovers as f64);
        f.insert(format!("{p}.tokens"), c.prompt_tokens.saturating_add(c.completion_tokens) as f64);
    }
    for b in &report.backends {
        let p = format!("backend.{}", b.name);
        let ratio = |n: u64| if b.attempts == 0 { 0.0 } else { n as f64 / b.attempts as f64 };
        f.insert(format!("{p}.attempts"), b.attempts as f64);
        f.insert(format!("{p}.throttled_ratio"), ratio(b.throttled));
        f.insert(format!("{p}.error_ratio"), ratio(b.errors_5xx + b.timeouts + b.transport_failures));
    }
    if let Some(n) = report.max_key_tokens_per_minute {
        f.insert("max_key_tokens_per_minute".into(), n as f64);
    }
    f.insert("requests".into(), requests as f64);
    f.insert("ok".into(), ok as f64);
    f.insert("rejected_ratio".into(), if requests == 0 { 0.0 } else { (requests - ok) as f64 / requests as f64 });
    f
}

/// The scenario with `path` set to `value`. Paths name things as users do:
/// `backends.primary.tpm`, `clients.chat.rate_per_s` (found inside `arrival`),
/// `gateway.policy.token_limit.tokens_per_minute` (the first token limit; also
/// `rate_limit`, `quota`, an element name, or `limits.N`).
pub fn apply(scenario: &Scenario, path: &str, value: f64) -> Result<Scenario, String> {
    let mut root = toml::Value::try_from(scenario).map_err(|e| e.to_string())?;
    let segments: Vec<&str> = path.split('.').collect();
    set(&mut root, &segments, value).map_err(|why| {
        let mut known = Vec::new();
        numeric_paths(&toml::Value::try_from(scenario).expect("serializes"), String::new(), &mut known);
        known.sort_by_key(|k| distance(k, path));
        format!(
            "`{path}`: {why}; the nearest valid paths: {}",
            known.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
        )
    })?;
    let mut varied: Scenario =
        root.try_into().map_err(|e: toml::de::Error| format!("`{path}` = {value}: {}", e.message()))?;
    varied.warnings = scenario.warnings.clone();
    varied.validate().map_err(|e| format!("`{path}` = {value}: {e}"))?;
    Ok(varied)
}

fn set(node: &mut toml::Value, segments: &[&str], value: f64) -> Result<(), String> {
    let (first, rest) = segments.split_first().ok_or("an empty path")?;
    if rest.is_empty() {
        return set_leaf(node, first, value);
    }
    let next = child(node, first).ok_or_else(|| format!("nothing named `{first}` there"))?;
    set(next, rest, value)
}

/// The child named `name`: a key, an array element by `name`/`id`, a limit by kind.
fn child<'v>(node: &'v mut toml::Value, name: &str) -> Option<&'v mut toml::Value> {
    if let toml::Value::Table(t) = node {
        if t.contains_key(name) {
            return t.get_mut(name);
        }
        return t.get_mut("limits").and_then(|limits| limit(limits, name));
    }
    let toml::Value::Array(items) = node else { return None };
    if let Ok(i) = name.parse::<usize>() {
        return items.get_mut(i);
    }
    items.iter_mut().find(|item| ["name", "id"].iter().any(|k| item.get(k).and_then(toml::Value::as_str) == Some(name)))
}

fn limit<'v>(limits: &'v mut toml::Value, name: &str) -> Option<&'v mut toml::Value> {
    let kinds: &[&str] = match name {
        "token_limit" => &["azure-openai-token-limit", "llm-token-limit"],
        "rate_limit" => &["rate-limit", "rate-limit-by-key"],
        "quota" => &["quota", "quota-by-key"],
        _ => &[],
    };
    let toml::Value::Array(items) = limits else { return None };
    if let Some(i) = name.strip_prefix("limits").and_then(|s| s.parse::<usize>().ok()) {
        return items.get_mut(i);
    }
    items.iter_mut().find(|l| {
        let kind = l.get("type").and_then(toml::Value::as_str).unwrap_or("");
        kinds.contains(&kind) || kind == name.replace('_', "-")
    })
}

fn set_leaf(node: &mut toml::Value, field: &str, value: f64) -> Result<(), String> {
    let toml::Value::Table(t) = node else { return Err(format!("`{field}` is not inside a table")) };
    let number = |old: Option<&toml::Value>| match old {
        Some(toml::Value::Float(_)) => toml::Value::Float(value),
        _ if value.fract() == 0.0 => toml::Value::Integer(value as i64),
        _ => toml::Value::Float(value),
    };
    if let Some(old) = t.get(field) {
        if !matches!(old, toml::Value::Integer(_) | toml::Value::Float(_)) {
            return Err(format!("`{field}` is not a number"));
        }
        let new = number(Some(old));
        t.insert(field.to_owned(), new);
        return Ok(());
    }
    // A field inside a nested table (`arrival.poisson.rate_per_s`), if only one has it.
    let mut holders: Vec<&mut toml::Value> = Vec::new();
    for (_, v) in t.iter_mut() {
        collect_holders(v, field, &mut holders);
    }
    match holders.len() {
        1 => set_leaf(holders.pop().expect("one"), field, value),
        0 => Err(format!("no numeric field `{field}` there")),
        n => Err(format!("`{field}` is found in {n} places; name the full path")),
    }
}

fn collect_holders<'v>(v: &'v mut toml::Value, field: &str, out: &mut Vec<&'v mut toml::Value>) {
    if v.as_table().is_some_and(|t| t.contains_key(field)) {
        out.push(v);
        return;
    }
    let toml::Value::Table(t) = v else { return };
    for (_, child) in t.iter_mut() {
        collect_holders(child, field, out);
    }
}

fn numeric_paths(v: &toml::Value, prefix: String, out: &mut Vec<String>) {
    let join = |k: &str| if prefix.is_empty() { k.to_owned() } else { format!("{prefix}.{k}") };
    match v {
        toml::Value::Table(t) => t.iter().for_each(|(k, v)| numeric_paths(v, join(k), out)),
        toml::Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let name =
                    ["name", "id"].iter().find_map(|k| item.get(k).and_then(toml::Value::as_str).map(str::to_owned));
                numeric_paths(item, format!("{prefix}.{}", name.unwrap_or_else(|| i.to_string())), out);
            }
        }
        toml::Value::Integer(_) | toml::Value::Float(_) => out.push(prefix),
        _ => {}
    }
}

fn distance(a: &str, b: &str) -> usize {
    diagnostics::edit_distance(a, b)
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Spread {
    pub mean: f64,
    pub min: f64,
    pub max: f64,
}

/// One grid point over all seeds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Point {
    pub values: Vec<f64>,
    pub figures: BTreeMap<String, Spread>,
    /// Share of seeds on which every SLO held.
    pub slo_pass_rate: f64,
    pub passes: bool,
    /// Per SLO, the worst margin over seeds (negative: broken on some seed).
    pub margins: Vec<f64>,
    pub simulated_requests: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SweepResult {
    pub scenario: String,
    pub varies: Vec<Vary>,
    pub seeds: u64,
    pub slos: Vec<Slo>,
    pub pass_share: f64,
    pub points: Vec<Point>,
    /// Index of the recommended point, if any meets the SLOs.
    pub recommended: Option<usize>,
}

pub struct SweepOptions {
    pub varies: Vec<Vary>,
    pub seeds: u64,
    pub slos: Vec<Slo>,
    pub jobs: usize,
    /// A point passes when every SLO holds on at least this share of seeds.
    pub pass_share: f64,
}

/// The grid in order: the first `--vary` changes slowest, as a reader expects.
pub fn grid(varies: &[Vary]) -> Vec<Vec<f64>> {
    let mut points = vec![Vec::new()];
    for v in varies {
        points =
            points.into_iter().flat_map(|p| v.values.iter().map(move |x| [p.clone(), vec![*x]].concat())).collect();
    }
    points
}

/// Runs every grid point with seeds 1..=N on `jobs` threads. Each run is
/// independent and results are put back in grid order, so the answer is the same
/// whatever the number of threads.
pub fn sweep(
    scenario: &Scenario,
    base: &Path,
    options: &SweepOptions,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<SweepResult, String> {
    let points = grid(&options.varies);
    let mut variants = Vec::with_capacity(points.len());
    for values in &points {
        let mut s = scenario.clone();
        for (vary, value) in options.varies.iter().zip(values) {
            s = apply(&s, &vary.path, *value)?;
        }
        variants.push(s);
    }
    let runs: Vec<(usize, u64)> = (0..points.len()).flat_map(|p| (1..=options.seeds).map(move |s| (p, s))).collect();
    let results = run_all(&variants, base, &runs, options.jobs.max(1), progress)?;
    let mut out = Vec::with_capacity(points.len());
    for (p, values) in points.into_iter().enumerate() {
        let reports: Vec<&Report> = results.iter().zip(&runs).filter(|(_, r)| r.0 == p).map(|(rep, _)| rep).collect();
        out.push(summarise(values, &reports, &options.slos, options.pass_share));
    }
    // Without an SLO there is no question to answer: the cheapest point would be
    // the smallest limit, which refuses the most.
    let recommended = if options.slos.is_empty() { None } else { recommend(&out) };
    Ok(SweepResult {
        scenario: scenario.name.clone(),
        varies: options.varies.clone(),
        seeds: options.seeds,
        slos: options.slos.clone(),
        pass_share: options.pass_share,
        points: out,
        recommended,
    })
}

fn run_all(
    variants: &[Scenario],
    base: &Path,
    runs: &[(usize, u64)],
    jobs: usize,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<Vec<Report>, String> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let done = std::sync::atomic::AtomicUsize::new(0);
    let slots: Vec<std::sync::Mutex<Option<Result<Report, String>>>> =
        runs.iter().map(|_| Default::default()).collect();
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&(p, seed)) = runs.get(i) else { return };
                let result = crate::run(&variants[p], base, Some(seed), false).map(|o| o.report);
                *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
                progress(done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1, runs.len());
            });
        }
    });
    slots.into_iter().map(|s| s.into_inner().unwrap_or_else(|e| e.into_inner()).expect("every run ran")).collect()
}

fn summarise(values: Vec<f64>, reports: &[&Report], slos: &[Slo], pass_share: f64) -> Point {
    let per_seed: Vec<BTreeMap<String, f64>> = reports.iter().map(|r| figures(r)).collect();
    let mut figures_out = BTreeMap::new();
    for name in per_seed.first().map(|f| f.keys().cloned().collect::<Vec<_>>()).unwrap_or_default() {
        // A figure a seed has no value for (NaN: latency with no call served) is
        // left out; with none at all, the point has no such figure.
        let xs: Vec<f64> = per_seed.iter().filter_map(|f| f.get(&name).copied()).filter(|v| !v.is_nan()).collect();
        if xs.is_empty() {
            continue;
        }
        let mean = xs.iter().sum::<f64>() / xs.len().max(1) as f64;
        let min = xs.iter().copied().fold(f64::INFINITY, f64::min);
        let max = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        figures_out.insert(name, Spread { mean, min, max });
    }
    let holds = |f: &BTreeMap<String, f64>| slos.iter().all(|s| f.get(&s.figure).is_some_and(|v| s.holds(*v)));
    let passing = per_seed.iter().filter(|f| holds(f)).count();
    let slo_pass_rate = if per_seed.is_empty() { 0.0 } else { passing as f64 / per_seed.len() as f64 };
    let margins = slos
        .iter()
        .map(|s| {
            per_seed
                .iter()
                .map(|f| f.get(&s.figure).filter(|v| !v.is_nan()).map_or(f64::NEG_INFINITY, |v| s.margin(*v)))
                .fold(f64::INFINITY, f64::min)
        })
        .collect();
    let simulated_requests = per_seed.iter().map(|f| f.get("requests").copied().unwrap_or(0.0) as u64).sum();
    Point {
        values,
        figures: figures_out,
        passes: slo_pass_rate >= pass_share - 1e-12,
        slo_pass_rate,
        margins,
        simulated_requests,
    }
}

/// The cheapest passing point: smallest values, compared in the order of the
/// `--vary` flags (the first one matters most); ties cannot happen, as grid points
/// differ. `None` when no point meets the SLOs.
pub fn recommend(points: &[Point]) -> Option<usize> {
    (0..points.len())
        .filter(|&i| points[i].passes)
        .min_by(|&a, &b| points[a].values.partial_cmp(&points[b].values).unwrap_or(std::cmp::Ordering::Equal))
}

/// Checks that every SLO names a figure the report has.
pub fn check_slos(scenario: &Scenario, slos: &[Slo]) -> Result<(), String> {
    let empty = crate::report::Recorder::new(scenario, false).report(scenario, 0);
    let known = figures(&empty);
    for s in slos {
        if !known.contains_key(&s.figure) {
            let mut names: Vec<&String> = known.keys().collect();
            names.sort_by_key(|k| distance(k, &s.figure));
            let near: Vec<&str> = names.iter().take(3).map(|s| s.as_str()).collect();
            return Err(format!("SLO `{}`: no figure `{}`; the nearest: {}", s.text, s.figure, near.join(", ")));
        }
    }
    Ok(())
}
