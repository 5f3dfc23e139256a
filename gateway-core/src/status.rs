//! Status-code predicates: increment conditions and (later) retry conditions.
//!
//! Written as a short text so that TOML stays readable: `"200-399"`, `"200"`,
//! `"429, 500-599"`, `">=500"`, `"429 || >= 500"`, or `"any"`.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A set of HTTP status codes, as inclusive ranges.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StatusPredicate {
    ranges: Vec<(u16, u16)>,
}

impl StatusPredicate {
    pub fn any() -> StatusPredicate {
        StatusPredicate { ranges: vec![(0, u16::MAX)] }
    }

    pub fn range(low: u16, high: u16) -> StatusPredicate {
        assert!(low <= high, "an empty status range is a construction bug");
        StatusPredicate { ranges: vec![(low, high)] }
    }

    /// The predicate matching exactly these inclusive ranges (none: matches nothing).
    pub fn from_ranges(ranges: Vec<(u16, u16)>) -> StatusPredicate {
        assert!(ranges.iter().all(|r| r.0 <= r.1), "an empty status range is a construction bug");
        StatusPredicate { ranges }
    }

    pub fn ranges(&self) -> &[(u16, u16)] {
        &self.ranges
    }

    pub fn matches(&self, status: u16) -> bool {
        self.ranges.iter().any(|&(low, high)| low <= status && status <= high)
    }

    pub fn parse(text: &str) -> Result<StatusPredicate, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("any") || text.eq_ignore_ascii_case("always") {
            return Ok(StatusPredicate::any());
        }
        let mut ranges = Vec::new();
        for part in text.split([',']).flat_map(|p| p.split("||")) {
            ranges.push(parse_range(part.trim()).map_err(|why| {
                format!("`{text}`: {why}; write codes and ranges such as \"200-399\", \"429, >=500\" or \"any\"")
            })?);
        }
        Ok(StatusPredicate { ranges })
    }
}

fn parse_range(part: &str) -> Result<(u16, u16), String> {
    let code = |s: &str| -> Result<u16, String> {
        let s = s.trim();
        match s.parse::<u16>() {
            Ok(c) if (100..=599).contains(&c) => Ok(c),
            _ => Err(format!("`{s}` is not an HTTP status code (100 to 599)")),
        }
    };
    if let Some(rest) = part.strip_prefix(">=") {
        return Ok((code(rest)?, 599));
    }
    if let Some(rest) = part.strip_prefix("<=") {
        return Ok((100, code(rest)?));
    }
    if let Some(rest) = part.strip_prefix('>') {
        return Ok((code(rest)? + 1, 599));
    }
    if let Some(rest) = part.strip_prefix('<') {
        return Ok((100, code(rest)?.saturating_sub(1)));
    }
    if let Some((low, high)) = part.split_once('-') {
        let (low, high) = (code(low)?, code(high)?);
        if low > high {
            return Err(format!("range `{part}` is empty"));
        }
        return Ok((low, high));
    }
    let c = code(part)?;
    Ok((c, c))
}

impl fmt::Display for StatusPredicate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.ranges == [(0, u16::MAX)] {
            return f.write_str("any");
        }
        for (i, &(low, high)) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            match (low, high) {
                (l, h) if l == h => write!(f, "{l}")?,
                (l, 599) => write!(f, ">={l}")?,
                (l, h) => write!(f, "{l}-{h}")?,
            }
        }
        Ok(())
    }
}

impl Serialize for StatusPredicate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for StatusPredicate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        StatusPredicate::parse(&text).map_err(serde::de::Error::custom)
    }
}
