//! The live run: the plan's calls sent at their instants, SDK retries as the
//! simulator's clients make them, and the report built from what came back.

use crate::local::{GatewayLine, Local, Setup};
use crate::send::{Failure, Reply, Target, Wire};
use gateway_core::decision_log::Caller;
use gateway_core::lifecycle::{AttemptRecord, AttemptResult};
use gateway_core::{Decision, Nanos, OutcomeRecord, Reason, Usage};
use http_body_util::Full;
use hyper::body::Bytes;
use rand_chacha::ChaCha8Rng;
use simulator::report::{Mode, Recorder};
use simulator::traffic::{self, Answer, Call, Plan};
use simulator::{Report, Scenario};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Where the traffic goes.
pub enum Where<'a> {
    /// A live gateway's root URL.
    Url(String),
    /// Mocks and proxies started on loopback from this `limitlab` binary.
    Local { exe: &'a Path },
}

/// How a caller's IP reaches the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallerIp {
    /// Its own source address in 127.0.0.0/8 on a loopback target; none otherwise.
    Auto,
    /// Its own source address in 127.0.0.0/8 (loopback targets only).
    Source,
    /// `X-Forwarded-For: <the simulator's address>`, for a gateway that trusts this host.
    ForwardedFor,
}

pub struct Options<'a> {
    pub scenario: &'a Scenario,
    /// The scenario file's folder (traces are relative to it).
    pub base: &'a Path,
    pub seed: Option<u64>,
    pub target: Where<'a>,
    /// The subscription key of callers the scenario identifies by IP, header or JWT.
    pub key: Option<String>,
    pub max_requests: Option<u64>,
    pub caller_ip: CallerIp,
    /// The deployment in each call's path (default: the first backend's model).
    pub deployment: Option<String>,
    pub api_version: String,
    pub keep_decisions: bool,
}

pub struct Outcome {
    pub report: Report,
    pub decisions: Vec<Decision>,
    /// What the user should know about the run (calls cut at the end, ...).
    pub notes: Vec<String>,
}

/// How long a call may take before the client gives up on it (the `openai`
/// SDKs' default timeout).
const CALL_DEADLINE: Duration = Duration::from_secs(600);

pub fn run(options: Options<'_>) -> Result<Outcome, String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime.block_on(run_async(options))
}

async fn run_async(options: Options<'_>) -> Result<Outcome, String> {
    let scenario = options.scenario;
    let seed = options.seed.unwrap_or(scenario.seed);
    let plan = Plan::new(scenario, options.base, seed)?;
    let deployment = options.deployment.clone().unwrap_or_else(|| default_deployment(scenario));
    // A local run starts its processes first; their clocks count from an
    // instant chosen now, ahead by two seconds a process (a debug build's or a
    // busy machine's proxy takes a second to load its tokenizers).
    let processes = (scenario.backends.len() + scenario.gateway.replicas + 1) as u64;
    let start_unix_ms =
        unix_ms() + if matches!(options.target, Where::Local { .. }) { 2_000 * processes } else { 1_000 };
    let local = match &options.target {
        Where::Local { exe } => {
            Some(Local::start(&Setup { exe, scenario, seed, deployment: &deployment, start_unix_ms })?)
        }
        Where::Url(_) => None,
    };
    let urls = match (&local, &options.target) {
        (Some(local), _) => local.fronts.clone(),
        (None, Where::Url(url)) => vec![url.clone()],
        (None, Where::Local { .. }) => unreachable!("a local run has its processes"),
    };
    let wires = wires(&urls).await?;
    let source = source_addresses(options.caller_ip, &wires[0].target)?;
    let key = options.key.clone();
    let now_ms = unix_ms();
    if now_ms > start_unix_ms {
        return Err(format!("the gateway and its backends took {} ms too long to start", now_ms - start_unix_ms));
    }
    let t0 = Instant::now() + Duration::from_millis(start_unix_ms - now_ms);
    let shared = Shared {
        wires,
        deployment,
        api_version: options.api_version.clone(),
        key,
        forwarded: source.is_none() && options.caller_ip == CallerIp::ForwardedFor,
    };
    let mut player = Player::new(scenario, seed, plan, t0, Arc::new(shared), source, options.max_requests);
    player.play().await;
    let backends = match &local {
        Some(local) => Some(mock_stats(local, scenario).await),
        None => None,
    };
    let gateway_lines = match local {
        Some(local) => local.stop()?,
        None => Vec::new(),
    };
    Ok(player.outcome(seed, &gateway_lines, backends, options.keep_decisions))
}

fn default_deployment(scenario: &Scenario) -> String {
    scenario.backends.first().map_or_else(|| "gpt-4o".to_owned(), |b| b.model.clone())
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// One wire per gateway front, each checked reachable before any traffic.
async fn wires(urls: &[String]) -> Result<Vec<Arc<Wire>>, String> {
    let mut wires = Vec::new();
    for url in urls {
        let target = Target::parse(url)?;
        let addr = target.resolve().await?;
        let connect = tokio::net::TcpStream::connect(addr);
        match tokio::time::timeout(Duration::from_secs(5), connect).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("cannot reach {url}: {e}; no traffic was sent")),
            Err(_) => return Err(format!("cannot reach {url}: no connection within 5 s; no traffic was sent")),
        }
        wires.push(Arc::new(Wire::new(target, addr, CALL_DEADLINE)));
    }
    Ok(wires)
}

/// Whether callers get source addresses of their own (the loopback plan).
fn source_addresses(caller_ip: CallerIp, target: &Target) -> Result<Option<LoopbackPlan>, String> {
    match (caller_ip, target.is_loopback()) {
        (CallerIp::Auto | CallerIp::Source, true) => Ok(Some(LoopbackPlan::default())),
        (CallerIp::Source, false) => {
            Err(format!("--caller-ip source needs a loopback target; {} is not one", target.host))
        }
        (CallerIp::Auto | CallerIp::ForwardedFor, _) => Ok(None),
    }
}

/// Each distinct caller IP of the scenario gets an address of its own in
/// 127.0.0.0/8, in the order callers first call (the plan's order, so the same
/// every run); a caller's gateway counters are then its own, as in the simulation.
#[derive(Default)]
struct LoopbackPlan {
    given: BTreeMap<String, Ipv4Addr>,
}

impl LoopbackPlan {
    fn address(&mut self, ip: &str) -> IpAddr {
        let next = self.given.len() as u32;
        IpAddr::V4(*self.given.entry(ip.to_owned()).or_insert_with(|| loopback(next)))
    }
}

/// The n-th loopback address for a caller, from 127.0.1.1 on, skipping
/// addresses that end in 0 or 255.
fn loopback(n: u32) -> Ipv4Addr {
    let (block, host) = (n / 254, n % 254 + 1);
    Ipv4Addr::from(0x7f00_0000 + 256 + block * 256 + host)
}

/// What every call task shares.
struct Shared {
    wires: Vec<Arc<Wire>>,
    deployment: String,
    api_version: String,
    key: Option<String>,
    forwarded: bool,
}

/// A finished call.
struct Done {
    call: Call,
    /// Its place in arrival order (first calls and retries alike).
    order: u64,
    arrived: Nanos,
    finished: Nanos,
    result: Result<Reply, Failure>,
}

struct Player<'s> {
    scenario: &'s Scenario,
    plan: Plan<'s>,
    start: Nanos,
    t0: Instant,
    shared: Arc<Shared>,
    source: Option<LoopbackPlan>,
    retry_rngs: Vec<ChaCha8Rng>,
    /// SDK retries waiting for their instant: (instant, order pushed, call).
    retries: BinaryHeap<Reverse<(Nanos, u64, usize)>>,
    waiting: BTreeMap<usize, Call>,
    pushed: u64,
    next_planned: Option<(Nanos, Call)>,
    first_calls: u64,
    max_requests: Option<u64>,
    arrivals: u64,
    sdk_retries: Vec<u64>,
    done: Vec<Done>,
    interrupted: bool,
    capped: bool,
    cut_at_end: u64,
}

impl<'s> Player<'s> {
    fn new(
        scenario: &'s Scenario,
        seed: u64,
        mut plan: Plan<'s>,
        t0: Instant,
        shared: Arc<Shared>,
        source: Option<LoopbackPlan>,
        max_requests: Option<u64>,
    ) -> Player<'s> {
        let next_planned = plan.next_call();
        Player {
            scenario,
            plan,
            start: scenario.start_nanos(),
            t0,
            shared,
            source,
            retry_rngs: (0..scenario.clients.len()).map(|i| traffic::retry_stream(seed, i)).collect(),
            retries: BinaryHeap::new(),
            waiting: BTreeMap::new(),
            pushed: 0,
            next_planned,
            first_calls: 0,
            max_requests,
            arrivals: 0,
            sdk_retries: vec![0; scenario.clients.len()],
            done: Vec::new(),
            interrupted: false,
            capped: false,
            cut_at_end: 0,
        }
    }

    fn end(&self) -> Nanos {
        self.start + self.scenario.duration.0
    }

    fn instant(&self, at: Nanos) -> Instant {
        self.t0 + (at - self.start).into_std()
    }

    /// The instant of the next call to send, planned or retried.
    fn next_due(&self) -> Option<Nanos> {
        let retry = self.retries.peek().map(|Reverse((at, _, _))| *at);
        let planned = self.next_planned.as_ref().map(|(at, _)| *at);
        [retry, planned].into_iter().flatten().min().filter(|at| *at < self.end())
    }

    async fn play(&mut self) {
        let (tx, mut rx) = mpsc::unbounded_channel::<Done>();
        let mut tasks = JoinSet::new();
        let end = self.instant(self.end());
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        loop {
            // A call's answer is queued before its task ends: take every answer
            // first, so that the retries it asks for are due before the loop
            // decides that nothing is left.
            while let Ok(done) = rx.try_recv() {
                self.finished(done);
            }
            let due = self.next_due();
            if due.is_none() && tasks.is_empty() {
                break;
            }
            let wake = due.map_or(end, |at| self.instant(at));
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => match due {
                    Some(at) => self.send_due(at, &tx, &mut tasks),
                    None => break,
                },
                Some(done) = rx.recv() => self.finished(done),
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = &mut ctrl_c => {
                    self.interrupted = true;
                    break;
                }
            }
        }
        // What is still in flight at the end is not counted, as in the
        // simulation, which leaves calls unfinished at its end.
        self.cut_at_end = tasks.len() as u64;
        tasks.abort_all();
        while let Ok(done) = rx.try_recv() {
            self.finished(done);
        }
    }

    fn send_due(&mut self, at: Nanos, tx: &mpsc::UnboundedSender<Done>, tasks: &mut JoinSet<()>) {
        let retry_due = self.retries.peek().is_some_and(|Reverse((r, _, _))| *r == at);
        let call = match retry_due {
            true => {
                let Reverse((_, _, slot)) = self.retries.pop().expect("peeked");
                self.waiting.remove(&slot).expect("a waiting retry")
            }
            false => {
                let (_, call) = self.next_planned.take().expect("a planned call is due");
                self.first_calls += 1;
                self.next_planned = match self.max_requests.is_some_and(|max| self.first_calls >= max) {
                    true => {
                        self.capped = self.plan.next_call().is_some();
                        None
                    }
                    false => self.plan.next_call(),
                };
                call
            }
        };
        self.dispatch(at, call, tx, tasks);
    }

    fn dispatch(&mut self, at: Nanos, call: Call, tx: &mpsc::UnboundedSender<Done>, tasks: &mut JoinSet<()>) {
        let order = self.arrivals;
        self.arrivals += 1;
        // Round robin over the replicas, every arrival, as the simulator spreads them.
        let wire = Arc::clone(&self.shared.wires[(order % self.shared.wires.len() as u64) as usize]);
        let source = self.source.as_mut().map(|plan| plan.address(&call.info.ip));
        let request = request(&self.shared, &wire.target, &self.scenario.clients[call.client].name, &call);
        let (tx, start, t0) = (tx.clone(), self.start, self.t0);
        tasks.spawn(async move {
            let result = match request {
                Ok(request) => wire.send(source, request).await,
                Err(e) => Err(Failure::Transport(format!("the call cannot be sent: {e}"))),
            };
            let finished = start + Nanos(t0.elapsed().as_nanos() as u64);
            let _ = tx.send(Done { call, order, arrived: at, finished, result });
        });
    }

    fn finished(&mut self, done: Done) {
        if done.finished >= self.end() {
            self.cut_at_end += 1;
            return;
        }
        let (status, headers) = match &done.result {
            Ok(reply) => (reply.status, &reply.retry_headers[..]),
            Err(Failure::Transport(_)) => (500, &[][..]),
            Err(Failure::Timeout) => (504, &[][..]),
        };
        let client = &self.scenario.clients[done.call.client];
        let answer = Answer { status, headers, now: done.finished };
        let rng = &mut self.retry_rngs[done.call.client];
        if let Some(wait) = traffic::sdk_retry_wait(client, done.call.attempt, answer, rng) {
            let mut next = done.call.clone();
            next.attempt += 1;
            self.sdk_retries[next.client] += 1;
            self.pushed += 1;
            let slot = self.pushed as usize;
            self.waiting.insert(slot, next);
            self.retries.push(Reverse((done.finished + wait, self.pushed, slot)));
        }
        self.done.push(done);
    }

    /// The report (and decision log) of what came back: each call's outcome
    /// as the gateway logged it when its log is at hand (a local run), else as
    /// its answer shows it.
    fn outcome(
        mut self,
        seed: u64,
        lines: &[GatewayLine],
        backends: Option<Vec<simulator::report::BackendStats>>,
        keep: bool,
    ) -> Outcome {
        let mut recorder = Recorder::new(self.scenario, keep);
        self.done.sort_by_key(|d| (d.finished, d.order));
        let unmatched = self.record_calls(&mut recorder, lines, keep);
        for (client, retries) in self.sdk_retries.iter().enumerate() {
            (0..*retries).for_each(|_| recorder.sdk_retry(client));
        }
        let mut report = recorder.report(self.scenario, seed);
        report.mode = Mode::Live;
        report.complete = !self.interrupted && !self.capped;
        if let Some(backends) = backends {
            report.backends = backends;
        }
        let notes = self.notes(unmatched);
        let decisions = recorder.decisions();
        Outcome { report, decisions, notes }
    }

    /// Records every finished call, in the order they finished, each with its
    /// line of the gateway's log when there is one. Returns how many calls had
    /// no line in a log that was given.
    fn record_calls(&self, recorder: &mut Recorder, lines: &[GatewayLine], keep: bool) -> u64 {
        let by_call: BTreeMap<(&str, u64, u32), &GatewayLine> =
            lines.iter().map(|l| ((l.client.as_str(), l.request, l.attempt), l)).collect();
        let mut unmatched = 0;
        for done in &self.done {
            let client = &self.scenario.clients[done.call.client];
            let line = by_call.get(&(client.name.as_str(), done.call.request, done.call.attempt)).copied();
            unmatched += u64::from(line.is_none() && !lines.is_empty());
            let record = record(done, line);
            let latency = done.finished - done.arrived;
            let decision = keep.then(|| {
                let caller = Caller {
                    request: done.call.request,
                    client: &client.name,
                    attempt: done.call.attempt,
                    info: &done.call.info,
                };
                Decision::new(caller, self.start, &record, latency)
            });
            recorder.caller_tokens(client, &done.call, done.finished, done.finished - self.start, record.usage.total());
            let retry_after = match &done.result {
                Ok(reply) if record.attempts.is_empty() => retry_after_secs(&reply.retry_headers),
                _ => None,
            };
            let at = done.finished - self.start;
            recorder.request(done.call.client, at, done.order, &record, record.reason, latency, retry_after, decision);
        }
        unmatched
    }

    /// What the report must say about calls it does not count as the
    /// simulation would: cut short, capped, uncarried or unmatched.
    fn notes(&self, unmatched: u64) -> Vec<String> {
        let mut notes = Vec::new();
        if self.interrupted {
            notes.push("interrupted: the report covers the calls that finished before Ctrl-C".to_owned());
        }
        if self.capped {
            notes.push(format!("stopped after --max-requests {} first calls", self.first_calls));
        }
        if self.cut_at_end > 0 {
            notes.push(format!(
                "{} calls still in flight at the scenario's end are not counted, as in the simulation",
                self.cut_at_end
            ));
        }
        let failures: Vec<&str> = self
            .done
            .iter()
            .filter_map(|d| match &d.result {
                Err(Failure::Transport(e)) => Some(e.as_str()),
                _ => None,
            })
            .collect();
        if let Some(first) = failures.first() {
            notes.push(format!(
                "{} calls could not be carried (counted as transport failures); the first: {first}",
                failures.len()
            ));
        }
        if unmatched > 0 {
            notes.push(format!("{unmatched} calls have no line in the gateway's decision log; their outcome is read from their answers"));
        }
        notes
    }
}

/// The HTTP request of a call.
fn request(shared: &Shared, target: &Target, client: &str, call: &Call) -> Result<hyper::Request<Full<Bytes>>, String> {
    let path = format!("/openai/deployments/{}/chat/completions?api-version={}", shared.deployment, shared.api_version);
    let mut builder = hyper::Request::post(path)
        .header(hyper::header::HOST, target.authority.as_str())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header("x-limitlab-request", call.request)
        .header("x-limitlab-client", client)
        .header("x-limitlab-attempt", call.attempt)
        .header(mock_aoai::server::COMPLETION_TOKENS_HEADER, call.completion_tokens.max(1));
    let key = call.info.subscription.as_ref().map(|s| s.key.as_str()).or(shared.key.as_deref());
    if let Some(key) = key {
        builder = builder.header("api-key", key);
    }
    for (name, value) in &call.info.headers {
        builder = builder.header(name.as_str(), value.as_str());
    }
    if shared.forwarded {
        builder = builder.header("x-forwarded-for", call.info.ip.as_str());
    }
    // A header the scenario gave that HTTP cannot carry (a trace's) fails the
    // call as a transport failure, which the report shows.
    builder.body(Full::new(Bytes::from(crate::wire::chat_body(call)))).map_err(|e| e.to_string())
}

/// A finished call as the core's outcome record: from the gateway's own line
/// when there is one, else from the answer.
fn record(done: &Done, line: Option<&GatewayLine>) -> OutcomeRecord {
    let (status, reason, backends, usage) = match line {
        Some(l) => {
            let reason = Reason::from_name(&l.reason).unwrap_or_else(|| answered_reason(done));
            let usage = Usage { prompt_tokens: l.prompt_tokens, completion_tokens: l.completion_tokens };
            (answered_status(done), reason, l.backends.clone(), usage)
        }
        None => {
            let reason = answered_reason(done);
            let backends = if reason.is_limit() { Vec::new() } else { vec!["target".to_owned()] };
            (answered_status(done), reason, backends, answered_usage(done))
        }
    };
    let attempts = backends
        .into_iter()
        .map(|backend| AttemptRecord {
            backend: backend.into(),
            wait: Nanos::ZERO,
            started: done.arrived,
            ended: done.finished,
            result: AttemptResult::Status(status),
            tokens: 0,
        })
        .collect();
    OutcomeRecord { arrived: done.arrived, finished: done.finished, attempts, status, reason, usage }
}

/// The status the client got: a call that could not be carried counts as the
/// 500 a gateway answers for a backend it cannot reach, one that timed out as 504.
fn answered_status(done: &Done) -> u16 {
    match &done.result {
        Ok(reply) => reply.status,
        Err(Failure::Transport(_)) => 500,
        Err(Failure::Timeout) => 504,
    }
}

fn answered_reason(done: &Done) -> Reason {
    match &done.result {
        Ok(reply) if reply.broken => Reason::BadResponse,
        Ok(reply) => gateway_core::limit_book::refusal_reason(reply.status, &reply.body)
            .unwrap_or_else(|| Reason::of_backend_status(reply.status)),
        Err(Failure::Transport(_)) => Reason::TransportFailure,
        Err(Failure::Timeout) => Reason::Timeout,
    }
}

fn answered_usage(done: &Done) -> Usage {
    match &done.result {
        Ok(reply) if reply.status < 400 => crate::wire::usage(&reply.body, reply.event_stream).unwrap_or_default(),
        _ => Usage::default(),
    }
}

fn retry_after_secs(headers: &[(String, String)]) -> Option<u64> {
    headers.iter().find(|(n, _)| n == "retry-after").and_then(|(_, v)| v.trim().parse().ok())
}

/// Each mock's own count of the attempts it saw, as the report's backend figures.
async fn mock_stats(local: &Local, scenario: &Scenario) -> Vec<simulator::report::BackendStats> {
    let mut stats = Vec::new();
    for (i, backend) in scenario.backends.iter().enumerate() {
        let figures = fetch_json(&local.mocks[i].1, "/_mock/stats").await.unwrap_or_default();
        let deployment =
            figures["deployments"].as_object().and_then(|d| d.values().next().cloned()).unwrap_or_default();
        let n = |name: &str| deployment[name].as_u64().unwrap_or(0);
        stats.push(simulator::report::BackendStats {
            name: backend.name.clone(),
            attempts: n("requests"),
            ok: n("completed"),
            throttled: n("throttled"),
            errors_5xx: n("faults"),
            timeouts: n("hangs"),
            transport_failures: n("resets") + n("refused") + n("broken_streams"),
        });
    }
    stats
}

/// `GET base + path`, read as JSON.
async fn fetch_json(base: &str, path: &str) -> Option<serde_json::Value> {
    let target = Target::parse(base).ok()?;
    let addr = target.resolve().await.ok()?;
    let wire = Wire::new(target, addr, Duration::from_secs(10));
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, wire.target.authority.as_str())
        .body(Full::new(Bytes::new()))
        .ok()?;
    let reply = wire.send(None, request).await.ok()?;
    serde_json::from_slice(&reply.body).ok()
}

#[cfg(test)]
mod tests {
    use super::loopback;

    #[test]
    fn callers_get_distinct_loopback_addresses_that_end_in_neither_0_nor_255() {
        let addresses: Vec<_> = (0..100_000).map(loopback).collect();
        let distinct: std::collections::BTreeSet<_> = addresses.iter().collect();
        assert_eq!(distinct.len(), addresses.len());
        assert!(addresses.iter().all(|a| a.octets()[0] == 127 && !matches!(a.octets()[3], 0 | 255)));
        assert_eq!(loopback(0).to_string(), "127.0.1.1");
    }
}
