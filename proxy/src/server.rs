//! The front end: subscription keys, the request body, and the driver loop that
//! carries out what `gateway-core`'s `Lifecycle` decides, attempt by attempt.

use crate::config::ProxyConfig;
use crate::counters::Mode;
use crate::decisions::{DecisionLog, Tags};
use crate::exact::Exact;
use crate::metrics::Metrics;
use crate::upstream::{Lease, UpBody, Upstream, UpstreamError};
use crate::usage::{self, StreamTracker};
use apim_policy::read::ExistsAction;
use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri};
use futures_util::StreamExt;
use gateway_core::routing::{parse_retry_after, Attempt, AttemptOutcome, Credential};
use gateway_core::{
    CoreError, Delivery, DeliveryEnd, Finished, GeneratedResponse, Lifecycle, Nanos, RequestId, RequestInfo, Step,
    Subscription, Usage,
};
use http_body_util::BodyExt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// The largest non-streamed backend body the proxy reads to find its usage.
const MAX_BACKEND_BODY: usize = 64 * 1024 * 1024;

pub struct Proxy {
    config: ProxyConfig,
    /// One lifecycle per product, in config order.
    lifecycles: Vec<Mutex<Lifecycle>>,
    /// The shared counter store's state, when `[counters]` is configured.
    store: Arc<crate::counters::StoreState>,
    /// Exact mode's exchange with the store (`[counters] mode = "exact"`).
    exact: Option<Exact<Lifecycle>>,
    /// Per product: whether a limit reads the prompt estimate (so it is counted
    /// before forwarding rather than only when a stream needs it).
    needs_estimate: Vec<bool>,
    /// Per product: whether a limit reserves `max_tokens` (so the body is read for it).
    needs_max_tokens: Vec<bool>,
    /// Per product: the request headers its keys read (lowercase); only these
    /// are copied into the core's `RequestInfo`.
    headers_read: Vec<Vec<String>>,
    /// (key, subscription index), looked up by key.
    keys: Vec<(String, usize)>,
    /// `subscription_key_header`, parsed once: a name given in mixed case
    /// (APIM's `Ocp-Apim-Subscription-Key`) is otherwise lowercased and hashed
    /// again for every request.
    key_header: HeaderName,
    /// The routing backends' URLs, by position, split for joining.
    bases: Vec<BaseUrl>,
    /// The TLS settings of backend connections when `ca_files` adds authorities.
    tls: Option<rustls::ClientConfig>,
    /// The header each routing backend is authenticated with, by position, read
    /// once at start (environment variables included).
    credentials: Vec<Option<(HeaderName, HeaderValue)>>,
    epoch: Instant,
    epoch_unix: Nanos,
    pub metrics: Metrics,
    /// `--decisions FILE`: one line per finished request.
    decisions: Option<DecisionLog>,
    /// The Responses API's background responses made through this replica,
    /// charged when a retrieval first shows them finished.
    background: crate::background::Background,
}

/// What a request is, once its key and body are read.
struct Admitted {
    product: usize,
    /// Index of the subscription in the config.
    /// The subscription's index in the config; `None` for an anonymous call
    /// (no key, served under `anonymous_product`).
    subscription: Option<usize>,
    info: RequestInfo,
    parts: axum::http::request::Parts,
    /// The body as the client sent it, and so as backends get it.
    body: Bytes,
    /// The body as the policy reads it: `body` decoded, if the client
    /// compressed it.
    text: Bytes,
    model: String,
    /// The prompt's tokens, counted with the model's tokenizer, when the policy
    /// needed an estimate; else counted only if a stream ends without usage.
    prompt_tokens: Option<u64>,
    started: Instant,
}

impl Proxy {
    pub fn new(config: ProxyConfig) -> Result<Proxy, String> {
        let lifecycles = lifecycles(&config)?;
        let keys = subscription_keys(&config)?;
        let exact = match &config.counters {
            Some(counters) if counters.mode == Mode::Exact => {
                let names = config.products.iter().map(|p| p.name.as_str());
                Some(Exact::new(counters, names, crate::counters::replica_id())?)
            }
            _ => None,
        };
        let metrics = Metrics::new(&config);
        let background = crate::background::Background::new(config.counters.as_ref())?;
        let key_header = HeaderName::from_bytes(config.subscription_key_header.as_bytes())
            .map_err(|_| "`subscription_key_header` is not a valid HTTP field name".to_string())?;
        let needs_estimate = any_token_limit(&config, |t| t.estimate_prompt_tokens || t.reserve);
        let needs_max_tokens = any_token_limit(&config, |t| t.reserve);
        let headers_read = config.products.iter().map(|p| p.policy().headers_read()).collect();
        let (bases, credentials) = backend_addresses(&config)?;
        let tls = match config.ca_files.is_empty() {
            true => None,
            false => Some(Upstream::tls_config_with(&config.ca_files)?),
        };
        // Load both vocabularies now, not on the first request (they take a while).
        tokenizer::count("gpt-4o", "warm up");
        tokenizer::count("gpt-35-turbo", "warm up");
        // The wall clock and the monotonic clock are read together (after the
        // slow warm-up): the core's time is `epoch_unix` plus what `epoch` has
        // seen go by since.
        let (epoch, wall) = (Instant::now(), SystemTime::now());
        let wall = wall.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let epoch_unix = Nanos(wall.saturating_add_signed(config.clock_offset_ms.saturating_mul(1_000_000)));
        Ok(Proxy {
            needs_estimate,
            needs_max_tokens,
            headers_read,
            bases,
            credentials,
            tls,
            config,
            lifecycles,
            store: Default::default(),
            exact,
            keys,
            key_header,
            epoch,
            epoch_unix,
            metrics,
            decisions: None,
            background,
        })
    }

    /// Writes the decision log (the simulator's `--decisions` lines) to `file`.
    pub fn write_decisions(&mut self, file: std::fs::File) {
        self.decisions = Some(DecisionLog::new(file, self.epoch_unix));
    }

    /// Everything a finished request leaves behind: its log line, its metrics
    /// and its decision line.
    fn finished(&self, req: &Admitted, finished: &Finished) {
        crate::logs::request(finished);
        self.metrics.finished(req.product, req.subscription, &finished.record, req.started);
        if let Some(decisions) = &self.decisions {
            let subscription = req.subscription.map_or("", |i| self.config.subscriptions[i].id.as_str());
            decisions.write(Tags { headers: &req.parts.headers, subscription, info: &req.info }, finished);
        }
    }

    /// How long a client may take to send a request's headers or body.
    pub fn client_timeout(&self) -> std::time::Duration {
        self.config.client_timeout.0.into_std()
    }

    fn now(&self) -> Nanos {
        self.epoch_unix + Nanos(self.epoch.elapsed().as_nanos() as u64)
    }

    fn instant_of(&self, at: Nanos) -> tokio::time::Instant {
        let offset = at.saturating_sub(self.epoch_unix);
        tokio::time::Instant::from_std(self.epoch + std::time::Duration::from_nanos(offset.0))
    }

    fn lifecycle(&self, product: usize) -> std::sync::MutexGuard<'_, Lifecycle> {
        self.lifecycles[product].lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A lifecycle per product. A replica that shares its counters journals its
/// changes for the others.
fn lifecycles(config: &ProxyConfig) -> Result<Vec<Mutex<Lifecycle>>, String> {
    let new = |p: &crate::config::ProductConfig| Lifecycle::new(p.policy(), config.routing.clone(), rand::random());
    let mut lifecycles = config.products.iter().map(new).collect::<Result<Vec<_>, _>>()?;
    if config.counters.is_some() {
        lifecycles.iter_mut().for_each(|l| l.limits_mut().enable_journal());
    }
    Ok(lifecycles.into_iter().map(Mutex::new).collect())
}

/// Each subscription's key (from the file or the environment) and index. Keys
/// from the file and from the environment alike: one key, one subscription.
fn subscription_keys(config: &ProxyConfig) -> Result<Vec<(String, usize)>, String> {
    let key = |s: &crate::config::SubscriptionConfig| match (&s.key, &s.key_env) {
        (Some(k), _) => Ok(k.clone()),
        (None, Some(var)) => std::env::var(var)
            .ok()
            .filter(|k| !k.is_empty())
            .ok_or_else(|| format!("subscription `{}`: environment variable `{var}` is not set or empty", s.id)),
        (None, None) => unreachable!("validated"),
    };
    let keys = config.subscriptions.iter().enumerate().map(|(i, s)| key(s).map(|k| (k, i)));
    let keys = keys.collect::<Result<Vec<_>, _>>()?;
    for (n, (key, i)) in keys.iter().enumerate() {
        if let Some((_, j)) = keys[..n].iter().find(|(other, _)| other == key) {
            let id = |k: &usize| &config.subscriptions[*k].id;
            return Err(format!("subscriptions `{}` and `{}` have the same key", id(j), id(i)));
        }
    }
    Ok(keys)
}

/// Each backend's base URL, split once, and the header that authenticates the
/// proxy to it, if any.
type Addresses = (Vec<BaseUrl>, Vec<Option<(HeaderName, HeaderValue)>>);

fn backend_addresses(config: &ProxyConfig) -> Result<Addresses, String> {
    let backends = &config.routing.backends;
    let base = |b: &gateway_core::routing::Backend| {
        BaseUrl::parse(&b.url).ok_or_else(|| format!("backend `{}`: `{}` is not a URL", b.id, b.url))
    };
    let credential = |b: &gateway_core::routing::Backend| {
        credential_header(b.credential.as_ref()).map_err(|e| format!("backend `{}`: {e}", b.id))
    };
    let bases = backends.iter().map(base).collect::<Result<Vec<_>, _>>()?;
    let credentials = backends.iter().map(credential).collect::<Result<Vec<_>, _>>()?;
    Ok((bases, credentials))
}

/// Per product: whether one of its token limits is `wanted`.
fn any_token_limit(config: &ProxyConfig, wanted: impl Fn(&gateway_core::TokenLimit) -> bool) -> Vec<bool> {
    let token_limit = |l: &gateway_core::Limit| match l {
        gateway_core::Limit::AzureOpenAiTokenLimit(t) | gateway_core::Limit::LlmTokenLimit(t) => wanted(t),
        _ => false,
    };
    config.products.iter().map(|p| p.policy().limits.iter().any(token_limit)).collect()
}

/// One front-end thread's view of the proxy: the shared policy state, and a
/// backend connection pool of the thread's own. A pool shared across threads
/// would drive each connection from the thread that opened it, so every
/// request would wake another thread twice.
#[derive(Clone)]
pub struct Worker {
    pub proxy: Arc<Proxy>,
    upstream: Arc<Upstream>,
}

impl Worker {
    /// A worker whose backend connections run on the current Tokio runtime.
    pub fn new(proxy: Arc<Proxy>) -> Worker {
        let upstream = match &proxy.tls {
            Some(tls) => Upstream::with_tls_config(tls.clone()),
            None => Upstream::new(),
        };
        Worker { proxy, upstream: Arc::new(upstream) }
    }
}

fn apim_error(status: StatusCode, message: &str) -> Response<Body> {
    // APIM's own error bodies: `statusCode` first, with its spacing.
    let message = serde_json::Value::String(message.to_owned());
    let body = format!("{{\"statusCode\": {}, \"message\": {message}}}", status.as_u16());
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// Answers one client request.
pub async fn handle(worker: Worker, peer: Arc<Peer>, request: Request<Body>) -> Response<Body> {
    let Worker { proxy, upstream } = worker;
    let admitted = match admit(&proxy, &peer, request).await {
        Ok(a) => a,
        Err(refusal) => {
            let response = refusal.response();
            crate::logs::refusal(response.status().as_u16(), refusal.name());
            proxy.metrics.refused(response.status().as_u16());
            return response;
        }
    };
    // Boxed: the request's record is half a kilobyte, and the futures that
    // carry it by value would be copied with it.
    drive(proxy, &upstream, Box::new(admitted)).await
}

/// The longest request URI and the most header bytes the proxy takes; beyond,
/// APIM-style 414 and 431 answers (hyper's own, with empty bodies, only come
/// past its much larger read buffer).
pub const MAX_URI_BYTES: usize = 16 * 1024;
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Why a request was refused before the policy ran.
enum Refusal {
    UriTooLong,
    HeadersTooLarge,
    NotFound,
    Key(KeyRefusal),
    BodyTooSlow,
    BodyTooLarge,
    /// `on_store_error = "reject"` while the counter store cannot be reached.
    StoreUnavailable,
    /// A body in a `Content-Encoding` the proxy does not decode.
    BodyCoding,
    /// A body that does not decode as its `Content-Encoding` says.
    BodyCorrupt,
    /// A WebSocket handshake (the Realtime API). The proxy does not relay
    /// WebSockets, so it could not count their tokens; forwarded as a plain
    /// request, the handshake would get the client a puzzling error from the
    /// backend instead of this one.
    WebSocket,
}

impl Refusal {
    fn response(&self) -> Response<Body> {
        match self {
            Refusal::UriTooLong => apim_error(StatusCode::URI_TOO_LONG, "Request URI too long"),
            Refusal::HeadersTooLarge => {
                apim_error(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "Request header fields too large")
            }
            Refusal::NotFound => apim_error(StatusCode::NOT_FOUND, "Resource not found"),
            Refusal::Key(key) => key.response(),
            Refusal::BodyTooSlow => apim_error(StatusCode::REQUEST_TIMEOUT, "Request timed out"),
            Refusal::BodyTooLarge => apim_error(StatusCode::PAYLOAD_TOO_LARGE, "Request entity too large"),
            Refusal::StoreUnavailable => apim_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "Service unavailable: the gateway's counter store cannot be reached",
            ),
            Refusal::BodyCoding => apim_error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Unsupported Content-Encoding: the gateway reads request bodies as they are, gzip or deflate",
            ),
            Refusal::BodyCorrupt => {
                apim_error(StatusCode::BAD_REQUEST, "The request body does not decode as its Content-Encoding says")
            }
            Refusal::WebSocket => apim_error(
                StatusCode::NOT_IMPLEMENTED,
                "WebSocket connections (the Realtime API) are not supported by this gateway",
            ),
        }
    }

    /// How the request log names it.
    fn name(&self) -> &'static str {
        match self {
            Refusal::UriTooLong => "uri-too-long",
            Refusal::HeadersTooLarge => "headers-too-large",
            Refusal::NotFound => "not-found",
            Refusal::Key(KeyRefusal::Missing) => "missing-subscription-key",
            Refusal::Key(KeyRefusal::Invalid) => "invalid-subscription-key",
            Refusal::BodyTooSlow => "body-timeout",
            Refusal::StoreUnavailable => "store-unavailable",
            Refusal::BodyTooLarge => "body-too-large",
            Refusal::BodyCoding => "body-coding-unsupported",
            Refusal::BodyCorrupt => "body-coding-corrupt",
            Refusal::WebSocket => "websocket-unsupported",
        }
    }
}

/// Whether the request's `Upgrade` field asks for a WebSocket.
fn asks_for_websocket(headers: &HeaderMap) -> bool {
    let upgrades = headers.get_all(header::UPGRADE).iter().filter_map(|v| v.to_str().ok());
    upgrades.flat_map(|v| v.split(',')).any(|protocol| {
        let name = protocol.trim().split('/').next().unwrap_or_default();
        name.eq_ignore_ascii_case("websocket")
    })
}

async fn admit(proxy: &Proxy, peer: &Peer, request: Request<Body>) -> Result<Admitted, Refusal> {
    let started = Instant::now();
    let (parts, body) = request.into_parts();
    if parts.uri.path_and_query().map_or(0, |p| p.as_str().len()) > MAX_URI_BYTES {
        return Err(Refusal::UriTooLong);
    }
    let header_bytes: usize = parts.headers.iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum();
    if header_bytes > MAX_HEADER_BYTES {
        return Err(Refusal::HeadersTooLarge);
    }
    if !parts.uri.path().starts_with("/openai/") {
        return Err(Refusal::NotFound);
    }
    let (subscription, product) = subscription(proxy, &parts.headers, &parts.uri).map_err(Refusal::Key)?;
    if asks_for_websocket(&parts.headers) {
        return Err(Refusal::WebSocket);
    }
    if proxy.store_refuses() {
        return Err(Refusal::StoreUnavailable);
    }
    let limit = proxy.config.max_body_bytes;
    // A body announced too large is refused at once, not after waiting for it.
    let announced = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if announced.is_some_and(|length| length > limit as u64) {
        return Err(Refusal::BodyTooLarge);
    }
    let body = match within(proxy.client_timeout(), axum::body::to_bytes(body, limit)).await {
        Err(_) => return Err(Refusal::BodyTooSlow),
        Ok(Err(_)) => return Err(Refusal::BodyTooLarge),
        Ok(Ok(body)) => body,
    };
    let text = readable(&parts.headers, &body, limit)?;
    let model = deployment_model(parts.uri.path(), &text);
    let (max_tokens, choices) = match proxy.needs_max_tokens[product] {
        // An embeddings call generates nothing: no completion allowance is reserved.
        true if parts.uri.path().ends_with("/embeddings") => (Some(0), None),
        true => completion_allowance(&text),
        false => (None, None),
    };
    let prompt_tokens = match proxy.needs_estimate[product] {
        true => Some(count_prompt_aside(&model, parts.uri.path(), &text).await),
        false => None,
    };
    let info = RequestInfo {
        ip: client_ip(&proxy.config.trusted_proxies, peer, &parts.headers),
        subscription: subscription.map(|index| {
            let s = &proxy.config.subscriptions[index];
            Subscription {
                id: s.id.clone(),
                key: proxy.keys.iter().find(|k| k.1 == index).map(|k| k.0.clone()).unwrap_or_default(),
                name: s.name.clone().unwrap_or_else(|| s.id.clone()),
            }
        }),
        // An anonymous call has no product context, as in APIM.
        product: subscription.map(|_| proxy.config.products[product].name.clone()),
        headers: headers_read(&proxy.headers_read[product], &parts.headers),
        prompt_tokens_estimate: prompt_tokens,
        max_tokens,
        choices,
    };
    Ok(Admitted { product, subscription, info, parts, body, text, model, prompt_tokens, started })
}

/// A request's `max_tokens` (by any of its names) and how many completions it asks
/// for (`n`, or `best_of` when larger, for each of a legacy completion's
/// prompts), which reserve mode sets aside; only these fields of the body are read.
fn completion_allowance(text: &[u8]) -> (Option<u64>, Option<u64>) {
    #[derive(serde::Deserialize, Default)]
    struct Fields {
        max_tokens: Option<u64>,
        max_completion_tokens: Option<u64>,
        /// The Responses API's name for it.
        max_output_tokens: Option<u64>,
        /// Completions asked for: each may run to `max_tokens`.
        n: Option<u64>,
        /// The legacy completions API generates this many and returns `n`.
        best_of: Option<u64>,
        /// A legacy completion's prompt: one, or a list of them.
        prompt: Option<serde_json::Value>,
    }
    let fields: Fields = serde_json::from_slice(text).unwrap_or_default();
    let max_tokens = fields.max_completion_tokens.or(fields.max_tokens).or(fields.max_output_tokens);
    // A list of numbers is one prompt given as tokens; any other list, several.
    let prompts = match &fields.prompt {
        Some(serde_json::Value::Array(items)) if !items.iter().all(serde_json::Value::is_number) => items.len() as u64,
        _ => 1,
    };
    let choices = match (fields.n, fields.best_of, prompts) {
        (None, None, 1) => None,
        (n, best_of, prompts) => Some(n.unwrap_or(1).max(best_of.unwrap_or(1)).saturating_mul(prompts)),
    };
    (max_tokens, choices)
}

/// A request body as the policy reads it (its prompt, its `max_tokens`):
/// decoded when the client compressed it, within the body limit. A coding the
/// proxy cannot read is refused rather than read as something else.
fn readable(headers: &HeaderMap, body: &Bytes, limit: usize) -> Result<Bytes, Refusal> {
    let coding = usage::Coding::of(headers);
    if coding == usage::Coding::Identity {
        return Ok(body.clone());
    }
    match usage::decode(coding, body, limit) {
        Ok(decoded) => Ok(Bytes::from(decoded)),
        Err(usage::DecodeError::Coding) => Err(Refusal::BodyCoding),
        Err(usage::DecodeError::Corrupt) => Err(Refusal::BodyCorrupt),
        Err(usage::DecodeError::TooLarge) => Err(Refusal::BodyTooLarge),
    }
}

/// The headers named in `names` (lowercase), every value of each in arrival order.
fn headers_read(names: &[String], headers: &HeaderMap) -> Vec<(String, String)> {
    let values = |name: &String| {
        let values = headers.get_all(name.as_str()).into_iter().filter_map(|v| v.to_str().ok());
        values.map(|v| (name.clone(), v.to_owned())).collect::<Vec<_>>()
    };
    names.iter().flat_map(values).collect()
}

/// The subscription and product of a request, from the key header (with APIM's
/// `;product=NAME` suffix), the `api-key` header or the query parameter.
/// Why a request has no usable subscription.
enum KeyRefusal {
    Missing,
    Invalid,
}

impl KeyRefusal {
    fn response(&self) -> Response<Body> {
        let message = match self {
            KeyRefusal::Missing => {
                "Access denied due to missing subscription key. Make sure to include subscription key when making \
                 requests to an API."
            }
            KeyRefusal::Invalid => {
                "Access denied due to invalid subscription key. Make sure to provide a valid key for an active \
                 subscription."
            }
        };
        apim_error(StatusCode::UNAUTHORIZED, message)
    }
}

/// The subscription and product of a request; no subscription for a request
/// without a key when the config serves those under `anonymous_product`.
fn subscription(proxy: &Proxy, headers: &HeaderMap, uri: &Uri) -> Result<(Option<usize>, usize), KeyRefusal> {
    // An empty value is no key at all, as APIM treats it.
    let from_header = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok()).filter(|v| !v.is_empty());
    let from_query = || {
        let query = uri.query()?;
        query.split('&').find_map(|kv| kv.split_once('=').filter(|(k, _)| *k == proxy.config.subscription_key_query))
    };
    let given = from_header(&proxy.key_header)
        .or_else(|| from_header(&API_KEY))
        .or_else(|| from_query().map(|(_, v)| v).filter(|v| !v.is_empty()))
        .or_else(|| bearer_key(proxy, from_header(&header::AUTHORIZATION)?));
    let Some(given) = given else {
        let anonymous = proxy.config.anonymous_product.as_ref();
        let product = anonymous.and_then(|name| proxy.config.products.iter().position(|p| &p.name == name));
        return product.map(|p| (None, p)).ok_or(KeyRefusal::Missing);
    };
    let (key, wanted_product) = split_product(given);
    let Some(&(_, index)) = proxy.keys.iter().find(|(k, _)| k == key) else { return Err(KeyRefusal::Invalid) };
    let s = &proxy.config.subscriptions[index];
    let name = match wanted_product {
        Some(p) if s.products.iter().any(|offered| offered == p) => p,
        Some(_) => return Err(KeyRefusal::Invalid),
        None => &s.products[0],
    };
    let product = proxy.config.products.iter().position(|p| p.name == name).expect("validated");
    Ok((Some(index), product))
}

/// An `Authorization: Bearer KEY` whose token is a subscription key: how the
/// `openai` SDK's plain client sends its key (Azure's `/openai/v1/` API takes
/// keys so). Any other bearer token (a JWT, say) is not a key and is left to
/// the policy, as before.
fn bearer_key<'a>(proxy: &Proxy, authorization: &'a str) -> Option<&'a str> {
    let (scheme, token) = authorization.split_once(' ')?;
    let token = token.trim();
    let known = |token: &str| proxy.keys.iter().any(|(k, _)| k == split_product(token).0);
    (scheme.eq_ignore_ascii_case("bearer") && known(token)).then_some(token)
}

/// A key as APIM reads it: `KEY;product=NAME` asks for one of the
/// subscription's products by name. Split at the first `;product=`, found
/// through the `;`s (a key rarely has one), not with a substring search, whose
/// set-up alone costs more than the scan for each request.
fn split_product(given: &str) -> (&str, Option<&str>) {
    const MARK: &str = ";product=";
    match given.match_indices(';').find(|&(i, _)| given[i..].starts_with(MARK)) {
        Some((i, _)) => (&given[..i], Some(&given[i + MARK.len()..])),
        None => (given, None),
    }
}

/// Azure OpenAI's own key header, which the proxy takes as a subscription key too.
static API_KEY: HeaderName = HeaderName::from_static("api-key");

/// A client connection's peer, with its address written out once per
/// connection rather than once per request.
pub struct Peer {
    pub addr: SocketAddr,
    ip: String,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Peer {
        Peer { addr, ip: addr.ip().to_string() }
    }
}

fn client_ip(trusted: &[std::net::IpAddr], peer: &Peer, headers: &HeaderMap) -> String {
    if trusted.contains(&peer.addr.ip()) {
        let forwarded = headers.get("x-forwarded-for").and_then(|v| v.to_str().ok());
        // The right-most address not a trusted proxy is the client.
        if let Some(ip) = forwarded
            .and_then(|f| f.rsplit(',').map(str::trim).find(|a| a.parse().is_ok_and(|ip| !trusted.contains(&ip))))
        {
            return ip.to_owned();
        }
    }
    peer.ip.clone()
}

/// The tokenizer to count with, named by the deployment: the path's
/// (`/openai/deployments/{name}/...`), or on a path without one (Azure's
/// `/openai/v1/...` and `/openai/responses`) the body's `model`.
fn deployment_model(path: &str, body: &[u8]) -> String {
    if let Some(rest) = path.strip_prefix("/openai/deployments/") {
        return tokenizer_model(rest.split('/').next().unwrap_or("gpt-4o"));
    }
    #[derive(serde::Deserialize)]
    struct Named {
        model: Option<String>,
    }
    let named = serde_json::from_slice::<Named>(body).ok().and_then(|n| n.model);
    tokenizer_model(named.as_deref().unwrap_or("gpt-4o"))
}

/// The deployment name often is the model's.
fn tokenizer_model(deployment: &str) -> String {
    // `windows`, not `contains("35")`: a substring search's set-up costs more
    // than scanning a deployment name.
    let gpt35 = deployment.as_bytes().windows(2).any(|pair| pair == b"35");
    if gpt35 || deployment.starts_with("gpt-4-") || deployment == "gpt-4" {
        return deployment.to_owned();
    }
    "gpt-4o".to_owned()
}

/// The prompt's tokens as the service counts them (0 for a body that is not
/// JSON): a Responses API request (`POST .../responses`) by its `instructions`
/// and `input`, any other by its `messages`, `prompt` or `input`.
fn count_prompt(model: &str, path: &str, body: &[u8]) -> u64 {
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(body) else { return 0 };
    match path.ends_with("/responses") {
        true => tokenizer::count_responses(model, &body),
        false => prompt_tokens(model, &body),
    }
}

/// Bodies at least this large are counted on the runtime's blocking pool:
/// counting takes about 90 µs a kilobyte of prose, so a document-sized prompt
/// (up to `max_body_bytes`) would otherwise hold the worker thread, and every
/// connection it serves, for tens or hundreds of milliseconds. A smaller body
/// costs less to count than to hand over.
const COUNT_ASIDE_BYTES: usize = 64 * 1024;

/// [`count_prompt`], on the blocking pool for a large body.
async fn count_prompt_aside(model: &str, path: &str, body: &Bytes) -> u64 {
    if body.len() < COUNT_ASIDE_BYTES {
        return count_prompt(model, path, body);
    }
    let (owned_model, owned_path, owned_body) = (model.to_owned(), path.to_owned(), body.clone());
    let counting = tokio::task::spawn_blocking(move || count_prompt(&owned_model, &owned_path, &owned_body));
    // Counting panics on no input; were the task lost all the same (the
    // runtime shutting down), the worker counts.
    match counting.await {
        Ok(tokens) => tokens,
        Err(_) => count_prompt(model, path, body),
    }
}

/// The request's prompt tokens as the proxy counts them: counted before it
/// was forwarded, if the policy needed them, else now.
fn prompt_estimate(req: &Admitted) -> u64 {
    req.prompt_tokens.unwrap_or_else(|| count_prompt(&req.model, req.parts.uri.path(), &req.text))
}

fn prompt_tokens(model: &str, body: &serde_json::Value) -> u64 {
    use serde_json::Value;
    if body.get("messages").is_some_and(Value::is_array) {
        return tokenizer::count_chat_request(model, body);
    }
    // An input is text, or text already turned into tokens (a list of numbers).
    let one = |v: &Value| match v {
        Value::String(s) => tokenizer::count(model, s),
        Value::Array(tokens) => tokens.len() as u64,
        _ => 0,
    };
    let inputs = |v: &Value| match v {
        Value::Array(items) if items.iter().all(Value::is_number) => items.len() as u64,
        Value::Array(items) => items.iter().map(one).sum(),
        other => one(other),
    };
    body.get("prompt").or_else(|| body.get("input")).map_or(0, inputs)
}

/// Awaits `future` for at most `limit`. The timer is armed only when the future
/// is not ready at once: a small body has usually arrived with its headers, and
/// a timer costs a registration and a removal in the runtime's wheel.
async fn within<F: std::future::Future>(limit: std::time::Duration, future: F) -> Result<F::Output, ()> {
    let mut future = std::pin::pin!(future);
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(future.as_mut().poll(cx))).await;
    if let std::task::Poll::Ready(output) = first {
        return Ok(output);
    }
    tokio::time::timeout(limit, future).await.map_err(|_| ())
}

/// Carries out the lifecycle's steps until the client has its answer. Every
/// deadline is the lifecycle's: an attempt races its `poll_timeout_of`, a retry
/// sleeps until it, and `handle_timeout_of` says what follows.
async fn drive(proxy: Arc<Proxy>, upstream: &Arc<Upstream>, req: Box<Admitted>) -> Response<Body> {
    let mut step = proxy.start(&req).await;
    // If the client goes away before its answer, the request ends as client-gone.
    let mut gone = ClientGone { proxy: &proxy, req: &req, id: None };
    loop {
        step = match step {
            Step::Respond(finished) => {
                gone.id = None;
                // Logged first: a client that leaves during the wait does not
                // undo the decision.
                let response = proxy.respond_generated(&req, finished);
                proxy.all_shipped(req.product).await;
                return response;
            }
            Step::Deliver { .. } => unreachable!("a response is delivered only after an attempt"),
            Step::Wait { id } => {
                gone.id = Some(id);
                proxy.when_due(req.product, id).await
            }
            Step::Forward { id, attempt } => {
                gone.id = Some(id);
                let (outcome, response) = match race(&proxy, upstream, &req, id, &attempt).await {
                    Ok(answer) => answer,
                    Err(due) => {
                        step = due;
                        continue;
                    }
                };
                let next = proxy.attempt_step(req.product, id, outcome).await;
                match next {
                    Ok(Step::Deliver { id }) => {
                        // From here the delivery's own guard (`Charge`) reports a departure.
                        gone.id = None;
                        drop(gone);
                        let response = response.expect("a delivered attempt has a response");
                        return deliver(proxy, req, id, attempt, response).await;
                    }
                    Ok(other) => other,
                    Err(e) => {
                        gone.id = None;
                        tracing::error!(error = %e, "the lifecycle refused an attempt's outcome");
                        return apim_error(StatusCode::INTERNAL_SERVER_ERROR, "Internal server error");
                    }
                }
            }
        };
    }
}

/// Sends attempt `id` and races its answer against the lifecycle's deadline:
/// the answer, or the step the lifecycle took at the deadline. Only the timer is
/// dropped when the answer wins; once the deadline has fired, the lifecycle's
/// call is awaited to its end (in exact mode it waits for its turn).
async fn race(
    proxy: &Proxy,
    upstream: &Arc<Upstream>,
    req: &Admitted,
    id: RequestId,
    attempt: &Attempt,
) -> Result<(AttemptOutcome, Option<Answer>), Step> {
    let sending = send(proxy, upstream, req, attempt);
    tokio::pin!(sending);
    loop {
        let deadline = proxy.lifecycle(req.product).poll_timeout_of(id).expect("an attempt has a deadline");
        tokio::select! {
            answer = &mut sending => return Ok(answer),
            () = tokio::time::sleep_until(proxy.instant_of(deadline)) => {
                if let Some(due) = proxy.timeout_step(req.product, id).await {
                    return Err(due);
                }
            }
        }
    }
}

/// Ends request `id` as client-gone if the future driving it is dropped (the
/// client disconnected) before its answer.
struct ClientGone<'a> {
    proxy: &'a Proxy,
    req: &'a Admitted,
    id: Option<RequestId>,
}

impl Drop for ClientGone<'_> {
    fn drop(&mut self) {
        let Some(id) = self.id else { return };
        let finished = self.proxy.lifecycle(self.req.product).handle_client_gone(self.proxy.now(), id);
        match finished {
            Ok(finished) => self.proxy.finished(self.req, &finished),
            Err(e) => tracing::error!(error = %e, "the lifecycle refused a client's departure"),
        }
    }
}

impl Proxy {
    /// Sleeps until the lifecycle's deadline for request `id`, then returns what
    /// the lifecycle decided at it.
    async fn when_due(&self, product: usize, id: RequestId) -> Step {
        let deadline = self.lifecycle(product).poll_timeout_of(id).expect("a waiting request has a deadline");
        self.at_deadline(product, id, deadline).await
    }

    async fn at_deadline(&self, product: usize, id: RequestId, mut deadline: Nanos) -> Step {
        loop {
            tokio::time::sleep_until(self.instant_of(deadline)).await;
            if let Some(step) = self.timeout_step(product, id).await {
                return step;
            }
            // The timer woke a hair early: wait for the lifecycle's instant again.
            deadline = self.lifecycle(product).poll_timeout_of(id).expect("the request still waits on its deadline");
        }
    }

    /// The request's arrival through its product's limits: at once on local or
    /// lagged counters, in the fleet's order in exact mode.
    async fn start(&self, req: &Admitted) -> Step {
        let draw = rand::random();
        let Some(exact) = &self.exact else {
            return self.lifecycle(req.product).handle_request(self.now(), &req.info, draw);
        };
        let info = req.info.clone();
        let call = move |lifecycle: &mut Lifecycle, now| lifecycle.handle_request(now, &info, draw);
        let lifecycle = &self.lifecycles[req.product];
        // Its changes go with the request's last call, before its answer.
        // Exact mode's calls are boxed here and below: their futures (about 2 KB
        // each) would otherwise be part of every request's future in every mode,
        // which is copied when hyper boxes it.
        Box::pin(exact.call_unshipped(&self.store, req.product, lifecycle, || self.now(), call, end_abandoned)).await
    }

    /// An attempt's outcome reported. A driver that went away has already
    /// reported its client gone, so an abandoned result needs nothing more.
    /// In exact mode the changes of an attempt whose response is delivered
    /// wait for the delivery's end and go with its changes, in one shipment;
    /// others are shipped at once.
    async fn attempt_step(&self, product: usize, id: RequestId, outcome: AttemptOutcome) -> Result<Step, CoreError> {
        let draw = rand::random();
        let call =
            move |lifecycle: &mut Lifecycle, now| lifecycle.handle_attempt(now, id, outcome, Usage::default(), draw);
        let Some(exact) = &self.exact else {
            return call(&mut self.lifecycle(product), self.now());
        };
        let lifecycle = &self.lifecycles[product];
        let unshipped = exact.call_unshipped(&self.store, product, lifecycle, || self.now(), call, ignore_abandoned);
        let step = Box::pin(unshipped).await;
        if !matches!(step, Ok(Step::Deliver { .. })) {
            exact.ship_soon(product);
        }
        step
    }

    /// Returns once every counter change made so far is in the store (exact
    /// mode; at once otherwise): awaited before anything reaches a client.
    async fn all_shipped(&self, product: usize) {
        if let Some(exact) = &self.exact {
            Box::pin(exact.all_shipped(&self.store, product)).await;
        }
    }

    /// The lifecycle's deadline for request `id` reached.
    async fn timeout_step(&self, product: usize, id: RequestId) -> Option<Step> {
        let draw = rand::random();
        let call = move |lifecycle: &mut Lifecycle, now| lifecycle.handle_timeout_of(now, id, draw);
        self.in_turn(product, call, ignore_abandoned).await
    }

    /// Makes a call that may change product `product`'s counters: at once on
    /// local or lagged counters, in the fleet's order in exact mode, where
    /// `abandoned` gets the result if the task waiting for it is gone. (The
    /// arrival, [`Proxy::start`], clones its `RequestInfo` only in exact mode.)
    async fn in_turn<R: Send + 'static>(
        &self,
        product: usize,
        call: impl FnOnce(&mut Lifecycle, Nanos) -> R + Send + 'static,
        abandoned: impl FnOnce(&mut Lifecycle, Nanos, R) + Send + 'static,
    ) -> R {
        let Some(exact) = &self.exact else {
            let mut lifecycle = self.lifecycle(product);
            return call(&mut lifecycle, self.now());
        };
        Box::pin(exact.call(&self.store, product, &self.lifecycles[product], || self.now(), call, abandoned)).await
    }
}

fn ignore_abandoned<R>(_: &mut Lifecycle, _: Nanos, _: R) {}

/// Ends a request whose driver went away while its arrival waited for its turn
/// (exact mode): nothing else will.
fn end_abandoned(lifecycle: &mut Lifecycle, now: Nanos, step: Step) {
    let (Step::Forward { id, .. } | Step::Wait { id } | Step::Deliver { id }) = step else { return };
    if let Err(e) = lifecycle.handle_client_gone(now, id) {
        tracing::error!(error = %e, "the lifecycle refused an abandoned request's end");
    }
}

/// The fields that never pass the proxy: hop-by-hop ones, those it writes
/// itself, and the client's credentials.
static NEVER_PASSED: [HeaderName; 11] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    header::HOST,
    header::CONTENT_LENGTH,
    HeaderName::from_static("api-key"),
    header::AUTHORIZATION,
];

/// Takes out of `headers` the fields that never pass the proxy, and those its
/// `Connection` field names. Done in place: cheaper than copying every other
/// field into a new map, and the more so the more fields a message carries.
fn strip_unpassed(headers: &mut HeaderMap) {
    let hop = nominated(headers);
    for name in NEVER_PASSED.iter().chain(&hop) {
        headers.remove(name);
    }
}

/// The fields a `Connection` header names: hop-by-hop like the standard ones
/// (RFC 9110 §7.6.1), so they are never passed on either way.
fn nominated(headers: &HeaderMap) -> Vec<HeaderName> {
    let values = headers.get_all(header::CONNECTION).iter().filter_map(|v| v.to_str().ok());
    let tokens = values.flat_map(|v| v.split(',')).map(str::trim);
    // `keep-alive`, the usual token, is dropped anyway: no allocation for it.
    let tokens = tokens.filter(|t| !NEVER_PASSED.iter().any(|name| name.as_str().eq_ignore_ascii_case(t)));
    tokens.filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok()).collect()
}

/// A backend's response head, and the connection its body arrives on.
type Answer = (hyper::Response<UpBody>, Lease);

async fn send(
    proxy: &Proxy,
    upstream: &Arc<Upstream>,
    req: &Admitted,
    attempt: &Attempt,
) -> (AttemptOutcome, Option<Answer>) {
    let Some(request) = backend_request(proxy, req, attempt) else {
        return (AttemptOutcome::TransportFailure, None);
    };
    proxy.metrics.attempt(&attempt.backend);
    // No timeout here: the attempt's deadline is the lifecycle's (see `drive`).
    match upstream.send(request).await {
        Err(e) => {
            // A connection that opened but answered something that is not HTTP is a
            // bad gateway, not a transport failure.
            let malformed = match &e {
                UpstreamError::Malformed(_) => true,
                UpstreamError::Http(e) => error_chain_has_parse_error(e.as_ref()),
                UpstreamError::Connect(_) => false,
            };
            tracing::warn!(backend = %attempt.backend, error = %e, malformed, "backend attempt failed");
            let outcome = if malformed { AttemptOutcome::BadResponse } else { AttemptOutcome::TransportFailure };
            (outcome, None)
        }
        Ok((response, lease)) => {
            let retry_after = parse_retry_after(&retry_after_headers(response.headers()), proxy.now());
            (AttemptOutcome::Response { status: response.status().as_u16(), retry_after }, Some((response, lease)))
        }
    }
}

fn error_chain_has_parse_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(err) = source {
        if err.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_parse) {
            return true;
        }
        source = err.source();
    }
    false
}

/// The policy's literal `set-header`s of one section, with APIM's `exists-action`.
fn apply_set_headers(headers: &mut HeaderMap, set: &[apim_policy::read::SetHeader], section: &str) {
    for h in set.iter().filter(|h| h.section == section) {
        let Ok(name) = HeaderName::try_from(h.name.as_str()) else { continue };
        let values = h.values.iter().filter_map(|v| HeaderValue::from_str(v).ok());
        match h.exists_action {
            ExistsAction::Delete => {
                headers.remove(&name);
            }
            ExistsAction::Skip if headers.contains_key(&name) => {}
            ExistsAction::Append => values.for_each(|v| {
                headers.append(&name, v);
            }),
            ExistsAction::Skip | ExistsAction::Override => {
                headers.remove(&name);
                values.for_each(|v| {
                    headers.append(&name, v);
                });
            }
        }
    }
}

/// The headers `parse_retry_after` reads; most responses have none of them.
fn retry_after_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    const NAMES: [&str; 3] = ["retry-after-ms", "x-ms-retry-after-ms", "retry-after"];
    headers
        .iter()
        .filter(|(n, _)| NAMES.contains(&n.as_str()))
        .filter_map(|(n, v)| v.to_str().ok().map(|v| (n.as_str().to_owned(), v.to_owned())))
        .collect()
}

fn backend_request(proxy: &Proxy, req: &Admitted, attempt: &Attempt) -> Option<hyper::Request<Bytes>> {
    let index = proxy.config.routing.backends.iter().position(|b| *b.id == *attempt.backend)?;
    let client_path = req.parts.uri.path_and_query();
    // The lifecycle's routing is the config's: an attempt's URL is its backend's.
    debug_assert_eq!(*attempt.url, proxy.config.routing.backends[index].url);
    let uri = proxy.bases[index].join(client_path)?;
    let mut request = hyper::Request::new(req.body.clone());
    *request.method_mut() = req.parts.method.clone();
    *request.uri_mut() = uri;
    let headers = request.headers_mut();
    *headers = req.parts.headers.clone();
    strip_unpassed(headers);
    headers.remove(&proxy.key_header);
    // The proxy reads every body it passes on for its token usage, so it asks
    // for bodies as they are; a client that accepts gzip may always be answered
    // without it (RFC 9110 §12.5.3).
    headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    apply_set_headers(headers, &proxy.config.products[req.product].set_headers, "inbound");
    if let Some((name, value)) = &proxy.credentials[index] {
        headers.append(name, value.clone());
    }
    Some(request)
}

/// The header that authenticates the proxy to a backend, if it has credentials.
/// A variable that is not set, or a value that cannot be a header, is an error.
fn credential_header(credential: Option<&Credential>) -> Result<Option<(HeaderName, HeaderValue)>, String> {
    let env = |var: &String| {
        let value = std::env::var(var).ok().filter(|v| !v.is_empty());
        value.ok_or_else(|| format!("environment variable `{var}` is not set or empty"))
    };
    let (name, value) = match credential {
        None => return Ok(None),
        Some(Credential::ApiKey(k)) => (HeaderName::from_static("api-key"), k.clone()),
        Some(Credential::ApiKeyEnv(var)) => (HeaderName::from_static("api-key"), env(var)?),
        Some(Credential::Bearer(t)) => (header::AUTHORIZATION, format!("Bearer {t}")),
        Some(Credential::BearerEnv(var)) => (header::AUTHORIZATION, format!("Bearer {}", env(var)?)),
    };
    let mut value =
        HeaderValue::try_from(value).map_err(|_| format!("the `{name}` credential is not a valid header value"))?;
    // Kept out of debug output and marked never to be indexed by HTTP/2's HPACK.
    value.set_sensitive(true);
    Ok(Some((name, value)))
}

/// A backend's base URL, split once so that each request's URI is put together
/// without parsing: the base's scheme and authority, then its path, then the
/// client's path and query (less a leading `/openai` when the base already ends
/// in it, as APIM's backend URLs often do).
pub(crate) struct BaseUrl {
    scheme: axum::http::uri::Scheme,
    authority: axum::http::uri::Authority,
    /// The base's path without a trailing `/` (empty for none).
    prefix: String,
}

impl BaseUrl {
    pub(crate) fn parse(url: &str) -> Option<BaseUrl> {
        let uri: Uri = url.trim_end_matches('/').parse().ok()?;
        let prefix = uri.path().trim_end_matches('/').to_owned();
        let parts = uri.into_parts();
        Some(BaseUrl { scheme: parts.scheme?, authority: parts.authority?, prefix })
    }

    fn join(&self, client: Option<&axum::http::uri::PathAndQuery>) -> Option<Uri> {
        let client_text = client.map_or("/", |p| p.as_str());
        let rest = match self.prefix.ends_with("/openai") {
            true => client_text.strip_prefix("/openai").unwrap_or(client_text),
            false => client_text,
        };
        // The common case: the joined path is the client's own, already parsed.
        let same = self.prefix.len() + rest.len() == client_text.len() && client_text.starts_with(&self.prefix);
        let path_and_query = match (same, client) {
            (true, Some(client)) => client.clone(),
            _ => format!("{}{rest}", self.prefix).parse().ok()?,
        };
        let mut parts = axum::http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(path_and_query);
        Uri::from_parts(parts).ok()
    }
}

async fn deliver(
    proxy: Arc<Proxy>,
    req: Box<Admitted>,
    id: RequestId,
    attempt: Attempt,
    (response, lease): Answer,
) -> Response<Body> {
    let (parts, body) = response.into_parts();
    let coding = usage::Coding::of(&parts.headers);
    let streaming = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let mut out = Response::new(Body::empty());
    *out.status_mut() = parts.status;
    *out.headers_mut() = parts.headers;
    strip_unpassed(out.headers_mut());
    apply_set_headers(out.headers_mut(), &proxy.config.products[req.product].set_headers, "outbound");
    if streaming {
        let charge = Charge::new(proxy, req, id, coding);
        // The head goes to the client now: the attempt's changes go first. (A
        // client that leaves meanwhile is charged by `charge`.)
        charge.proxy.all_shipped(charge.req.product).await;
        *out.body_mut() = Body::from_stream(charged_stream(body, charge, lease));
        return out;
    }
    // APIM's `forward-request timeout` covers the response head only: the body
    // is read for as long as it comes. A client that leaves first drops this
    // future, and `charge` reports it.
    let mut charge = Charge::new(proxy, req, id, coding);
    let read = http_body_util::Limited::new(body, MAX_BACKEND_BODY).collect();
    let bytes = match read.await {
        Ok(collected) => {
            lease.release();
            collected.to_bytes()
        }
        Err(_) => {
            // The body broke before the client saw any of it: the core answers
            // in its place, and charges what was delivered (nothing).
            tracing::warn!(backend = %attempt.backend, "backend body broken");
            let finished = charge.settle(Usage::default(), 0, DeliveryEnd::BodyBroken).await;
            return generated_response(finished);
        }
    };
    let usage = match charge.proxy.answer_usage(&charge.req, out.status(), coding, &bytes).await {
        Ok(usage) => usage.unwrap_or_default(),
        Err(usage::Unreadable) => {
            charge.tracker.give_up();
            charge.streamed_usage()
        }
    };
    let finished = charge.settle(usage, bytes.len() as u64, DeliveryEnd::Complete).await;
    for (name, value) in &finished.headers {
        if let (Ok(n), Ok(v)) = (HeaderName::try_from(name.as_str()), HeaderValue::from_str(value)) {
            out.headers_mut().insert(n, v);
        }
    }
    *out.body_mut() = Body::from(bytes);
    out
}

impl Proxy {
    /// What a buffered answer used. A creation (`POST`) used what its `usage`
    /// says. Any other call (`GET` of a stored response or chat completion)
    /// used nothing more, unless it is the first to show finished a background
    /// response made through this replica, or with `[counters]` through the
    /// fleet (see [`crate::background`]). A
    /// successful generation whose body reports no usage is charged as counted
    /// (see [`Proxy::unreported_usage`]), never as zero.
    async fn answer_usage(
        &self,
        req: &Admitted,
        status: StatusCode,
        coding: usage::Coding,
        body: &[u8],
    ) -> Result<Option<Usage>, usage::Unreadable> {
        let path = req.parts.uri.path();
        // Cancelling a background response (`POST .../responses/{id}/cancel`)
        // creates nothing: it is a read that may show the response finished.
        let creation = req.parts.method == axum::http::Method::POST && !path.ends_with("/cancel");
        let state = match path.contains("/responses") {
            true => usage::ResponseState::of(coding, body, MAX_BACKEND_BODY),
            false => None,
        };
        let charged = match &state {
            None => creation,
            Some(state) if creation => {
                if state.background && !state.finished() {
                    self.background.remember(&self.store, &state.id).await;
                }
                true
            }
            // A finished background response is charged once, whichever call shows it.
            Some(state) => state.finished() && self.background.take(&self.store, &state.id).await,
        };
        if !charged {
            return Ok(None);
        }
        // A response still queued or running has no usage yet: it is charged when it is seen finished.
        let settled = state.is_none_or(|state| state.finished());
        match usage::from_body(coding, body, MAX_BACKEND_BODY)? {
            None if status.is_success() && settled => Ok(self.unreported_usage(req, coding, body)),
            usage => Ok(usage),
        }
    }

    /// What a generation whose answer reports no `usage` used (a backend that
    /// leaves it out): its prompt as estimated and what the model wrote,
    /// counted, as for a stream without usage. Any other answer used nothing.
    fn unreported_usage(&self, req: &Admitted, coding: usage::Coding, body: &[u8]) -> Option<Usage> {
        let texts = usage::generated_texts(coding, body, MAX_BACKEND_BODY)?;
        let completion_tokens = texts.iter().map(|text| tokenizer::count(&req.model, text)).sum();
        let usage = Usage { prompt_tokens: prompt_estimate(req), completion_tokens };
        tracing::warn!(
            prompt_tokens = usage.prompt_tokens,
            completion_tokens = usage.completion_tokens,
            "the backend's answer reported no usage; its prompt and output are charged as counted by the proxy"
        );
        self.metrics.usage_missing();
        Some(usage)
    }

    /// Reports a delivery's end; in exact mode, in the fleet's order. The
    /// charge is made even if the task that waited for it is gone.
    async fn finish_delivery(&self, product: usize, id: RequestId, delivery: Delivery) -> Finished {
        let call = move |lifecycle: &mut Lifecycle, now| lifecycle.handle_delivered(now, id, delivery);
        let finished = self.in_turn(product, call, ignore_abandoned).await;
        finished.expect("each delivery is reported once")
    }

    pub fn render_metrics(&self) -> String {
        let now = self.now();
        let mut out =
            self.metrics.render(|product, backend| self.lifecycle(product).router().is_available(now, backend));
        if self.config.counters.is_some() {
            crate::metrics::render_store(&mut out, &self.store);
        }
        out
    }

    pub fn counters(&self) -> Option<&crate::counters::CountersConfig> {
        self.config.counters.as_ref()
    }

    pub(crate) fn store_state(&self) -> &crate::counters::StoreState {
        &self.store
    }

    pub(crate) fn product_names(&self) -> impl Iterator<Item = &str> {
        self.config.products.iter().map(|p| p.name.as_str())
    }

    /// Moves each product's journaled counter changes into its stream's backlog.
    pub(crate) fn drain_journals(&self, streams: &mut [crate::counters::Stream]) {
        for (product, stream) in streams.iter_mut().enumerate() {
            let mut lifecycle = self.lifecycle(product);
            while let Some(delta) = lifecycle.limits_mut().poll_delta() {
                // Bounded while the store is away: the oldest changes go first
                // (they matter least: their windows end soonest), and are counted.
                if stream.backlog.len() >= crate::counters::MAX_BACKLOG {
                    stream.backlog.pop_front();
                    self.store.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                stream.backlog.push_back(delta);
            }
        }
    }

    /// Exact mode: every product catches up with the store and ships what waits.
    pub(crate) async fn flush_exact(&self) {
        let Some(exact) = &self.exact else { return };
        for (product, lifecycle) in self.lifecycles.iter().enumerate() {
            exact.flush(&self.store, product, lifecycle, || self.now()).await;
        }
    }

    /// Applies another replica's counter changes to a product's counters.
    pub(crate) fn apply_deltas(&self, product: usize, deltas: &[gateway_core::CounterDelta]) {
        let now = self.now();
        let mut lifecycle = self.lifecycle(product);
        for delta in deltas {
            lifecycle.limits_mut().handle_delta(now, delta);
        }
        drop(lifecycle);
        let store = &self.store;
        store.applied.fetch_add(deltas.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let mut timings = store.timings.lock().unwrap_or_else(|e| e.into_inner());
        for delta in deltas {
            timings.lag_s.saturating_record((now.saturating_sub(delta.at).0 / 1000).max(1));
        }
    }

    /// Whether a request must be refused because the counter store cannot be
    /// reached and the config says to reject then.
    fn store_refuses(&self) -> bool {
        use crate::counters::OnStoreError;
        self.config.counters.as_ref().is_some_and(|c| c.on_store_error == OnStoreError::Reject)
            && !self.store.reachable.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn respond_generated(&self, req: &Admitted, finished: Finished) -> Response<Body> {
        self.finished(req, &finished);
        generated_response(finished)
    }
}

/// The client's answer when the gateway made it (a rejection, 500, 502, 503, 504).
fn generated_response(finished: Finished) -> Response<Body> {
    let generated = finished.generated.map(|g| *g).unwrap_or_else(|| GeneratedResponse {
        status: 500,
        headers: Vec::new(),
        body: String::new(),
        retry_after_secs: None,
    });
    let mut out = Response::new(Body::from(generated.body));
    *out.status_mut() = StatusCode::from_u16(generated.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    for (name, value) in generated.headers.iter().chain(&finished.headers) {
        if let (Ok(n), Ok(v)) = (HeaderName::try_from(name.as_str()), HeaderValue::from_str(value)) {
            out.headers_mut().insert(n, v);
        }
    }
    out
}

/// Charges a streamed response's tokens exactly once: when the stream ends,
/// breaks, or the client goes away (the body is dropped).
struct Charge {
    proxy: Arc<Proxy>,
    req: Box<Admitted>,
    id: RequestId,
    tracker: StreamTracker,
    response_bytes: u64,
    done: bool,
}

impl Charge {
    fn new(proxy: Arc<Proxy>, req: Box<Admitted>, id: RequestId, coding: usage::Coding) -> Charge {
        let tracker = StreamTracker::with_coding(&req.model, coding);
        Charge { proxy, req, id, tracker, response_bytes: 0, done: false }
    }

    /// What the stream used: its usage chunk, else its text counted. A stream
    /// that is not a creation (`GET` of a stored response, resumed) used nothing.
    fn streamed_usage(&self) -> Usage {
        let req = &self.req;
        if req.parts.method != axum::http::Method::POST {
            return Usage::default();
        }
        self.tracker.usage(prompt_estimate(req))
    }

    fn delivery(&self, usage: Usage, response_bytes: u64, end: DeliveryEnd) -> Delivery {
        // Only a creation is charged (see `streamed_usage`): a read that could
        // not be read has nothing to report.
        if self.tracker.unreadable() && self.req.parts.method == axum::http::Method::POST {
            tracing::warn!(
                prompt_tokens = usage.prompt_tokens,
                "the backend's body could not be read for its usage (its Content-Encoding, or a `usage` of an \
                 unknown shape); the prompt alone is charged"
            );
            self.proxy.metrics.usage_unreadable();
        }
        Delivery { usage, request_bytes: self.req.body.len() as u64, response_bytes, end }
    }

    /// Charges what was streamed, once, when the stream ended or broke.
    async fn finish(&mut self, end: DeliveryEnd) {
        if self.done {
            return;
        }
        self.settle(self.streamed_usage(), self.response_bytes, end).await;
    }

    /// Reports the delivery's end with what it used (a buffered body's `usage`,
    /// or a stream's), logs and counts the request: once. Marked settled
    /// before the core is told, so that a task dropped while waiting for its
    /// turn (exact mode, whose call is made anyway) is not charged twice.
    async fn settle(&mut self, usage: Usage, response_bytes: u64, end: DeliveryEnd) -> Finished {
        assert!(!std::mem::replace(&mut self.done, true), "a delivery is settled once");
        let delivery = self.delivery(usage, response_bytes, end);
        let finished = self.proxy.finish_delivery(self.req.product, self.id, delivery).await;
        self.proxy.finished(&self.req, &finished);
        finished
    }
}

impl Drop for Charge {
    /// A stream dropped before it ended is one whose client went away. It is
    /// charged at once on this replica's counters; in exact mode the change is
    /// shipped with the product's next turn (at most a `sync_interval` later).
    fn drop(&mut self) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let delivery = self.delivery(self.streamed_usage(), self.response_bytes, DeliveryEnd::ClientGone);
        let finished = self.proxy.lifecycle(self.req.product).handle_delivered(self.proxy.now(), self.id, delivery);
        let finished = finished.expect("each delivery is reported once");
        self.proxy.finished(&self.req, &finished);
    }
}

/// The backend's stream, passed on in batches of what has arrived (see
/// [`crate::batch`]) and charged when it ends; its connection goes back to the
/// pool only if the stream ended cleanly.
fn charged_stream(
    body: UpBody,
    charge: Charge,
    lease: Lease,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send {
    let data = crate::batch::Batched::new(body.into_data_stream());
    let state = (data, charge, Some(lease));
    futures_util::stream::unfold(state, |(mut data, mut charge, mut lease)| async move {
        match data.next().await {
            None => {
                charge.finish(DeliveryEnd::Complete).await;
                if let Some(lease) = lease.take() {
                    lease.release();
                }
                None
            }
            Some(Err(e)) => {
                charge.finish(DeliveryEnd::Complete).await;
                Some((Err(std::io::Error::other(e)), (data, charge, None)))
            }
            Some(Ok(bytes)) => {
                charge.tracker.feed(&bytes);
                charge.response_bytes += bytes.len() as u64;
                // The client has all it asked for once `[DONE]` reaches it:
                // the charge is made (in exact mode, shipped) before.
                if charge.tracker.done() {
                    charge.finish(DeliveryEnd::Complete).await;
                }
                Some((Ok(bytes), (data, charge, lease)))
            }
        }
    })
}
#[cfg(test)]
mod tests {
    use super::{deployment_model, split_product, BaseUrl};

    #[test]
    fn keys_name_their_product_as_apim_reads_them() {
        // The reference: `split_once` at the first `;product=`.
        let check = |given: &str, expected: (&str, Option<&str>)| {
            let reference = given.split_once(";product=").map_or((given, None), |(k, p)| (k, Some(p)));
            assert_eq!(split_product(given), expected, "{given}");
            assert_eq!(split_product(given), reference, "{given}");
        };
        check("k", ("k", None));
        check("k;product=p", ("k", Some("p")));
        check("a;b;product=p", ("a;b", Some("p")));
        check("k;product=p;product=q", ("k", Some("p;product=q")));
        check("k;product=", ("k", Some("")));
        check("k;produc", ("k;produc", None));
        check(";product=p", ("", Some("p")));
        check("k;", ("k;", None));
    }

    #[test]
    fn prompts_count_text_and_tokens_given_as_numbers() {
        let check = |body: serde_json::Value, expected: u64| {
            assert_eq!(super::prompt_tokens("gpt-4o", &body), expected, "{body}");
        };
        let count = |s: &str| tokenizer::count("gpt-4o", s);
        check(serde_json::json!({"input": "Hello there"}), count("Hello there"));
        check(serde_json::json!({"input": ["Hello", "there"]}), count("Hello") + count("there"));
        // Embeddings and completions take inputs already tokenized: one, or several.
        check(serde_json::json!({"input": [9906, 1070]}), 2);
        check(serde_json::json!({"input": [[9906, 1070], [1, 2, 3]]}), 5);
        check(serde_json::json!({"prompt": ["Hello", [1, 2]]}), count("Hello") + 2);
        check(serde_json::json!({"input": []}), 0);
        check(serde_json::json!({"input": 5}), 0);
    }

    #[test]
    fn deployments_name_their_tokenizer() {
        let check = |path: &str, expected: &str| assert_eq!(deployment_model(path, b"{}"), expected, "{path}");
        check("/openai/deployments/gpt-35-turbo/chat/completions", "gpt-35-turbo");
        check("/openai/deployments/my35/chat/completions", "my35");
        check("/openai/deployments/gpt-4/chat/completions", "gpt-4");
        check("/openai/deployments/gpt-4-32k/chat/completions", "gpt-4-32k");
        check("/openai/deployments/gpt-4o-mini/chat/completions", "gpt-4o");
        check("/openai/deployments/3/chat/completions", "gpt-4o");
        check("/openai/deployments/3x5/chat/completions", "gpt-4o");
        check("/openai/v1/chat/completions", "gpt-4o");
        // Paths without a deployment name it in the body.
        let check = |path: &str, body: &str, expected: &str| {
            assert_eq!(deployment_model(path, body.as_bytes()), expected, "{path} {body}");
        };
        check("/openai/v1/chat/completions", r#"{"model":"gpt-35-turbo","messages":[]}"#, "gpt-35-turbo");
        check("/openai/v1/responses", r#"{"model":"gpt-4","input":"hi"}"#, "gpt-4");
        check("/openai/responses", r#"{"model":"gpt-4.1-mini","input":"hi"}"#, "gpt-4o");
        check("/openai/v1/chat/completions", "not json", "gpt-4o");
        // A deployment in the path wins over the body's model.
        check("/openai/deployments/gpt-4/chat/completions", r#"{"model":"gpt-4o"}"#, "gpt-4");
    }

    /// The backend URI as the proxy first wrote it, with `format!` and a parse:
    /// the reference the split-once join must agree with.
    fn reference(base: &str, path: &str) -> String {
        let base = base.trim_end_matches('/');
        let path = if base.ends_with("/openai") { path.strip_prefix("/openai").unwrap_or(path) } else { path };
        format!("{base}{path}").parse::<axum::http::Uri>().unwrap().to_string()
    }

    #[test]
    fn backend_uris_join_the_base_and_the_clients_path() {
        let check = |base: &str, path: &str, expected: &str| {
            let client: axum::http::uri::PathAndQuery = path.parse().unwrap();
            let joined = BaseUrl::parse(base).unwrap().join(Some(&client)).unwrap().to_string();
            assert_eq!(joined, expected, "{base} + {path}");
            assert_eq!(joined, reference(base, path), "{base} + {path}");
        };
        let chat = "/openai/deployments/d/chat/completions?api-version=2024-10-21";
        check("http://127.0.0.1:1", chat, &format!("http://127.0.0.1:1{chat}"));
        check("http://127.0.0.1:1/", chat, &format!("http://127.0.0.1:1{chat}"));
        check("https://x.openai.azure.com/openai", chat, &format!("https://x.openai.azure.com{chat}"));
        check("https://x.openai.azure.com/openai/", "/openai/v1/models", "https://x.openai.azure.com/openai/v1/models");
        check("http://h/prefix", chat, &format!("http://h/prefix{chat}"));
        check("http://h/team/openai", "/openai/v1/chat?q=1", "http://h/team/openai/v1/chat?q=1");
        check("http://h/openai", "/other", "http://h/openai/other");
    }

    #[test]
    fn a_base_without_scheme_or_host_is_refused() {
        assert!(BaseUrl::parse("/openai").is_none());
        assert!(BaseUrl::parse("not a url").is_none());
    }
}
