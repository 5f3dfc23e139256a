//! `limitlab policy check` and `limitlab policy import` as users run them.

mod common;

use common::limitlab;

#[test]
fn check_summarises_understood_files_and_locates_errors() {
    let (code, out, _) = limitlab(&["policy", "check", "policies/seed-ip-limits.xml"]);
    assert_eq!(code, 0);
    assert!(out.contains("rate-limit-by-key: 10 calls per 60 s by client IP"), "{out}");
    assert!(out.contains("switch to secondary"), "{out}");
    let bad = std::env::temp_dir().join(format!("limitlab-bad-policy-{}.xml", std::process::id()));
    std::fs::write(
        &bad,
        "<policies>\n<inbound>\n<rate-limit calls=\"x\" renewal-period=\"60\" />\n</inbound>\n</policies>\n",
    )
    .unwrap();
    let (code, _, err) = limitlab(&["policy", "check", bad.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains(&format!("{}:3:", bad.display())) && err.contains("`x` is not a whole number"), "{err}");
    std::fs::remove_file(bad).unwrap();
    let (code, _, err) = limitlab(&["policy", "check", "policies/seed-jwt-limits.xml"]);
    assert_eq!(code, 2, "an undefined named value");
    assert!(err.contains("policies/seed-jwt-limits.xml:20:"), "{err}");
}

#[test]
fn check_reads_a_native_toml_policy_as_toml_not_as_xml() {
    let (code, out, err) = limitlab(&["policy", "check", "policies/seed-ip-limits.toml"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("rate-limit-by-key: 10 calls per 60 s by client IP"), "{out}");
    let bad = std::env::temp_dir().join(format!("limitlab-bad-policy-{}.toml", std::process::id()));
    std::fs::write(
        &bad,
        "[[limits]]\ntype = \"rate-limit-by-key\"\ncalls = 10\nrenewal_period = 400\ncounter_key = \"ip\"\n",
    )
    .unwrap();
    let (code, _, err) = limitlab(&["policy", "check", bad.to_str().unwrap()]);
    std::fs::remove_file(&bad).unwrap();
    assert_eq!(code, 2);
    assert!(err.contains(&format!("{}:1:1: limits[0]: rate-limit-by-key: `renewal_period`", bad.display())), "{err}");
}

#[test]
fn a_statement_block_in_a_counter_key_is_an_error_not_one_shared_counter() {
    let file = std::env::temp_dir().join(format!("limitlab-block-policy-{}.xml", std::process::id()));
    let key = "@{ var ip = context.Request.IpAddress; return ip.Substring(0, 7); }";
    let xml = format!("<policies>\n<inbound>\n<rate-limit-by-key calls=\"10\" renewal-period=\"60\" counter-key=\"{key}\" />\n</inbound>\n</policies>\n");
    std::fs::write(&file, xml).unwrap();
    let (code, out, err) = limitlab(&["policy", "check", file.to_str().unwrap()]);
    std::fs::remove_file(&file).unwrap();
    assert_eq!(code, 2, "{out}");
    assert!(err.contains(&format!("{}:3:64:", file.display())), "{err}");
    assert!(err.contains("a statement block `@{ ... }` is not supported"), "{err}");
}

#[test]
fn every_error_of_a_policy_file_comes_in_file_order_with_its_line() {
    let file = std::env::temp_dir().join(format!("limitlab-errors-policy-{}.xml", std::process::id()));
    let xml = "<policies>\n<inbound>\n<rate-limit calls=\"x\" renewal-period=\"60\" />\n\
               <quota-by-key calls=\"1\" renewal-period=\"60\" counter-key=\"@{ return 1; }\" />\n\
               <rate-limit-by-kye calls=\"1\" renewal-period=\"60\" counter-key=\"x\" />\n</inbound>\n</policies>\n";
    std::fs::write(&file, xml).unwrap();
    let (code, _, err) = limitlab(&["policy", "check", file.to_str().unwrap()]);
    std::fs::remove_file(&file).unwrap();
    assert_eq!(code, 2);
    let located: Vec<&str> = err.lines().filter(|l| l.starts_with(file.to_str().unwrap())).collect();
    assert_eq!(located.len(), 3, "{err}");
    let lines: Vec<&str> = located.iter().map(|l| l.split(':').nth(1).unwrap()).collect();
    assert_eq!(lines, ["3", "4", "5"], "{err}");
    assert!(located[0].contains("`x` is not a whole number"), "{err}");
    assert!(located[1].contains("statement block"), "{err}");
    assert!(located[2].contains("did you mean <rate-limit-by-key>?"), "{err}");
    // Each located line is followed by the offending source line.
    assert_eq!(err.lines().count(), 6, "{err}");
    assert!(err.lines().nth(1).unwrap().trim_start().starts_with("<rate-limit calls=\"x\""), "{err}");
}

#[test]
fn import_prints_native_toml_that_loads_as_the_same_policy() {
    let (code, out, _) = limitlab(&["policy", "import", "policies/seed-ip-limits.xml"]);
    assert_eq!(code, 0);
    let imported = gateway_core_policy(&out);
    let native = gateway_core_policy(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../policies/seed-ip-limits.toml")).unwrap(),
    );
    assert_eq!(imported, native);
}

fn gateway_core_policy(text: &str) -> String {
    // Compare through the core's own reading, normalised to TOML.
    let policy = gateway_core::Policy::from_toml(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    toml::to_string(&policy).unwrap()
}

/// A failed write to standard output (here a full disk) is an error the command
/// reports with exit status 2, not a panic.
#[test]
fn a_full_stdout_is_an_error_not_a_panic() {
    let full = std::fs::File::create("/dev/full").expect("Linux has /dev/full");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_limitlab"))
        .args(["policy", "check", "policies/seed-ip-limits.xml"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .stdout(full)
        .output()
        .expect("limitlab runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("writing to standard output"), "{stderr}");
}

#[test]
fn decide_reserves_max_tokens_for_each_completion_a_logged_request_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("reserve.toml");
    std::fs::write(
        &policy,
        "[[limits]]\ntype = \"azure-openai-token-limit\"\ncounter_key = \"ip\"\ntokens_per_minute = 1000\n\
         estimate_prompt_tokens = true\nreserve = true\n",
    )
    .unwrap();
    // 10 + 4 x 300 does not fit in 1,000; 10 + 3 x 300 does.
    let requests = dir.path().join("requests.jsonl");
    std::fs::write(
        &requests,
        "{\"t_ms\": 0, \"ip\": \"a\", \"prompt_tokens\": 10, \"max_tokens\": 300, \"n\": 4}\n\
         {\"t_ms\": 1, \"ip\": \"b\", \"prompt_tokens\": 10, \"max_tokens\": 300, \"n\": 3}\n",
    )
    .unwrap();
    let (code, out, err) = limitlab(&["decide", policy.to_str().unwrap(), requests.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("2 requests: 1 admitted"), "{out}");
}
