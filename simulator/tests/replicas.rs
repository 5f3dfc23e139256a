//! Replicas and their counters: local counters multiply a limit by the replica
//! count, one shared counter is exact, and a shared store with lag lands between.

use std::path::Path;

const LOCAL: &str = include_str!("../../scenarios/replicas-local.toml");

/// Calls admitted in ten minutes of one call per second spread over three
/// replicas under 10 calls per 60 s, with the given `[gateway]` counter settings.
fn admitted(counters: &str) -> u64 {
    let text = LOCAL.replace("counters = \"local\"", counters);
    let scenario = simulator::Scenario::from_toml("replicas.toml", &text).unwrap_or_else(|e| panic!("{e}"));
    let outcome = simulator::run(&scenario, Path::new("."), None, false).unwrap();
    let client = &outcome.report.clients[0];
    assert_eq!(client.requests, 599);
    client.by_reason.get("ok").copied().unwrap_or(0)
}

#[test]
fn lag_moves_a_shared_limit_from_exact_towards_local() {
    assert_eq!(admitted("counters = \"local\""), 300, "three replicas, three times the limit");
    assert_eq!(admitted("counters = \"shared\""), 100, "one exact counter");
    let lags = ["1s", "5s", "20s", "40s", "59s"];
    let with_lag: Vec<u64> =
        lags.iter().map(|lag| admitted(&format!("counters = \"shared\"\nsync_lag = \"{lag}\""))).collect();
    assert!(with_lag.windows(2).all(|w| w[0] <= w[1]), "more lag, more admitted: {with_lag:?}");
    // One call per second round-robin: a replica's next call comes 3 s after its
    // last, so a 1 s lag hides nothing; 5 s to 40 s hide more and more.
    assert_eq!(with_lag[0], 100);
    assert!(with_lag[1] > 100 && with_lag[3] < 300, "{with_lag:?}");
    assert!(with_lag[1] < with_lag[2] && with_lag[2] < with_lag[3], "{with_lag:?}");
    // Changes heard of after they have left the window are moot: as good as local.
    assert_eq!(admitted("counters = \"shared\"\nsync_lag = \"2m\""), 300);
}

#[test]
fn a_lag_needs_a_shared_store() {
    let text = LOCAL.replace("counters = \"local\"", "counters = \"local\"\nsync_lag = \"1s\"");
    let err = simulator::Scenario::from_toml("replicas.toml", &text).unwrap_err();
    assert!(err.contains("`gateway.sync_lag`") && err.contains("counters = \"shared\""), "{err}");
}
