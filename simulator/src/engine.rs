//! The discrete-event engine: a queue of events ordered by (time, sequence), the
//! gateway replicas (`gateway-core`), the backends (`mock-aoai`'s model) and the
//! clients. No wall clock and no threads: the same scenario and seed give the same
//! events in the same order.

use crate::queue::EventQueue;
use crate::report::{Decision, Recorder};
use crate::scenario::{Arrival, Scenario};
use crate::trace::{self, TraceLine};
use crate::traffic::{self, Call};
use gateway_core::decision_log::Caller;
use gateway_core::routing::{AttemptOutcome, Routing};
use gateway_core::{
    CounterDelta, Delivery, DeliveryEnd, Finished, Lifecycle, Nanos, OutcomeRecord, Reason, RequestId, Step, Usage,
};
use mock_aoai::model::{ModelRequest, ModelResponse, Operation};
use mock_aoai::DeploymentModel;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::VecDeque;
use std::path::Path;

#[derive(Debug)]
enum Event {
    /// The next arrival of a generated client.
    Generate { client: usize },
    /// A call reaches the gateway.
    Arrive(Box<Call>),
    /// The gateway sends an attempt to a backend.
    Send { replica: usize, id: RequestId, backend: usize },
    /// An attempt's response head (or failure) is back at the gateway. `attempt`
    /// numbers the flight's attempts: an answer to an attempt the gateway has
    /// already timed out is dropped, as a real gateway drops the connection.
    AttemptEnd { replica: usize, id: RequestId, attempt: u32, outcome: AttemptOutcome },
    /// A replica's next deadline (an attempt's timeout, a retry's instant), as
    /// its lifecycle's `poll_timeout` named it.
    Timer { replica: usize },
    /// The delivered response is over.
    Delivered { replica: usize, id: RequestId, usage: Usage, bytes: (u64, u64) },
    /// A counter change made by replica `from` reaches the others (shared store with lag).
    Sync { from: usize, delta: Box<CounterDelta> },
}

impl Event {
    /// The replica and id of the request in flight an event is about.
    fn request(&self) -> Option<(usize, RequestId)> {
        match *self {
            Event::Send { replica, id, .. }
            | Event::AttemptEnd { replica, id, .. }
            | Event::Delivered { replica, id, .. } => Some((replica, id)),
            Event::Generate { .. } | Event::Arrive(_) | Event::Sync { .. } | Event::Timer { .. } => None,
        }
    }
}

/// How many of a generated client's calls are drawn before they arrive: three,
/// so a call's counters can be asked for two arrivals before it comes, in two
/// steps (see `Engine::draw_ahead`).
const DRAWN_AHEAD: usize = 3;

/// A generated client's next calls, drawn ahead of their arrivals.
#[derive(Default)]
struct Upcoming {
    /// In arrival order, each with the gap after it.
    calls: VecDeque<(Box<Call>, Nanos)>,
    /// When the call after the last of `calls` arrives.
    tail_at: Nanos,
}

struct InFlight {
    id: RequestId,
    /// Boxed, so a flight moves as a few words; the box is reused (see `recycle`).
    call: Box<Call>,
    /// The call's place in arrival order, for the decision log.
    order: u64,
    arrived: Nanos,
    /// The model's decision for the current attempt, once sent.
    completion: Option<mock_aoai::model::Completion>,
    /// How many attempts were sent: the current one's number plus one.
    attempts: u32,
    /// The current attempt's backend, when it was sent (since the start), and
    /// the outcome it was recorded with, until it ends.
    sent: Option<(usize, Nanos, AttemptOutcome)>,
}

pub struct Engine<'s> {
    scenario: &'s Scenario,
    start: Nanos,
    end: Nanos,
    queue: EventQueue<Event>,
    /// The instant of the event being handled.
    now: Nanos,
    /// An event due at `now` that no queued event precedes: it is handled next,
    /// exactly as the queue would order it, without going through the queue.
    immediate: Option<Event>,
    /// The sequence number of the latest event scheduled.
    seq: u64,
    replicas: Vec<Lifecycle>,
    /// Per replica, the instant of its `Timer` event in the queue, if any.
    armed: Vec<Option<Nanos>>,
    /// The replica the next arrival goes to (round robin), below `replicas.len()`.
    next_replica: usize,
    /// Replicas share counters through a store this late (their journals are on).
    sync_lag: Option<Nanos>,
    backends: Vec<DeploymentModel>,
    /// The scenario backend of each routing backend, by position.
    backend_of_route: Vec<usize>,
    /// Per replica, indexed by the slot half of a `RequestId` (unique among a
    /// replica's requests in flight).
    flights: Vec<Vec<Option<InFlight>>>,
    rng: ChaCha8Rng,
    /// Each generated client's arrivals and calls, in this order per call: the
    /// call (caller, tokens, streaming), then the gap to the next one.
    client_rngs: Vec<ChaCha8Rng>,
    /// Each client's SDK retry jitter, apart, so retries do not shift arrivals.
    retry_rngs: Vec<ChaCha8Rng>,
    /// Each generated client's next calls, drawn ahead of their arrivals.
    upcoming: Vec<Upcoming>,
    /// Where each client's caller addresses start in 10.0.0.0/8.
    address_bases: Vec<u32>,
    sequence: u64,
    arrivals: u64,
    traces: Vec<Option<Vec<TraceLine>>>,
    /// Finished calls, reused (with their IP buffers) so that a generated call
    /// allocates nothing. The boxes themselves are what is reused, hence the
    /// `Vec` of boxes.
    #[allow(clippy::vec_box)]
    spare_calls: Vec<Box<Call>>,
    pub recorder: Recorder,
}

impl<'s> Engine<'s> {
    pub fn new(scenario: &'s Scenario, base: &Path, seed: u64, keep_decisions: bool) -> Result<Engine<'s>, String> {
        let start = scenario.start_nanos();
        let routing: &Routing = &scenario.gateway.routing;
        let replica_count = match scenario.gateway.replicas_count_alone() {
            true => scenario.gateway.replicas,
            false => 1,
        };
        let mut replicas = (0..replica_count)
            .map(|i| Lifecycle::new(scenario.gateway.policy(), routing.clone(), seed ^ (i as u64 + 1)))
            .collect::<Result<Vec<_>, _>>()?;
        let sync_lag = scenario.gateway.sync_lag.map(|lag| lag.0);
        if sync_lag.is_some() {
            replicas.iter_mut().for_each(|replica| replica.limits_mut().enable_journal());
        }
        let backends: Vec<DeploymentModel> = scenario
            .backends
            .iter()
            .enumerate()
            .map(|(i, d)| DeploymentModel::new(d.clone(), seed.wrapping_mul(31).wrapping_add(i as u64), start))
            .collect();
        let backend_of_route = routing
            .backends
            .iter()
            .map(|b| {
                scenario.backends.iter().position(|d| d.name == b.id).expect("validated: every backend is modelled")
            })
            .collect();
        let client_rngs = (0..scenario.clients.len()).map(|i| traffic::call_stream(seed, i)).collect();
        let retry_rngs = (0..scenario.clients.len()).map(|i| traffic::retry_stream(seed, i)).collect();
        let traces = scenario
            .clients
            .iter()
            .map(|c| match &c.arrival {
                Arrival::Trace { path } => trace::load(&base.join(path)).map(Some),
                _ => Ok(None),
            })
            .collect::<Result<Vec<_>, String>>()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(1);
        let mut engine = Engine {
            scenario,
            start,
            end: start + scenario.duration.0,
            queue: EventQueue::new(start),
            now: start,
            immediate: None,
            seq: 0,
            armed: vec![None; replicas.len()],
            replicas,
            next_replica: 0,
            sync_lag,
            backends,
            backend_of_route,
            flights: (0..replica_count).map(|_| Vec::new()).collect(),
            rng,
            client_rngs,
            retry_rngs,
            upcoming: scenario.clients.iter().map(|_| Upcoming::default()).collect(),
            address_bases: scenario.caller_address_bases()?,
            sequence: 0,
            arrivals: 0,
            traces,
            spare_calls: Vec::new(),
            recorder: Recorder::new(scenario, keep_decisions),
        };
        engine.schedule_clients();
        Ok(engine)
    }

    fn schedule_clients(&mut self) {
        for (i, client) in self.scenario.clients.iter().enumerate() {
            match &client.arrival {
                Arrival::Trace { .. } => {
                    let lines = self.traces[i].take().unwrap_or_default();
                    for line in lines {
                        let call = traffic::trace_call(i, &self.scenario.clients[i], &line);
                        self.push(self.start + Nanos::from_millis(line.t_ms), Event::Arrive(Box::new(call)));
                    }
                }
                _ => {
                    let first = self.start + self.next_gap(i, self.start);
                    self.push(first, Event::Generate { client: i });
                }
            }
        }
    }

    fn push(&mut self, at: Nanos, event: Event) {
        // The queue orders by (time, sequence) and a new event has the highest
        // sequence yet, so an event due now goes first iff none is queued for now;
        // events pushed after it come after it too.
        self.seq += 1;
        if self.is_next(at) {
            self.immediate = Some(event);
            return;
        }
        self.queue.push(at, self.seq, event);
    }

    /// Whether an event scheduled now for `at` is the next to be handled.
    fn is_next(&self, at: Nanos) -> bool {
        at == self.now && self.immediate.is_none() && !self.queue.has_due(at)
    }

    /// Runs to the end of the scenario; requests in flight then are left unfinished.
    /// `progress` hears the share of simulated time done, now and then.
    pub fn run(&mut self, progress: &mut dyn FnMut(f64)) {
        let mut handled = 0u64;
        while let Some((now, event)) = self.next_event() {
            handled += 1;
            if handled.is_multiple_of(65_536) {
                progress((now - self.start).as_secs_f64() / (self.end - self.start).as_secs_f64().max(1e-9));
            }
            self.prefetch_ahead();
            self.handle(now, event);
        }
    }

    /// Asks for the memory of what comes next early, so handling it does not
    /// wait on a cache miss. An event's request was last touched a backend's
    /// latency ago, so its records (the flight, the gateway's ledger, the pinned
    /// counter rows) have left the cache: two events ahead, the records are
    /// asked for; one event ahead, they are read and what they point to is
    /// asked for (a generated call's counters are asked for when it is drawn,
    /// see `draw_ahead`). Hints only: no state changes.
    fn prefetch_ahead(&self) {
        if let Some((replica, id)) = self.queue.peek(1).and_then(Event::request) {
            self.replicas[replica].hints().request(id);
            if let Some(flight) = self.flights[replica].get(id.slot()) {
                cache_hint::prefetch(flight);
            }
        }
        if let Some((replica, id)) = self.queue.peek(0).and_then(Event::request) {
            self.replicas[replica].hints().request_counters(id);
            if let Some(Some(flight)) = self.flights[replica].get(id.slot()) {
                cache_hint::prefetch(&*flight.call);
            }
        }
    }

    /// The next event before the end of the scenario, and its instant.
    fn next_event(&mut self) -> Option<(Nanos, Event)> {
        if let Some(event) = self.immediate.take() {
            return (self.now < self.end).then_some((self.now, event));
        }
        let (now, event) = self.queue.pop()?;
        if now >= self.end {
            return None;
        }
        self.now = now;
        Some((now, event))
    }

    fn handle(&mut self, now: Nanos, event: Event) {
        match event {
            Event::Generate { client } => self.generate(now, client),
            Event::Arrive(call) => self.arrive(now, call),
            Event::Send { replica, id, backend } => self.send(now, replica, id, backend),
            Event::AttemptEnd { replica, id, attempt, outcome } => self.attempt_end(now, replica, id, attempt, outcome),
            Event::Delivered { replica, id, usage, bytes } => {
                self.delivered(now, replica, id, usage, bytes);
                self.arm(replica);
            }
            Event::Timer { replica } => self.timer(now, replica),
            Event::Sync { from, delta } => {
                for (r, replica) in self.replicas.iter_mut().enumerate() {
                    if r != from {
                        replica.limits_mut().handle_delta(now, &delta);
                    }
                }
            }
        }
    }

    fn attempt_end(&mut self, now: Nanos, replica: usize, id: RequestId, attempt: u32, outcome: AttemptOutcome) {
        let Some(flight) = self.flights[replica].get_mut(id.slot()).and_then(Option::as_mut) else { return };
        if flight.id != id || flight.attempts != attempt + 1 || flight.sent.is_none() {
            // The gateway timed this attempt out before its answer came.
            return;
        }
        flight.sent = None;
        let draw = self.rng.next_u64();
        let step = self.replicas[replica].handle_attempt(now, id, outcome, Usage::default(), draw);
        self.share_changes(now, replica);
        match step.as_ref().expect("the engine reports each attempt once") {
            &Step::Deliver { id } => self.deliver_now_or_later(now, replica, id),
            step => self.follow(now, replica, step),
        }
        self.arm(replica);
    }

    /// A replica's deadline came: its lifecycle times attempts out and sends the
    /// retries that are due. An attempt it timed out had been recorded with the
    /// answer its backend would give; it is recorded as the timeout it became.
    fn timer(&mut self, now: Nanos, replica: usize) {
        if self.armed[replica] != Some(now) {
            return;
        }
        self.armed[replica] = None;
        let rng = &mut self.rng;
        self.replicas[replica].handle_timeout(now, &mut || rng.next_u64());
        self.share_changes(now, replica);
        while let Some(step) = self.replicas[replica].poll_step() {
            let id = step_id(&step);
            let flight = self.flights[replica][id.slot()].as_mut().expect("a deadline's request is in flight");
            if let Some((backend, since_start, recorded)) = flight.sent.take() {
                self.recorder.retract_attempt(backend, since_start, &recorded);
                self.recorder.backend_attempt(backend, since_start, &AttemptOutcome::Timeout);
            }
            self.follow(now, replica, &step);
        }
        self.arm(replica);
    }

    /// Keeps one `Timer` event queued for the replica's next deadline. Deadlines
    /// only come later as requests go on, so one armed earlier stays valid (it
    /// may find nothing due, and arms the next).
    fn arm(&mut self, replica: usize) {
        let Some(next) = self.replicas[replica].poll_timeout() else { return };
        if self.armed[replica].is_some_and(|armed| armed <= next) {
            return;
        }
        self.armed[replica] = Some(next);
        self.push(next, Event::Timer { replica });
    }

    /// Sends the counter changes replica `replica` just made to the others, which
    /// hear of them `sync_lag` later.
    ///
    /// Inline, as most scenarios share no counters and this is asked after every
    /// step of every request.
    #[inline]
    fn share_changes(&mut self, now: Nanos, replica: usize) {
        if let Some(lag) = self.sync_lag {
            self.send_changes(now, replica, lag);
        }
    }

    fn send_changes(&mut self, now: Nanos, replica: usize, lag: Nanos) {
        while let Some(delta) = self.replicas[replica].limits_mut().poll_delta() {
            self.push(now + lag, Event::Sync { from: replica, delta: Box::new(delta) });
        }
    }

    fn next_gap(&mut self, client: usize, now: Nanos) -> Nanos {
        let clock = traffic::Clock { start: self.start, end: self.end };
        traffic::next_gap(&self.scenario.clients[client], &mut self.client_rngs[client], clock, now)
    }

    fn generate(&mut self, now: Nanos, client: usize) {
        let (mut call, gap) = match self.upcoming[client].calls.pop_front() {
            Some(drawn) => drawn,
            None => {
                let call = self.draw_call(client);
                (call, self.next_gap(client, now))
            }
        };
        call.request = self.sequence;
        self.sequence += 1;
        self.arrive(now, call);
        self.push(now + gap, Event::Generate { client });
        self.draw_ahead(client, now + gap);
    }

    /// Draws the client's next calls, each with the gap after it, in the order
    /// its stream would give them at their arrivals (so drawing early changes
    /// no number), until [`DRAWN_AHEAD`] are waiting; `next_at` is when the first
    /// waiting call arrives. Then asks for the counters of the calls ahead, in
    /// two steps an arrival apart (hints that decide nothing): the index entries
    /// that find the call just drawn, and the counters of the call before it,
    /// whose entries were asked for one arrival ago.
    fn draw_ahead(&mut self, client: usize, next_at: Nanos) {
        if self.upcoming[client].calls.is_empty() {
            self.upcoming[client].tail_at = next_at;
        }
        while self.upcoming[client].calls.len() < DRAWN_AHEAD {
            let at = self.upcoming[client].tail_at;
            let call = self.draw_call(client);
            let gap = self.next_gap(client, at);
            self.replicas[self.next_replica].hints().lookup(&call.info);
            let upcoming = &mut self.upcoming[client];
            upcoming.calls.push_back((call, gap));
            upcoming.tail_at = at + gap;
        }
        let calls = &self.upcoming[client].calls;
        if let Some((call, _)) = calls.len().checked_sub(2).map(|i| &calls[i]) {
            self.replicas[self.next_replica].hints().counters(&call.info);
        }
    }

    /// A generated client's next call; its `request` number is given on arrival.
    fn draw_call(&mut self, client: usize) -> Box<Call> {
        // A spare call is filled in place: building a new `Call` and moving it
        // into the box would copy its 200-odd bytes for every call.
        let mut call = self.spare_calls.pop().unwrap_or_default();
        let c = &self.scenario.clients[client];
        traffic::draw_call(&mut call, client, c, &mut self.client_rngs[client], self.address_bases[client]);
        call
    }

    fn arrive(&mut self, now: Nanos, call: Box<Call>) {
        let order = self.arrivals;
        self.arrivals += 1;
        // Round robin, wrapped by a comparison rather than a division per call.
        let replica = self.next_replica;
        self.next_replica = if replica + 1 == self.replicas.len() { 0 } else { replica + 1 };
        let draw = self.rng.next_u64();
        let step = self.replicas[replica].handle_request(now, &call.info, draw);
        self.share_changes(now, replica);
        match &step {
            Step::Forward { id, .. } | Step::Deliver { id } | Step::Wait { id } => {
                let id = *id;
                let flight = InFlight { id, call, order, arrived: now, completion: None, attempts: 0, sent: None };
                self.insert_flight(replica, id, flight);
                self.follow(now, replica, &step);
                self.arm(replica);
            }
            Step::Respond(finished) => {
                self.record(now, order, &call, now, finished);
                self.recycle(call);
            }
        }
    }

    fn insert_flight(&mut self, replica: usize, id: RequestId, flight: InFlight) {
        let flights = &mut self.flights[replica];
        if flights.len() <= id.slot() {
            flights.resize_with(id.slot() + 1, || None);
        }
        debug_assert!(flights[id.slot()].is_none(), "the gateway hands out each live slot once");
        flights[id.slot()] = Some(flight);
    }

    fn flight(&self, replica: usize, id: RequestId) -> &InFlight {
        let flight = self.flights[replica][id.slot()].as_ref().expect("in flight");
        debug_assert_eq!(flight.id, id);
        flight
    }

    /// Carries out what the gateway decided.
    fn follow(&mut self, now: Nanos, replica: usize, step: &Step) {
        match step {
            &Step::Forward { id, ref attempt } => {
                let backend = self.backend_of_route[attempt.backend_index];
                self.push(now, Event::Send { replica, id, backend });
            }
            // The lifecycle holds the retry's instant; the replica's timer brings it.
            Step::Wait { .. } => {}
            &Step::Deliver { id } => {
                let (at, usage, bytes) = self.delivery(now, replica, id);
                self.push(at, Event::Delivered { replica, id, usage, bytes });
            }
            Step::Respond(finished) => self.finish(now, replica, finished.id, finished),
        }
    }

    /// When the response of request `id` is over, what it used and its body sizes.
    fn delivery(&self, now: Nanos, replica: usize, id: RequestId) -> (Nanos, Usage, (u64, u64)) {
        let flight = self.flight(replica, id);
        // An error response (429, 5xx) carries no usage and is over at once.
        let (rest, usage) = match flight.completion {
            None => (Nanos::ZERO, Usage::default()),
            Some(c) => {
                let usage = Usage { prompt_tokens: c.prompt_tokens, completion_tokens: c.completion_tokens_sent() };
                let head = if flight.call.stream { c.time_to_first_token } else { c.duration() };
                (c.duration().saturating_sub(head), usage)
            }
        };
        (now + rest, usage, wire_bytes(&flight.call, usage))
    }

    /// `follow` for a delivery at the end of an attempt's handling: a delivery
    /// the queue would hand out next (due now, nothing queued before it) is
    /// handled at once, as the queue would, with its sequence number spent.
    /// Most responses that are not streamed end this way.
    fn deliver_now_or_later(&mut self, now: Nanos, replica: usize, id: RequestId) {
        let (at, usage, bytes) = self.delivery(now, replica, id);
        if !self.is_next(at) {
            return self.push(at, Event::Delivered { replica, id, usage, bytes });
        }
        self.seq += 1;
        self.delivered(now, replica, id, usage, bytes);
    }

    fn delivered(&mut self, now: Nanos, replica: usize, id: RequestId, usage: Usage, bytes: (u64, u64)) {
        let delivery = Delivery { usage, request_bytes: bytes.0, response_bytes: bytes.1, end: DeliveryEnd::Complete };
        let finished = self.replicas[replica].handle_delivered(now, id, delivery);
        self.share_changes(now, replica);
        // Borrowed where it lies: moving a `Finished` out of its `Result` copies it.
        self.finish(now, replica, Some(id), finished.as_ref().expect("the engine delivers each response once"));
    }

    /// Sends an attempt to the backend's model. Its answer comes back when the
    /// model says; a backend that hangs never answers, and the lifecycle's
    /// deadline ends the attempt instead.
    fn send(&mut self, now: Nanos, replica: usize, id: RequestId, backend: usize) {
        let flight = self.flights[replica][id.slot()].as_mut().expect("in flight");
        let call = &flight.call;
        let request = ModelRequest {
            operation: Operation::ChatCompletions,
            prompt_tokens: call.prompt_tokens,
            max_tokens: call.max_tokens,
            best_of: None,
            choices: call.info.choices.unwrap_or(1),
            generated: call.info.choices.unwrap_or(1),
            stream: call.stream,
            completion_tokens: Some(call.completion_tokens),
        };
        flight.completion = None;
        let (after, outcome) = match self.backends[backend].handle_request(now, &request) {
            ModelResponse::Complete(c) => {
                flight.completion = Some(c);
                let head = if call.stream { c.time_to_first_token } else { c.duration() };
                (head, AttemptOutcome::Response { status: 200, retry_after: None })
            }
            ModelResponse::Throttled(t) => {
                (Nanos::ZERO, AttemptOutcome::Response { status: 429, retry_after: Some(t.retry_after) })
            }
            ModelResponse::Fault { status, after } => (after, AttemptOutcome::Response { status, retry_after: None }),
            ModelResponse::Reset | ModelResponse::Refused => (Nanos::ZERO, AttemptOutcome::TransportFailure),
            ModelResponse::TooLarge { .. } => {
                (Nanos::ZERO, AttemptOutcome::Response { status: 400, retry_after: None })
            }
            ModelResponse::Hang => (Nanos::MAX, AttemptOutcome::Timeout),
        };
        let attempt = flight.attempts;
        flight.attempts += 1;
        flight.sent = Some((backend, now - self.start, outcome));
        self.recorder.backend_attempt(backend, now - self.start, &outcome);
        if after != Nanos::MAX {
            self.push(now.saturating_add(after), Event::AttemptEnd { replica, id, attempt, outcome });
        }
    }

    fn finish(&mut self, now: Nanos, replica: usize, id: Option<RequestId>, finished: &Finished) {
        let flight =
            id.and_then(|id| self.flights[replica][id.slot()].take()).expect("a finished request was in flight");
        debug_assert_eq!(Some(flight.id), id);
        self.record(now, flight.order, &flight.call, flight.arrived, finished);
        self.recycle(flight.call);
    }

    /// Keeps a finished call's box and IP buffer for a later call: a few dozen at
    /// most, enough for a steady stream and bounded however bursty the traffic.
    fn recycle(&mut self, call: Box<Call>) {
        if self.spare_calls.len() < 64 {
            self.spare_calls.push(call);
        }
    }

    fn record(&mut self, now: Nanos, order: u64, call: &Call, arrived: Nanos, finished: &Finished) {
        let record = &finished.record;
        let reason = record.reason;
        let latency = now - arrived;
        // The full decision line (strings, keys) is built only for a decision log.
        let line = match self.recorder.wants_decisions() {
            true => Some(self.decision(call, arrived, record, reason, latency)),
            false => None,
        };
        let client = &self.scenario.clients[call.client];
        self.recorder.caller_tokens(client, call, now, now - self.start, record.usage.total());
        let retry_after = finished.generated.as_ref().and_then(|g| g.retry_after_secs);
        self.recorder.request(call.client, now - self.start, order, record, reason, latency, retry_after, line);
        self.sdk_retry(now, call, finished);
    }

    /// A decision log line; out of line, as most runs keep no log.
    #[cold]
    #[inline(never)]
    fn decision(
        &self,
        call: &Call,
        arrived: Nanos,
        record: &OutcomeRecord,
        reason: Reason,
        latency: Nanos,
    ) -> Decision {
        debug_assert_eq!(record.reason, reason);
        debug_assert_eq!(record.arrived, arrived);
        let client = &self.scenario.clients[call.client].name;
        let caller = Caller { request: call.request, client, attempt: call.attempt, info: &call.info };
        Decision::new(caller, self.start, record, latency)
    }

    /// The client SDK's own retry, like the `openai` SDKs'.
    fn sdk_retry(&mut self, now: Nanos, call: &Call, finished: &Finished) {
        let headers = finished.generated.as_ref().map_or(&[][..], |g| &g.headers[..]);
        let client = &self.scenario.clients[call.client];
        let answer = traffic::Answer { status: finished.record.status, headers, now };
        let Some(wait) = traffic::sdk_retry_wait(client, call.attempt, answer, &mut self.retry_rngs[call.client])
        else {
            return;
        };
        let mut next = call.clone();
        next.attempt += 1;
        self.recorder.sdk_retry(call.client);
        self.push(now + wait, Event::Arrive(Box::new(next)));
    }
}

fn step_id(step: &Step) -> RequestId {
    match step {
        Step::Forward { id, .. } | Step::Wait { id } | Step::Deliver { id } => *id,
        Step::Respond(finished) => finished.id.expect("a request in flight has an id"),
    }
}

/// Body sizes for bandwidth quotas: about 4 bytes of JSON per token plus the
/// envelope (a chat request's framing, a response's ids and filter results).
fn wire_bytes(call: &Call, usage: Usage) -> (u64, u64) {
    let bytes = |envelope: u64, tokens: u64| tokens.saturating_mul(4).saturating_add(envelope);
    (bytes(200, call.prompt_tokens), if usage.total() == 0 { 150 } else { bytes(800, usage.completion_tokens) })
}

#[cfg(test)]
mod tests {
    /// A scenario of clients with these caller counts.
    fn scenario(callers: &[usize]) -> Result<crate::Scenario, String> {
        let mut text = String::from(
            "name = \"t\"\nstart = \"2024-01-01T00:00:00Z\"\nduration = \"1m\"\nseed = 1\n\
             [[backends]]\nname = \"b\"\nmodel = \"gpt-4o\"\ntpm = 1000\n\
             [gateway.routing]\nset_backend = \"b\"\nbackends = [{ id = \"b\", url = \"http://b\" }]\n",
        );
        for (i, n) in callers.iter().enumerate() {
            text += &format!(
                "[[clients]]\nname = \"c{i}\"\ncallers = {n}\narrival = {{ poisson = {{ rate_per_s = 1 }} }}\n\
                 prompt_tokens = {{ fixed = 10 }}\ncompletion_tokens = {{ fixed = 10 }}\n"
            );
        }
        crate::Scenario::from_toml("t.toml", &text)
    }

    #[test]
    fn every_caller_of_a_scenario_has_an_address_of_its_own() {
        let callers = [100_000, 3, 65_536, 70_000];
        let bases = scenario(&callers).unwrap().caller_address_bases().unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for (client, n) in callers.iter().enumerate() {
            for caller in 0..*n {
                let mut ip = String::new();
                crate::traffic::write_caller_ip(&mut ip, bases[client] + caller as u32);
                assert!(seen.insert(ip), "client {client} caller {caller} shares an address");
            }
        }
        assert_eq!(seen.len(), callers.iter().sum::<usize>());
        // A client of at most 65,536 callers keeps the plain plan: 10.{client}.x.y.
        assert_eq!(scenario(&[5, 5, 5]).unwrap().caller_address_bases().unwrap(), vec![0, 1 << 16, 2 << 16]);
    }

    #[test]
    fn a_scenario_with_more_callers_than_addresses_is_refused() {
        let error = scenario(&[16_000_000, 1_000_000]).expect_err("refused");
        assert!(error.contains("callers would share addresses"), "{error}");
        assert!(scenario(&[257 * 65_536 - 65_536]).is_ok(), "256 blocks fit");
    }

    #[test]
    fn caller_ips_are_dotted_quads() {
        for (address, expected) in [
            (0, "10.0.0.0"),
            (255, "10.0.0.255"),
            (256, "10.0.1.0"),
            ((7 << 16) + 300, "10.7.1.44"),
            ((1 << 24) - 1, "10.255.255.255"),
        ] {
            let mut ip = "stale".to_owned();
            ip.clear();
            crate::traffic::write_caller_ip(&mut ip, address);
            assert_eq!(ip, expected);
        }
    }
}
