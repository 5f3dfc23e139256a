//! The `<backend>` section: which backend an attempt goes to, whether and when to
//! retry, failover by conditional `set-backend-service`, backend pools and circuit
//! breakers. Sans-IO like the rest of the core: time comes in as `now`, randomness
//! as `draw`, a uniformly distributed `u64` the driver takes from its seeded RNG.

use crate::status::StatusPredicate;
use crate::time::Nanos;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::Arc;

/// A backend APIM can forward to. Credentials are opaque to the core.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub id: String,
    pub url: String,
    /// How the driver authenticates to the backend; the core never reads it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<Credential>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
}

/// A backend credential, opaque to the core: the proxy sends it as `api-key` or
/// `Authorization: Bearer`, taken from the config or from an environment variable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Credential {
    ApiKey(String),
    ApiKeyEnv(String),
    Bearer(String),
    BearerEnv(String),
}

/// The backend's advice on when to come back, from its response headers:
/// `retry-after-ms`, then `x-ms-retry-after-ms`, then `Retry-After` (delta seconds
/// or an HTTP date, read against `now`). Names compare case-insensitively.
pub fn parse_retry_after(headers: &[(String, String)], now: Nanos) -> Option<Nanos> {
    let get = |name: &str| headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim());
    for name in ["retry-after-ms", "x-ms-retry-after-ms"] {
        if let Some(ms) = get(name).and_then(|v| v.parse::<f64>().ok()).filter(|ms| ms.is_finite() && *ms >= 0.0) {
            return Some(Nanos((ms * 1e6).round() as u64));
        }
    }
    let value = get("retry-after")?;
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Nanos::from_secs(secs));
    }
    let date = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    Some(Nanos::from_utc(date.with_timezone(&chrono::Utc)).saturating_sub(now))
}

/// A circuit-breaker rule, as APIM defines it on a backend entity.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreaker {
    /// Trip after this many failures within `interval`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_count: Option<u32>,
    /// Or trip when this share (1 to 100) of the attempts within `interval` failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_percent: Option<u8>,
    /// Seconds.
    pub interval: u64,
    /// The statuses that count as failures.
    pub statuses: StatusPredicate,
    /// Whether transport failures and timeouts count as failures whatever
    /// `statuses` says (they are seen by it as 500 and 504 in any case).
    #[serde(default = "yes")]
    pub transport_failures: bool,
    /// Seconds the breaker stays open.
    pub trip_duration: u64,
    /// Stay open for the backend's `Retry-After` instead, when it sends one.
    #[serde(default)]
    pub accept_retry_after: bool,
}

fn yes() -> bool {
    true
}

/// How a pool picks among its available members.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PoolStrategy {
    RoundRobin,
    Weighted,
    Priority,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    pub id: String,
    pub strategy: PoolStrategy,
    pub members: Vec<PoolMember>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolMember {
    pub backend: String,
    #[serde(default = "one")]
    pub weight: u32,
    /// 0 (highest) to 100.
    #[serde(default)]
    pub priority: u8,
}

fn one() -> u32 {
    1
}

/// APIM's `retry` policy around `forward-request`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retry {
    /// Statuses to retry on.
    pub condition: StatusPredicate,
    /// Also retry transport failures and timeouts whatever `condition` says (they
    /// are seen by it as 500 and 504 in any case).
    #[serde(default)]
    pub on_transport_failure: bool,
    pub count: u32,
    /// Seconds.
    pub interval: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_interval: Option<f64>,
    #[serde(default)]
    pub first_fast_retry: bool,
    /// `choose/when condition → set-backend-service` inside the retry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub switch: Vec<Switch>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Switch {
    pub when: StatusPredicate,
    #[serde(default)]
    pub on_transport_failure: bool,
    pub backend: String,
}

/// The whole `<backend>` side of a policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Routing {
    #[serde(default)]
    pub backends: Vec<Backend>,
    #[serde(default)]
    pub pools: Vec<Pool>,
    /// `set-backend-service backend-id`: a backend or a pool (may come from a
    /// policy file's `<set-backend-service>` instead).
    #[serde(default)]
    pub set_backend: String,
    /// `forward-request timeout`, seconds (APIM's default: 300).
    #[serde(default = "default_timeout")]
    pub timeout: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
    /// limitlab option (off in APIM-compatible mode): wait at least the backend's
    /// `retry-after-ms`, `x-ms-retry-after-ms` or `Retry-After`.
    #[serde(default)]
    pub honor_retry_after: bool,
}

fn default_timeout() -> u64 {
    300
}

impl Routing {
    /// Checks the references and bounds that serde cannot.
    pub fn validate(&self) -> Result<(), String> {
        let backend_exists = |id: &str| self.backends.iter().any(|b| b.id == id);
        let target_exists = |id: &str| backend_exists(id) || self.pools.iter().any(|p| p.id == id);
        for pool in &self.pools {
            if pool.members.is_empty() || pool.members.len() > 30 {
                return Err(format!("pool `{}`: a pool has 1 to 30 members, not {}", pool.id, pool.members.len()));
            }
            if backend_exists(&pool.id) {
                return Err(format!("pool `{}`: the id is also a backend's", pool.id));
            }
            for m in &pool.members {
                if self.pools.iter().any(|p| p.id == m.backend) {
                    return Err(format!(
                        "pool `{}`: member `{}` is a pool; pools cannot contain pools (a circular reference at worst)",
                        pool.id, m.backend
                    ));
                }
                if !backend_exists(&m.backend) {
                    return Err(format!(
                        "pool `{}`: member `{}` is not a backend; known backends: {}",
                        pool.id,
                        m.backend,
                        self.backend_ids()
                    ));
                }
                if m.weight == 0 {
                    return Err(format!("pool `{}`: member `{}` has weight 0; weights start at 1", pool.id, m.backend));
                }
                if m.priority > 100 {
                    return Err(format!(
                        "pool `{}`: member `{}` has priority {}; priorities are 0 to 100",
                        pool.id, m.backend, m.priority
                    ));
                }
            }
        }
        if self.set_backend.is_empty() {
            return Err(format!(
                "no backend is chosen: set `set_backend` (or use a policy with <set-backend-service>); known backends: {}",
                self.backend_ids()
            ));
        }
        if !target_exists(&self.set_backend) {
            return Err(format!(
                "`set_backend` = `{}` is neither a backend nor a pool; known backends: {}",
                self.set_backend,
                self.backend_ids()
            ));
        }
        if let Some(retry) = &self.retry {
            validate_retry(retry, &target_exists)?;
        }
        for b in &self.backends {
            if let Some(cb) = &b.circuit_breaker {
                validate_breaker(&b.id, cb)?;
            }
        }
        Ok(())
    }

    fn backend_ids(&self) -> String {
        self.backends.iter().map(|b| format!("`{}`", b.id)).collect::<Vec<_>>().join(", ")
    }
}

fn validate_retry(retry: &Retry, target_exists: &dyn Fn(&str) -> bool) -> Result<(), String> {
    if !(1..=50).contains(&retry.count) {
        return Err(format!("retry: `count` must be 1 to 50, got {}", retry.count));
    }
    let non_negative = |name: &str, v: Option<f64>| match v {
        Some(v) if !(v.is_finite() && v >= 0.0) => {
            Err(format!("retry: `{name}` must be a number of seconds, 0 or more, got {v}"))
        }
        _ => Ok(()),
    };
    non_negative("interval", Some(retry.interval))?;
    non_negative("delta", retry.delta)?;
    non_negative("max_interval", retry.max_interval)?;
    if let Some(s) = retry.switch.iter().find(|s| !target_exists(&s.backend)) {
        return Err(format!("retry: switch to `{}`, which is neither a backend nor a pool", s.backend));
    }
    Ok(())
}

fn validate_breaker(id: &str, cb: &CircuitBreaker) -> Result<(), String> {
    if cb.failure_count.is_none() && cb.failure_percent.is_none() {
        return Err(format!("backend `{id}`: a circuit breaker needs `failure_count` or `failure_percent`"));
    }
    if cb.failure_count == Some(0) || cb.failure_percent.is_some_and(|p| p == 0 || p > 100) {
        return Err(format!("backend `{id}`: `failure_count` must be at least 1 and `failure_percent` 1 to 100"));
    }
    if cb.interval == 0 {
        return Err(format!("backend `{id}`: circuit breaker `interval` must be at least 1 second"));
    }
    Ok(())
}

/// What one attempt ended with, as the driver saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// The backend answered. `retry_after` is its advice, already parsed.
    Response { status: u16, retry_after: Option<Nanos> },
    /// Connection refused, reset, or a stream broken before the response began.
    TransportFailure,
    /// The backend answered something that is not HTTP (a malformed response).
    BadResponse,
    /// No response within the per-attempt timeout.
    Timeout,
}

impl AttemptOutcome {
    /// The status the policy's conditions (`retry condition`, `choose/when`,
    /// circuit-breaker rules, increment conditions) see for this outcome. APIM shows
    /// a backend it could not reach as 500 (its `BackendConnectionFailure`, which
    /// Microsoft's troubleshooting guide retries with `condition="@(context.Response.StatusCode
    /// == 500)"`), an attempt that timed out as 504, and an answer that is not HTTP
    /// as 502, the statuses the client then gets.
    pub fn policy_status(&self) -> u16 {
        match self {
            AttemptOutcome::Response { status, .. } => *status,
            AttemptOutcome::TransportFailure => 500,
            AttemptOutcome::BadResponse => 502,
            AttemptOutcome::Timeout => 504,
        }
    }

    /// Whether a condition matches: by the outcome's policy status, or, for an
    /// outcome without a response, by the rule's `on_transport_failure` /
    /// `transport_failures` switch.
    fn matches(&self, statuses: &StatusPredicate, transport: bool) -> bool {
        let failed_without_response = !matches!(self, AttemptOutcome::Response { .. });
        statuses.matches(self.policy_status()) || (transport && failed_without_response)
    }
}

/// The wait before retry `n` (n ≥ 1), APIM's formulas, exactly.
/// `draw` is a uniform `u64`; the exponential jitter is `u = 0.8 + 0.4·draw/2^64`.
pub fn retry_wait(retry: &Retry, n: u32, draw: u64) -> Nanos {
    assert!(n >= 1, "retries are numbered from 1");
    if n == 1 && retry.first_fast_retry {
        return Nanos::ZERO;
    }
    let secs = |s: f64| (s * 1e9).round() as u128;
    let interval = secs(retry.interval);
    let wait = match (retry.delta, retry.max_interval) {
        (None, _) => interval,
        (Some(delta), None) => interval + (n as u128 - 1) * secs(delta),
        (Some(delta), Some(max)) => {
            let steps = (1u128 << (n - 1).min(60)) - 1;
            let base = steps * secs(delta);
            // base · (0.8 + 0.4·draw/2^64) = base·4/5 + base·2·draw/(5·2^64)
            let jitter = (base * 2 / 5).saturating_mul(draw as u128) >> 64;
            (interval + base * 4 / 5 + jitter).min(secs(max))
        }
    };
    Nanos(wait.min(u64::MAX as u128) as u64)
}

/// Bounds of `retry_wait` over all draws, for tests and reports.
pub fn retry_wait_bounds(retry: &Retry, n: u32) -> (Nanos, Nanos) {
    (retry_wait(retry, n, 0), retry_wait(retry, n, u64::MAX))
}

#[derive(Clone, Debug, Default)]
struct BreakerState {
    /// (time, failed) of the attempts within the interval.
    log: VecDeque<(Nanos, bool)>,
    open_until: Nanos,
}

/// Where `set-backend-service` points: a backend or a pool, by index.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Target {
    #[default]
    Unrouted,
    Backend(usize),
    Pool(usize),
}

/// The routing state of one gateway: breakers and round-robin cursors, with the
/// configuration resolved to indices so a decision allocates nothing.
pub struct Router {
    config: Routing,
    names: Vec<Arc<str>>,
    urls: Vec<Arc<str>>,
    /// Per pool: (backend index, weight, priority) per member.
    members: Vec<Vec<(usize, u32, u8)>>,
    start: Target,
    /// The target of each `retry.switch` entry.
    switches: Vec<Target>,
    breakers: Vec<BreakerState>,
    cursors: Vec<usize>,
}

/// Where the next attempt goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempt {
    /// 0 for the first attempt, n for retry n.
    pub number: u32,
    pub backend: Arc<str>,
    /// The backend's position in `Routing::backends`, for drivers that index.
    pub backend_index: usize,
    pub url: Arc<str>,
    pub timeout: Nanos,
}

/// No member of the target can take the request: APIM answers 503.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unavailable {
    /// When the earliest member's breaker closes.
    pub retry_after: Nanos,
}

/// The router's answer after an attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    Retry {
        attempt: Attempt,
        wait: Nanos,
    },
    /// Give the client the last backend outcome unchanged.
    Respond,
    /// The retry target has no available member.
    Unavailable(Unavailable),
}

/// Per-request routing state.
#[derive(Clone, Debug, Default)]
pub struct Route {
    target: Target,
    attempts: u32,
}

impl Router {
    pub fn new(config: Routing) -> Result<Router, String> {
        config.validate()?;
        let backend = |id: &str| config.backends.iter().position(|b| b.id == id).expect("validated: members exist");
        let members = config
            .pools
            .iter()
            .map(|p| p.members.iter().map(|m| (backend(&m.backend), m.weight, m.priority)).collect())
            .collect();
        let target = |id: &str| match config.backends.iter().position(|b| b.id == id) {
            Some(i) => Target::Backend(i),
            None => Target::Pool(config.pools.iter().position(|p| p.id == id).expect("validated: targets exist")),
        };
        let start = target(&config.set_backend);
        let switches = config.retry.iter().flat_map(|r| &r.switch).map(|s| target(&s.backend)).collect();
        Ok(Router {
            names: config.backends.iter().map(|b| Arc::from(b.id.as_str())).collect(),
            urls: config.backends.iter().map(|b| Arc::from(b.url.as_str())).collect(),
            members,
            start,
            switches,
            breakers: vec![BreakerState::default(); config.backends.len()],
            cursors: vec![0; config.pools.len()],
            config,
        })
    }

    pub fn config(&self) -> &Routing {
        &self.config
    }

    /// The name of the backend at `index` in `Routing::backends`, as attempts carry it.
    pub fn backend_name(&self, index: usize) -> &Arc<str> {
        &self.names[index]
    }

    /// The first attempt of a request.
    pub fn start(&mut self, now: Nanos, draw: u64) -> Result<(Route, Attempt), Unavailable> {
        let mut route = Route { target: self.start, attempts: 0 };
        let attempt = self.attempt(now, &mut route, draw)?;
        Ok((route, attempt))
    }

    /// Records an attempt's outcome and decides what follows.
    pub fn handle_outcome(
        &mut self,
        now: Nanos,
        route: &mut Route,
        backend: &str,
        outcome: AttemptOutcome,
        draw: u64,
    ) -> Next {
        self.record(now, backend, outcome);
        let Some(retry) = &self.config.retry else { return Next::Respond };
        if !outcome.matches(&retry.condition, retry.on_transport_failure) || route.attempts > retry.count {
            return Next::Respond;
        }
        if let Some(i) = retry.switch.iter().position(|s| outcome.matches(&s.when, s.on_transport_failure)) {
            route.target = self.switches[i];
        }
        let mut wait = retry_wait(retry, route.attempts, draw);
        if let (true, AttemptOutcome::Response { retry_after: Some(advice), .. }) =
            (self.config.honor_retry_after, outcome)
        {
            wait = wait.max(advice);
        }
        match self.attempt(now + wait, route, draw.rotate_left(17)) {
            Ok(attempt) => Next::Retry { attempt, wait },
            Err(unavailable) => Next::Unavailable(unavailable),
        }
    }

    /// Whether the backend's breaker lets requests through at `now`.
    pub fn is_available(&self, now: Nanos, backend: &str) -> bool {
        self.index_of(backend).is_some_and(|i| self.breakers[i].open_until <= now)
    }

    fn index_of(&self, backend: &str) -> Option<usize> {
        // An attempt's backend is usually the router's own name (`Attempt::backend`
        // shares it), found by address without comparing the text.
        let shared = self.names.iter().position(|name| std::ptr::eq(&**name, backend));
        shared.or_else(|| self.config.backends.iter().position(|b| b.id == backend))
    }

    fn attempt(&mut self, at: Nanos, route: &mut Route, draw: u64) -> Result<Attempt, Unavailable> {
        let backend = self.choose(at, route.target, draw)?;
        let attempt = Attempt {
            number: route.attempts,
            backend: self.names[backend].clone(),
            backend_index: backend,
            url: self.urls[backend].clone(),
            timeout: Nanos::from_secs(self.config.timeout),
        };
        route.attempts += 1;
        Ok(attempt)
    }

    /// Picks an available backend of a target (a backend or a pool).
    fn choose(&mut self, now: Nanos, target: Target, draw: u64) -> Result<usize, Unavailable> {
        let p = match target {
            Target::Pool(p) => p,
            Target::Backend(i) => {
                let open_until = self.breakers[i].open_until;
                return if open_until <= now { Ok(i) } else { Err(Unavailable { retry_after: open_until - now }) };
            }
            Target::Unrouted => unreachable!("a route starts at the configured target"),
        };
        let breakers = &self.breakers;
        let available = |m: &&(usize, u32, u8)| breakers[m.0].open_until <= now;
        let members = &self.members[p];
        let Some(best) = members.iter().filter(available).map(|m| m.2).min() else {
            let earliest = members.iter().map(|m| breakers[m.0].open_until).min().expect("pools have members");
            return Err(Unavailable { retry_after: earliest - now });
        };
        Ok(match self.config.pools[p].strategy {
            PoolStrategy::RoundRobin => {
                let count = members.iter().filter(available).count();
                let pick = members.iter().filter(available).nth(self.cursors[p] % count).expect("within count").0;
                self.cursors[p] = self.cursors[p].wrapping_add(1);
                pick
            }
            PoolStrategy::Weighted => weighted(members.iter().filter(available), draw),
            PoolStrategy::Priority => weighted(members.iter().filter(available).filter(|m| m.2 == best), draw),
        })
    }

    fn record(&mut self, now: Nanos, backend: &str, outcome: AttemptOutcome) {
        let Some(i) = self.index_of(backend) else { return };
        // Borrow the rule and the state as disjoint fields: no clone per attempt.
        let Some(rule) = &self.config.backends[i].circuit_breaker else { return };
        let failed = outcome.matches(&rule.statuses, rule.transport_failures);
        let state = &mut self.breakers[i];
        let interval = Nanos::from_secs(rule.interval);
        state.log.push_back((now, failed));
        while state.log.front().is_some_and(|&(t, _)| t + interval <= now) {
            state.log.pop_front();
        }
        if !failed {
            return;
        }
        let failures = state.log.iter().filter(|e| e.1).count() as u64;
        let total = state.log.len() as u64;
        let by_count = rule.failure_count.is_some_and(|n| failures >= u64::from(n));
        let by_percent = rule.failure_percent.is_some_and(|p| failures * 100 >= u64::from(p) * total);
        if by_count || by_percent {
            let advice = match outcome {
                AttemptOutcome::Response { retry_after: Some(a), .. } if rule.accept_retry_after => a,
                _ => Nanos::from_secs(rule.trip_duration),
            };
            state.open_until = now + advice;
            state.log.clear();
        }
    }
}

/// Picks a member with probability proportional to its weight; `draw` is uniform.
fn weighted<'m>(members: impl Iterator<Item = &'m (usize, u32, u8)> + Clone, draw: u64) -> usize {
    let total: u64 = members.clone().map(|m| u64::from(m.1)).sum();
    let mut point = ((draw as u128 * total as u128) >> 64) as u64;
    for m in members {
        if point < u64::from(m.1) {
            return m.0;
        }
        point -= u64::from(m.1);
    }
    unreachable!("the point lies below the total weight")
}
