//! The whole life of a client request: limits on the way in, attempts at backends
//! with retry and failover, delivery, and the books on the way out.
//!
//! [`Lifecycle`] joins the limit book ([`LimitBook`]) and the `<backend>` side
//! ([`Router`]). The driver (simulator or proxy) feeds it events and performs the
//! [`Step`]s it returns:
//!
//! ```text
//! handle_request ──► Forward{attempt} ──(driver sends it now)──► handle_attempt
//!        │                  ▲                                        │
//!        │                  ├──── Forward (retry at once) ◄──────────┤
//!        │                  └── handle_timeout ◄── Wait (retry later)┤
//!        ▼                                                           ▼
//!   Respond(Finished) ◄── Respond (503, 500, 502, 504) ◄─── Deliver ─► handle_delivered ─► Finished
//! ```
//!
//! The lifecycle holds every deadline itself: each attempt's timeout and each
//! retry's instant. A driver learns the next one from [`Lifecycle::poll_timeout`]
//! (or, driving one request, [`Lifecycle::poll_timeout_of`]) and reports that it
//! came with [`Lifecycle::handle_timeout`] (or [`Lifecycle::handle_timeout_of`]);
//! it never computes a timeout or a wait. Every client request ends in exactly
//! one [`Finished`], which carries its [`OutcomeRecord`] and charges its tokens once.

use crate::deadlines::{Deadlines, Due, Ticket};
use crate::key::RequestInfo;
use crate::limit_book::{CoreError, LimitBook, RequestDecision, RequestId, ResponseInfo};
use crate::policy::Policy;
use crate::reason::Reason;
use crate::routing::{Attempt, AttemptOutcome, Next, Route, Router, Routing, Unavailable};
use crate::time::Nanos;
use serde::Serialize;
use smallvec::SmallVec;
use std::collections::VecDeque;
use std::sync::Arc;

/// Tokens a response reported in `usage`, or the driver counted (prompt with the
/// model's tokenizer, completion from the streamed text).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Usage {
    /// Counts saturate: a backend may report anything, and a wrapped count would
    /// charge almost nothing.
    pub fn total(self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }

    fn add(&mut self, other: Usage) {
        self.prompt_tokens = self.prompt_tokens.saturating_add(other.prompt_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(other.completion_tokens);
    }
}

/// What the driver does next for a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Send the request to `attempt.backend` now, then report how it ended with
    /// [`Lifecycle::handle_attempt`]. An attempt with no answer by its deadline
    /// (see [`Lifecycle::poll_timeout`]) is timed out by the lifecycle itself.
    Forward { id: RequestId, attempt: Attempt },
    /// The request waits for a retry. Nothing to do until the lifecycle's
    /// deadline for it; [`Lifecycle::handle_timeout`] then gives its `Forward`.
    Wait { id: RequestId },
    /// Pass the backend's response to the client unchanged, then report what was
    /// delivered with [`Lifecycle::handle_delivered`].
    Deliver { id: RequestId },
    /// Answer the client with this; the request is over.
    Respond(Finished),
}

/// The end of a client request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finished {
    /// The request's id; `None` when a limit rejected it on arrival.
    pub id: Option<RequestId>,
    /// A response the gateway made itself (rejection, 503, 500, 504); `None` when
    /// the client got the backend's response. Boxed: most requests have none, and
    /// a `Finished` moves through every driver's hot path.
    pub generated: Option<Box<GeneratedResponse>>,
    /// Headers the policy adds to the client response (remaining calls, tokens).
    pub headers: Vec<(String, String)>,
    pub variables: Vec<(String, i64)>,
    pub record: OutcomeRecord,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GeneratedResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// The wait the answer's retry header carries, in seconds (whatever the
    /// header is named), for reports.
    pub retry_after_secs: Option<u64>,
}

/// How one attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttemptResult {
    Status(u16),
    TransportFailure,
    BadResponse,
    Timeout,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AttemptRecord {
    pub backend: Arc<str>,
    /// The retry wait before this attempt (zero for the first).
    pub wait: Nanos,
    pub started: Nanos,
    pub ended: Nanos,
    pub result: AttemptResult,
    pub tokens: u64,
}

/// Everything the decision log, the proxy's logs and its metrics need about one
/// client request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OutcomeRecord {
    pub arrived: Nanos,
    pub finished: Nanos,
    /// Inline for one attempt, the common case, which then allocates nothing.
    pub attempts: SmallVec<[AttemptRecord; 1]>,
    /// The status the client received.
    pub status: u16,
    pub reason: Reason,
    /// Tokens charged to the request's token counters: every attempt's usage plus
    /// what was delivered, exactly once.
    pub usage: Usage,
}

impl OutcomeRecord {
    pub fn tokens_charged(&self) -> u64 {
        self.usage.total()
    }
}

/// What the driver knows once the delivered response is over (the body read, or
/// the stream ended or broke).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delivery {
    /// The usage of the delivered response: from `usage`, the final stream chunk,
    /// or counted; for a broken stream, what was sent before it broke.
    pub usage: Usage,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub end: DeliveryEnd,
}

/// How the delivery of a backend's response ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeliveryEnd {
    /// The whole response reached the client (or, for a stream, the backend ended it).
    #[default]
    Complete,
    /// The client went away first: what was sent until then is charged.
    ClientGone,
    /// The backend's body broke (or never ended) before any of it reached the
    /// client: the core answers 502 in its place, and the policy's increment
    /// conditions see 502. What the body reported until then is charged.
    BodyBroken,
}

enum Phase {
    /// An attempt is on its way to a backend; `ticket` names its deadline.
    Attempting { attempt: Sent, started: Nanos, wait: Nanos, ticket: Ticket },
    /// A retry waits for its instant. Boxed: retries are rare, and a flight
    /// moves through every driver's hot path.
    Waiting(Box<Waiting>),
    /// The backend's response with this status is being delivered.
    Delivering { status: u16 },
}

struct Waiting {
    next: Attempt,
    until: Nanos,
    wait: Nanos,
}

/// What a flight keeps of the attempt on its way: the backend by position and the
/// timeout. Not the `Attempt` itself, whose shared name and URL would cost an
/// atomic count to clone and another to drop, for every attempt.
#[derive(Clone, Copy)]
struct Sent {
    backend_index: usize,
    timeout: Nanos,
}

impl Sent {
    fn of(attempt: &Attempt) -> Sent {
        Sent { backend_index: attempt.backend_index, timeout: attempt.timeout }
    }
}

pub(crate) struct Flight {
    id: RequestId,
    route: Route,
    phase: Phase,
    record: OutcomeRecord,
}

/// The sans-IO lifecycle of one gateway's requests: the limit book on the way
/// in and out, the router's attempts, retries and failover in between, and
/// each request's record until it is finished.
pub struct Lifecycle {
    limits: LimitBook,
    router: Router,
    /// Indexed by the slot half of a `RequestId`, which the gateway keeps unique
    /// among requests in flight.
    flights: Vec<Option<Flight>>,
    deadlines: Deadlines,
    /// Steps decided by `handle_timeout`, for `poll_step`.
    steps: VecDeque<Step>,
    /// The latest instant seen: time never runs backwards in the core.
    latest: Nanos,
}

impl Lifecycle {
    /// Builds the pipeline; the routing is validated and an error names what is wrong.
    pub fn new(policy: &Policy, routing: Routing, hash_seed: u64) -> Result<Lifecycle, String> {
        Ok(Lifecycle {
            limits: LimitBook::new(policy, hash_seed),
            router: Router::new(routing)?,
            flights: Vec::new(),
            deadlines: Deadlines::default(),
            steps: VecDeque::new(),
            latest: Nanos::ZERO,
        })
    }

    /// The limit book: its counters, and the journal of counter changes that
    /// replicas sharing counters with lag exchange.
    pub fn limits(&self) -> &LimitBook {
        &self.limits
    }

    /// The limit book, for the journal: [`LimitBook::enable_journal`],
    /// [`LimitBook::poll_delta`] and [`LimitBook::handle_delta`].
    pub fn limits_mut(&mut self) -> &mut LimitBook {
        &mut self.limits
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    /// The slot where request `id`'s flight is kept, for cache hints.
    pub(crate) fn flight_slot(&self, id: RequestId) -> Option<&Option<Flight>> {
        self.flights.get(id.slot())
    }

    /// A client request arrives. `draw` is a uniform `u64` from the driver's RNG.
    pub fn handle_request(&mut self, now: Nanos, req: &RequestInfo, draw: u64) -> Step {
        let now = self.observe(now);
        let admitted = match self.limits.handle_request(now, req) {
            RequestDecision::Forward(admitted) => admitted,
            RequestDecision::Reject(rejection) => {
                let mut record = fresh_record(now);
                record.status = rejection.status;
                record.reason = rejection.reason;
                let generated = GeneratedResponse {
                    status: rejection.status,
                    headers: rejection.headers,
                    body: rejection.body,
                    retry_after_secs: rejection.retry_after_secs,
                };
                return Step::Respond(Finished {
                    id: None,
                    generated: Some(Box::new(generated)),
                    headers: Vec::new(),
                    variables: rejection.variables,
                    record,
                });
            }
        };
        let id = admitted.id;
        match self.router.start(now, draw) {
            Ok((route, attempt)) => {
                let ticket = self.deadlines.add_attempt(deadline(now, attempt.timeout), id);
                let phase = Phase::Attempting { attempt: Sent::of(&attempt), started: now, wait: Nanos::ZERO, ticket };
                // Built where it is kept: a flight made first and then moved into
                // its slot would be copied whole.
                *self.place(id) = Some(Flight { id, route, phase, record: fresh_record(now) });
                Step::Forward { id, attempt }
            }
            Err(unavailable) => {
                let phase = Phase::Delivering { status: 503 };
                let flight = Flight { id, route: Route::default(), phase, record: fresh_record(now) };
                let response = unavailable_response(unavailable);
                Step::Respond(self.finish_generated(now, flight, Reason::NoBackend, response, admitted.variables))
            }
        }
    }

    /// An attempt ended: the backend answered (status known; for a response that
    /// will not be delivered, `usage` is what its body reported), or could not be
    /// reached, or answered something that is not HTTP. A response that comes after
    /// the attempt's deadline is a timeout. (Timeouts themselves are the
    /// lifecycle's: see [`Lifecycle::handle_timeout`].)
    pub fn handle_attempt(
        &mut self,
        now: Nanos,
        id: RequestId,
        outcome: AttemptOutcome,
        usage: Usage,
        draw: u64,
    ) -> Result<Step, CoreError> {
        let now = self.observe(now);
        let flight = flight_mut(&mut self.flights, id)?;
        let Phase::Attempting { ticket, .. } = flight.phase else {
            return Err(CoreError::WrongPhase(id));
        };
        self.deadlines.cancel_attempt(ticket);
        self.end_attempt(now, id, outcome, usage, draw)
    }

    /// Records how the current attempt of `id` ended and decides what follows.
    fn end_attempt(
        &mut self,
        now: Nanos,
        id: RequestId,
        outcome: AttemptOutcome,
        usage: Usage,
        draw: u64,
    ) -> Result<Step, CoreError> {
        // The flight stays in its slot while the request goes on (another attempt,
        // or delivery) and is taken out only when the request is over.
        let flight = flight_mut(&mut self.flights, id)?;
        // Copied out: every branch below sets a new phase or ends the request.
        let Phase::Attempting { attempt, started, wait, .. } = flight.phase else {
            return Err(CoreError::WrongPhase(id));
        };
        // The router's own name: found by address when the router looks it up.
        let backend = Arc::clone(self.router.backend_name(attempt.backend_index));
        let outcome = match outcome {
            AttemptOutcome::Response { .. } if now >= deadline(started, attempt.timeout) => AttemptOutcome::Timeout,
            other => other,
        };
        let next = self.router.handle_outcome(now, &mut flight.route, &backend, outcome, draw);
        flight.record.usage.add(usage);
        flight.record.attempts.push(AttemptRecord {
            backend,
            wait,
            started,
            ended: now,
            result: result_of(outcome),
            tokens: usage.total(),
        });
        match (next, outcome) {
            (Next::Retry { attempt, wait }, _) if wait == Nanos::ZERO => Ok(self.start_attempt(now, id, attempt, wait)),
            (Next::Retry { attempt, wait }, _) => {
                flight.phase = Phase::Waiting(Box::new(Waiting { next: attempt, until: now + wait, wait }));
                self.deadlines.add_retry(now + wait, id);
                Ok(Step::Wait { id })
            }
            (Next::Respond, AttemptOutcome::Response { status, .. }) => {
                flight.phase = Phase::Delivering { status };
                Ok(Step::Deliver { id })
            }
            (Next::Respond, failure) => {
                let flight = self.take(id)?;
                Ok(Step::Respond(self.respond_with_error(now, flight, failure)))
            }
            (Next::Unavailable(unavailable), _) => {
                let flight = self.take(id)?;
                let response = unavailable_response(unavailable);
                Ok(Step::Respond(self.finish_generated(now, flight, Reason::NoBackend, response, Vec::new())))
            }
        }
    }

    /// Sends request `id`'s next attempt now, with its deadline.
    fn start_attempt(&mut self, now: Nanos, id: RequestId, attempt: Attempt, wait: Nanos) -> Step {
        let ticket = self.deadlines.add_attempt(deadline(now, attempt.timeout), id);
        let flight = flight_mut(&mut self.flights, id).expect("a request that starts an attempt is in flight");
        flight.phase = Phase::Attempting { attempt: Sent::of(&attempt), started: now, wait, ticket };
        Step::Forward { id, attempt }
    }

    /// The delivered response is over; charges the request's tokens once.
    pub fn handle_delivered(&mut self, now: Nanos, id: RequestId, delivery: Delivery) -> Result<Finished, CoreError> {
        let now = self.observe(now);
        // The flight is worked on in its slot and only its record leaves it:
        // taking the whole flight out would copy it.
        let flight = flight_mut(&mut self.flights, id)?;
        let Phase::Delivering { status } = flight.phase else {
            return Err(CoreError::WrongPhase(id));
        };
        flight.record.usage.add(delivery.usage);
        if let Some(last) = flight.record.attempts.last_mut() {
            last.tokens = last.tokens.saturating_add(delivery.usage.total());
        }
        // A body that broke before the client saw any of it is the gateway's 502,
        // to the client and to the policy alike.
        let client_status = match delivery.end {
            DeliveryEnd::BodyBroken => 502,
            DeliveryEnd::Complete | DeliveryEnd::ClientGone => status,
        };
        let info = ResponseInfo {
            status: Some(client_status),
            total_tokens: flight.record.usage.total(),
            request_bytes: delivery.request_bytes,
            response_bytes: delivery.response_bytes,
        };
        let completed = match self.limits.handle_response(now, id, &info) {
            Ok(completed) => completed,
            Err(error) => {
                self.flights[id.slot()] = None;
                return Err(error);
            }
        };
        // A client that left mid-answer is logged as nginx logs it (499); the
        // policy saw the backend's status, which it did answer.
        flight.record.status = match delivery.end {
            DeliveryEnd::ClientGone => CLIENT_CLOSED_REQUEST,
            DeliveryEnd::Complete | DeliveryEnd::BodyBroken => info.status.expect("set above"),
        };
        flight.record.reason = match delivery.end {
            DeliveryEnd::Complete => Reason::of_backend_status(status),
            DeliveryEnd::ClientGone => Reason::ClientGone,
            DeliveryEnd::BodyBroken => Reason::BadResponse,
        };
        flight.record.finished = now;
        let record = std::mem::replace(&mut flight.record, fresh_record(now));
        self.flights[id.slot()] = None;
        let generated = match delivery.end {
            DeliveryEnd::BodyBroken => Some(Box::new(broken_body_response())),
            DeliveryEnd::Complete | DeliveryEnd::ClientGone => None,
        };
        Ok(Finished { id: Some(id), generated, headers: completed.headers, variables: completed.variables, record })
    }

    /// The client went away before a response was delivered (during an attempt or
    /// a retry's wait): the request ends as `client-gone`, with no status for the
    /// policy's increment conditions (a request with no response matches none),
    /// and the usage of its finished attempts charged.
    pub fn handle_client_gone(&mut self, now: Nanos, id: RequestId) -> Result<Finished, CoreError> {
        let now = self.observe(now);
        let flight = flight_mut(&mut self.flights, id)?;
        match &flight.phase {
            Phase::Attempting { ticket, .. } => self.deadlines.cancel_attempt(*ticket),
            Phase::Waiting(_) => {}
            Phase::Delivering { .. } => return Err(CoreError::WrongPhase(id)),
        }
        let mut flight = self.take(id)?;
        self.drop_stale_retries();
        let info = ResponseInfo { status: None, total_tokens: flight.record.usage.total(), ..ResponseInfo::default() };
        let completed = self.limits.handle_response(now, id, &info)?;
        flight.record.reason = Reason::ClientGone;
        flight.record.status = CLIENT_CLOSED_REQUEST;
        flight.record.finished = now;
        Ok(Finished {
            id: Some(id),
            generated: None,
            headers: completed.headers,
            variables: completed.variables,
            record: flight.record,
        })
    }

    /// The next instant at which the lifecycle acts on its own: an attempt's
    /// timeout or a retry's instant. The one timer a driver of many requests
    /// keeps for this lifecycle; at that instant, call [`Lifecycle::handle_timeout`].
    /// (Idle counters are evicted as requests come; see [`LimitBook::poll_timeout`]
    /// for a driver that wants their memory back while no request comes.)
    pub fn poll_timeout(&self) -> Option<Nanos> {
        self.deadlines.next()
    }

    /// Acts on every deadline due at `now`: a timed-out attempt ends as a
    /// timeout (`draw` gives a uniform `u64` for its retry, as `handle_attempt`'s
    /// `draw` does); a retry whose instant has come is sent. The steps that
    /// follow come out of [`Lifecycle::poll_step`].
    pub fn handle_timeout(&mut self, now: Nanos, draw: &mut dyn FnMut() -> u64) {
        let now = self.observe(now);
        while let Some(due) = self.deadlines.pop_due(now) {
            let step = match due {
                Due::AttemptTimeout(id) => Some(self.time_out(now, id, draw())),
                Due::Retry(at, id) => self.retry_due(now, at, id),
            };
            self.steps.extend(step);
        }
    }

    /// The next step `handle_timeout` decided, in the order it decided them.
    pub fn poll_step(&mut self) -> Option<Step> {
        self.steps.pop_front()
    }

    /// When the lifecycle next acts on request `id` on its own: its attempt's
    /// deadline, or its retry's instant (`None` while its response is delivered).
    /// For a driver that waits on each request apart, as the proxy does.
    pub fn poll_timeout_of(&self, id: RequestId) -> Option<Nanos> {
        let flight = match self.flights.get(id.slot()) {
            Some(Some(flight)) if flight.id == id => flight,
            _ => return None,
        };
        match &flight.phase {
            Phase::Attempting { attempt, started, .. } => Some(deadline(*started, attempt.timeout)),
            Phase::Waiting(waiting) => Some(waiting.until),
            Phase::Delivering { .. } => None,
        }
    }

    /// Acts on request `id`'s deadline if it has come by `now` (see
    /// [`Lifecycle::handle_timeout`]); `None` when it has not, or the request has
    /// moved on.
    pub fn handle_timeout_of(&mut self, now: Nanos, id: RequestId, draw: u64) -> Option<Step> {
        let now = self.observe(now);
        if self.poll_timeout_of(id)? > now {
            return None;
        }
        let flight = flight_mut(&mut self.flights, id).expect("it has a deadline");
        let step = match &flight.phase {
            Phase::Attempting { ticket, .. } => {
                self.deadlines.cancel_attempt(*ticket);
                self.time_out(now, id, draw)
            }
            Phase::Waiting(waiting) => {
                let until = waiting.until;
                self.retry_due(now, until, id).expect("a waiting request's retry")
            }
            Phase::Delivering { .. } => unreachable!("a delivery has no deadline"),
        };
        self.drop_stale_retries();
        Some(step)
    }

    fn time_out(&mut self, now: Nanos, id: RequestId, draw: u64) -> Step {
        let step = self.end_attempt(now, id, AttemptOutcome::Timeout, Usage::default(), draw);
        step.expect("a deadline's request is attempting")
    }

    /// Sends the retry of `id` that was due at `at`, unless the request has
    /// moved on (a driver of one request handled it already).
    fn retry_due(&mut self, now: Nanos, at: Nanos, id: RequestId) -> Option<Step> {
        let flight = match self.flights.get_mut(id.slot()) {
            Some(Some(flight)) if flight.id == id => flight,
            _ => return None,
        };
        let Phase::Waiting(waiting) = &flight.phase else { return None };
        if waiting.until != at {
            return None;
        }
        let Phase::Waiting(waiting) = std::mem::replace(&mut flight.phase, Phase::Delivering { status: 0 }) else {
            unreachable!("just matched")
        };
        Some(self.start_attempt(now, id, waiting.next, waiting.wait))
    }

    /// Drops retry entries at the heap's top whose requests have moved on, so
    /// that a driver of single requests, which never pops them, keeps the heap
    /// bounded by the requests waiting.
    fn drop_stale_retries(&mut self) {
        let flights = &self.flights;
        let live = |at: Nanos, id: RequestId| match flights.get(id.slot()) {
            Some(Some(flight)) if flight.id == id => matches!(&flight.phase, Phase::Waiting(w) if w.until == at),
            _ => false,
        };
        self.deadlines.drop_retries_while(|at, id| !live(at, id));
    }

    fn observe(&mut self, now: Nanos) -> Nanos {
        self.latest = self.latest.max(now);
        self.latest
    }

    /// A transport failure or timeout as the last attempt's result becomes the
    /// gateway's own error response.
    #[cold]
    #[inline(never)]
    fn respond_with_error(&mut self, now: Nanos, flight: Flight, failure: AttemptOutcome) -> Finished {
        let (reason, response) = match failure {
            AttemptOutcome::TransportFailure => (Reason::TransportFailure, gateway_error(500, "Internal server error")),
            AttemptOutcome::BadResponse => {
                (Reason::BadResponse, gateway_error(502, "Bad gateway: the backend's answer was not valid HTTP"))
            }
            AttemptOutcome::Timeout => (Reason::Timeout, gateway_error(504, "Gateway timeout")),
            AttemptOutcome::Response { .. } => unreachable!("a backend's response is delivered"),
        };
        self.finish_generated(now, flight, reason, response, Vec::new())
    }

    fn finish_generated(
        &mut self,
        now: Nanos,
        mut flight: Flight,
        reason: Reason,
        generated: GeneratedResponse,
        mut variables: Vec<(String, i64)>,
    ) -> Finished {
        flight.record.reason = reason;
        let info = ResponseInfo {
            status: Some(generated.status),
            total_tokens: flight.record.usage.total(),
            ..ResponseInfo::default()
        };
        let completed =
            self.limits.handle_response(now, flight.id, &info).expect("a flight is admitted by the gateway");
        variables.extend(completed.variables);
        flight.record.status = generated.status;
        flight.record.finished = now;
        Finished {
            id: Some(flight.id),
            generated: Some(Box::new(generated)),
            headers: completed.headers,
            variables,
            record: flight.record,
        }
    }

    /// The empty slot where the flight of request `id` is to be kept.
    #[inline]
    fn place(&mut self, id: RequestId) -> &mut Option<Flight> {
        let slot = id.slot();
        if self.flights.len() <= slot {
            self.flights.resize_with(slot + 1, || None);
        }
        debug_assert!(self.flights[slot].is_none(), "the gateway hands out each live slot once");
        &mut self.flights[slot]
    }

    fn take(&mut self, id: RequestId) -> Result<Flight, CoreError> {
        let slot = self.flights.get_mut(id.slot()).ok_or(CoreError::UnknownRequest(id))?;
        match slot {
            Some(flight) if flight.id == id => Ok(slot.take().expect("just matched")),
            _ => Err(CoreError::UnknownRequest(id)),
        }
    }
}

/// The flight of `id` in its slot (a field-level borrow, so the router can be
/// used beside it).
fn flight_mut(flights: &mut [Option<Flight>], id: RequestId) -> Result<&mut Flight, CoreError> {
    match flights.get_mut(id.slot()) {
        Some(Some(flight)) if flight.id == id => Ok(flight),
        _ => Err(CoreError::UnknownRequest(id)),
    }
}

/// The status recorded for a request whose client left before any answer (nginx's
/// 499, "client closed request"); the policy sees no status at all.
pub const CLIENT_CLOSED_REQUEST: u16 = 499;

/// The first instant at which an attempt sent at `started` has timed out: an
/// answer at `started + timeout` itself is still in time.
fn deadline(started: Nanos, timeout: Nanos) -> Nanos {
    started + timeout + Nanos(1)
}

/// The record of a request that arrived at `now` and has not been answered yet.
fn fresh_record(now: Nanos) -> OutcomeRecord {
    OutcomeRecord {
        arrived: now,
        finished: now,
        attempts: SmallVec::new(),
        status: 0,
        reason: Reason::Ok,
        usage: Usage::default(),
    }
}

fn result_of(outcome: AttemptOutcome) -> AttemptResult {
    match outcome {
        AttemptOutcome::Response { status, .. } => AttemptResult::Status(status),
        AttemptOutcome::TransportFailure => AttemptResult::TransportFailure,
        AttemptOutcome::BadResponse => AttemptResult::BadResponse,
        AttemptOutcome::Timeout => AttemptResult::Timeout,
    }
}

/// APIM's answer when a circuit breaker (or every pool member's) is open.
#[cold]
#[inline(never)]
fn unavailable_response(unavailable: Unavailable) -> GeneratedResponse {
    let secs = unavailable.retry_after.retry_after_secs();
    GeneratedResponse {
        status: 503,
        headers: vec![
            ("Content-Type".to_owned(), "application/json".to_owned()),
            ("Retry-After".to_owned(), secs.to_string()),
        ],
        body: format!(
            "{{\"statusCode\": 503, \"message\": \"Service Unavailable: no backend is available. Try again in {secs} seconds.\"}}"
        ),
        retry_after_secs: Some(secs),
    }
}

/// The gateway's answer when a backend's body broke before the client saw any of it.
#[cold]
#[inline(never)]
fn broken_body_response() -> GeneratedResponse {
    gateway_error(502, "Bad gateway: the backend's response was incomplete")
}

#[cold]
#[inline(never)]
fn gateway_error(status: u16, message: &str) -> GeneratedResponse {
    GeneratedResponse {
        status,
        headers: vec![("Content-Type".to_owned(), "application/json".to_owned())],
        body: format!("{{\"statusCode\": {status}, \"message\": \"{message}\"}}"),
        retry_after_secs: None,
    }
}
