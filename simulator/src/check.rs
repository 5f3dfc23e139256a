//! `limitlab check`: the scenario's promises (`[[expect]]`) against many perturbed
//! runs, with proptest's search and shrinking, so a failure comes back as the
//! smallest perturbation found that breaks a promise.

use crate::scenario::{Arrival, Scenario};
use crate::sweep;
use gateway_core::time::HumanDuration;
use mock_aoai::Dist;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};
use serde::Serialize;
use std::path::Path;

/// One perturbed case.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Case {
    pub rate_scale: f64,
    pub token_scale: f64,
    pub burstiness: f64,
    pub fault_shift_s: i64,
    pub seed: u64,
}

/// A broken promise, at the smallest case found.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Failure {
    pub promise: String,
    pub measured: f64,
    pub case: Case,
    /// The case as a scenario file `limitlab simulate` reproduces.
    pub scenario: String,
}

pub fn validate(scenario: &Scenario) -> Result<(), String> {
    for (i, e) in scenario.expect.iter().enumerate() {
        if e.never_rejected.is_some() == e.figure.is_some() {
            return Err(format!(
                "expect[{i}]: give `never_rejected = \"CLIENT\"` or a `figure` with `at_most`/`at_least`"
            ));
        }
        if e.figure.is_some() && e.at_most.is_none() && e.at_least.is_none() {
            return Err(format!("expect[{i}]: `{}` needs `at_most` or `at_least`", e.figure()));
        }
        let slo = sweep::parse_slo(&format!("{}<=0", e.figure())).map_err(|m| format!("expect[{i}]: {m}"))?;
        if slo.figure != "max_key_tokens_per_minute" {
            sweep::check_slos(scenario, &[slo]).map_err(|m| format!("expect[{i}]: {m}"))?;
        }
    }
    let b = &scenario.check;
    for (name, [lo, hi]) in [("rate_scale", b.rate_scale), ("token_scale", b.token_scale)] {
        if !(lo > 0.0 && lo <= hi && hi.is_finite()) {
            return Err(format!("check.{name}: need 0 < low <= high, got [{lo}, {hi}]"));
        }
    }
    let [lo, hi] = b.burstiness;
    if !(lo >= 1.0 && lo <= hi && hi <= 60.0) {
        return Err(format!("check.burstiness: need 1 <= low <= high <= 60, got [{lo}, {hi}]"));
    }
    if b.fault_shift_s[0] > b.fault_shift_s[1] {
        return Err(format!("check.fault_shift_s: need low <= high, got {:?}", b.fault_shift_s));
    }
    Ok(())
}

/// The scenario moved by a case: rates and token sizes scaled, the seed set.
pub fn perturb(scenario: &Scenario, case: Case) -> Scenario {
    let mut s = scenario.clone();
    s.seed = case.seed;
    for c in &mut s.clients {
        let r = case.rate_scale;
        match &mut c.arrival {
            Arrival::Constant { rate_per_s } | Arrival::Poisson { rate_per_s } | Arrival::Bursts { rate_per_s, .. } => {
                *rate_per_s *= r
            }
            Arrival::Ramp { from_per_s, to_per_s } => {
                *from_per_s *= r;
                *to_per_s *= r;
            }
            Arrival::Daily { peak_per_s, trough_per_s, .. } => {
                *peak_per_s *= r;
                *trough_per_s *= r;
            }
            Arrival::Trace { .. } => {}
        }
        scale(&mut c.prompt_tokens, case.token_scale);
        scale(&mut c.completion_tokens, case.token_scale);
        burst(&mut c.arrival, case.burstiness);
    }
    for b in &mut s.backends {
        let shift = |d: &mut gateway_core::time::HumanDuration| {
            let ns = (d.0 .0 as i128 + case.fault_shift_s as i128 * 1_000_000_000).max(0);
            d.0 = gateway_core::Nanos(ns as u64);
        };
        for o in &mut b.faults.outages {
            shift(&mut o.start);
            shift(&mut o.end);
        }
        for spike in &mut b.faults.latency_spikes {
            shift(&mut spike.start);
            shift(&mut spike.end);
        }
    }
    s
}

/// Packs a client's arrivals into bursts `b` times as dense, keeping its average.
fn burst(arrival: &mut Arrival, b: f64) {
    if b <= 1.0 {
        return;
    }
    let minute = gateway_core::Nanos::from_secs(60);
    let on_of = |cycle: gateway_core::Nanos| gateway_core::Nanos((cycle.0 as f64 / b) as u64);
    *arrival = match arrival.clone() {
        Arrival::Constant { rate_per_s } | Arrival::Poisson { rate_per_s } => {
            let on = on_of(minute);
            Arrival::Bursts { rate_per_s: rate_per_s * b, on: HumanDuration(on), off: HumanDuration(minute - on) }
        }
        Arrival::Bursts { rate_per_s, on, off } => {
            let cycle = on.0 + off.0;
            let new_on = gateway_core::Nanos((on.0 .0 as f64 / b) as u64).max(gateway_core::Nanos(1));
            Arrival::Bursts {
                rate_per_s: rate_per_s * b,
                on: HumanDuration(new_on),
                off: HumanDuration(cycle - new_on),
            }
        }
        other => other,
    };
}

fn scale(d: &mut Dist, k: f64) {
    match d {
        Dist::Fixed(v) => *v *= k,
        Dist::Uniform { min, max } => {
            *min *= k;
            *max *= k;
        }
        Dist::Normal { mean, std } => {
            *mean *= k;
            *std *= k;
        }
        Dist::LogNormal(d) => *d = d.scaled(k),
        Dist::Empirical(values) => values.iter_mut().for_each(|v| *v *= k),
    }
}

/// The first broken promise of a case, with its measured figure.
fn broken(scenario: &Scenario, base: &Path, case: Case) -> Result<Option<(String, f64)>, String> {
    let outcome = crate::run(&perturb(scenario, case), base, None, false)?;
    let figures = sweep::figures(&outcome.report);
    for e in &scenario.expect {
        let value = figures.get(&e.figure()).copied().unwrap_or(f64::NAN);
        let (lo, hi) = e.bounds();
        if !(lo <= value && value <= hi) {
            return Ok(Some((e.describe(), value)));
        }
    }
    Ok(None)
}

/// Runs `cases` perturbed cases from `seed`; `Ok(None)` when every promise held.
pub fn check(scenario: &Scenario, base: &Path, cases: u32, seed: u64) -> Result<Option<Failure>, String> {
    validate(scenario)?;
    let b = scenario.check.clone();
    let shift = b.fault_shift_s[0]..=b.fault_shift_s[1];
    let strategy = (range(b.rate_scale), range(b.token_scale), range(b.burstiness), shift, any::<u64>()).prop_map(
        |(rate_scale, token_scale, burstiness, fault_shift_s, seed)| Case {
            rate_scale,
            token_scale,
            burstiness,
            fault_shift_s,
            seed,
        },
    );
    let config = Config { cases, failure_persistence: None, max_shrink_iters: 256, ..Config::default() };
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &key));
    let result = runner.run(&strategy, |case| match broken(scenario, base, case) {
        Ok(None) => Ok(()),
        Ok(Some((promise, value))) => Err(TestCaseError::fail(format!("{promise}\u{0}{value}"))),
        Err(e) => Err(TestCaseError::fail(format!("error\u{0}{e}"))),
    });
    match result {
        Ok(()) => Ok(None),
        Err(TestError::Fail(why, case)) => {
            let (promise, value) = why.message().split_once('\u{0}').unwrap_or((why.message(), ""));
            if promise == "error" {
                return Err(value.to_owned());
            }
            let reproduce = perturb(scenario, case);
            let text = toml::to_string(&reproduce).map_err(|e| e.to_string())?;
            Ok(Some(Failure {
                promise: promise.to_owned(),
                measured: value.parse().unwrap_or(f64::NAN),
                case,
                scenario: text,
            }))
        }
        Err(TestError::Abort(why)) => Err(format!("the check stopped: {why}")),
    }
}

/// A factor in `[lo, hi]` in steps of 0.001, as an integer so that proptest
/// shrinks it toward `lo` (the smallest perturbation of that kind).
fn range([lo, hi]: [f64; 2]) -> BoxedStrategy<f64> {
    let (lo_m, hi_m) = ((lo * 1000.0).round() as u64, (hi * 1000.0).round() as u64);
    if lo_m >= hi_m {
        return Just(lo).boxed();
    }
    (lo_m..=hi_m).prop_map(|m| m as f64 / 1000.0).boxed()
}
