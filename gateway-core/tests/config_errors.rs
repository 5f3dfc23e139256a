//! Bad configuration is a clear error that names the field (and the TOML line), never a panic.

use gateway_core::Policy;

/// Asserts that `toml_text` is refused with a message containing every `needle`.
fn check(toml_text: &str, needles: &[&str]) {
    let err = Policy::from_toml(toml_text).expect_err("bad configuration must be refused");
    for needle in needles {
        assert!(err.contains(needle), "error does not mention `{needle}`:\n{err}");
    }
}

const RATE: &str = "[[limits]]\ntype = \"rate-limit-by-key\"\ncalls = 10\nrenewal_period = 60\ncounter_key = \"ip\"\n";

#[test]
fn rate_limit_errors() {
    check(&RATE.replace("calls = 10", "calls = 0"), &["`calls` must be at least 1", "line 1"]);
    check(&RATE.replace("renewal_period = 60", "renewal_period = 301"), &["`renewal_period`", "1 to 300", "301"]);
    check(&RATE.replace("renewal_period = 60", "renewal_period = 0"), &["`renewal_period`"]);
    check(&RATE.replace("calls = 10", "cals = 10"), &["unknown field `cals`", "calls"]);
    check(&RATE.replace("calls = 10", "calls = -1"), &["calls"]);
    check(&RATE.replace("counter_key = \"ip\"", "counter_key = \"ipaddress\""), &["ipaddress", "ip"]);
    check(&RATE.replace("counter_key = \"ip\"", ""), &["rate-limit-by-key", "`counter_key` is required"]);
    check(&RATE.replace("-by-key", ""), &["`counter_key` is not allowed", "rate-limit-by-key"]);
    check(&format!("{RATE}increment_count = 0\n"), &["`increment_count`"]);
    check(&format!("{RATE}increment_condition = \"2xx\"\n"), &["`2xx`", "200-399"]);
    check(&format!("{RATE}algorithm = \"leaky\"\n"), &["leaky", "sliding-window", "token-bucket"]);
    check(&RATE.replace("rate-limit-by-key", "rate-limit-by-ky"), &["rate-limit-by-ky", "rate-limit-by-key"]);
}

#[test]
fn quota_errors() {
    let quota =
        "[[limits]]\ntype = \"quota-by-key\"\nbandwidth = \"10 KB\"\nrenewal_period = 60\ncounter_key = \"ip\"\n";
    check(&quota.replace("\"10 KB\"", "10"), &["bandwidth", "no unit", "10 KB"]);
    check(&quota.replace("\"10 KB\"", "\"10 parsecs\""), &["bandwidth", "parsecs"]);
    check(&quota.replace("bandwidth = \"10 KB\"", "calls = 0"), &["`calls` must be at least 1"]);
    check(&quota.replace("bandwidth = \"10 KB\"\n", ""), &["needs `calls`, `bandwidth` or both"]);
    check(&format!("{quota}first_period_start = \"yesterday\"\n"), &["first_period_start", "RFC 3339"]);
    check(&format!("{quota}renewal_period_s = 1\n"), &["unknown field `renewal_period_s`"]);
}

#[test]
fn token_limit_errors() {
    let tokens = "[[limits]]\ntype = \"azure-openai-token-limit\"\ncounter_key = \"ip\"\ntokens_per_minute = 500\n";
    check(&tokens.replace("500", "0"), &["`tokens_per_minute` must be at least 1"]);
    check(&tokens.replace("tokens_per_minute = 500", "token_quota = 100"), &["`token_quota_period`"]);
    check(&format!("{tokens}token_quota_period = \"Daily\"\n"), &["`token_quota` is not"]);
    check(&format!("{tokens}token_quota = 5\ntoken_quota_period = \"Fortnightly\"\n"), &["Fortnightly", "Daily"]);
    check(&tokens.replace("tokens_per_minute = 500", ""), &["needs `tokens_per_minute`, `token_quota` or both"]);
    check(&tokens.replace("counter_key = \"ip\"\n", ""), &["counter_key"]);
    check(&format!("{tokens}estimate_prompt_tokens = \"yes\"\n"), &["estimate_prompt_tokens"]);
}

#[test]
fn the_line_of_the_bad_limit_is_named() {
    let two = format!("{RATE}\n{}", RATE.replace("calls = 10", "calls = 0"));
    check(&two, &["line 7"]);
}

#[test]
fn good_policies_round_trip_through_toml() {
    let text = format!(
        "{RATE}\n[[limits]]\ntype = \"quota\"\ncalls = 5\nbandwidth = \"2 MB\"\nrenewal_period = 0\nfirst_period_start = \"1900-01-01T00:00:00Z\"\nincrement_condition = \"200-299, 304\"\n\n[[limits]]\ntype = \"llm-token-limit\"\ncounter_key = {{ concat = [\"ip\", {{ jwt = {{}} }}] }}\ntoken_quota = 9\ntoken_quota_period = \"Monthly\"\nalgorithm = \"token-bucket\"\n"
    );
    let policy = Policy::from_toml(&text).unwrap();
    let again = Policy::from_toml(&toml::to_string(&policy).unwrap()).unwrap();
    assert_eq!(policy, again);
}
