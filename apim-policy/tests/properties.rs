//! Round trips of random native policies through XML, and random or mutated input
//! that must give an answer (a policy or one message), never a panic.

use apim_policy::{read, write, ReadOptions};
use gateway_core::{KeyExpr, Limit, Policy};
use proptest::prelude::*;

fn text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 :._\"&<'-]{0,8}"
}

fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z][a-zA-Z0-9-]{0,10}"
}

fn leaf_key() -> impl Strategy<Value = KeyExpr> {
    prop_oneof![
        Just(KeyExpr::Ip),
        Just(KeyExpr::SubscriptionId),
        Just(KeyExpr::SubscriptionKey),
        Just(KeyExpr::SubscriptionName),
        Just(KeyExpr::Product),
        (name(), text()).prop_map(|(name, default)| KeyExpr::Header { name, default }),
        (prop_oneof![Just("sub".to_owned()), "[a-z]{1,6}"], name(), prop_oneof![Just(String::new()), text()])
            .prop_map(|(claim, header, default)| KeyExpr::Jwt { claim, header, default }),
        "[a-zA-Z0-9:._-]{1,8}".prop_map(KeyExpr::Const),
    ]
}

fn key() -> impl Strategy<Value = KeyExpr> {
    prop_oneof![leaf_key(), prop::collection::vec(leaf_key(), 2..4).prop_map(KeyExpr::Concat)]
}

/// A non-empty status set within 100-599, as merged ranges.
fn condition() -> impl Strategy<Value = String> {
    prop::collection::vec((100u16..600, 0u16..80), 1..4).prop_map(|spans| {
        let mut on = [false; 500];
        for (start, len) in spans {
            for s in start..(start + len + 1).min(600) {
                on[(s - 100) as usize] = true;
            }
        }
        let mut ranges = Vec::new();
        let mut i = 0;
        while i < 500 {
            if on[i] {
                let j = (i..500).find(|&j| !on[j]).unwrap_or(500);
                ranges.push(if j - 1 == i { format!("{}", i + 100) } else { format!("{}-{}", i + 100, j + 99) });
                i = j;
            } else {
                i += 1;
            }
        }
        ranges.join(", ")
    })
}

/// One limit's random draws, before they become its TOML table.
struct Draw {
    condition: Option<String>,
    count: u64,
    period: u64,
    big: u64,
    names: Vec<Option<String>>,
    flag: bool,
    pick: u8,
}

impl Draw {
    /// Sets each field of `fields` whose drawn name is there.
    fn set_names(&self, t: &mut toml::Table, fields: &[&str]) {
        for (field, name) in fields.iter().zip(&self.names) {
            if let Some(name) = name {
                t.insert((*field).to_owned(), name.as_str().into());
            }
        }
    }

    fn set_condition(&self, t: &mut toml::Table) {
        if let Some(c) = &self.condition {
            t.insert("increment_condition".into(), c.as_str().into());
        }
    }
}

fn limit() -> impl Strategy<Value = toml::Table> {
    let names = prop::collection::vec(prop::option::of(name()), 8);
    (0usize..6, key(), prop::option::of(condition()), 1u64..5, 1u64..300, 1u64..1_000_000, names, any::<bool>(), 0u8..4)
        .prop_map(|(kind, key, condition, count, period, big, names, flag, pick)| {
            let draw = Draw { condition, count, period, big, names, flag, pick };
            let element = [
                "rate-limit",
                "rate-limit-by-key",
                "quota",
                "quota-by-key",
                "azure-openai-token-limit",
                "llm-token-limit",
            ][kind];
            let mut t = toml::Table::new();
            t.insert("type".into(), element.into());
            if kind % 2 == 1 || kind >= 4 {
                t.insert("counter_key".into(), toml::Value::try_from(&key).unwrap());
            }
            match kind {
                0 | 1 => rate_limit_fields(&mut t, &draw),
                2 | 3 => quota_fields(&mut t, &draw),
                _ => token_limit_fields(&mut t, &draw),
            }
            t
        })
}

fn rate_limit_fields(t: &mut toml::Table, d: &Draw) {
    t.insert("calls".into(), (d.big as i64 % 1000 + 1).into());
    t.insert("renewal_period".into(), (d.period as i64).into());
    t.insert("increment_count".into(), (d.count as i64).into());
    d.set_condition(t);
    d.set_names(
        t,
        &[
            "retry_after_header_name",
            "retry_after_variable_name",
            "remaining_calls_header_name",
            "remaining_calls_variable_name",
            "total_calls_header_name",
        ],
    );
}

fn quota_fields(t: &mut toml::Table, d: &Draw) {
    if d.pick != 1 {
        t.insert("calls".into(), (d.big as i64).into());
    }
    if d.pick >= 1 {
        t.insert("bandwidth".into(), format!("{} KB", d.big % 100_000 + 1).into());
    }
    t.insert("renewal_period".into(), (d.period as i64 * 1000).into());
    t.insert("increment_count".into(), (d.count as i64).into());
    let start = format!("20{:02}-0{}-1{}T0{}:00:00Z", d.big % 30, 1 + d.pick, d.pick, d.pick);
    t.insert("first_period_start".into(), start.into());
    d.set_condition(t);
}

fn token_limit_fields(t: &mut toml::Table, d: &Draw) {
    if d.pick != 1 {
        t.insert("tokens_per_minute".into(), (d.big as i64).into());
    }
    if d.pick >= 1 {
        t.insert("token_quota".into(), (d.big as i64 * 7).into());
        t.insert("token_quota_period".into(), ["Hourly", "Daily", "Weekly", "Monthly"][d.pick as usize].into());
    }
    t.insert("estimate_prompt_tokens".into(), d.flag.into());
    d.set_names(
        t,
        &[
            "retry_after_header_name",
            "retry_after_variable_name",
            "remaining_tokens_header_name",
            "remaining_tokens_variable_name",
            "tokens_consumed_header_name",
            "tokens_consumed_variable_name",
            "remaining_quota_tokens_header_name",
            "remaining_quota_tokens_variable_name",
        ],
    );
}

proptest! {
    /// Any native policy that APIM's XML can express comes back unchanged.
    #[test]
    fn native_policies_round_trip_through_xml(tables in prop::collection::vec(limit(), 1..5)) {
        let limits: Vec<Limit> = tables
            .into_iter()
            .map(|t| toml::Value::Table(t.clone()).try_into().unwrap_or_else(|e| panic!("generated an invalid limit {t:?}: {e}")))
            .collect();
        let policy = Policy { limits };
        let xml = write(&policy, None);
        let doc = read(&xml, &ReadOptions::default()).map_err(|e| TestCaseError::fail(format!("{e}\n{xml}")))?;
        prop_assert_eq!(doc.policy, policy, "{}", xml);
    }

    /// Random bytes give an error, not a panic.
    #[test]
    fn random_input_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        let _ = read(&String::from_utf8_lossy(&bytes), &ReadOptions::default());
    }

    /// The seed policy, cut, spliced and sprinkled with characters, gives a policy
    /// or one message with a position inside the text, never a panic.
    #[test]
    fn mutated_policies_never_panic(edits in prop::collection::vec((0usize..5000, 0usize..40, prop::sample::select(vec!["", "<", ">", "\"", "&", "@(", ")", "=", "x", "-1", "&&", "</when>", "<retry>"])), 1..6)) {
        let mut xml = include_str!("../../policies/seed-ip-limits.xml").to_owned();
        for (at, cut, insert) in edits {
            let mut at = at % (xml.len() + 1);
            while !xml.is_char_boundary(at) { at -= 1; }
            let mut end = (at + cut).min(xml.len());
            while !xml.is_char_boundary(end) { end -= 1; }
            xml.replace_range(at..end, insert);
        }
        if let Err(e) = read(&xml, &ReadOptions::default()) {
            prop_assert!(e.line >= 1 && e.line as usize <= xml.lines().count() + 1, "{} for\n{}", e, xml);
            prop_assert!(!e.message.is_empty());
        }
    }
}
