//! Prometheus metrics of the proxy, rendered in the text exposition format.

use crate::config::ProxyConfig;
use gateway_core::OutcomeRecord;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Instant;

/// Latency buckets in seconds.
const BUCKETS: [f64; 14] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn record(&mut self, secs: f64) {
        for (i, le) in BUCKETS.iter().enumerate() {
            if secs <= *le {
                self.counts[i] += 1;
            }
        }
        self.sum += secs;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str) {
        for (i, le) in BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {}", self.counts[i]);
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}",
            self.count, self.sum, self.count
        );
    }
}

#[derive(Default)]
struct Inner {
    /// (status, reason, product, backend) → requests; names by config index, and
    /// backend `usize::MAX` when no backend was tried.
    requests: BTreeMap<(u16, &'static str, usize, usize), u64>,
    /// Requests refused before the lifecycle (401, 404, 408, 413) by status.
    refused: BTreeMap<u16, u64>,
    /// (subscription, backend, kind) → tokens, by config index.
    tokens: BTreeMap<(Option<usize>, usize, &'static str), u64>,
    /// Attempts by backend, by config index.
    attempts: Vec<u64>,
    retries: u64,
    failovers: u64,
    usage_unreadable: u64,
    usage_missing: u64,
    total: Histogram,
    added: Histogram,
}

pub struct Metrics {
    inner: Mutex<Inner>,
    products: Vec<String>,
    subscriptions: Vec<String>,
    backends: Vec<String>,
}

impl Metrics {
    pub fn new(config: &ProxyConfig) -> Metrics {
        Metrics {
            inner: Mutex::new(Inner { attempts: vec![0; config.routing.backends.len()], ..Inner::default() }),
            products: config.products.iter().map(|p| p.name.clone()).collect(),
            subscriptions: config.subscriptions.iter().map(|s| s.id.clone()).collect(),
            backends: config.routing.backends.iter().map(|b| b.id.clone()).collect(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A response whose usage could not be read.
    pub fn usage_unreadable(&self) {
        self.lock().usage_unreadable += 1;
    }

    pub fn usage_missing(&self) {
        self.lock().usage_missing += 1;
    }

    pub fn refused(&self, status: u16) {
        *self.lock().refused.entry(status).or_default() += 1;
    }

    pub fn attempt(&self, backend: &str) {
        let Some(i) = self.backends.iter().position(|b| b == backend) else { return };
        self.lock().attempts[i] += 1;
    }

    /// One finished request: its outcome record and its wall time since arrival.
    /// `product` and `subscription` are indices in the config.
    pub fn finished(&self, product: usize, subscription: Option<usize>, record: &OutcomeRecord, started: Instant) {
        let total = started.elapsed().as_secs_f64();
        let backend_time: u64 = record.attempts.iter().map(|a| (a.ended - a.started).0 + a.wait.0).sum();
        let added = (total - backend_time as f64 / 1e9).max(0.0);
        let backend = record
            .attempts
            .last()
            .and_then(|a| self.backends.iter().position(|b| *b == *a.backend))
            .unwrap_or(usize::MAX);
        let mut m = self.lock();
        *m.requests.entry((record.status, record.reason.as_str(), product, backend)).or_default() += 1;
        m.retries += record.attempts.len().saturating_sub(1) as u64;
        let first = record.attempts.first().map(|a| &a.backend);
        m.failovers += u64::from(record.attempts.iter().any(|a| Some(&a.backend) != first));
        for (kind, n) in [("prompt", record.usage.prompt_tokens), ("completion", record.usage.completion_tokens)] {
            if n > 0 {
                let total = m.tokens.entry((subscription, backend, kind)).or_default();
                *total = total.saturating_add(n);
            }
        }
        m.total.record(total);
        m.added.record(added);
    }

    /// The text exposition; `available(product, backend)` says whether the
    /// product's breaker of that backend is closed (each product's lifecycle keeps
    /// its own breakers).
    pub fn render(&self, available: impl Fn(usize, &str) -> bool) -> String {
        let m = self.lock();
        let mut out = String::new();
        out.push_str("# HELP limitlab_requests_total Client requests by final status, reason, product and last backend.\n# TYPE limitlab_requests_total counter\n");
        let backend_name = |i: usize| self.backends.get(i).map_or("", String::as_str);
        for ((status, reason, product, backend), n) in &m.requests {
            let (product, backend) = (&self.products[*product], backend_name(*backend));
            let _ = writeln!(out, "limitlab_requests_total{{status=\"{status}\",reason=\"{reason}\",product=\"{product}\",backend=\"{backend}\"}} {n}");
        }
        out.push_str("# HELP limitlab_refused_total Requests refused before the policy (missing or invalid key, too large).\n# TYPE limitlab_refused_total counter\n");
        for (status, n) in &m.refused {
            let _ = writeln!(out, "limitlab_refused_total{{status=\"{status}\"}} {n}");
        }
        out.push_str("# HELP limitlab_tokens_total Tokens charged, by subscription, backend and kind.\n# TYPE limitlab_tokens_total counter\n");
        for ((key, backend, kind), n) in &m.tokens {
            // An anonymous call's tokens are labelled with an empty key.
            let key = key.map_or("", |k| self.subscriptions[k].as_str());
            let backend = backend_name(*backend);
            let _ = writeln!(out, "limitlab_tokens_total{{key=\"{key}\",backend=\"{backend}\",kind=\"{kind}\"}} {n}");
        }
        out.push_str("# HELP limitlab_backend_attempts_total Attempts sent to each backend.\n# TYPE limitlab_backend_attempts_total counter\n");
        for (backend, n) in self.backends.iter().zip(&m.attempts).filter(|(_, n)| **n > 0) {
            let _ = writeln!(out, "limitlab_backend_attempts_total{{backend=\"{backend}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP limitlab_retries_total Retries decided by the policy.\n# TYPE limitlab_retries_total counter\nlimitlab_retries_total {}", m.retries);
        let _ = writeln!(out, "# HELP limitlab_failovers_total Requests that tried more than one backend.\n# TYPE limitlab_failovers_total counter\nlimitlab_failovers_total {}", m.failovers);
        let _ = writeln!(out, "# HELP limitlab_usage_unreadable_total Responses whose usage could not be read (a Content-Encoding the proxy does not decode, or a usage of an unknown shape): charged their prompt alone.\n# TYPE limitlab_usage_unreadable_total counter\nlimitlab_usage_unreadable_total {}", m.usage_unreadable);
        let _ = writeln!(out, "# HELP limitlab_usage_missing_total Successful generations whose body reported no usage: charged their prompt and output as the proxy counts them.\n# TYPE limitlab_usage_missing_total counter\nlimitlab_usage_missing_total {}", m.usage_missing);
        out.push_str("# HELP limitlab_circuit_open Whether a product's circuit breaker of a backend is open (1) or closed (0).\n# TYPE limitlab_circuit_open gauge\n");
        for (i, product) in self.products.iter().enumerate() {
            for backend in &self.backends {
                let open = u8::from(!available(i, backend));
                let _ = writeln!(out, "limitlab_circuit_open{{product=\"{product}\",backend=\"{backend}\"}} {open}");
            }
        }
        out.push_str("# HELP limitlab_request_duration_seconds Time from request to response end.\n# TYPE limitlab_request_duration_seconds histogram\n");
        m.total.render(&mut out, "limitlab_request_duration_seconds");
        out.push_str("# HELP limitlab_gateway_added_seconds Time the gateway added: total minus backend attempts and retry waits.\n# TYPE limitlab_gateway_added_seconds histogram\n");
        m.added.render(&mut out, "limitlab_gateway_added_seconds");
        out
    }
}

/// The counter store's figures: reachability, errors, changes shipped and
/// applied, the backlog waiting to be shipped, calls made locally meanwhile,
/// exchange round trips and the lag observed on the others' changes.
pub fn render_store(out: &mut String, store: &crate::counters::StoreState) {
    use std::sync::atomic::Ordering::Relaxed;
    let gauges = [
        (
            "limitlab_store_reachable",
            "Whether the last exchange with the counter store worked.",
            u64::from(store.reachable.load(Relaxed)),
        ),
        ("limitlab_store_errors_total", "Exchanges with the counter store that failed.", store.errors.load(Relaxed)),
        ("limitlab_store_changes_shipped_total", "Counter changes shipped to the store.", store.shipped.load(Relaxed)),
        (
            "limitlab_store_changes_applied_total",
            "Other replicas' counter changes applied.",
            store.applied.load(Relaxed),
        ),
        ("limitlab_store_backlog", "Counter changes waiting to be shipped.", store.backlog.load(Relaxed)),
        (
            "limitlab_store_changes_dropped_total",
            "Changes dropped from a full backlog while the store was away.",
            store.dropped.load(Relaxed),
        ),
        (
            "limitlab_store_local_calls_total",
            "Exact mode: calls to the core (arrivals, attempt outcomes, completions) made on this replica's own counters while the store could not be reached.",
            store.local_calls.load(Relaxed),
        ),
        (
            "limitlab_store_lock_acquisitions_total",
            "Exact mode: times this replica took a product's lock (the lease it keeps while its calls keep coming).",
            store.acquisitions.load(Relaxed),
        ),
    ];
    for (name, help, value) in gauges {
        let kind = if name.ends_with("_total") { "counter" } else { "gauge" };
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    }
    let timings = store.timings.lock().unwrap_or_else(|e| e.into_inner());
    for (name, help, h) in [
        (
            "limitlab_store_round_trip_seconds",
            "One exchange with the store: a lagged sync, or in exact mode taking the lock (with the changes to read) or shipping changes (renewing or releasing the lock).",
            &timings.round_trip_s,
        ),
        ("limitlab_store_sync_lag_seconds", "From another replica's change to its application here.", &timings.lag_s),
        (
            "limitlab_store_wait_seconds",
            "Exact mode: how long an answer waited for its request's counter changes to be in the store before it went to the client.",
            &timings.wait_s,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} summary");
        for q in [0.5, 0.99] {
            let _ = writeln!(out, "{name}{{quantile=\"{q}\"}} {}", h.value_at_quantile(q) as f64 / 1e6);
        }
        let _ = writeln!(out, "{name}_count {}", h.len());
    }
}
