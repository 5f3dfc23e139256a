//! Retry, failover, pools and circuit breakers.

use gateway_core::routing::{retry_wait, retry_wait_bounds, AttemptOutcome, Next, Retry, Router, Routing};
use gateway_core::Nanos;
use proptest::prelude::*;

/// The seed article's `<backend>` section, as shipped under `policies/`.
const SEED: &str = include_str!("../../policies/seed-failover-routing.toml");

fn routing(text: &str) -> Routing {
    toml::from_str(text).unwrap_or_else(|e| panic!("test routing does not parse: {e}"))
}

fn status(s: u16) -> AttemptOutcome {
    AttemptOutcome::Response { status: s, retry_after: None }
}

/// Runs one request against backends that answer from `script` in order, and
/// returns the backends tried with the wait before each retry.
fn check(text: &str, script: &[AttemptOutcome], draw: u64, expected: &[(&str, Option<(f64, f64)>)]) {
    let mut router = Router::new(routing(text)).unwrap();
    let mut now = Nanos::from_secs(1_000);
    let (mut route, mut attempt) = router.start(now, draw).unwrap();
    let mut seen = vec![(attempt.backend.clone(), None)];
    for outcome in script {
        match router.handle_outcome(now, &mut route, &attempt.backend.clone(), *outcome, draw) {
            Next::Retry { attempt: next, wait } => {
                now = now + wait;
                seen.push((next.backend.clone(), Some(wait)));
                attempt = next;
            }
            Next::Respond | Next::Unavailable(_) => break,
        }
    }
    assert_eq!(seen.len(), expected.len(), "attempts: {seen:?}");
    for (i, ((backend, wait), (want_backend, bounds))) in seen.iter().zip(expected).enumerate() {
        assert_eq!(backend.as_ref(), *want_backend, "attempt {i}");
        match (wait, bounds) {
            (None, None) => {}
            (Some(w), Some((low, high))) => {
                let secs = w.as_secs_f64();
                assert!(*low <= secs && secs <= *high, "attempt {i}: wait {secs} outside [{low}, {high}]");
            }
            _ => panic!("attempt {i}: wait {wait:?} vs bounds {bounds:?}"),
        }
    }
}

#[test]
fn seed_failover_switches_to_secondary_and_backs_off_exponentially() {
    let all_429 = [status(429); 10];
    let expected = [
        ("primary", None),
        ("secondary", Some((1.0, 1.0))),
        ("secondary", Some((1.8, 2.2))),
        ("secondary", Some((3.4, 4.6))),
        ("secondary", Some((6.6, 8.0))),
        ("secondary", Some((8.0, 8.0))),
    ];
    for draw in [0, u64::MAX / 3, u64::MAX / 2, u64::MAX] {
        check(SEED, &all_429, draw, &expected);
    }
}

#[test]
fn seed_failover_stops_at_the_first_success_and_ignores_4xx() {
    check(SEED, &[status(503), status(200)], 0, &[("primary", None), ("secondary", Some((1.0, 1.0)))]);
    check(SEED, &[status(400)], 0, &[("primary", None)]);
}

/// APIM shows the retry condition a backend it cannot reach as 500 and an attempt
/// that timed out as 504, so `StatusCode >= 500` retries both and fails over.
#[test]
fn transport_failures_and_timeouts_are_seen_as_500_and_504() {
    let failed_over = [("primary", None), ("secondary", Some((1.0, 1.0)))];
    check(SEED, &[AttemptOutcome::TransportFailure, status(200)], 0, &failed_over);
    check(SEED, &[AttemptOutcome::Timeout, status(200)], 0, &failed_over);
    check(SEED, &[AttemptOutcome::BadResponse, status(200)], 0, &failed_over);
    // Microsoft's fix for `BackendConnectionFailure`: retry on exactly 500.
    let only_500 = "set_backend = \"primary\"\nbackends = [{ id = \"primary\", url = \"http://p\" }, { id = \"secondary\", url = \"http://s\" }]\nretry = { condition = \"500\", count = 1, interval = 1, switch = [{ when = \"500\", backend = \"secondary\" }] }\n";
    check(only_500, &[AttemptOutcome::TransportFailure, status(200)], 0, &failed_over);
    check(only_500, &[AttemptOutcome::Timeout], 0, &[("primary", None)]);
    let only_504 = only_500.replace("\"500\"", "\"504\"");
    check(&only_504, &[AttemptOutcome::Timeout, status(200)], 0, &failed_over);
    check(&only_504, &[AttemptOutcome::TransportFailure], 0, &[("primary", None)]);
}

#[test]
fn a_breaker_counting_500s_trips_on_refused_connections() {
    let text = "set_backend = \"primary\"\nbackends = [{ id = \"primary\", url = \"http://p\", circuit_breaker = { failure_count = 2, interval = 60, statuses = \"500\", transport_failures = false, trip_duration = 30 } }]\n";
    let mut router = Router::new(routing(text)).unwrap();
    let now = Nanos::from_secs(1_000);
    for _ in 0..2 {
        let (mut route, attempt) = router.start(now, 0).unwrap();
        router.handle_outcome(now, &mut route, &attempt.backend, AttemptOutcome::TransportFailure, 0);
    }
    assert!(!router.is_available(now, "primary"), "two refused connections are two 500s");
    let mut timeouts = Router::new(routing(text)).unwrap();
    for _ in 0..2 {
        let (mut route, attempt) = timeouts.start(now, 0).unwrap();
        timeouts.handle_outcome(now, &mut route, &attempt.backend, AttemptOutcome::Timeout, 0);
    }
    assert!(timeouts.is_available(now, "primary"), "a timeout is a 504, not a 500");
}

#[test]
fn retry_wait_formulas() {
    let retry = |delta: Option<f64>, max: Option<f64>, fast: bool| Retry {
        condition: gateway_core::StatusPredicate::parse("429").unwrap(),
        on_transport_failure: false,
        count: 10,
        interval: 2.0,
        delta,
        max_interval: max,
        first_fast_retry: fast,
        switch: vec![],
    };
    let secs = |r: &Retry, n: u32, draw: u64| retry_wait(r, n, draw).as_secs_f64();
    // Fixed.
    assert_eq!((secs(&retry(None, None, false), 1, 0), secs(&retry(None, None, false), 7, 0)), (2.0, 2.0));
    // Linear: interval + (n - 1)·delta.
    assert_eq!(secs(&retry(Some(0.5), None, false), 4, 0), 3.5);
    // First fast retry goes at once, later ones follow the formula.
    assert_eq!(secs(&retry(Some(0.5), None, true), 1, 0), 0.0);
    assert_eq!(secs(&retry(Some(0.5), None, true), 2, 0), 2.5);
    // Exponential with jitter in [0.8, 1.2], capped.
    let exp = retry(Some(1.0), Some(30.0), false);
    // n = 3: 2 + 3·u, u in [0.8, 1.2): the largest draw lands one nanosecond short of 5.6 s.
    assert_eq!(retry_wait_bounds(&exp, 3), (Nanos::from_millis(4_400), Nanos(5_599_999_999)));
    assert_eq!(retry_wait_bounds(&exp, 10), (Nanos::from_secs(30), Nanos::from_secs(30)));
}

#[test]
fn honoring_retry_after_waits_at_least_the_backends_advice() {
    let text = format!("honor_retry_after = true\n{SEED}");
    let mut router = Router::new(routing(&text)).unwrap();
    let (mut route, _) = router.start(Nanos::ZERO, 0).unwrap();
    let advice = AttemptOutcome::Response { status: 429, retry_after: Some(Nanos::from_secs(12)) };
    let Next::Retry { wait, .. } = router.handle_outcome(Nanos::ZERO, &mut route, "primary", advice, 0) else {
        panic!()
    };
    assert_eq!(wait, Nanos::from_secs(12));
    let mut apim = Router::new(routing(SEED)).unwrap();
    let (mut route, _) = apim.start(Nanos::ZERO, 0).unwrap();
    let Next::Retry { wait, .. } = apim.handle_outcome(Nanos::ZERO, &mut route, "primary", advice, 0) else { panic!() };
    assert_eq!(wait, Nanos::from_secs(1), "APIM-compatible mode ignores the advice");
}

const POOL: &str = r#"
set_backend = "pool"

[[backends]]
id = "a"
url = "http://a"
circuit_breaker = { failure_count = 2, interval = 60, statuses = "429, >=500", trip_duration = 30 }

[[backends]]
id = "b"
url = "http://b"
circuit_breaker = { failure_count = 1, interval = 60, statuses = ">=500", trip_duration = 10, accept_retry_after = true }

[[backends]]
id = "c"
url = "http://c"

[[pools]]
id = "pool"
strategy = "priority"
members = [{ backend = "a", priority = 0 }, { backend = "b", priority = 0, weight = 3 }, { backend = "c", priority = 1 }]
"#;

#[test]
fn priority_pools_skip_tripped_members_and_fall_back_to_lower_priorities() {
    let mut router = Router::new(routing(POOL)).unwrap();
    let t = Nanos::from_secs(100);
    // Weights 1:3 within priority 0: draws below a quarter pick `a`.
    assert_eq!(router.start(t, 0).unwrap().1.backend.as_ref(), "a");
    assert_eq!(router.start(t, u64::MAX).unwrap().1.backend.as_ref(), "b");
    // Trip `b` with a 503 carrying Retry-After 20 s (accepted), `a` with two 429s.
    let (mut route, _) = router.start(t, 0).unwrap();
    router.handle_outcome(
        t,
        &mut route,
        "b",
        AttemptOutcome::Response { status: 503, retry_after: Some(Nanos::from_secs(20)) },
        0,
    );
    assert!(!router.is_available(t, "b"));
    assert_eq!(router.start(t, u64::MAX).unwrap().1.backend.as_ref(), "a");
    router.handle_outcome(t, &mut route, "a", status(429), 0);
    router.handle_outcome(t, &mut route, "a", status(429), 0);
    // Every priority-0 member is tripped: priority 1 takes over.
    assert_eq!(router.start(t, 0).unwrap().1.backend.as_ref(), "c");
    // `b` comes back after its Retry-After (20 s), `a` after trip_duration (30 s).
    assert_eq!(router.start(t + Nanos::from_secs(20), 0).unwrap().1.backend.as_ref(), "b");
    assert_eq!(router.start(t + Nanos::from_secs(30), 0).unwrap().1.backend.as_ref(), "a");
}

#[test]
fn a_pool_with_no_available_member_answers_unavailable_until_the_earliest_returns() {
    let text = POOL.replace(", { backend = \"c\", priority = 1 }", "");
    let mut router = Router::new(routing(&text)).unwrap();
    let t = Nanos::from_secs(5);
    let (mut route, _) = router.start(t, 0).unwrap();
    router.handle_outcome(t, &mut route, "b", status(500), 0);
    router.handle_outcome(t, &mut route, "a", status(500), 0);
    router.handle_outcome(t, &mut route, "a", status(500), 0);
    assert_eq!(router.start(t + Nanos::from_secs(4), 0).unwrap_err().retry_after, Nanos::from_secs(6));
}

#[test]
fn round_robin_rotates_over_available_members() {
    let text = POOL.replace("\"priority\"", "\"round-robin\"");
    let mut router = Router::new(routing(&text)).unwrap();
    let picks: Vec<String> = (0..6).map(|_| router.start(Nanos::ZERO, 0).unwrap().1.backend.to_string()).collect();
    assert_eq!(picks, ["a", "b", "c", "a", "b", "c"]);
}

#[test]
fn bad_routing_is_refused_with_a_clear_error() {
    let cases = [
        (SEED.replace("count = 5", "count = 0"), "`count` must be 1 to 50, got 0"),
        (SEED.replace("count = 5", "count = 51"), "`count` must be 1 to 50, got 51"),
        (POOL.replace("{ backend = \"c\", priority = 1 }", "{ backend = \"d\" }"), "member `d` is not a backend"),
        (POOL.replace("weight = 3", "weight = 0"), "member `b` has weight 0"),
        (POOL.replace("{ backend = \"c\", priority = 1 }", "{ backend = \"pool\" }"), "circular reference"),
        (
            SEED.replace("set_backend = \"primary\"", "set_backend = \"primry\""),
            "`primry` is neither a backend nor a pool",
        ),
        (SEED.replace("backend = \"secondary\" }", "backend = \"tertiary\" }"), "switch to `tertiary`"),
        (POOL.replace("failure_count = 2, ", ""), "needs `failure_count` or `failure_percent`"),
    ];
    for (text, needle) in cases {
        let err = Router::new(routing(&text)).err().unwrap_or_else(|| panic!("accepted: {needle}"));
        assert!(err.contains(needle), "`{err}` does not contain `{needle}`");
    }
}

proptest! {
    /// At most count + 1 attempts, every wait within the formula's bounds, and a
    /// tripped backend never chosen before its open period ends.
    #[test]
    fn retries_are_bounded_and_breakers_respected(
        count in 1u32..8, statuses in prop::collection::vec(prop::sample::select(vec![200u16, 429, 500, 503, 400]), 1..30),
        draws in prop::collection::vec(any::<u64>(), 30),
    ) {
        let text = POOL.replace("set_backend = \"pool\"", &format!("set_backend = \"pool\"\n[retry]\ncondition = \"429, >=500\"\ncount = {count}\ninterval = 1\ndelta = 1\nmax_interval = 8\n"));
        let mut router = Router::new(routing(&text)).unwrap();
        let retry = router.config().retry.clone().unwrap();
        let mut now = Nanos::from_secs(10);
        let Ok((mut route, mut attempt)) = router.start(now, draws[0]) else { return Ok(()) };
        let mut attempts = 1;
        for (i, s) in statuses.iter().enumerate() {
            let outcome = status(*s);
            let before = router.is_available(now, &attempt.backend);
            prop_assert!(before, "chose a tripped backend");
            match router.handle_outcome(now, &mut route, &attempt.backend.clone(), outcome, draws[i % draws.len()]) {
                Next::Retry { attempt: next, wait } => {
                    let (low, high) = retry_wait_bounds(&retry, attempts);
                    prop_assert!(low <= wait && wait <= high, "wait {:?} outside {:?}", wait, (low, high));
                    attempts += 1;
                    now = now + wait;
                    prop_assert!(router.is_available(now, &next.backend));
                    attempt = next;
                }
                Next::Respond | Next::Unavailable(_) => break,
            }
        }
        prop_assert!(attempts <= count + 1);
    }
}

#[test]
fn retry_after_headers_are_read_in_order_of_precision() {
    use gateway_core::routing::parse_retry_after;
    let now = gateway_core::time::parse_rfc3339("2015-10-21T07:27:00Z").unwrap();
    let check = |headers: &[(&str, &str)], expected: Option<Nanos>| {
        let headers: Vec<(String, String)> = headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
        assert_eq!(parse_retry_after(&headers, now), expected, "{headers:?}");
    };
    check(&[("Retry-After", "7"), ("retry-after-ms", "1500")], Some(Nanos::from_millis(1_500)));
    check(&[("x-ms-retry-after-ms", "250.5")], Some(Nanos(250_500_000)));
    check(&[("retry-after", "3")], Some(Nanos::from_secs(3)));
    check(&[("Retry-After", "Wed, 21 Oct 2015 07:28:00 GMT")], Some(Nanos::from_secs(60)));
    check(&[("Retry-After", "Wed, 21 Oct 2015 07:26:00 GMT")], Some(Nanos::ZERO));
    check(&[("Retry-After", "soon"), ("retry-after-ms", "-1")], None);
    check(&[], None);
}

proptest! {
    /// Every wait against the issue's formulas, written out in floating point:
    /// fixed, linear (capped), exponential with u in [0.8, 1.2], first fast retry.
    #[test]
    fn waits_follow_apims_formulas(
        interval in 0u32..20, delta in prop::option::of(0u32..10), max in prop::option::of(0u32..120),
        fast in any::<bool>(), n in 1u32..12, draw in any::<u64>(),
    ) {
        let retry = Retry {
            condition: gateway_core::StatusPredicate::parse("429").unwrap(),
            on_transport_failure: false,
            count: 50,
            interval: f64::from(interval),
            delta: delta.map(f64::from),
            max_interval: max.map(f64::from),
            first_fast_retry: fast,
            switch: vec![],
        };
        let wait = retry_wait(&retry, n, draw).as_secs_f64();
        let (i, cap) = (f64::from(interval), max.map_or(f64::INFINITY, f64::from));
        let (low, high) = match (delta.map(f64::from), max) {
            _ if fast && n == 1 => (0.0, 0.0),
            (None, _) => (i, i),
            (Some(d), None) => (i + f64::from(n - 1) * d, i + f64::from(n - 1) * d),
            (Some(d), Some(_)) => {
                let steps = 2f64.powi(n as i32 - 1) - 1.0;
                ((i + steps * d * 0.8).min(cap), (i + steps * d * 1.2).min(cap))
            }
        };
        prop_assert!(low - 1e-9 <= wait && wait <= high + 1e-9, "retry {}: {} outside [{}, {}]", n, wait, low, high);
    }
}
