//! Where a configuration takes its policy from: written inline in native TOML, or
//! a file (`policy = "policies/seed-ip-limits.xml"`, APIM XML or native TOML).

use crate::read::{read, PolicyDocument, ReadOptions};
use gateway_core::routing::Routing;
use gateway_core::Policy;
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq)]
pub enum PolicySource {
    Inline(Policy),
    File(PathBuf),
}

impl Default for PolicySource {
    fn default() -> PolicySource {
        PolicySource::Inline(Policy::default())
    }
}

impl<'de> Deserialize<'de> for PolicySource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PolicySource;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a policy table (`[[...policy.limits]]`) or the path of a policy file (.xml or .toml)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PolicySource, E> {
                Ok(PolicySource::File(PathBuf::from(v)))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<PolicySource, A::Error> {
                Policy::deserialize(de::value::MapAccessDeserializer::new(map)).map(PolicySource::Inline)
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for PolicySource {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            PolicySource::Inline(p) => p.serialize(s),
            PolicySource::File(path) => path.serialize(s),
        }
    }
}

impl PolicySource {
    /// The policy, reading a file relative to `base` when it names one; an XML
    /// file's backend choice, retry and timeout go into `routing`. Warnings about
    /// unmodelled elements are returned for the caller to show.
    pub fn resolve(
        &self,
        base: &Path,
        named_values: &BTreeMap<String, String>,
        routing: &mut Routing,
    ) -> Result<(Policy, Vec<String>), String> {
        self.resolve_all(base, named_values, routing).map(|r| (r.policy, r.warnings))
    }

    /// `resolve`, also giving the file's `set-header` elements.
    pub fn resolve_all(
        &self,
        base: &Path,
        named_values: &BTreeMap<String, String>,
        routing: &mut Routing,
    ) -> Result<Resolved, String> {
        let path = match self {
            PolicySource::Inline(p) => {
                return Ok(Resolved { policy: p.clone(), set_headers: Vec::new(), warnings: Vec::new() })
            }
            PolicySource::File(path) => base.join(path),
        };
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{shown}: cannot read the policy: {e}"))?;
        if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("toml")) {
            let policy = Policy::from_toml_file(&shown, &text)?;
            return Ok(Resolved { policy, set_headers: Vec::new(), warnings: Vec::new() });
        }
        let options = ReadOptions { strict: false, named_values: named_values.clone() };
        let doc: PolicyDocument = read(&text, &options).map_err(|d| d.render(&shown, &text))?;
        doc.apply_to(routing).map_err(|e| format!("{shown}: the policy's backend side: {e}"))?;
        let warnings = doc.warnings.iter().map(|w| format!("{shown}:{w}")).collect();
        Ok(Resolved { policy: doc.policy, set_headers: doc.set_headers, warnings })
    }
}

/// What a policy source comes to.
pub struct Resolved {
    pub policy: Policy,
    pub set_headers: Vec<crate::read::SetHeader>,
    pub warnings: Vec<String>,
}
