//! Time as the core sees it: plain numbers handed in by the driver.
//!
//! The core never reads a clock. Every entry point takes `now: Nanos`, a count of
//! nanoseconds since the Unix epoch, and every duration is a `Nanos` too. Instants
//! before 1970 (APIM's default `first_period_start` is `0001-01-01T00:00:00Z`) are
//! represented as signed [`EpochSeconds`] and all window arithmetic on them is done
//! in `i128`, so no value a user can write overflows.

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Timelike, Utc};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::ops::{Add, Sub};

pub const NANOS_PER_SEC: u64 = 1_000_000_000;

/// Nanoseconds. As an instant: since the Unix epoch. As a span: a duration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Nanos(pub u64);

impl Nanos {
    pub const ZERO: Nanos = Nanos(0);
    pub const MAX: Nanos = Nanos(u64::MAX);

    pub const fn from_secs(secs: u64) -> Nanos {
        Nanos(secs.saturating_mul(NANOS_PER_SEC))
    }

    pub const fn from_millis(ms: u64) -> Nanos {
        Nanos(ms.saturating_mul(1_000_000))
    }

    /// The span as a standard duration, for drivers that sleep.
    pub fn into_std(self) -> std::time::Duration {
        std::time::Duration::from_nanos(self.0)
    }

    pub fn as_secs_f64(self) -> f64 {
        self.0 as f64 / NANOS_PER_SEC as f64
    }

    pub fn saturating_sub(self, other: Nanos) -> Nanos {
        Nanos(self.0.saturating_sub(other.0))
    }

    pub fn saturating_add(self, other: Nanos) -> Nanos {
        Nanos(self.0.saturating_add(other.0))
    }

    /// Whole seconds, rounded up, and never below one: the value APIM puts in
    /// `Retry-After`, which promises the caller that waiting this long is enough.
    pub fn retry_after_secs(self) -> u64 {
        self.0.div_ceil(NANOS_PER_SEC).max(1)
    }

    /// The instant as a UTC date-time, for calendar arithmetic.
    pub fn to_utc(self) -> DateTime<Utc> {
        let secs = (self.0 / NANOS_PER_SEC) as i64;
        let nanos = (self.0 % NANOS_PER_SEC) as u32;
        Utc.timestamp_opt(secs, nanos).single().expect("every u64 nanosecond instant is a valid UTC time")
    }

    /// The UTC date-time as an instant; times before the epoch clamp to zero,
    /// times after the last instant (2554-07-21) to it.
    pub fn from_utc(t: DateTime<Utc>) -> Nanos {
        Nanos(Nanos::nanos_of(t).clamp(0, u64::MAX as i128) as u64)
    }

    /// The UTC date-time as an instant, if one represents it.
    pub fn try_from_utc(t: DateTime<Utc>) -> Option<Nanos> {
        u64::try_from(Nanos::nanos_of(t)).ok().map(Nanos)
    }

    fn nanos_of(t: DateTime<Utc>) -> i128 {
        t.timestamp() as i128 * NANOS_PER_SEC as i128 + t.timestamp_subsec_nanos() as i128
    }
}

impl Add for Nanos {
    type Output = Nanos;
    fn add(self, rhs: Nanos) -> Nanos {
        self.saturating_add(rhs)
    }
}

impl Sub for Nanos {
    type Output = Nanos;
    fn sub(self, rhs: Nanos) -> Nanos {
        self.saturating_sub(rhs)
    }
}

impl fmt::Display for Nanos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.3}s", self.as_secs_f64())
    }
}

/// Seconds since the Unix epoch, signed, so that `0001-01-01T00:00:00Z` fits.
/// In configuration it is written as an RFC 3339 instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EpochSeconds(pub i64);

impl EpochSeconds {
    /// APIM's default `first-period-start`.
    pub const APIM_DEFAULT: EpochSeconds = EpochSeconds(-62_135_596_800);

    pub fn as_nanos_i128(self) -> i128 {
        self.0 as i128 * NANOS_PER_SEC as i128
    }
}

impl Default for EpochSeconds {
    fn default() -> Self {
        EpochSeconds::APIM_DEFAULT
    }
}

impl Serialize for EpochSeconds {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let t =
            Utc.timestamp_opt(self.0, 0).single().ok_or_else(|| serde::ser::Error::custom("instant out of range"))?;
        s.serialize_str(&t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
    }
}

impl<'de> Deserialize<'de> for EpochSeconds {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let t = DateTime::parse_from_rfc3339(&text).map_err(|e| {
            serde::de::Error::custom(format!("`{text}` is not an RFC 3339 instant such as 2024-01-01T00:00:00Z: {e}"))
        })?;
        Ok(EpochSeconds(t.timestamp()))
    }
}

/// A calendar period of a token quota, aligned to the UTC calendar.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum CalendarPeriod {
    Hourly,
    Daily,
    /// Weeks start on Monday 00:00 UTC (ISO 8601).
    Weekly,
    Monthly,
    Yearly,
}

impl CalendarPeriod {
    /// The half-open period `[start, end)` that contains `now`.
    pub fn bounds(self, now: Nanos) -> (Nanos, Nanos) {
        let t = now.to_utc();
        let start_date = match self {
            CalendarPeriod::Hourly => {
                let start = t.date_naive().and_hms_opt(t.hour(), 0, 0).expect("valid hour");
                let start = Utc.from_utc_datetime(&start);
                return (Nanos::from_utc(start), Nanos::from_utc(start + chrono::Duration::hours(1)));
            }
            CalendarPeriod::Daily => t.date_naive(),
            CalendarPeriod::Weekly => {
                t.date_naive() - chrono::Duration::days(t.weekday().num_days_from_monday() as i64)
            }
            CalendarPeriod::Monthly => NaiveDate::from_ymd_opt(t.year(), t.month(), 1).expect("valid month"),
            CalendarPeriod::Yearly => NaiveDate::from_ymd_opt(t.year(), 1, 1).expect("valid year"),
        };
        let end_date = match self {
            CalendarPeriod::Hourly => unreachable!("handled above"),
            CalendarPeriod::Daily => start_date + chrono::Duration::days(1),
            CalendarPeriod::Weekly => start_date + chrono::Duration::days(7),
            CalendarPeriod::Monthly => start_date.checked_add_months(chrono::Months::new(1)).expect("valid month"),
            CalendarPeriod::Yearly => start_date.checked_add_months(chrono::Months::new(12)).expect("valid year"),
        };
        (midnight(start_date), midnight(end_date))
    }
}

fn midnight(date: NaiveDate) -> Nanos {
    Nanos::from_utc(Utc.from_utc_datetime(&date.and_hms_opt(0, 0, 0).expect("midnight exists")))
}

/// `HH:MM:SS` with hours not wrapped at a day, as the quota rejection message shows it.
pub fn format_hh_mm_ss(secs: u64) -> String {
    format!("{:02}:{:02}:{:02}", secs / 3600, (secs / 60) % 60, secs % 60)
}

/// An instant as RFC 3339 in UTC with microseconds, as logs show it.
pub fn format_rfc3339(at: Nanos) -> String {
    let at = Utc.timestamp_nanos(i64::try_from(at.0).unwrap_or(i64::MAX));
    at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// Parses an RFC 3339 instant into [`Nanos`]; used by drivers and tests.
pub fn parse_rfc3339(text: &str) -> Result<Nanos, String> {
    let t = DateTime::parse_from_rfc3339(text).map_err(|e| format!("`{text}` is not an RFC 3339 instant: {e}"))?;
    // Refused rather than clamped: every instant past the end would silently be
    // the same one.
    Nanos::try_from_utc(t.with_timezone(&Utc)).ok_or_else(|| match t.timestamp() < 0 {
        true => format!("`{text}` is before 1970-01-01T00:00:00Z, which the simulated clock cannot represent"),
        false => format!("`{text}` is after {LAST_INSTANT}, the last instant the simulated clock can represent"),
    })
}

/// `Nanos(u64::MAX)` as a date.
pub const LAST_INSTANT: &str = "2554-07-21T23:34:33Z";

/// Parses a human-readable duration: `"250ms"`, `"90s"`, `"1.5s"`, `"5m"`, `"1h"`,
/// `"2d"`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Nanos, String> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 =
        number.parse().map_err(|_| format!("`{text}` is not a duration like \"90s\", \"5m\" or \"1h\""))?;
    let unit_ns = match unit.trim() {
        "ns" => 1.0,
        "us" | "µs" => 1e3,
        "ms" => 1e6,
        "" | "s" => 1e9,
        "m" | "min" => 60e9,
        "h" => 3_600e9,
        "d" => 86_400e9,
        other => return Err(format!("`{other}` is not a duration unit; use ms, s, m, h or d")),
    };
    let ns = value * unit_ns;
    if !ns.is_finite() || ns > u64::MAX as f64 {
        return Err(format!("`{text}` is too long a duration"));
    }
    Ok(Nanos(ns.round() as u64))
}

/// A duration written for people in config files: `"90s"`, `"1h"`, or a number of seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HumanDuration(pub Nanos);

impl Serialize for HumanDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let ns = self.0 .0;
        match ns.is_multiple_of(1_000_000) {
            true if ns.is_multiple_of(NANOS_PER_SEC) => s.serialize_str(&format!("{}s", ns / NANOS_PER_SEC)),
            true => s.serialize_str(&format!("{}ms", ns / 1_000_000)),
            false => s.serialize_str(&format!("{ns}ns")),
        }
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration like \"90s\", \"5m\", \"1h\" or a number of seconds")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<HumanDuration, E> {
                parse_duration(v).map(HumanDuration).map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<HumanDuration, E> {
                Ok(HumanDuration(Nanos::from_secs(v)))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<HumanDuration, E> {
                u64::try_from(v)
                    .map(|v| HumanDuration(Nanos::from_secs(v)))
                    .map_err(|_| E::custom("a duration cannot be negative"))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<HumanDuration, E> {
                parse_duration(&v.to_string()).map(HumanDuration).map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}
