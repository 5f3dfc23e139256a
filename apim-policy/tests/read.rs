//! Reading APIM policy XML: the seed articles, the shapes of the public GenAI
//! samples, round trips, and bad input.

use apim_policy::{read, write, ReadOptions};
use gateway_core::{KeyExpr, Limit};
use std::collections::BTreeMap;

const SEED_1: &str = include_str!("../../policies/seed-ip-limits.xml");
const SEED_2: &str = include_str!("../../policies/seed-jwt-limits.xml");

fn toml_of(limit: &Limit) -> String {
    toml::to_string(limit).unwrap()
}

#[test]
fn the_first_seed_article_reads_as_its_pipeline() {
    let doc = read(SEED_1, &ReadOptions::default()).unwrap();
    let limits: Vec<String> = doc.policy.limits.iter().map(toml_of).collect();
    let expected_policy = gateway_core::Policy::from_toml(include_str!("../../policies/seed-ip-limits.toml")).unwrap();
    assert_eq!(doc.policy, expected_policy, "{limits:#?}");
    assert_eq!(doc.backend_id.as_deref(), Some("primary"));
    let retry = doc.retry.as_ref().unwrap();
    assert_eq!(
        (retry.count, retry.interval, retry.delta, retry.max_interval, retry.first_fast_retry),
        (5, 1.0, Some(1.0), Some(8.0), false)
    );
    assert_eq!(retry.condition.to_string(), "429, >=500");
    assert_eq!(retry.switch.len(), 1);
    assert_eq!(
        (retry.switch[0].backend.as_str(), retry.switch[0].when.to_string()),
        ("secondary", "429, >=500".to_owned())
    );
    assert_eq!(doc.set_headers[0].name, "Content-Type");
    assert!(doc.warnings.is_empty(), "{:?}", doc.warnings);
    // The same routing as the native seed file.
    let mut routing: gateway_core::routing::Routing =
        toml::from_str(include_str!("../../policies/seed-failover-routing.toml")).unwrap();
    let native = routing.clone();
    routing.retry = None;
    routing.set_backend = "secondary".into();
    doc.apply_to(&mut routing).unwrap();
    assert_eq!(routing, native);
}

#[test]
fn the_second_seed_article_reads_as_its_pipeline() {
    let options =
        ReadOptions { named_values: BTreeMap::from([("backend-id".into(), "aoai".into())]), ..Default::default() };
    let doc = read(SEED_2, &options).unwrap();
    let l = &doc.policy.limits;
    assert_eq!(l.len(), 4);
    let Limit::QuotaByKey(q) = &l[1] else { panic!("{:?}", l[1]) };
    assert_eq!(
        (q.calls, q.bandwidth.map(|b| b.0), q.renewal_period),
        (Some(1_000_000), Some(10_000 * 1024), 2_629_800)
    );
    let Limit::RateLimitByKey(r) = &l[2] else { panic!() };
    assert_eq!(
        r.counter_key,
        Some(KeyExpr::Jwt { claim: "sub".into(), header: "Authorization".into(), default: String::new() })
    );
    let Limit::AzureOpenAiTokenLimit(t) = &l[3] else { panic!() };
    assert_eq!(
        (t.tokens_per_minute, t.remaining_tokens_variable_name.as_deref()),
        (Some(500), Some("remainingTokens"))
    );
    assert_eq!(doc.backend_id.as_deref(), Some("aoai"));
    assert_eq!(doc.managed_identity.as_deref(), Some("https://cognitiveservices.azure.com"));
    // Without the named value it is an error that names it.
    let err = read(SEED_2, &ReadOptions::default()).unwrap_err();
    assert!(err.message.contains("named value `{{backend-id}}`"), "{err}");
}

const GENAI_SAMPLE: &str = r#"<policies>
    <inbound>
        <base />
        <set-backend-service backend-id="openai-backend-pool" />
        <azure-openai-token-limit counter-key="@(context.Subscription.Id)" tokens-per-minute="10000" estimate-prompt-tokens="true" remaining-tokens-variable-name="remainingTokens" />
        <azure-openai-emit-token-metric namespace="openai">
            <dimension name="Subscription ID" value="@(context.Subscription.Id)" />
            <dimension name="Client IP" value="@(context.Request.IpAddress)" />
        </azure-openai-emit-token-metric>
        <llm-token-limit counter-key="@(context.Subscription.Id + &quot;-&quot; + context.Product.Name)" token-quota="100000" token-quota-period="Monthly" estimate-prompt-tokens="false" remaining-quota-tokens-header-name="x-quota-remaining" />
        <cache-lookup vary-by-developer="false" vary-by-developer-groups="false" />
    </inbound>
    <backend>
        <retry condition="@(context.Response.StatusCode == 429 || context.Response.StatusCode == 503)" count="2" interval="0" first-fast-retry="true">
            <forward-request buffer-request-body="true" timeout="120" />
        </retry>
    </backend>
    <outbound><base /></outbound>
    <on-error><base /></on-error>
</policies>"#;

#[test]
fn the_shapes_of_the_public_genai_samples_read() {
    let doc = read(GENAI_SAMPLE, &ReadOptions::default()).unwrap();
    assert_eq!(doc.policy.limits.len(), 2);
    let Limit::LlmTokenLimit(t) = &doc.policy.limits[1] else { panic!() };
    assert_eq!((t.token_quota, t.token_quota_period), (Some(100_000), Some(gateway_core::CalendarPeriod::Monthly)));
    assert_eq!(
        t.counter_key,
        KeyExpr::Concat(vec![KeyExpr::SubscriptionId, KeyExpr::Const("-".into()), KeyExpr::Product])
    );
    assert_eq!(doc.token_metrics[0].dimensions, ["Subscription ID", "Client IP"]);
    let retry = doc.retry.as_ref().unwrap();
    assert_eq!((retry.condition.to_string().as_str(), retry.first_fast_retry), ("429, 503", true));
    assert_eq!(doc.timeout, Some(120));
    // A priority pool with breakers, from the configuration, takes the retry.
    let mut routing: gateway_core::routing::Routing = toml::from_str(
        r#"
        set_backend = "openai-backend-pool"
        backends = [
            { id = "ptu", url = "https://ptu.openai.azure.com", circuit_breaker = { failure_count = 1, interval = 10, statuses = "429", trip_duration = 10, accept_retry_after = true } },
            { id = "paygo", url = "https://paygo.openai.azure.com" },
        ]
        pools = [{ id = "openai-backend-pool", strategy = "priority", members = [{ backend = "ptu", priority = 0 }, { backend = "paygo", priority = 1 }] }]
        "#,
    )
    .unwrap();
    doc.apply_to(&mut routing).unwrap();
    assert_eq!(routing.timeout, 120);
    // The cache is not modelled: a warning with its line, or an error with --strict.
    assert_eq!(doc.warnings.len(), 1);
    assert_eq!(doc.warnings[0].line, 11);
    assert!(doc.warnings[0].message.contains("<cache-lookup> is not modelled"));
    let strict = read(GENAI_SAMPLE, &ReadOptions { strict: true, ..Default::default() }).unwrap_err();
    assert_eq!((strict.line, strict.message.contains("--strict")), (11, true));
}

#[test]
fn bad_input_is_one_clear_message_with_its_place() {
    let check = |xml: &str, line: u32, column: u32, needle: &str| {
        let err = read(xml, &ReadOptions::default()).unwrap_err();
        assert!(err.message.contains(needle), "`{err}` lacks `{needle}`");
        assert_eq!((err.line, err.column), (line, column), "{err}");
    };
    check(
        "<policies><inbound>\n  <rate-limit calls=\"1\" renewal-period=\"1\" /></inboun></policies>",
        2,
        46,
        "malformed XML",
    );
    check(
        "<policies><inbound>\n  <rate-limit calls=\"10\" renewal-period=\"60\" colls=\"3\" />\n</inbound></policies>",
        2,
        3,
        "unknown field `colls`",
    );
    check(
        "<policies><inbound>\n  <rate-limit calls=\"ten\" renewal-period=\"60\" />\n</inbound></policies>",
        2,
        22,
        "`ten` is not a whole number",
    );
    check(
        "<policies><inbound>\n  <rate-limit-by-key calls=\"1\" renewal-period=\"60\" counter-key=\"@(context.Request.Url.Host)\" />\n</inbound></policies>",
        2,
        67,
        "unsupported expression `context.Request.Url.Host`",
    );
    check(
        "<policies><inbound><retry condition=\"@(true)\" count=\"51\" interval=\"1\" /></inbound></policies>",
        1,
        20,
        "1 to 50",
    );
    check(
        "<policies><inbound><retry condition=\"@(true)\" count=\"2\" interval=\"-1\" /></inbound></policies>",
        1,
        67,
        "<retry> `interval` must be a number of seconds, 0 or more, got -1",
    );
    check(
        "<policies><inbound><retry condition=\"@(true)\" count=\"2\" interval=\"1\" max-interval=\"inf\" /></inbound></policies>",
        1,
        84,
        "`max-interval` must be a number of seconds",
    );
    check("<policy/>", 1, 1, "not <policies>");
    check(
        "<policies><inbound>\n  <rate-limit-by-kye calls=\"1\" renewal-period=\"60\" counter-key=\"x\" />\n</inbound></policies>",
        2,
        3,
        "unknown element <rate-limit-by-kye>; did you mean <rate-limit-by-key>?",
    );
    check(
        "<policies><inbound><qouta calls=\"1\" renewal-period=\"60\" /></inbound></policies>",
        1,
        20,
        "did you mean <quota>?",
    );
}

#[test]
fn an_element_far_from_every_limit_stays_a_warning() {
    let doc = read("<policies><inbound><cors /></inbound></policies>", &ReadOptions::default()).unwrap();
    assert_eq!(doc.warnings.len(), 1);
    assert!(doc.warnings[0].message.contains("<cors> is not modelled"), "{}", doc.warnings[0]);
}

/// An expression outside the supported subset is an error at its place, never
/// read as literal text (which would put every caller on one counter).
#[test]
fn unsupported_expressions_are_errors_at_their_place() {
    let check = |attributes: &str, column: u32, needle: &str| {
        let xml = format!("<policies><inbound>\n  <rate-limit-by-key calls=\"1\" renewal-period=\"60\" {attributes} />\n</inbound></policies>");
        let err = read(&xml, &ReadOptions::default()).unwrap_err();
        assert!(err.message.contains(needle), "`{err}` lacks `{needle}`");
        assert_eq!((err.line, err.column), (2, column), "{err}");
    };
    let block = r#"counter-key="@{ var ip = context.Request.IpAddress; return ip.Substring(0, 7); }""#;
    check(block, 65, "a statement block `@{ ... }` is not supported");
    check(r#"counter-key="@(context.Request.IpAddress.Substring(0, 7))""#, 92, "unexpected `.Substring(0, 7)`");
    check(r#"counter-key="@(context.Request.IpAddress + 1)""#, 95, "unsupported expression `1`");
    check(r#"counter-key="@(context.Request.IpAddress) + x""#, 65, "only a whole `@( ... )` expression");
    check(r#"counter-key="ip" increment-count="@(2)""#, 86, "a policy expression is not supported here");
}

#[test]
fn writing_and_reading_back_gives_the_seed_policy() {
    let policy = gateway_core::Policy::from_toml(include_str!("../../policies/seed-ip-limits.toml")).unwrap();
    let routing: gateway_core::routing::Routing =
        toml::from_str(include_str!("../../policies/seed-failover-routing.toml")).unwrap();
    let xml = write(&policy, Some(&routing));
    let doc = read(&xml, &ReadOptions::default()).unwrap();
    assert_eq!(doc.policy, policy, "{xml}");
    assert_eq!(doc.retry, routing.retry, "{xml}");
}
