//! The proxy's configuration: addresses, subscriptions and products with their
//! policies, and the routing (backends, retry, pools, breakers) of gateway-core.

use apim_policy::PolicySource;
use gateway_core::routing::Routing;
use gateway_core::time::HumanDuration;
use gateway_core::{Nanos, Policy};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    #[serde(default = "default_listen")]
    pub listen: String,
    #[serde(default = "default_admin")]
    pub admin: String,
    /// Peers whose `X-Forwarded-For` is believed.
    #[serde(default)]
    pub trusted_proxies: Vec<IpAddr>,
    /// Larger request bodies get 413.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// How long a client may take to send its request.
    #[serde(default = "default_client_timeout")]
    pub client_timeout: HumanDuration,
    #[serde(default = "default_key_header")]
    pub subscription_key_header: String,
    #[serde(default = "default_key_query")]
    pub subscription_key_query: String,
    #[serde(default)]
    pub subscriptions: Vec<SubscriptionConfig>,
    pub products: Vec<ProductConfig>,
    /// Serves requests that carry no subscription key under this product, with
    /// no subscription (`context.Subscription` is null, `context.Product` too),
    /// as APIM serves an API that does not require a subscription. Without it,
    /// such requests get 401.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anonymous_product: Option<String>,
    pub routing: Routing,
    /// APIM named values for `{{name}}` in policy files.
    #[serde(default)]
    pub named_values: BTreeMap<String, String>,
    /// PEM files of certificate authorities that https backends may present,
    /// trusted besides the public ones (a private or corporate CA); relative
    /// paths are from the config file's folder.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ca_files: Vec<std::path::PathBuf>,
    /// How far the core's clock runs from the wall clock, in milliseconds
    /// (default 0). `limitlab load --local` sets it so that the run starts at
    /// its scenario's start instant: calendar quotas and fixed windows then
    /// turn over when the simulation's do.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub clock_offset_ms: i64,
    /// Counters shared with other replicas through Redis; without it, local.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counters: Option<crate::counters::CountersConfig>,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}

fn default_admin() -> String {
    "127.0.0.1:9090".into()
}

fn default_max_body() -> usize {
    10 * 1024 * 1024
}

fn default_client_timeout() -> HumanDuration {
    HumanDuration(Nanos::from_secs(60))
}

fn default_key_header() -> String {
    "Ocp-Apim-Subscription-Key".into()
}

fn default_key_query() -> String {
    "subscription-key".into()
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionConfig {
    /// `context.Subscription.Id`.
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The key, or the environment variable that holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_env: Option<String>,
    /// Products the subscription may use; the first is the default.
    pub products: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProductConfig {
    pub name: String,
    /// Inline native TOML, or a policy file: `policy = "../policies/seed-ip-limits.xml"`.
    #[serde(default)]
    pub policy: PolicySource,
    /// The policy file's `set-header` elements with literal values.
    #[serde(skip)]
    pub set_headers: Vec<apim_policy::read::SetHeader>,
}

impl ProductConfig {
    /// The policy, read from its file when the config named one.
    pub fn policy(&self) -> &Policy {
        match &self.policy {
            PolicySource::Inline(p) => p,
            PolicySource::File(_) => unreachable!("policy files are read when the config is loaded"),
        }
    }
}

impl ProxyConfig {
    pub fn from_toml(path: &str, text: &str) -> Result<ProxyConfig, String> {
        let mut config: ProxyConfig =
            toml::from_str(text).map_err(|e| diagnostics::describe_toml_error(path, text, &e))?;
        let base = std::path::Path::new(path).parent().unwrap_or(std::path::Path::new("."));
        config.ca_files = config.ca_files.iter().map(|f| base.join(f)).collect();
        for product in &mut config.products {
            // A policy file's backend side (set-backend-service, retry) goes into the shared routing.
            let resolved = product.policy.resolve_all(base, &config.named_values, &mut config.routing)?;
            resolved.warnings.iter().for_each(|w| eprintln!("warning: {w}"));
            product.policy = PolicySource::Inline(resolved.policy);
            for header in resolved.set_headers {
                match header.values.iter().any(|v| v.trim_start().starts_with("@(")) {
                    true => eprintln!(
                        "warning: product `{}`: set-header `{}` has an expression value, which limitlab does not \
                         evaluate; the header is left as it is (backend credentials come from `routing.backends`)",
                        product.name, header.name
                    ),
                    false => product.set_headers.push(header),
                }
            }
        }
        config.validate().map_err(|e| format!("{path}: {e}"))?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        self.routing.validate().map_err(|e| format!("`routing`: {e}"))?;
        if self.products.is_empty() {
            return Err("`products`: configure at least one product".into());
        }
        for (i, s) in self.subscriptions.iter().enumerate() {
            if s.key.is_none() == s.key_env.is_none() {
                return Err(format!("subscriptions[{i}] (`{}`): give exactly one of `key` and `key_env`", s.id));
            }
            if s.products.is_empty() {
                return Err(format!("subscriptions[{i}] (`{}`): `products` must name at least one product", s.id));
            }
            if let Some(p) = s.products.iter().find(|p| !self.products.iter().any(|q| &q.name == *p)) {
                return Err(format!("subscriptions[{i}] (`{}`): no product named `{p}`", s.id));
            }
            // An empty key would admit every request that sends an empty header.
            if s.key.as_deref().is_some_and(str::is_empty) {
                return Err(format!("subscriptions[{i}] (`{}`): `key` is empty", s.id));
            }
        }
        if axum::http::HeaderName::from_bytes(self.subscription_key_header.as_bytes()).is_err() {
            let name = &self.subscription_key_header;
            return Err(format!("`subscription_key_header`: `{name}` is not a valid HTTP field name"));
        }
        if let Some(counters) = &self.counters {
            counters.validate()?;
        }
        if let Some(p) = self.anonymous_product.as_ref().filter(|p| !self.products.iter().any(|q| &q.name == *p)) {
            return Err(format!("`anonymous_product`: no product named `{p}`"));
        }
        for b in &self.routing.backends {
            check_url(&b.url).map_err(|e| format!("`routing` backend `{}`: {e}", b.id))?;
        }
        Ok(())
    }

    /// Overrides a backend's URL (`--backend NAME=URL`).
    pub fn override_backend(&mut self, spec: &str) -> Result<(), String> {
        let (name, url) = spec.split_once('=').ok_or_else(|| format!("`{spec}`: use --backend NAME=URL"))?;
        let backend = self
            .routing
            .backends
            .iter_mut()
            .find(|b| b.id == name)
            .ok_or_else(|| format!("--backend {spec}: no backend named `{name}`"))?;
        check_url(url).map_err(|e| format!("--backend {spec}: {e}"))?;
        backend.url = url.trim_end_matches('/').to_owned();
        Ok(())
    }
}

/// A backend URL the proxy can call: http or https, with a host.
fn check_url(url: &str) -> Result<(), String> {
    let uri: axum::http::Uri = url.parse().map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none_or(str::is_empty) {
        return Err(format!("`{url}` is not an http:// or https:// URL with a host"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::ProxyConfig;

    const GOOD: &str = r#"
[[subscriptions]]
id = "a"
key = "key-a"
products = ["p"]

[[subscriptions]]
id = "b"
key = "key-b"
products = ["p"]

[[products]]
name = "p"

[routing]
set_backend = "primary"
backends = [{ id = "primary", url = "https://contoso.openai.azure.com/openai" }]
"#;

    /// `from` replaced by `to` in the good config is refused with `needle`.
    fn check(from: &str, to: &str, needle: &str) {
        assert!(GOOD.contains(from), "{from}");
        let err = ProxyConfig::from_toml("p.toml", &GOOD.replacen(from, to, 1)).unwrap_err();
        assert!(err.contains(needle), "`{err}` lacks `{needle}`");
    }

    #[test]
    fn keys_and_backend_urls_that_cannot_work_are_refused() {
        ProxyConfig::from_toml("p.toml", GOOD).unwrap();
        check("key = \"key-a\"", "key = \"\"", "subscriptions[0] (`a`): `key` is empty");
        let spaced = "subscription_key_header = \"Ocp Apim Key\"\n[[subscriptions]]";
        check("[[subscriptions]]", spaced, "`subscription_key_header`: `Ocp Apim Key` is not a valid HTTP field name");
        for url in ["not a url", "ftp://contoso", "/openai", "https://"] {
            check("https://contoso.openai.azure.com/openai", url, "`routing` backend `primary`: ");
        }
        let mut config = ProxyConfig::from_toml("p.toml", GOOD).unwrap();
        let err = config.override_backend("primary=localhost:8081").unwrap_err();
        assert!(err.contains("not an http:// or https:// URL"), "{err}");
        config.override_backend("primary=http://127.0.0.1:8081").unwrap();
    }
}
