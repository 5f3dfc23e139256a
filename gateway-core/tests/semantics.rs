//! One test per sentence of the semantics in the crate README.

mod common;

use common::{call, check, check_at, run_at};
use gateway_core::time::parse_rfc3339;
use gateway_core::{Change, KeyExpr, LimitBook, Nanos, RequestDecision, RequestInfo, ResponseInfo, Subscription};

const RATE_2_PER_60: &str = r#"
[[limits]]
type = "rate-limit-by-key"
calls = 2
renewal_period = 60
counter_key = "ip"
"#;

#[test]
fn sliding_window_edges_are_half_open() {
    // Calls at 0 s and 1 s fill the window; the call at 0 s leaves it at exactly 60 s.
    check(
        RATE_2_PER_60,
        &[call(0, "a"), call(1_000, "a"), call(2_000, "a"), call(59_999, "a"), call(60_000, "a"), call(60_001, "a")],
        &["ok", "ok", "429@0/58", "429@0/1", "ok", "429@0/1"],
    );
}

#[test]
fn retry_after_rounds_up_to_whole_seconds() {
    // At 2.5 s the oldest call (0 s) leaves at 60 s: 57.5 s, shown as 58.
    check(RATE_2_PER_60, &[call(0, "a"), call(1_000, "a"), call(2_500, "a")], &["ok", "ok", "429@0/58"]);
}

#[test]
fn keys_are_counted_apart() {
    check(RATE_2_PER_60, &[call(0, "a"), call(0, "a"), call(0, "b"), call(0, "a")], &["ok", "ok", "ok", "429@0/60"]);
}

#[test]
fn rejected_calls_are_not_counted() {
    let one_per_60 = RATE_2_PER_60.replace("calls = 2", "calls = 1");
    // If the rejected call at 30 s counted, the call at 60 s would be rejected.
    check(&one_per_60, &[call(0, "a"), call(30_000, "a"), call(60_000, "a")], &["ok", "429@0/30", "ok"]);
}

#[test]
fn increment_count_counts_each_call_that_many_times() {
    let policy = format!("{RATE_2_PER_60}increment_count = 2\n").replace("calls = 2", "calls = 5");
    check(&policy, &[call(0, "a"), call(0, "a"), call(0, "a")], &["ok", "ok", "429@0/60"]);
}

#[test]
fn a_passed_call_counts_at_once_even_when_a_later_policy_rejects() {
    let policy = r#"
[[limits]]
type = "rate-limit-by-key"
calls = 2
renewal_period = 60
counter_key = "ip"

[[limits]]
type = "rate-limit-by-key"
calls = 1
renewal_period = 60
counter_key = { const = "global" }
"#;
    check(policy, &[call(0, "a"), call(1_000, "a"), call(2_000, "a")], &["ok", "429@1/59", "429@0/58"]);
}

const DEFERRED: &str = r#"
[[limits]]
type = "rate-limit-by-key"
calls = 1
renewal_period = 60
counter_key = "ip"
increment_condition = "200-399"
"#;

#[test]
fn deferred_increment_counts_only_matching_statuses() {
    check(
        DEFERRED,
        &[call(0, "a").status(Some(500)), call(1_000, "a").status(None), call(2_000, "a"), call(3_000, "a")],
        &["ok", "ok", "ok", "429@0/59"],
    );
}

#[test]
fn deferred_increment_checks_on_the_way_in_and_counts_on_the_way_out() {
    // The first call's response comes at 10 s, so the second call (5 s) is admitted,
    // the third (11 s) is not, and the window runs from the response time.
    check(
        DEFERRED,
        &[
            call(0, "a").latency(10_000),
            call(5_000, "a").status(Some(404)),
            call(11_000, "a"),
            call(69_999, "a"),
            call(70_000, "a"),
        ],
        &["ok", "ok", "429@0/59", "429@0/1", "ok"],
    );
}

#[test]
fn deferred_increment_is_settled_against_a_later_rejection() {
    let policy = format!(
        "{DEFERRED}\n[[limits]]\ntype = \"rate-limit-by-key\"\ncalls = 1\nrenewal_period = 60\ncounter_key = {{ const = \"g\" }}\n"
    )
    .replace("\"200-399\"", "\"any\"")
    .replacen("calls = 1", "calls = 2", 1);
    // The second call passes limit 0 and is rejected by limit 1 with 429, which
    // matches "any", so limit 0 counts it: the third call is rejected by limit 0.
    check(&policy, &[call(0, "a"), call(1_000, "a"), call(2_000, "a")], &["ok", "429@1/59", "429@0/58"]);
}

#[test]
fn token_bucket_refills_continuously() {
    let policy = r#"
[[limits]]
type = "rate-limit-by-key"
calls = 2
renewal_period = 10
counter_key = "ip"
algorithm = "token-bucket"
"#;
    // Capacity 2, one call back every 5 s.
    check(
        policy,
        &[
            call(0, "a"),
            call(0, "a"),
            call(0, "a"),
            call(4_999, "a"),
            call(5_000, "a"),
            call(5_000, "a"),
            call(20_000, "a"),
            call(20_000, "a"),
            call(20_000, "a"),
        ],
        &["ok", "ok", "429@0/5", "429@0/1", "ok", "429@0/5", "ok", "ok", "429@0/5"],
    );
}

#[test]
fn rate_limit_is_keyed_by_subscription() {
    let policy = "[[limits]]\ntype = \"rate-limit\"\ncalls = 1\nrenewal_period = 10\n";
    check(policy, &[call(0, "a"), call(0, "b"), call(0, "a")], &["ok", "ok", "429@0/10"]);
}

fn at(text: &str) -> Nanos {
    parse_rfc3339(text).unwrap()
}

const QUOTA_2_PER_HOUR: &str = r#"
[[limits]]
type = "quota-by-key"
calls = 2
renewal_period = 3600
counter_key = "ip"
first_period_start = "2024-01-01T00:00:00Z"
"#;

#[test]
fn quota_windows_are_fixed_and_aligned_to_first_period_start() {
    check_at(
        QUOTA_2_PER_HOUR,
        at("2024-01-01T00:30:00Z"),
        &[
            call(0, "a"),
            call(1_000, "a"),
            call(2_000, "a"),
            call(1_800_000, "a"),
            call(1_800_000, "a"),
            call(1_800_000, "a"),
        ],
        &["ok", "ok", "403@0/1798", "ok", "ok", "403@0/3600"],
    );
}

#[test]
fn quota_rejection_texts() {
    let (_, headers) =
        run_at(QUOTA_2_PER_HOUR, at("2024-01-01T00:30:00Z"), &[call(0, "a"), call(0, "a"), call(0, "a")]);
    assert_eq!(
        headers[2],
        vec![("Content-Type".into(), "application/json".into()), ("Retry-After".into(), "1800".into())]
    );
    let mut gw = LimitBook::new(&common::policy(QUOTA_2_PER_HOUR), 1);
    let req = common::request_for(&call(0, "a"));
    let now = at("2024-01-01T00:30:00Z");
    for _ in 0..2 {
        let RequestDecision::Forward(a) = gw.handle_request(now, &req) else { panic!("admitted") };
        gw.handle_response(now, a.id, &ResponseInfo { status: Some(200), ..Default::default() }).unwrap();
    }
    let RequestDecision::Reject(r) = gw.handle_request(now, &req) else { panic!("rejected") };
    assert_eq!(
        r.body,
        r#"{"statusCode": 403, "message": "Out of call volume quota. Quota will be replenished in 00:30:00."}"#
    );
}

#[test]
fn quota_default_first_period_start_is_year_one() {
    // 0001-01-01 is a whole number of days before 1970, so daily windows start at midnight UTC.
    let policy = "[[limits]]\ntype = \"quota-by-key\"\ncalls = 1\nrenewal_period = 86400\ncounter_key = \"ip\"\n";
    check_at(
        policy,
        at("2024-03-05T23:59:58Z"),
        &[call(0, "a"), call(1_000, "a"), call(2_000, "a")],
        &["ok", "403@0/1", "ok"],
    );
    // A first period start before 1970 that is not day-aligned shifts the windows.
    let shifted = format!("{policy}first_period_start = \"1969-12-31T12:00:00Z\"\n");
    check_at(
        &shifted,
        at("2024-03-05T11:59:59Z"),
        &[call(0, "a"), call(0, "a"), call(1_000, "a")],
        &["ok", "403@0/1", "ok"],
    );
}

#[test]
fn quota_with_period_zero_never_renews() {
    let policy = "[[limits]]\ntype = \"quota-by-key\"\ncalls = 1\nrenewal_period = 0\ncounter_key = \"ip\"\n";
    check(policy, &[call(0, "a"), call(1_000, "a"), call(400_000_000_000, "a")], &["ok", "403@0/-", "403@0/-"]);
    let (_, headers) = run_at(policy, Nanos::from_secs(5), &[call(0, "a"), call(0, "a")]);
    assert_eq!(headers[1], vec![("Content-Type".into(), "application/json".into())]);
}

#[test]
fn quota_that_starts_in_the_future_still_counts() {
    let policy = QUOTA_2_PER_HOUR.replace("2024-01-01", "2030-01-01");
    check_at(
        &policy,
        at("2024-01-01T00:59:59Z"),
        &[call(0, "a"), call(0, "a"), call(0, "a"), call(1_000, "a")],
        &["ok", "ok", "403@0/1", "ok"],
    );
}

#[test]
fn bandwidth_quota_counts_request_and_response_bytes_when_the_response_completes() {
    let policy =
        "[[limits]]\ntype = \"quota-by-key\"\nbandwidth = \"1 KB\"\nrenewal_period = 60\ncounter_key = \"ip\"\n";
    // The first call's 2,000 bytes count only when its response completes at 5 s, so
    // the call at 1 s is admitted; at 6 s the window holds 2,100 bytes. The start
    // (1,700,000,000 s) is 20 s into a minute, so the window ends 40 s in.
    check(
        policy,
        &[call(0, "a").bytes(2_000).latency(5_000), call(1_000, "a").bytes(100), call(6_000, "a"), call(7_000, "a")],
        &["ok", "ok", "403@0/34", "403@0/33"],
    );
}

#[test]
fn bandwidth_rejection_text() {
    let policy =
        "[[limits]]\ntype = \"quota-by-key\"\nbandwidth = \"1 KB\"\nrenewal_period = 60\ncounter_key = \"ip\"\n";
    let mut gw = LimitBook::new(&common::policy(policy), 1);
    let req = common::request_for(&call(0, "a"));
    let RequestDecision::Forward(a) = gw.handle_request(Nanos::from_secs(60), &req) else { panic!() };
    gw.handle_response(
        Nanos::from_secs(60),
        a.id,
        &ResponseInfo { status: Some(200), request_bytes: 24, response_bytes: 1000, ..Default::default() },
    )
    .unwrap();
    let RequestDecision::Reject(r) = gw.handle_request(Nanos::from_secs(61), &req) else { panic!() };
    assert_eq!(
        r.body,
        r#"{"statusCode": 403, "message": "Out of bandwidth quota. Quota will be replenished in 00:00:59."}"#
    );
}

#[test]
fn quota_with_increment_condition_is_deferred() {
    let policy = format!("{QUOTA_2_PER_HOUR}increment_condition = \"200\"\n");
    check_at(
        &policy,
        at("2024-01-01T00:30:00Z"),
        &[call(0, "a").status(Some(201)), call(0, "a").latency(10), call(1, "a"), call(2, "a"), call(20, "a")],
        &["ok", "ok", "ok", "ok", "403@0/1800"],
    );
}

#[test]
fn a_policy_that_never_ran_counts_nothing() {
    let policy = r#"
[[limits]]
type = "rate-limit-by-key"
calls = 1
renewal_period = 60
counter_key = "ip"

[[limits]]
type = "quota-by-key"
calls = 2
renewal_period = 3600
counter_key = "ip"
first_period_start = "2024-01-01T00:00:00Z"
"#;
    // The call at 1 s is rejected by the rate limit before the quota runs, so the
    // quota still admits the call at 61 s.
    check_at(
        policy,
        at("2024-01-01T00:00:00Z"),
        &[call(0, "a"), call(1_000, "a"), call(61_000, "a"), call(122_000, "a")],
        &["ok", "429@0/59", "ok", "403@1/3478"],
    );
}

const TPM_100: &str = r#"
[[limits]]
type = "azure-openai-token-limit"
counter_key = "ip"
tokens_per_minute = 100
remaining_tokens_header_name = "remaining-tokens"
tokens_consumed_header_name = "consumed-tokens"
"#;

#[test]
fn tokens_are_counted_when_the_response_completes() {
    // Without an estimate a request is rejected only once counted tokens reach the limit.
    check(
        TPM_100,
        &[
            call(0, "a").tokens(60).latency(3_000),
            call(1_000, "a").tokens(50),
            call(2_000, "a"),
            call(3_001, "a"),
            call(60_999, "a"),
            call(61_000, "a"),
        ],
        &["ok", "ok", "ok", "429@0/58", "429@0/1", "ok"],
    );
}

#[test]
fn token_limit_reaches_but_does_not_pass_tokens_per_minute() {
    check(TPM_100, &[call(0, "a").tokens(99), call(1, "a").tokens(1), call(2, "a")], &["ok", "ok", "429@0/60"]);
}

#[test]
fn token_estimate_rejects_when_counted_plus_estimate_exceeds() {
    let policy = TPM_100.replace("tokens_per_minute = 100", "tokens_per_minute = 100\nestimate_prompt_tokens = true");
    check(
        &policy,
        &[
            call(0, "a").tokens(60),
            call(1_000, "a").estimate(40).tokens(40),
            call(2_000, "a").estimate(1),
            call(2_000, "b").estimate(101),
        ],
        &["ok", "ok", "429@0/58", "429@0/1"],
    );
}

#[test]
fn token_headers_carry_counts_after_this_request() {
    let (_, headers) = run_at(TPM_100, Nanos::from_secs(100), &[call(0, "a").tokens(30), call(1_000, "a").tokens(45)]);
    assert_eq!(headers[0], vec![("remaining-tokens".into(), "70".into()), ("consumed-tokens".into(), "30".into())]);
    assert_eq!(headers[1], vec![("remaining-tokens".into(), "25".into()), ("consumed-tokens".into(), "45".into())]);
}

#[test]
fn token_rejection_texts() {
    let policy = TPM_100.replace(
        "counter_key",
        "retry_after_header_name = \"x-retry\"\nretry_after_variable_name = \"wait\"\ncounter_key",
    );
    let mut gw = LimitBook::new(&common::policy(&policy), 1);
    let req = common::request_for(&call(0, "a"));
    let RequestDecision::Forward(a) = gw.handle_request(Nanos::from_secs(10), &req) else { panic!() };
    gw.handle_response(
        Nanos::from_secs(10),
        a.id,
        &ResponseInfo { status: Some(200), total_tokens: 500, ..Default::default() },
    )
    .unwrap();
    let RequestDecision::Reject(r) = gw.handle_request(Nanos::from_millis(10_500), &req) else { panic!() };
    assert_eq!(r.status, 429);
    assert_eq!(r.body, r#"{"statusCode": 429, "message": "Token limit is exceeded. Try again in 60 seconds."}"#);
    assert_eq!(
        r.headers,
        vec![
            ("Content-Type".into(), "application/json".into()),
            ("x-retry".into(), "60".into()),
            ("remaining-tokens".into(), "0".into())
        ]
    );
    assert_eq!(r.variables, vec![("wait".to_owned(), 60)]);
}

#[test]
fn token_bucket_goes_into_debt_and_repays_it() {
    let policy = TPM_100.replace("tokens_per_minute = 100", "tokens_per_minute = 100\nalgorithm = \"token-bucket\"");
    // 160 tokens take the bucket to -60: it refills 100 per 60 s, so it is above
    // zero again just after 36 s.
    check(
        policy.as_str(),
        &[call(0, "a").tokens(160), call(1, "a"), call(36_000, "a"), call(36_001, "a")],
        &["ok", "429@0/36", "429@0/1", "ok"],
    );
}

#[test]
fn token_quota_uses_utc_calendar_periods() {
    let policy = r#"
[[limits]]
type = "llm-token-limit"
counter_key = "ip"
token_quota = 100
token_quota_period = "Hourly"
remaining_quota_tokens_header_name = "quota-left"
"#;
    let start = at("2024-05-01T10:15:00Z");
    check_at(
        policy,
        start,
        &[call(0, "a").tokens(100), call(1_000, "a"), call(2_700_000, "a")],
        &["ok", "403@0/2699", "ok"],
    );
    let (_, headers) = run_at(policy, start, &[call(0, "a").tokens(40)]);
    assert_eq!(headers[0], vec![("quota-left".to_owned(), "60".to_owned())]);
}

#[test]
fn token_quota_rejection_text() {
    let policy = "[[limits]]\ntype = \"llm-token-limit\"\ncounter_key = \"ip\"\ntoken_quota = 10\ntoken_quota_period = \"Daily\"\n";
    let mut gw = LimitBook::new(&common::policy(policy), 1);
    let req = common::request_for(&call(0, "a"));
    let now = at("2024-05-01T22:00:00Z");
    let RequestDecision::Forward(a) = gw.handle_request(now, &req) else { panic!() };
    gw.handle_response(now, a.id, &ResponseInfo { status: Some(200), total_tokens: 10, ..Default::default() }).unwrap();
    let RequestDecision::Reject(r) = gw.handle_request(now, &req) else { panic!() };
    assert_eq!((r.status, r.retry_after_secs), (403, Some(7200)));
    assert_eq!(r.body, r#"{"statusCode": 403, "message": "Token quota is exceeded. Try again in 02:00:00."}"#);
}

#[test]
fn calendar_periods_align_to_utc() {
    use gateway_core::CalendarPeriod::*;
    let cases = [
        (Hourly, "2024-02-29T10:15:00Z", "2024-02-29T10:00:00Z", "2024-02-29T11:00:00Z"),
        (Daily, "2024-02-29T10:15:00Z", "2024-02-29T00:00:00Z", "2024-03-01T00:00:00Z"),
        (Weekly, "2024-02-29T10:15:00Z", "2024-02-26T00:00:00Z", "2024-03-04T00:00:00Z"),
        (Monthly, "2024-02-29T10:15:00Z", "2024-02-01T00:00:00Z", "2024-03-01T00:00:00Z"),
        (Yearly, "2024-02-29T10:15:00Z", "2024-01-01T00:00:00Z", "2025-01-01T00:00:00Z"),
        (Monthly, "2024-12-31T23:59:59Z", "2024-12-01T00:00:00Z", "2025-01-01T00:00:00Z"),
    ];
    for (period, now, start, end) in cases {
        assert_eq!(period.bounds(at(now)), (at(start), at(end)), "{period:?} at {now}");
    }
}

#[test]
fn rate_limit_headers_and_variables() {
    let policy = format!(
        "{RATE_2_PER_60}remaining_calls_header_name = \"x-left\"\ntotal_calls_header_name = \"x-total\"\nremaining_calls_variable_name = \"left\"\nretry_after_header_name = \"x-wait\"\n"
    );
    let (outcomes, headers) = run_at(&policy, Nanos::from_secs(0), &[call(0, "a"), call(0, "a"), call(0, "a")]);
    assert_eq!(outcomes, ["ok", "ok", "429@0/60"]);
    assert_eq!(headers[0], vec![("x-left".into(), "1".into()), ("x-total".into(), "2".into())]);
    assert_eq!(headers[1], vec![("x-left".into(), "0".into()), ("x-total".into(), "2".into())]);
    assert_eq!(
        headers[2],
        vec![
            ("Content-Type".into(), "application/json".into()),
            ("x-wait".into(), "60".into()),
            ("x-left".into(), "0".into()),
            ("x-total".into(), "2".into())
        ]
    );
    let mut gw = LimitBook::new(&common::policy(&policy), 0);
    let RequestDecision::Forward(a) = gw.handle_request(Nanos::ZERO, &common::request_for(&call(0, "a"))) else {
        panic!()
    };
    assert_eq!(a.variables, vec![("left".to_owned(), 1)]);
}

#[test]
fn policies_sharing_counter_key_and_kind_increment_once() {
    let policy = format!("{RATE_2_PER_60}\n{}", RATE_2_PER_60.replace("calls = 2", "calls = 3"));
    // If the request counted twice, the second call would already be rejected.
    check(&policy, &[call(0, "a"), call(1_000, "a"), call(2_000, "a")], &["ok", "ok", "429@0/58"]);
    // Different elements never share: a rate-limit-by-key and a quota-by-key both count.
    let mixed = format!(
        "{RATE_2_PER_60}\n[[limits]]\ntype = \"quota-by-key\"\ncalls = 1\nrenewal_period = 60\ncounter_key = \"ip\"\n"
    );
    check_at(&mixed, Nanos::ZERO, &[call(0, "a"), call(1_000, "a")], &["ok", "403@1/59"]);
}

#[test]
fn time_never_goes_backwards() {
    let mut gw = LimitBook::new(&common::policy(RATE_2_PER_60), 0);
    let req = common::request_for(&call(0, "a"));
    assert!(matches!(gw.handle_request(Nanos::from_secs(100), &req), RequestDecision::Forward(_)));
    assert!(matches!(gw.handle_request(Nanos::from_secs(100), &req), RequestDecision::Forward(_)));
    // An earlier `now` is read as 100 s: the window is still full.
    let RequestDecision::Reject(r) = gw.handle_request(Nanos::from_secs(30), &req) else { panic!() };
    assert_eq!(r.retry_after_secs, Some(60));
}

#[test]
fn idle_counters_are_evicted() {
    let policy = format!("{RATE_2_PER_60}\n{TPM_100}");
    let mut gw = LimitBook::new(&common::policy(&policy), 0);
    for i in 0..1_000u64 {
        let req = RequestInfo { ip: format!("10.0.{}.{}", i / 256, i % 256), ..Default::default() };
        let now = Nanos::from_millis(i);
        let RequestDecision::Forward(a) = gw.handle_request(now, &req) else { panic!() };
        gw.handle_response(now, a.id, &ResponseInfo { status: Some(200), total_tokens: 5, ..Default::default() })
            .unwrap();
    }
    assert_eq!(gw.counter_count(), 2_000);
    assert_eq!(gw.in_flight_count(), 0);
    // Counters are looked at once the wheel's bucket of their due instant has passed.
    let lag = gateway_core::counters::EVICTION_LAG;
    let first_look = gw.poll_timeout().expect("counters are held");
    assert!(first_look > Nanos::from_millis(999) && first_look <= Nanos::from_millis(999) + lag);
    gw.handle_timeout(Nanos::from_secs(30));
    assert_eq!(gw.counter_count(), 2_000, "windows still hold calls");
    let next = gw.poll_timeout().expect("counters are held");
    assert!(next > Nanos::from_secs(60) && next <= Nanos::from_secs(60) + lag, "{next:?}");
    // Key i is idle at 60 s + i ms: none is evicted early, none held a bucket too long.
    let at = Nanos::from_millis(60_500);
    gw.handle_timeout(at);
    let idle_before_lag = (at - lag).0.div_ceil(1_000_000) - 60_000;
    assert!(gw.counter_count() >= 2 * 499, "keys 501.. are still active");
    assert!(gw.counter_count() <= 2 * (1_000 - idle_before_lag as usize), "{}", gw.counter_count());
    gw.handle_timeout(Nanos::from_millis(60_999) + lag);
    assert_eq!(gw.counter_count(), 0);
    assert_eq!(gw.poll_timeout(), None);
}

fn jwt(payload: &str) -> String {
    use base64::Engine;
    let enc = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    format!("Bearer {}.{}.c2lnbmF0dXJl", enc(r#"{"alg":"RS256"}"#), enc(payload))
}

#[test]
fn counter_keys_read_the_request() {
    let req = RequestInfo {
        ip: "203.0.113.9".into(),
        subscription: Some(Subscription { id: "sub-1".into(), key: "k1".into(), name: "team".into() }),
        product: Some("gold".into()),
        headers: vec![
            ("X-Team".into(), "blue".into()),
            ("authorization".into(), jwt(r#"{"sub":"alice","tid":42,"oid":null}"#)),
        ],
        prompt_tokens_estimate: None,
        max_tokens: None,
        choices: None,
    };
    let key = |toml_value: &str| -> String {
        #[derive(serde::Deserialize)]
        struct K {
            k: KeyExpr,
        }
        let k: K = toml::from_str(&format!("k = {toml_value}")).unwrap();
        k.k.eval(&req)
    };
    let cases = [
        ("\"ip\"", "203.0.113.9"),
        ("\"subscription_id\"", "sub-1"),
        ("\"subscription_key\"", "k1"),
        ("\"product\"", "gold"),
        ("{ header = { name = \"x-team\" } }", "blue"),
        ("{ header = { name = \"x-missing\", default = \"none\" } }", "none"),
        ("{ jwt = {} }", "alice"),
        ("{ jwt = { claim = \"tid\" } }", "42"),
        ("{ jwt = { claim = \"oid\", default = \"anon\" } }", "anon"),
        ("{ jwt = { claim = \"sub\", header = \"x-team\", default = \"bad-token\" } }", "bad-token"),
        ("{ const = \"all\" }", "all"),
        ("{ concat = [\"product\", { const = \":\" }, { jwt = {} }] }", "gold:alice"),
    ];
    for (expr, expected) in cases {
        assert_eq!(key(expr), expected, "{expr}");
    }
    let bare = RequestInfo::default();
    assert_eq!(KeyExpr::SubscriptionId.eval(&bare), "");
}

#[test]
fn a_late_delta_counts_from_when_the_call_was_made() {
    let mut a = LimitBook::new(&common::policy(RATE_2_PER_60), 0);
    let mut b = LimitBook::new(&common::policy(RATE_2_PER_60), 1);
    a.enable_journal();
    let req = common::request_for(&call(0, "a"));
    let secs = Nanos::from_secs;
    // Two calls on A at 10 s; B hears of them 5 s later and its window is then full.
    for _ in 0..2 {
        let RequestDecision::Forward(admitted) = a.handle_request(secs(10), &req) else { panic!() };
        a.handle_response(secs(10), admitted.id, &ResponseInfo { status: Some(200), ..Default::default() }).unwrap();
    }
    let deltas: Vec<_> = std::iter::from_fn(|| a.poll_delta()).collect();
    assert_eq!(deltas.len(), 2, "{deltas:?}");
    assert!(deltas.iter().all(|d| d.at == secs(10) && d.key == req.ip && d.change == Change::Count(1)));
    assert!(matches!(b.handle_request(secs(14), &req), RequestDecision::Forward(_)), "not heard of yet");
    deltas.iter().for_each(|d| b.handle_delta(secs(15), d));
    let RequestDecision::Reject(r) = b.handle_request(secs(16), &req) else { panic!("three calls in the window") };
    // B's own call at 14 s stays; the calls counted at 10 s leave at 70 s, not 75 s.
    assert_eq!(r.retry_after_secs, Some(54));
    assert!(matches!(b.handle_request(Nanos::from_millis(70_001), &req), RequestDecision::Forward(_)));
}
