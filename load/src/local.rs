//! `limitlab load --local`: the scenario's gateway and backends as processes on
//! loopback ports. One `limitlab mock` per scenario backend (its deployment
//! model, its fault schedule clocked from the run's start), then one `limitlab
//! proxy` per gateway replica with the scenario's policy and routing.

use mock_aoai::MockConfig;
use serde::Deserialize;
use simulator::scenario::{CounterSharing, Identity};
use simulator::Scenario;
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Everything started, stopped when dropped.
pub struct Local {
    children: Vec<Child>,
    dir: PathBuf,
    /// One front URL per replica, in the scenario's round-robin order.
    pub fronts: Vec<String>,
    /// (scenario backend, mock URL).
    pub mocks: Vec<(String, String)>,
    decision_files: Vec<PathBuf>,
}

/// What the run's processes need to know.
pub struct Setup<'a> {
    pub exe: &'a Path,
    pub scenario: &'a Scenario,
    pub seed: u64,
    pub deployment: &'a str,
    /// The run's start, milliseconds since the Unix epoch.
    pub start_unix_ms: u64,
}

impl Local {
    pub fn start(setup: &Setup<'_>) -> Result<Local, String> {
        check_supported(setup.scenario)?;
        let dir = std::env::temp_dir().join(format!("limitlab-load-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let mut local =
            Local { children: Vec::new(), dir, fronts: Vec::new(), mocks: Vec::new(), decision_files: Vec::new() };
        for (i, backend) in setup.scenario.backends.iter().enumerate() {
            let path = local.dir.join(format!("mock-{}.toml", backend.name));
            write(&path, &mock_config(setup, i)?)?;
            let url = local.spawn(setup.exe, &["mock", "--config", &shown(&path), "--listen", "127.0.0.1:0"], 1)?;
            local.mocks.push((backend.name.clone(), url[0].clone()));
        }
        // Replicas sharing counters through a lagging store share a Redis.
        let store = match lagged(setup.scenario) {
            true => Some(local.start_redis()?),
            false => None,
        };
        let proxy_config = local.dir.join("proxy.toml");
        write(&proxy_config, &proxy_config_text(setup, &local.mocks, store.as_deref())?)?;
        // As in the simulator: replicas with counters of their own are a proxy
        // each; replicas sharing one exact store decide as one gateway.
        let replicas = match setup.scenario.gateway.replicas_count_alone() {
            true => setup.scenario.gateway.replicas.max(1),
            false => 1,
        };
        for replica in 0..replicas {
            let decisions = local.dir.join(format!("decisions-{replica}.jsonl"));
            let (config, log) = (shown(&proxy_config), shown(&decisions));
            let args = ["proxy", "--config", &config, "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"];
            let urls = local.spawn(setup.exe, &[&args[..], &["--decisions", &log]].concat(), 2)?;
            local.fronts.push(urls[0].clone());
            local.decision_files.push(decisions);
        }
        Ok(local)
    }

    /// Starts `exe ARGS` and reads the URL at the end of each of its first `lines` lines.
    fn spawn(&mut self, exe: &Path, args: &[&str], lines: usize) -> Result<Vec<String>, String> {
        let log = self.dir.join(format!("{}-{}.log", args[0], self.children.len()));
        let stderr = std::fs::File::create(&log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let mut child = Command::new(exe)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot start {} {}: {e}", exe.display(), args[0]))?;
        let mut out = BufReader::new(child.stdout.take().expect("piped"));
        self.children.push(child);
        let mut urls = Vec::new();
        for _ in 0..lines {
            let mut line = String::new();
            let _ = out.read_line(&mut line);
            match line.trim().rsplit(' ').next().filter(|u| u.starts_with("http://")) {
                Some(url) => urls.push(url.to_owned()),
                None => {
                    let said = std::fs::read_to_string(&log).unwrap_or_default();
                    return Err(format!("`limitlab {}` did not start: {}", args.join(" "), said.trim()));
                }
            }
        }
        Ok(urls)
    }

    /// A `redis-server` on a free loopback port, without persistence; its URL.
    fn start_redis(&mut self) -> Result<String, String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("cannot find a free port for redis-server: {e}"))?
            .port();
        let args = ["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"];
        let child =
            Command::new("redis-server").args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().map_err(
                |e| {
                    format!(
                        "load --local: replicas that share counters through a lagging store need `redis-server` \
                     (Debian: apt install redis-server): {e}"
                    )
                },
            )?;
        self.children.push(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err(format!("redis-server did not listen on port {port} within 10 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(format!("redis://127.0.0.1:{port}/0"))
    }

    /// Stops every process (SIGTERM, so proxies finish what is in flight) and
    /// returns the proxies' decision logs.
    pub fn stop(mut self) -> Result<Vec<GatewayLine>, String> {
        self.terminate();
        let mut lines = Vec::new();
        for path in &self.decision_files {
            let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            for (n, line) in text.lines().enumerate() {
                let parsed = serde_json::from_str(line).map_err(|e| format!("{}:{}: {e}", path.display(), n + 1))?;
                lines.push(parsed);
            }
        }
        Ok(lines)
    }

    fn terminate(&mut self) {
        for child in &self.children {
            terminate(child.id());
        }
        for child in &mut self.children {
            let _ = child.wait();
        }
        self.children.clear();
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        self.terminate();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// SIGTERM to a child process, through the `kill` command (the workspace keeps
/// its one `unsafe` in cache-hint, so no `libc::kill`).
fn terminate(pid: u32) {
    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
}

/// One line of a proxy's decision log, as far as the live report reads it.
#[derive(Clone, Debug, Deserialize)]
pub struct GatewayLine {
    pub request: u64,
    pub client: String,
    pub attempt: u32,
    pub reason: String,
    pub backends: Vec<String>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

fn check_supported(scenario: &Scenario) -> Result<(), String> {
    let mut products: Vec<&str> = scenario
        .clients
        .iter()
        .filter_map(|c| match &c.identity {
            Identity::Subscription { product } => Some(product.as_str()),
            _ => None,
        })
        .collect();
    products.sort_unstable();
    products.dedup();
    if products.len() > 1 {
        return Err(format!(
            "load --local: clients use products {}; the proxy keeps counters per product while the simulator's \
             gateway has one policy for all, so the two would not count alike",
            products.join(", ")
        ));
    }
    Ok(())
}

fn mock_config(setup: &Setup<'_>, backend: usize) -> Result<String, String> {
    let mut deployment = setup.scenario.backends[backend].clone();
    deployment.name = setup.deployment.to_owned();
    // The simulator seeds backend i with seed * 31 + i; the mock seeds its
    // first deployment with its own seed.
    let config = MockConfig {
        seed: setup.seed.wrapping_mul(31).wrapping_add(backend as u64),
        api_keys: Vec::new(),
        origin_unix_ms: Some(setup.start_unix_ms),
        deployments: vec![deployment],
    };
    toml::to_string(&config).map_err(|e| format!("cannot write a mock config: {e}"))
}

/// Whether the scenario's replicas share counters through a lagging store.
fn lagged(scenario: &Scenario) -> bool {
    scenario.gateway.counters != CounterSharing::Local && scenario.gateway.sync_lag.is_some()
}

fn proxy_config_text(setup: &Setup<'_>, mocks: &[(String, String)], store: Option<&str>) -> Result<String, String> {
    let scenario = setup.scenario;
    let product = scenario
        .clients
        .iter()
        .find_map(|c| match &c.identity {
            Identity::Subscription { product } => Some(product.clone()),
            _ => None,
        })
        .unwrap_or_else(|| "limitlab".to_owned());
    let mut routing = scenario.gateway.routing.clone();
    for backend in &mut routing.backends {
        let (_, url) =
            mocks.iter().find(|(name, _)| *name == backend.id).ok_or("validated: every backend is modelled")?;
        backend.url = url.clone();
    }
    // Callers the scenario gives no subscription send no key: the proxy serves
    // them as APIM serves an API that requires none (no subscription, no
    // product), which is how the simulator's gateway sees them.
    let mut subscriptions = Vec::new();
    for c in &scenario.clients {
        if let Identity::Subscription { .. } = c.identity {
            for caller in 0..c.callers {
                let who = format!("{}-{caller}", c.name);
                subscriptions.push(subscription(&who, &format!("key-{who}"), &product));
            }
        }
    }
    let start_ms = scenario.start_nanos().0 / 1_000_000;
    let mut config = toml::Table::new();
    config.insert("clock_offset_ms".into(), (start_ms as i64 - setup.start_unix_ms as i64).into());
    config.insert("subscriptions".into(), toml::Value::Array(subscriptions));
    config.insert("anonymous_product".into(), product.clone().into());
    let policy = toml::Value::try_from(scenario.gateway.policy()).map_err(|e| e.to_string())?;
    let mut product_table = toml::Table::new();
    product_table.insert("name".into(), product.into());
    product_table.insert("policy".into(), policy);
    config.insert("products".into(), toml::Value::Array(vec![toml::Value::Table(product_table)]));
    config.insert("routing".into(), toml::Value::try_from(&routing).map_err(|e| e.to_string())?);
    if let (Some(store), Some(lag)) = (store, scenario.gateway.sync_lag) {
        // The proxy ships and applies changes every interval: a change reaches
        // the others between 0 and two intervals after it was made, the
        // simulator's `sync_lag` on average.
        let mut counters = toml::Table::new();
        counters.insert("store".into(), store.into());
        counters.insert("mode".into(), "lagged".into());
        counters.insert("sync_interval".into(), format!("{}ms", lag.0 .0 / 1_000_000).into());
        config.insert("counters".into(), toml::Value::Table(counters));
    }
    toml::to_string(&config).map_err(|e| format!("cannot write the proxy config: {e}"))
}

fn subscription(id: &str, key: &str, product: &str) -> toml::Value {
    let mut table = toml::Table::new();
    table.insert("id".into(), id.into());
    table.insert("key".into(), key.into());
    table.insert("products".into(), toml::Value::Array(vec![product.into()]));
    toml::Value::Table(table)
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn shown(path: &Path) -> String {
    path.display().to_string()
}
