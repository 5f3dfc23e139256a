//! The HTTP server: Azure OpenAI's endpoints over the behaviour model, with its
//! errors, headers, SSE streams and timings, plus `/_mock` control endpoints.

use crate::config::{Faults, MockConfig};
use crate::logprobs;
use crate::model::{Completion, DeploymentModel, ModelRequest, ModelResponse, Operation, Throttle};
use crate::shape::{self, Said};
use crate::stored::{self, Stored};
use crate::wire::{self, ChatStream, Meta, ParsedRequest, ResponseWire};
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use gateway_core::Nanos;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

struct MockState {
    config: MockConfig,
    models: BTreeMap<String, DeploymentModel>,
    epoch: Instant,
    epoch_unix: Nanos,
    served: u64,
    /// The Responses API's stored responses.
    stored: stored::Store,
}

#[derive(Clone)]
pub struct Mock {
    state: Arc<Mutex<MockState>>,
}

impl Mock {
    pub fn new(config: MockConfig) -> Mock {
        // Load each model's vocabulary now, not on the first request, which
        // would otherwise take hundreds of milliseconds longer than the model says.
        for d in &config.deployments {
            tokenizer::count(&d.model, "warm up");
        }
        // The wall clock and the monotonic clock are read together: the mock's
        // time is `epoch_unix` plus what `epoch` has seen go by since.
        let (epoch, epoch_unix) = (Instant::now(), SystemTime::now());
        let epoch_unix = Nanos(epoch_unix.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64));
        // Fault schedules count from the config's origin, else from now.
        let origin = config.origin_unix_ms.map_or(epoch_unix, Nanos::from_millis);
        let models = config
            .deployments
            .iter()
            .enumerate()
            .map(|(i, d)| (d.name.clone(), DeploymentModel::new(d.clone(), config.seed ^ (i as u64) << 32, origin)))
            .collect();
        let state = MockState { config, models, epoch, epoch_unix, served: 0, stored: stored::Store::default() };
        Mock { state: Arc::new(Mutex::new(state)) }
    }

    pub fn router(self) -> Router {
        Router::new()
            .route("/openai/deployments/{deployment}/chat/completions", operation(Operation::ChatCompletions))
            .route("/openai/deployments/{deployment}/completions", operation(Operation::Completions))
            .route("/openai/deployments/{deployment}/embeddings", operation(Operation::Embeddings))
            .route("/openai/responses", named(Operation::Responses, dated_responses_api_version))
            // Azure's v1 API: the deployment is the body's `model`, as the plain
            // `openai` client sends it.
            .route("/openai/v1/chat/completions", named(Operation::ChatCompletions, v1_api_version))
            .route("/openai/v1/completions", named(Operation::Completions, v1_api_version))
            .route("/openai/v1/embeddings", named(Operation::Embeddings, v1_api_version))
            .route("/openai/v1/responses", named(Operation::Responses, v1_api_version))
            .route("/openai/v1/responses/{id}", kept(v1_api_version))
            .route("/openai/v1/responses/{id}/cancel", cancelling(v1_api_version))
            .route("/openai/responses/{id}", kept(dated_responses_api_version))
            .route("/openai/responses/{id}/cancel", cancelling(dated_responses_api_version))
            .route("/openai/v1/models", get(models))
            .route("/openai/v1/models/{model}", get(model))
            .route("/_mock/stats", get(stats))
            .route("/_mock/faults", post(set_faults))
            .with_state(self)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MockState> {
        // A panic while holding the lock cannot leave the model half-updated in a way
        // that matters to a mock; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Serves until `shutdown` completes, then finishes the requests in progress.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: MockConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // Each SSE event is written as it is made; with Nagle's algorithm on, every
    // event after the first would wait for the client's delayed ACK (40 ms on
    // Linux), and a zero-latency stream of 64 events would take 40 ms.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, Mock::new(config).router()).with_graceful_shutdown(shutdown).await
}

/// The route of one Azure OpenAI operation: every operation shares `handle`.
fn operation(op: Operation) -> axum::routing::MethodRouter<Mock> {
    post(
        move |mock: State<Mock>,
              path: Path<String>,
              query: Query<HashMap<String, String>>,
              headers: HeaderMap,
              body: Bytes| async move {
            match dated_api_version(&query.0) {
                Ok(version) => handle(mock.0, op, path.0, version, headers, body).await,
                Err(refusal) => *refusal,
            }
        },
    )
}

/// A route whose deployment is the body's `model` (the Responses API, and
/// every operation of the v1 API); the path's own rule says which
/// `api-version`s it takes.
fn named(op: Operation, api_version: ApiVersionRule) -> axum::routing::MethodRouter<Mock> {
    post(move |mock: State<Mock>, query: Query<HashMap<String, String>>, headers: HeaderMap, body: Bytes| async move {
        let version = match api_version(&query.0) {
            Ok(version) => version,
            Err(refusal) => return *refusal,
        };
        match wire::body_deployment(&body) {
            Ok(deployment) => handle(mock.0, op, deployment, version, headers, body).await,
            Err(message) => error(StatusCode::BAD_REQUEST, "BadRequest", &message),
        }
    })
}

/// `GET` (retrieve) and `DELETE` of a stored response, by id.
fn kept(api_version: ApiVersionRule) -> axum::routing::MethodRouter<Mock> {
    let retrieve = move |mock: State<Mock>,
                         id: Path<String>,
                         query: Query<HashMap<String, String>>,
                         headers: HeaderMap| async move {
        stored_call(&mock, &id, &query, &headers, api_version, |store, id| {
            let view = store.get(id).map(|stored| stored.view(Instant::now()));
            view.map(|body| Json(body).into_response())
        })
    };
    let delete = move |mock: State<Mock>,
                       id: Path<String>,
                       query: Query<HashMap<String, String>>,
                       headers: HeaderMap| async move {
        stored_call(&mock, &id, &query, &headers, api_version, |store, id| {
            let deleted = json!({ "id": id, "object": "response", "deleted": true });
            store.remove(id).then(|| Json(deleted).into_response())
        })
    };
    get(retrieve).delete(delete)
}

/// `POST .../responses/{id}/cancel`: stops a background response.
fn cancelling(api_version: ApiVersionRule) -> axum::routing::MethodRouter<Mock> {
    post(
        move |mock: State<Mock>, id: Path<String>, query: Query<HashMap<String, String>>, headers: HeaderMap| async move {
            stored_call(&mock, &id, &query, &headers, api_version, |store, id| {
                store.cancel(id, Instant::now()).map(|cancelled| match cancelled {
                    Ok(body) => Json(body).into_response(),
                    Err(message) => invalid_request(StatusCode::BAD_REQUEST, &message, None, None),
                })
            })
        },
    )
}

/// A call on a stored response, checked (key, api-version) and made under the
/// state's lock; `call` answers `None` for a response the store does not hold
/// (the service's 404).
fn stored_call(
    mock: &Mock,
    id: &str,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    api_version: ApiVersionRule,
    call: impl FnOnce(&mut stored::Store, &str) -> Option<Response>,
) -> Response {
    if let Err(refusal) = api_version(query) {
        return *refusal;
    }
    let mut state = mock.lock();
    if !authorized(&state.config.api_keys, headers) {
        return *unauthorized();
    }
    call(&mut state.stored, id).unwrap_or_else(|| {
        invalid_request(StatusCode::NOT_FOUND, &format!("Response with id '{id}' not found."), None, None)
    })
}

fn invalid_request(status: StatusCode, message: &str, param: Option<&str>, code: Option<&str>) -> Response {
    let body = wire::invalid_request_body(message, param, code);
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Which `api-version`s a route takes: the version a call names, or Azure's refusal.
type ApiVersionRule = fn(&HashMap<String, String>) -> Result<String, Box<Response>>;

/// The deployment routes' rule: a dated version, required.
fn dated_api_version(query: &HashMap<String, String>) -> Result<String, Box<Response>> {
    let Some(api_version) = query.get("api-version").cloned() else {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "The api-version query parameter (?api-version=) is required for all requests.",
        ));
    };
    if !wire::is_known_api_version(&api_version) {
        // Azure's answer to an api-version it does not serve, as current
        // resources give it (older ones answered 404 "Resource not found").
        return Err(refuse(StatusCode::BAD_REQUEST, "BadRequest", "API version not supported"));
    }
    Ok(api_version)
}

/// `/openai/responses`: a dated version from the Responses API's first preview on.
fn dated_responses_api_version(query: &HashMap<String, String>) -> Result<String, Box<Response>> {
    let version = dated_api_version(query)?;
    if !wire::serves_responses(&version) {
        return Err(refuse(StatusCode::BAD_REQUEST, "BadRequest", "API version not supported"));
    }
    Ok(version)
}

/// `/openai/v1/...`: no version needed; `preview` asks for preview features.
fn v1_api_version(query: &HashMap<String, String>) -> Result<String, Box<Response>> {
    match query.get("api-version").map(String::as_str) {
        None => Ok("v1".to_owned()),
        Some("preview") => Ok("preview".to_owned()),
        Some(_) => Err(refuse(StatusCode::BAD_REQUEST, "BadRequest", "API version not supported")),
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], wire::error_body(code, message)).into_response()
}

fn refuse(status: StatusCode, code: &str, message: &str) -> Box<Response> {
    Box::new(error(status, code, message))
}

/// Everything a handler learns before the model decides.
struct Admission {
    meta: Meta,
    parsed: ParsedRequest,
    response: ModelResponse,
    api_version: String,
    dimensions: usize,
    seed: u64,
}

async fn handle(
    mock: Mock,
    operation: Operation,
    deployment: String,
    api_version: String,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let admission = match admit(&mock, operation, &deployment, api_version, &headers, &body) {
        Ok(a) => a,
        Err(response) => return *response,
    };
    match admission.response {
        ModelResponse::Throttled(t) => throttled(operation, &admission.api_version, &t),
        ModelResponse::Fault { status, after } => {
            tokio::time::sleep(duration(after)).await;
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            (status, [(header::CONTENT_TYPE, "application/json")], wire::fault_body(status.as_u16())).into_response()
        }
        ModelResponse::Reset | ModelResponse::Refused => reset(),
        ModelResponse::TooLarge { cost, tpm } => error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            &format!(
                "This request needs {cost} tokens (its prompt plus max_tokens), more than this deployment's \
                 rate limit of {tpm} tokens per minute can ever admit. Lower max_tokens or the prompt."
            ),
        ),
        ModelResponse::Hang => std::future::pending().await,
        ModelResponse::Complete(c) => complete(&mock, operation, admission, c).await,
    }
}

fn admit(
    mock: &Mock,
    operation: Operation,
    deployment: &str,
    api_version: String,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Admission, Box<Response>> {
    let mut guard = mock.lock();
    // Borrowed through the guard once, so that its fields can be borrowed apart.
    let state = &mut *guard;
    if !authorized(&state.config.api_keys, headers) {
        return Err(unauthorized());
    }
    let now = state.epoch_unix + Nanos(state.epoch.elapsed().as_nanos() as u64);
    state.served += 1;
    let served = state.served;
    let Some(model) = state.models.get_mut(deployment) else {
        return Err(refuse(
            StatusCode::NOT_FOUND,
            "DeploymentNotFound",
            "The API deployment for this resource does not exist. If you created the deployment within the last 5 \
             minutes, please wait a moment and try again.",
        ));
    };
    let model_name = model.config().model.clone();
    if !wire::serves(&model_name, operation) {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "OperationNotSupported",
            &wire::not_supported(operation, &model_name),
        ));
    }
    let mut parsed = wire::parse_request(operation, &model_name, body)
        .map_err(|message| refuse(StatusCode::BAD_REQUEST, "BadRequest", &message))?;
    // A continued response's input is its predecessors' input and output too.
    if let Some(previous) = &parsed.keeping.previous {
        let Some(stored) = state.stored.get(previous) else {
            let message = format!("Previous response with id '{previous}' not found.");
            let refusal = invalid_request(
                StatusCode::BAD_REQUEST,
                &message,
                Some("previous_response_id"),
                Some("previous_response_not_found"),
            );
            return Err(Box::new(refusal));
        };
        parsed.prompt_tokens = parsed.prompt_tokens.saturating_add(stored.tokens);
    }
    let dimensions = model.config().embedding_dimensions();
    wire::check_dimensions(&model_name, dimensions, parsed.dimensions)
        .map_err(|message| refuse(StatusCode::BAD_REQUEST, "BadRequest", &message))?;
    let request = ModelRequest {
        operation,
        prompt_tokens: parsed.prompt_tokens,
        max_tokens: parsed.max_tokens,
        best_of: parsed.best_of,
        choices: parsed.choices,
        generated: parsed.generated,
        stream: parsed.stream && operation != Operation::Embeddings,
        completion_tokens: completion_tokens(headers)?,
    };
    let response = model.handle_request(now, &request);
    let id = match operation {
        Operation::ChatCompletions => format!("chatcmpl-limitlab{served:012x}"),
        Operation::Completions => format!("cmpl-limitlab{served:012x}"),
        Operation::Embeddings => format!("emb-limitlab{served:012x}"),
        Operation::Responses => format!("resp_limitlab{served:012x}"),
    };
    let meta = Meta { id, created: now.0 / 1_000_000_000, model: model_name };
    Ok(Admission { meta, parsed, response, api_version, dimensions, seed: state.config.seed })
}

/// The completion length a load generator asks for (`limitlab load` sends the
/// one its scenario drew, so that the mock answers what the simulator's backend
/// would); without the header, the deployment's distribution draws it. Azure
/// ignores the header.
fn completion_tokens(headers: &HeaderMap) -> Result<Option<u64>, Box<Response>> {
    let Some(value) = headers.get(COMPLETION_TOKENS_HEADER) else { return Ok(None) };
    match value.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok()) {
        Some(n) if n >= 1 => Ok(Some(n)),
        _ => Err(refuse(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!("`{COMPLETION_TOKENS_HEADER}` must be a whole number of tokens, at least 1"),
        )),
    }
}

/// The mock's request header for the completion length a caller wants.
pub const COMPLETION_TOKENS_HEADER: &str = "x-limitlab-completion-tokens";

fn unauthorized() -> Box<Response> {
    refuse(
        StatusCode::UNAUTHORIZED,
        "401",
        "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for \
         an active subscription and use a correct regional API endpoint for your resource.",
    )
}

/// `GET /openai/v1/models`: the deployments, by the names the v1 API takes as
/// `model`, in name order.
async fn models(State(mock): State<Mock>, headers: HeaderMap) -> Response {
    let state = mock.lock();
    if !authorized(&state.config.api_keys, &headers) {
        return *unauthorized();
    }
    let created = state.epoch_unix.0 / 1_000_000_000;
    let data: Vec<Value> = state.models.keys().map(|name| wire::model_entry(name, created)).collect();
    Json(json!({ "object": "list", "data": data })).into_response()
}

/// `GET /openai/v1/models/{model}`: one deployment, or the service's 404.
async fn model(State(mock): State<Mock>, Path(name): Path<String>, headers: HeaderMap) -> Response {
    let state = mock.lock();
    if !authorized(&state.config.api_keys, &headers) {
        return *unauthorized();
    }
    if !state.models.contains_key(&name) {
        return error(StatusCode::NOT_FOUND, "model_not_found", &format!("The model `{name}` does not exist."));
    }
    Json(wire::model_entry(&name, state.epoch_unix.0 / 1_000_000_000)).into_response()
}

/// Whether a call may be served: any call when no keys are configured, else one
/// that carries a configured key (as `api-key`, or as a bearer token).
fn authorized(keys: &[String], headers: &HeaderMap) -> bool {
    if keys.is_empty() {
        return true;
    }
    let api_key = headers.get("api-key").and_then(|v| v.to_str().ok());
    let bearer =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    [api_key, bearer].into_iter().flatten().any(|given| keys.iter().any(|k| k == given))
}

fn throttled(operation: Operation, api_version: &str, t: &Throttle) -> Response {
    let mut response = (
        StatusCode::TOO_MANY_REQUESTS,
        [(header::CONTENT_TYPE, "application/json")],
        wire::throttle_body(operation, api_version, t),
    )
        .into_response();
    let h = response.headers_mut();
    insert(h, "retry-after", t.retry_after.retry_after_secs());
    insert(h, "retry-after-ms", t.retry_after.0.div_ceil(1_000_000));
    insert(h, "x-ratelimit-remaining-requests", t.remaining_requests);
    insert(h, "x-ratelimit-remaining-tokens", t.remaining_tokens);
    response
}

fn insert(headers: &mut HeaderMap, name: &'static str, value: impl ToString) {
    if let Ok(v) = HeaderValue::from_str(&value.to_string()) {
        headers.insert(name, v);
    }
}

/// A connection reset before any response: the body fails before its first
/// byte, so the server aborts the connection without completing a response.
fn reset() -> Response {
    let failing = stream::once(async { Err::<Bytes, _>(std::io::Error::other("injected connection reset")) });
    Response::new(Body::from_stream(failing))
}

fn duration(n: Nanos) -> Duration {
    Duration::from_nanos(n.0)
}

async fn complete(mock: &Mock, operation: Operation, admission: Admission, mut c: Completion) -> Response {
    let Admission { meta, parsed, dimensions, seed, .. } = admission;
    // A JSON answer or a call is spelled first: its length may differ from the draw.
    let said = shape::say(&parsed.shape, &meta.model, &mut c, parsed.max_tokens, &meta.id);
    let request_id = meta.id.clone();
    let wire = ResponseWire { meta: &meta, completion: &c, said: &said, keeping: &parsed.keeping };
    if operation == Operation::Responses && parsed.keeping.store {
        keep(mock, &wire);
    }
    let mut response = match (operation, parsed.stream) {
        (Operation::Responses, _) if parsed.keeping.background => Json(wire.queued()).into_response(),
        (Operation::Embeddings, _) => {
            tokio::time::sleep(duration(c.time_to_first_token)).await;
            Json(wire::embeddings_response(&meta, &parsed, dimensions, seed)).into_response()
        }
        (_, true) => {
            let events = sse_events(operation, meta, c, &said, &parsed);
            let mut r = Response::new(Body::from_stream(events));
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream; charset=utf-8"));
            r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            r
        }
        (Operation::ChatCompletions, false) => {
            tokio::time::sleep(duration(c.duration())).await;
            Json(wire::chat_response(&meta, &c, &said, parsed.logprobs)).into_response()
        }
        (Operation::Completions, false) => {
            tokio::time::sleep(duration(c.duration())).await;
            Json(wire::completions_response(&meta, &c, parsed.logprobs)).into_response()
        }
        (Operation::Responses, false) => {
            tokio::time::sleep(duration(c.duration())).await;
            Json(wire.response()).into_response()
        }
    };
    let h = response.headers_mut();
    insert(h, "x-ratelimit-remaining-requests", c.remaining_requests);
    insert(h, "x-ratelimit-remaining-tokens", c.remaining_tokens);
    insert(h, "apim-request-id", request_id);
    response
}

/// Stores a Responses API answer as it will be once its last token is out. A
/// stream that breaks midway leaves a failed response.
fn keep(mock: &Mock, wire: &ResponseWire) {
    let c = wire.completion;
    let mut stored = Stored {
        body: wire.response(),
        tokens: c.prompt_tokens.saturating_add(c.completion_tokens_total()),
        done_at: Instant::now() + duration(c.duration()),
        background: wire.keeping.background,
        cancelled: false,
    };
    if c.break_after.is_some() {
        stored.body = stored.pending("failed");
    }
    mock.lock().stored.insert(wire.meta.id.clone(), stored);
}

/// One SSE event per chunk, paced by the latency model; a stream that breaks
/// midway ends with an error after `break_after` tokens, aborting the connection.
fn sse_events(
    operation: Operation,
    meta: Meta,
    c: Completion,
    said: &Said,
    parsed: &ParsedRequest,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send {
    let (head, tokens, tail) = match operation {
        Operation::Responses => responses_events(&meta, &c, said, &parsed.keeping),
        _ => chunk_events(operation, &meta, &c, said, parsed),
    };
    let tail = match c.break_after {
        Some(_) => vec![Err(std::io::Error::other("injected broken stream"))],
        None => tail.into_iter().map(Ok).collect(),
    };
    let head = head.into_iter().map(Ok).collect::<Vec<Result<Bytes, std::io::Error>>>();
    let (ttft, per_token) = (duration(c.time_to_first_token), duration(c.time_per_token));
    // Each chunk is due at its own instant from the start, not a wait after the
    // one before: waits would add up every timer's lateness, about a
    // millisecond a token, and make a long stream much slower than the model says.
    let origin = tokio::time::Instant::now();
    let paced = stream::iter(tokens.into_iter().enumerate()).then(move |(i, chunk)| async move {
        let due = origin + ttft + per_token * i as u32;
        if !(ttft + per_token * i as u32).is_zero() {
            tokio::time::sleep_until(due).await;
        }
        Ok(chunk)
    });
    stream::iter(head).chain(paced).chain(stream::iter(tail))
}

/// A stream's events before its tokens, for each token sent, and after them
/// (sent only if the stream does not break).
type Events = (Vec<Bytes>, Vec<Bytes>, Vec<Bytes>);

/// Chat completions' and completions' chunks, ending with `data: [DONE]`. With
/// several choices, each token's chunks (one per choice, by index) go out together.
fn chunk_events(operation: Operation, meta: &Meta, c: &Completion, said: &Said, parsed: &ParsedRequest) -> Events {
    let event = |v: Value| format!("data: {v}\n\n");
    let chat = ChatStream { meta, completion: c, said, logprobs: parsed.logprobs };
    let head = match operation {
        Operation::ChatCompletions => {
            let roles = (0..c.choices).map(|index| event(chat.role(index)));
            vec![Bytes::from(event(chat.prelude())), Bytes::from(roles.collect::<String>())]
        }
        _ => Vec::new(),
    };
    let sent = c.break_after.unwrap_or(c.completion_tokens);
    // A JSON answer or a call has as many pieces as tokens, or fewer where a
    // character spans tokens.
    let pieces = (0..sent).map_while(|i| said.piece(i));
    let mut tokens = Vec::new();
    // A legacy completion's text offsets: each piece's place in its choice's text.
    let mut offset = 0;
    for (i, piece) in (0..).zip(pieces) {
        let chunk = |index: u64| match operation {
            Operation::ChatCompletions => chat.token(index, i, piece),
            _ => {
                let logprobs =
                    parsed.logprobs.map_or(Value::Null, |top| logprobs::completions(&[piece], i, top, offset));
                wire::completions_chunk(meta, index, piece, None, logprobs)
            }
        };
        tokens.push(Bytes::from((0..c.choices).map(|index| event(chunk(index))).collect::<String>()));
        offset += piece.chars().count();
    }
    let last = |index: u64| match operation {
        Operation::ChatCompletions => chat.finish(index),
        _ => wire::completions_chunk(meta, index, "", Some(c.finish_reason), Value::Null),
    };
    let mut tail = vec![Bytes::from((0..c.choices).map(|index| event(last(index))).collect::<String>())];
    if parsed.include_usage {
        let usage = match operation {
            Operation::ChatCompletions => chat.usage(),
            _ => wire::completions_usage_chunk(meta, c),
        };
        tail.push(Bytes::from(event(usage)));
    }
    tail.push(Bytes::from_static(b"data: [DONE]\n\n"));
    (head, tokens, tail)
}

/// A Responses API stream's events, numbered in order; its usage is in its
/// last event, and no `[DONE]` follows.
fn responses_events(meta: &Meta, c: &Completion, said: &Said, keeping: &stored::Keeping) -> Events {
    let wire = ResponseWire { meta, completion: c, said, keeping };
    let mut number = 0u64..;
    let mut event = |v: Value| Bytes::from(wire::responses_event(v, number.next().unwrap_or_default()));
    let head = wire.prelude().into_iter().map(&mut event).collect();
    let sent = c.break_after.unwrap_or(c.completion_tokens);
    let tokens = (0..sent).map_while(|i| said.piece(i)).map(|piece| event(wire.token(piece))).collect();
    let tail = wire.finish().into_iter().map(&mut event).collect();
    (head, tokens, tail)
}

async fn stats(State(mock): State<Mock>) -> Json<Value> {
    let state = mock.lock();
    let deployments: BTreeMap<&str, Value> =
        state.models.iter().map(|(name, m)| (name.as_str(), json!(m.stats()))).collect();
    Json(json!({ "deployments": deployments }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultsChange {
    deployment: String,
    faults: Faults,
}

/// Replaces a deployment's faults at run time, so a test can script an outage;
/// the new schedule counts from the change.
async fn set_faults(State(mock): State<Mock>, body: Bytes) -> Response {
    let change: FaultsChange = match serde_json::from_slice(&body) {
        Ok(c) => c,
        Err(e) => return error(StatusCode::BAD_REQUEST, "BadRequest", &format!("invalid faults: {e}")),
    };
    let mut state = mock.lock();
    let now = state.epoch_unix + Nanos(state.epoch.elapsed().as_nanos() as u64);
    let Some(model) = state.models.get_mut(&change.deployment) else {
        return error(StatusCode::NOT_FOUND, "DeploymentNotFound", &format!("no deployment `{}`", change.deployment));
    };
    if let Err(e) = change.faults.validate() {
        return error(StatusCode::BAD_REQUEST, "BadRequest", &format!("invalid faults: {e}"));
    }
    model.set_faults(change.faults, now);
    Json(json!({ "deployment": change.deployment, "faults": model.config().faults })).into_response()
}
