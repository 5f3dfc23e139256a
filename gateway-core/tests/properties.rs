//! Property tests: each limiter against a simple reference model, and the invariants.

mod common;

use gateway_core::{LimitBook, Nanos, RequestDecision, RequestInfo, ResponseInfo};
use proptest::prelude::*;

const SEC: u64 = 1_000_000_000;

/// Arrivals as (gap since the previous one in ms, caller index).
fn arrivals(max_gap_ms: u64) -> impl Strategy<Value = Vec<(u64, usize)>> {
    prop::collection::vec((0..max_gap_ms, 0..4usize), 1..200)
}

fn req(caller: usize) -> RequestInfo {
    RequestInfo { ip: format!("10.0.0.{caller}"), ..RequestInfo::default() }
}

fn ok() -> ResponseInfo {
    ResponseInfo { status: Some(200), ..ResponseInfo::default() }
}

/// Feeds one request and answers it at once; returns the retry-after of a rejection.
fn step(gw: &mut LimitBook, now: Nanos, caller: usize) -> Option<Option<u64>> {
    match gw.handle_request(now, &req(caller)) {
        RequestDecision::Forward(a) => {
            gw.handle_response(now, a.id, &ok()).unwrap();
            None
        }
        RequestDecision::Reject(r) => Some(r.retry_after_secs),
    }
}

/// The reference sliding window: a list of admitted times per key.
fn reference_sliding(log: &mut [Vec<u64>], now: u64, caller: usize, calls: usize, period: u64) -> Option<u64> {
    let inside: Vec<u64> = log[caller].iter().copied().filter(|&t| now < period || t > now - period).collect();
    if inside.len() < calls {
        log[caller].push(now);
        return None;
    }
    // The call is admitted once all but calls - 1 of the calls inside have left.
    let leaving = inside[inside.len() - calls];
    Some((leaving + period - now).div_ceil(SEC).max(1))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn sliding_window_matches_the_reference(calls in 1usize..6, period_s in 1u64..10, arrivals in arrivals(3_000)) {
        let policy = format!("[[limits]]\ntype = \"rate-limit-by-key\"\ncalls = {calls}\nrenewal_period = {period_s}\ncounter_key = \"ip\"\n");
        let mut gw = LimitBook::new(&common::policy(&policy), 3);
        let mut log = vec![Vec::new(); 4];
        let mut now = 1_000 * SEC;
        for (gap_ms, caller) in arrivals {
            now += gap_ms * 1_000_000;
            let expected = reference_sliding(&mut log, now, caller, calls, period_s * SEC);
            let got = step(&mut gw, Nanos(now), caller).map(|r| r.expect("rate limits always say when"));
            prop_assert_eq!(got, expected, "at {} caller {}", now, caller);
            // The invariant, directly: no window ever holds more than `calls` admitted calls.
            let held = log[caller].iter().filter(|&&t| t + period_s * SEC > now).count();
            prop_assert!(held <= calls);
        }
    }

    #[test]
    fn quota_matches_the_reference(calls in 1u64..5, period_s in 0u64..100, origin_s in -62_135_596_800i64..2_000_000_000, arrivals in arrivals(20_000)) {
        let origin = chrono::DateTime::from_timestamp(origin_s, 0).unwrap().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let policy = format!("[[limits]]\ntype = \"quota-by-key\"\ncalls = {calls}\nrenewal_period = {period_s}\ncounter_key = \"ip\"\nfirst_period_start = \"{origin}\"\n");
        let mut gw = LimitBook::new(&common::policy(&policy), 3);
        let mut counts: Vec<(i128, u64)> = vec![(i128::MIN, 0); 4];
        let mut now = 1_700_000_000 * SEC;
        for (gap_ms, caller) in arrivals {
            now += gap_ms * 1_000_000;
            let offset = now as i128 - origin_s as i128 * SEC as i128;
            let index = if period_s == 0 { 0 } else { offset.div_euclid((period_s * SEC) as i128) };
            if counts[caller].0 != index {
                counts[caller] = (index, 0);
            }
            let expected = if counts[caller].1 < calls {
                counts[caller].1 += 1;
                None
            } else if period_s == 0 {
                Some(None)
            } else {
                let end = origin_s as i128 * SEC as i128 + (index + 1) * (period_s * SEC) as i128;
                Some(Some(((end - now as i128) as u64).div_ceil(SEC).max(1)))
            };
            prop_assert_eq!(step(&mut gw, Nanos(now), caller), expected);
            prop_assert!(counts[caller].1 <= calls);
        }
    }

    #[test]
    fn token_bucket_never_admits_more_than_capacity_plus_rate(calls in 1u64..6, period_s in 1u64..20, arrivals in arrivals(2_000)) {
        let policy = format!("[[limits]]\ntype = \"rate-limit-by-key\"\ncalls = {calls}\nrenewal_period = {period_s}\ncounter_key = {{ const = \"one\" }}\nalgorithm = \"token-bucket\"\n");
        let mut gw = LimitBook::new(&common::policy(&policy), 3);
        let mut admitted = Vec::new();
        let mut now = 0;
        for (gap_ms, _) in arrivals {
            now += gap_ms * 1_000_000;
            if step(&mut gw, Nanos(now), 0).is_none() {
                admitted.push(now);
            }
        }
        // In any span [a, b] of length W: count <= calls + calls * W / period.
        let period = (period_s * SEC) as u128;
        for i in 0..admitted.len() {
            for j in i..admitted.len() {
                let count = (j - i + 1) as u128;
                let span = (admitted[j] - admitted[i]) as u128;
                prop_assert!(count * period <= calls as u128 * period + calls as u128 * span, "{} calls in {} ns", count, span);
            }
        }
    }

    /// Requests with random latencies interleave; every reported token is charged
    /// exactly once and the per-minute decisions match a reference sliding sum.
    #[test]
    fn token_counts_are_never_lost(tpm in 50u64..500, calls in prop::collection::vec((0u64..4_000, 0u64..120, 0u64..30_000, 0..3usize), 1..120)) {
        let policy = format!("[[limits]]\ntype = \"azure-openai-token-limit\"\ncounter_key = \"ip\"\ntokens_per_minute = {tpm}\nremaining_tokens_header_name = \"left\"\n");
        let mut gw = LimitBook::new(&common::policy(&policy), 3);
        // Events: (time, phase, index); responses are scheduled at arrival + latency.
        let mut t = 0;
        let mut events: Vec<(u64, u8, usize)> = Vec::new();
        for (i, &(gap_ms, _, _, _)) in calls.iter().enumerate() {
            t += gap_ms * 1_000_000;
            events.push((t, 0, i));
        }
        let mut charged: Vec<Vec<(u64, u64)>> = vec![Vec::new(); 3];
        let (mut reported, mut total_charged) = (0, 0);
        let mut ids = vec![None; calls.len()];
        while let Some(pos) = (0..events.len()).min_by_key(|&k| events[k]) {
            let (now, phase, i) = events.swap_remove(pos);
            let (_, tokens, latency_ms, caller) = calls[i];
            let window: u64 = charged[caller].iter().filter(|&&(at, _)| at + 60 * SEC > now).map(|&(_, n)| n).sum();
            if phase == 0 {
                let d = gw.handle_request(Nanos(now), &req(caller));
                prop_assert_eq!(matches!(d, RequestDecision::Forward(_)), window < tpm, "at {} window {}", now, window);
                if let RequestDecision::Forward(a) = d {
                    ids[i] = Some(a.id);
                    events.push((now + latency_ms * 1_000_000, 1, i));
                }
            } else {
                let info = ResponseInfo { status: Some(200), total_tokens: tokens, ..ResponseInfo::default() };
                let done = gw.handle_response(Nanos(now), ids[i].unwrap(), &info).unwrap();
                charged[caller].push((now, tokens));
                reported += tokens;
                total_charged += done.tokens_charged;
                let left = tpm.saturating_sub(window + tokens);
                prop_assert_eq!(done.headers, vec![("left".to_owned(), left.to_string())]);
            }
        }
        prop_assert_eq!(total_charged, reported);
        prop_assert_eq!(gw.in_flight_count(), 0);
    }
}

/// Every kind of counter (see the file's comment).
const ALL_COUNTERS: &str = include_str!("data/all-counters.toml");

/// Feeds timed calls (gap, caller, latency, status, tokens, max_tokens) to
/// `gateways`, call i to gateway i % n; after every event the changes the gateway
/// made are applied to the others at once. Returns every decision and header.
fn replay_shared(gateways: &mut [LimitBook], calls: &[(u64, usize, u64, u16, u64, u64)]) -> Vec<String> {
    let mut events: Vec<(u64, u8, usize)> = Vec::new();
    let mut t = 0;
    for (i, call) in calls.iter().enumerate() {
        t += call.0 * 1_000_000;
        events.push((t, 0, i));
    }
    let mut ids = vec![None; calls.len()];
    let mut seen = Vec::new();
    while let Some(pos) = (0..events.len()).min_by_key(|&k| events[k]) {
        let (now, phase, i) = events.swap_remove(pos);
        let (_, caller, latency_ms, status, tokens, max_tokens) = calls[i];
        let g = i % gateways.len();
        if phase == 0 {
            let req = RequestInfo { max_tokens: Some(max_tokens), prompt_tokens_estimate: Some(20), ..req(caller) };
            match gateways[g].handle_request(Nanos(now), &req) {
                RequestDecision::Forward(a) => {
                    ids[i] = Some(a.id);
                    events.push((now + latency_ms * 1_000_000, 1, i));
                    seen.push(format!("{i} in"));
                }
                RequestDecision::Reject(r) => {
                    seen.push(format!("{i} {} {:?} {:?}", r.status, r.retry_after_secs, r.headers))
                }
            }
        } else {
            let info = ResponseInfo {
                status: Some(status),
                total_tokens: tokens,
                request_bytes: 100,
                response_bytes: 4 * tokens,
            };
            let done = gateways[g].handle_response(Nanos(now), ids[i].unwrap(), &info).unwrap();
            seen.push(format!("{i} out {:?}", done.headers));
        }
        while let Some(delta) = gateways[g].poll_delta() {
            for (_, gw) in gateways.iter_mut().enumerate().filter(|&(o, _)| o != g) {
                gw.handle_delta(Nanos(now), &delta);
            }
        }
    }
    seen
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 100, ..ProptestConfig::default() })]

    /// Replicas that hand each other every counter change at once decide exactly
    /// as one gateway does: the journal loses nothing and counts nothing twice.
    #[test]
    fn replicas_with_instant_sync_decide_as_one_gateway(
        replicas in 2usize..4,
        calls in prop::collection::vec((0u64..3_000, 0..3usize, 0u64..8_000, prop::sample::select(vec![200u16, 200, 429, 500]), 0u64..300, 1u64..200), 1..150),
    ) {
        let policy = common::policy(ALL_COUNTERS);
        let mut one = [LimitBook::new(&policy, 1)];
        let mut many: Vec<LimitBook> = (0..replicas).map(|r| LimitBook::new(&policy, r as u64)).collect();
        many.iter_mut().for_each(LimitBook::enable_journal);
        // A single gateway is its own shared store: give it the same schedule.
        let single = replay_shared(&mut one, &calls);
        let shared = replay_shared(&mut many, &calls);
        prop_assert_eq!(single, shared);
    }
}
