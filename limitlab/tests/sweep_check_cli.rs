//! `limitlab sweep` and `limitlab check` as users and CI run them.

mod common;

use common::limitlab;

#[test]
fn check_exits_0_when_promises_hold_1_when_one_breaks_2_on_bad_input() {
    let dir = std::env::temp_dir().join(format!("limitlab-check-cli-{}", std::process::id()));
    let out = dir.to_str().unwrap();
    let (code, stdout, _) = limitlab(&["check", "scenarios/tenant-tpm.toml", "--cases", "20", "--out", out]);
    assert_eq!(code, 0, "{stdout}");
    let (code, stdout, _) = limitlab(&["check", "scenarios/tenant-tpm-raised.toml", "--cases", "20", "--out", out]);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("FAILED: client.chat-") && stdout.contains("reproduce: limitlab simulate"), "{stdout}");
    let (code, reproduced, _) = limitlab(&["simulate", &format!("{out}/failing-case.toml"), "--out", out]);
    assert_eq!(code, 0, "{reproduced}");
    let (code, _, err) = limitlab(&["check", "scenarios/seed-ip-limits.toml"]);
    assert_eq!(code, 2, "no promises is bad input");
    assert!(err.contains("no [[expect]] promises"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_sweep_of_ten_values_and_ten_seeds_recommends_a_point() {
    let dir = std::env::temp_dir().join(format!("limitlab-sweep-cli-{}", std::process::id()));
    let out = dir.to_str().unwrap();
    let (code, stdout, err) = limitlab(&[
        "sweep",
        "scenarios/seed-ip-limits.toml",
        "--vary",
        "backends.primary.tpm=10000..100000:10000",
        "--seeds",
        "10",
        "--slo",
        "backend.primary.throttled_ratio<=0.05",
        "--out",
        out,
    ]);
    assert_eq!(code, 0, "{stdout}{err}");
    assert!(stdout.contains("recommended: backends.primary.tpm = "), "{stdout}");
    for file in ["sweep.json", "sweep.csv", "sweep.html", "sweep-0.svg", "sweep-0.png"] {
        assert!(dir.join(file).exists(), "{file}");
    }
    let csv = std::fs::read_to_string(dir.join("sweep.csv")).unwrap();
    assert_eq!(csv.lines().count(), 11, "a header and one row per grid point");
    let (code, _, err) = limitlab(&["sweep", "scenarios/seed-ip-limits.toml", "--vary", "backends.primry.tpm=1,2"]);
    assert_eq!(code, 2);
    assert!(err.contains("backends.primary.tpm"), "{err}");
    // Options that cannot mean anything are refused before any run.
    let vary = ["sweep", "scenarios/seed-ip-limits.toml", "--vary", "backends.primary.tpm=1000"];
    for (flag, value, message) in [
        ("--seeds", "0", "--seeds must be at least 1"),
        ("--jobs", "0", "--jobs must be at least 1"),
        ("--pass-share", "1.5", "--pass-share is a share of seeds, 0 to 1"),
    ] {
        let (code, _, err) = limitlab(&[&vary[..], &[flag, value]].concat());
        assert_eq!((code, err.contains(message)), (2, true), "{flag} {value}: {err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_sweep_without_an_slo_recommends_nothing_and_one_over_demand_is_refused() {
    let dir = std::env::temp_dir().join(format!("limitlab-sweep-questions-{}", std::process::id()));
    let out = dir.to_str().unwrap();
    let grid = ["sweep", "scenarios/seed-ip-limits.toml", "--seeds", "1", "--out", out];
    let (code, stdout, err) = limitlab(&[&grid[..], &["--vary", "gateway.policy.rate_limit.calls=1,10"]].concat());
    assert_eq!(code, 0, "{err}");
    assert!(!stdout.contains("recommended:"), "{stdout}");
    assert!(stdout.contains("no --slo given") && stdout.contains("rejected"), "{stdout}");
    let demand = ["--vary", "clients.power-user.callers=1,2"];
    let (code, _, err) = limitlab(&[&grid[..], &demand].concat());
    assert_eq!(code, 2);
    assert!(err.contains("changes a client's demand") && err.contains("--allow-demand"), "{err}");
    let (code, _, err) = limitlab(&[&grid[..], &demand, &["--allow-demand"]].concat());
    assert_eq!(code, 0, "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
