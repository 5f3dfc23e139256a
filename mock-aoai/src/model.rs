//! The behaviour of one Azure OpenAI deployment, sans-IO: the simulator calls it
//! directly with simulated time, the server with wall time. Same config, seed and
//! request sequence: same responses.
//!
//! Admission follows Azure's documented rules: a request costs its prompt tokens
//! plus `max_tokens` (times `best_of`; the configured default when absent), tokens
//! are limited over a sliding 60 s and requests over a sliding 10 s window
//! (`rpm / 6`). Provisioned deployments limit by utilisation instead: tokens
//! actually processed in the last 60 s against the provisioned TPM.

use crate::config::{DeploymentConfig, Faults, OutageMode};
use crate::dist::round_to_u64;
use gateway_core::limiter::SlidingLog;
use gateway_core::Nanos;
use rand::{Rng, RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::convert::Infallible;

const MINUTE: Nanos = Nanos::from_secs(60);
const TEN_SECONDS: Nanos = Nanos::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    ChatCompletions,
    Completions,
    Embeddings,
    /// The Responses API (`POST /openai/v1/responses`).
    Responses,
}

impl Operation {
    /// The operation name Azure's 429 message quotes.
    pub fn azure_name(self) -> &'static str {
        match self {
            Operation::ChatCompletions => "ChatCompletions_Create",
            Operation::Completions => "Completions_Create",
            Operation::Embeddings => "Embeddings_Create",
            Operation::Responses => "Responses_Create",
        }
    }
}

/// What the model needs to know about a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelRequest {
    pub operation: Operation,
    /// Prompt tokens as the service counts them.
    pub prompt_tokens: u64,
    pub max_tokens: Option<u64>,
    pub best_of: Option<u64>,
    /// Completions asked for (`n`, at least 1), each as long as the length drawn.
    pub choices: u64,
    /// Completions generated and billed: `choices`, or more when a legacy
    /// completion's `best_of` picks the best of several candidates.
    pub generated: u64,
    pub stream: bool,
    /// The completion length the caller will get (before `max_tokens`), when the
    /// driver decides it (the simulator's clients, trace replay); else the
    /// deployment's distribution draws it.
    pub completion_tokens: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitKind {
    Tokens,
    Requests,
    /// A provisioned deployment at 100% utilisation.
    Utilization,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Throttle {
    pub limit: LimitKind,
    pub retry_after: Nanos,
    pub remaining_requests: u64,
    pub remaining_tokens: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    Length,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub prompt_tokens: u64,
    /// Of each choice; zero for embeddings.
    pub completion_tokens: u64,
    /// How many choices the answer has (the request's `n`), each as long.
    pub choices: u64,
    /// How many completions were generated and billed (at least `choices`).
    pub generated: u64,
    pub finish_reason: FinishReason,
    pub time_to_first_token: Nanos,
    pub time_per_token: Nanos,
    /// For a stream that breaks midway: the completion tokens sent before it breaks.
    pub break_after: Option<u64>,
    pub remaining_requests: u64,
    pub remaining_tokens: u64,
}

impl Completion {
    /// The completion tokens of every completion generated, as `usage` reports them.
    pub fn completion_tokens_total(&self) -> u64 {
        self.completion_tokens.saturating_mul(self.generated)
    }

    /// The completion tokens sent before the stream broke, or all of them. (A
    /// stream generates only what it sends: `best_of` cannot be streamed.)
    pub fn completion_tokens_sent(&self) -> u64 {
        self.break_after.unwrap_or(self.completion_tokens).saturating_mul(self.generated)
    }

    /// When the last token is out, counted from the request's arrival.
    pub fn duration(&self) -> Nanos {
        let tokens = self.break_after.unwrap_or(self.completion_tokens);
        self.time_to_first_token + Nanos(self.time_per_token.0.saturating_mul(tokens.saturating_sub(1)))
    }
}

/// The model's answer to one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelResponse {
    Complete(Completion),
    /// 429, with Azure's headers.
    Throttled(Throttle),
    /// An injected 5xx, answered after the time to first token.
    Fault {
        status: u16,
        after: Nanos,
    },
    /// The connection is reset before any response.
    Reset,
    /// No response ever (an outage in `hang` mode).
    Hang,
    /// The connection is refused (an outage in `refuse` mode): the backend is down.
    Refused,
    /// The request costs more tokens (prompt plus `max_tokens`) than the
    /// deployment admits in a whole minute: it can never succeed, and Azure
    /// answers 400 rather than a 429 to retry.
    TooLarge {
        cost: u64,
        tpm: u64,
    },
}

/// Counts for `GET /_mock/stats` and the simulator's report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub requests: u64,
    pub completed: u64,
    pub throttled: u64,
    pub faults: u64,
    pub resets: u64,
    pub hangs: u64,
    pub refused: u64,
    pub too_large: u64,
    pub broken_streams: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

pub struct DeploymentModel {
    config: DeploymentConfig,
    /// Where fault schedules count from.
    start: Nanos,
    seed: u64,
    /// The stream every request's draws come from, [`DRAWS_PER_REQUEST`] words
    /// each.
    draws: ChaCha8Rng,
    tokens: SlidingLog,
    requests: SlidingLog,
    stats: Stats,
}

impl DeploymentModel {
    /// `seed` should differ per deployment; `start` is the instant schedules count from.
    pub fn new(config: DeploymentConfig, seed: u64, start: Nanos) -> DeploymentModel {
        DeploymentModel {
            config,
            start,
            seed,
            draws: ChaCha8Rng::seed_from_u64(seed),
            tokens: SlidingLog::default(),
            requests: SlidingLog::default(),
            stats: Stats::default(),
        }
    }

    pub fn config(&self) -> &DeploymentConfig {
        &self.config
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Replaces the faults; their schedule counts from `origin`.
    pub fn set_faults(&mut self, faults: Faults, origin: Nanos) {
        self.config.faults = faults;
        self.start = origin;
    }

    /// Decides the fate of a request arriving at `now`. Each request owns its
    /// draws (see [`RequestDraws`]), so changing one fault rate does not reshuffle
    /// the draws of every later request.
    pub fn handle_request(&mut self, now: Nanos, req: &ModelRequest) -> ModelResponse {
        self.stats.requests += 1;
        let mut rng = RequestDraws::new(&mut self.draws, self.seed, self.stats.requests);
        self.decide(now, req, &mut rng)
    }

    fn decide(&mut self, now: Nanos, req: &ModelRequest, rng: &mut RequestDraws) -> ModelResponse {
        let since_start = now.saturating_sub(self.start);
        let faults = &self.config.faults;
        if let Some(outage) = faults.outages.iter().find(|o| o.start.0 <= since_start && since_start < o.end.0) {
            return match outage.mode {
                OutageMode::Hang => self.count(ModelResponse::Hang),
                OutageMode::Refuse => self.count(ModelResponse::Refused),
                OutageMode::Fail => self.count(ModelResponse::Fault { status: outage.status, after: Nanos::ZERO }),
            };
        }
        if rng.random::<f64>() < faults.connection_reset.0 {
            return self.count(ModelResponse::Reset);
        }
        let (cost, tpm) = (self.cost(req), self.config.tpm);
        if !self.config.provisioned && cost > tpm {
            return self.count(ModelResponse::TooLarge { cost, tpm });
        }
        if let Err(throttle) = self.admit(now, req) {
            return self.count(ModelResponse::Throttled(throttle));
        }
        let response = self.complete(now, since_start, req, rng);
        self.count(response)
    }

    fn count(&mut self, response: ModelResponse) -> ModelResponse {
        let stats = &mut self.stats;
        match response {
            ModelResponse::Complete(c) => {
                stats.completed += 1;
                stats.prompt_tokens = stats.prompt_tokens.saturating_add(c.prompt_tokens);
                stats.completion_tokens = stats.completion_tokens.saturating_add(c.completion_tokens_sent());
                stats.broken_streams += u64::from(c.break_after.is_some());
            }
            ModelResponse::Throttled(_) => stats.throttled += 1,
            ModelResponse::Fault { .. } => stats.faults += 1,
            ModelResponse::Reset => stats.resets += 1,
            ModelResponse::Hang => stats.hangs += 1,
            ModelResponse::Refused => stats.refused += 1,
            ModelResponse::TooLarge { .. } => stats.too_large += 1,
        }
        response
    }

    /// The tokens a request is counted as for admission.
    pub fn cost(&self, req: &ModelRequest) -> u64 {
        if req.operation == Operation::Embeddings {
            return req.prompt_tokens;
        }
        let completion = req.max_tokens.unwrap_or(self.config.default_max_tokens);
        req.prompt_tokens.saturating_add(completion.saturating_mul(req.best_of.unwrap_or(1).max(1)))
    }

    fn admit(&mut self, now: Nanos, req: &ModelRequest) -> Result<(), Throttle> {
        self.tokens.expire(now, MINUTE);
        self.requests.expire(now, TEN_SECONDS);
        let tpm = self.config.tpm;
        if self.config.provisioned {
            // Utilisation: tokens processed in the last minute, charged on completion.
            if self.tokens.total() >= tpm {
                let retry_after = self.tokens.wait_until_at_most(now, MINUTE, tpm.saturating_sub(1));
                return Err(self.throttle(LimitKind::Utilization, retry_after));
            }
            return Ok(());
        }
        let cost = self.cost(req);
        let per_10s = self.config.requests_per_10s();
        if self.requests.total() + 1 > per_10s {
            let retry_after = self.requests.wait_until_at_most(now, TEN_SECONDS, per_10s - 1);
            return Err(self.throttle(LimitKind::Requests, retry_after));
        }
        if self.tokens.total().saturating_add(cost) > tpm {
            // A request that costs more than a whole minute's tokens never fits;
            // the honest advice is a full minute.
            debug_assert!(cost <= tpm, "a request larger than a minute's tokens is refused before");
            let retry_after = self.tokens.wait_until_at_most(now, MINUTE, tpm.saturating_sub(cost));
            return Err(self.throttle(LimitKind::Tokens, retry_after));
        }
        self.requests.add(now, 1);
        self.tokens.add(now, cost);
        Ok(())
    }

    fn throttle(&self, limit: LimitKind, retry_after: Nanos) -> Throttle {
        Throttle {
            limit,
            retry_after: retry_after.max(Nanos::from_millis(1)),
            remaining_requests: self.remaining_requests(),
            remaining_tokens: self.config.tpm.saturating_sub(self.tokens.total()),
        }
    }

    fn remaining_requests(&self) -> u64 {
        self.config.requests_per_10s().saturating_sub(self.requests.total())
    }

    fn complete(
        &mut self,
        now: Nanos,
        since_start: Nanos,
        req: &ModelRequest,
        rng: &mut RequestDraws,
    ) -> ModelResponse {
        let spike_ms: f64 = self
            .config
            .faults
            .latency_spikes
            .iter()
            .filter(|s| s.start.0 <= since_start && since_start < s.end.0)
            .map(|s| s.extra_ms)
            .sum();
        let ms = |v: f64| Nanos(round_to_u64(v * 1e6));
        let time_to_first_token = ms(self.config.latency.ttft_ms.sample(rng) + spike_ms);
        let time_per_token = ms(self.config.latency.per_token_ms.sample(rng));
        let fault_draw = rng.random::<f64>();
        let mut threshold = 0.0;
        for (status, p) in &self.config.faults.error_rates {
            threshold += p.0;
            if fault_draw < threshold {
                return ModelResponse::Fault { status: status.0, after: time_to_first_token };
            }
        }
        let (completion_tokens, finish_reason) = self.completion_length(req, rng);
        let break_after = match req.stream && rng.random::<f64>() < self.config.faults.broken_stream.0 {
            true => Some(rng.random_range(0..completion_tokens.max(1))),
            false => None,
        };
        let choices = req.choices.max(1);
        let generated = req.generated.max(choices);
        if self.config.provisioned {
            self.tokens.add(now, req.prompt_tokens.saturating_add(completion_tokens.saturating_mul(generated)));
        }
        ModelResponse::Complete(Completion {
            prompt_tokens: req.prompt_tokens,
            completion_tokens,
            choices,
            generated,
            finish_reason,
            time_to_first_token,
            time_per_token,
            break_after,
            remaining_requests: self.remaining_requests(),
            remaining_tokens: self.config.tpm.saturating_sub(self.tokens.total()),
        })
    }

    fn completion_length(&self, req: &ModelRequest, rng: &mut RequestDraws) -> (u64, FinishReason) {
        if req.operation == Operation::Embeddings {
            return (0, FinishReason::Stop);
        }
        let drawn = match req.completion_tokens {
            Some(n) => n,
            None => round_to_u64(self.config.completion_tokens.sample(rng)).max(1),
        };
        match req.max_tokens {
            Some(max) if drawn >= max => (max, FinishReason::Length),
            _ => (drawn, FinishReason::Stop),
        }
    }
}

/// How many 64-bit words of the model's stream each request owns. A request
/// draws at most seven in the common case (a reset, two latencies, a fault, a
/// completion length, a broken stream and where it breaks; a normal sample by
/// the ziggurat takes one word about 99% of the time), so eight leave one spare.
const DRAWS_PER_REQUEST: u32 = 8;

/// The draws of one request: the next [`DRAWS_PER_REQUEST`] words of the model's
/// stream, whether used or not, so every request's draws depend only on the seed
/// and its number. A request that needs more (a rejection sampler's rare retry)
/// goes on in a stream of its own, `(seed, request number)`. One stream read in
/// order costs far less than a fresh ChaCha stream per request, which computes
/// 256 bytes to use a few dozen.
///
/// The words are read from the stream in one go, as bytes: ChaCha's `fill_bytes`
/// consumes the same 32-bit results in the same order as that many `next_u64`
/// calls, so the words are exactly those, at a fraction of the bookkeeping.
struct RequestDraws {
    words: [u64; DRAWS_PER_REQUEST as usize],
    used: usize,
    seed: u64,
    request: u64,
    spill: Option<ChaCha8Rng>,
}

impl RequestDraws {
    fn new(stream: &mut ChaCha8Rng, seed: u64, request: u64) -> RequestDraws {
        let mut bytes = [0u8; 8 * DRAWS_PER_REQUEST as usize];
        stream.fill_bytes(&mut bytes);
        let words = std::array::from_fn(|i| u64::from_le_bytes(bytes[8 * i..8 * i + 8].try_into().expect("8 bytes")));
        RequestDraws { words, used: 0, seed, request, spill: None }
    }

    fn word(&mut self) -> u64 {
        if let Some(&word) = self.words.get(self.used) {
            self.used += 1;
            return word;
        }
        let (seed, request) = (self.seed, self.request);
        let spill = self.spill.get_or_insert_with(|| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(request);
            rng
        });
        spill.next_u64()
    }
}

impl rand::TryRng for RequestDraws {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        Ok(self.word() as u32)
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        Ok(self.word())
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        for chunk in dst.chunks_mut(8) {
            chunk.copy_from_slice(&self.word().to_le_bytes()[..chunk.len()]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request's words are the stream's next `next_u64`s, wherever in a ChaCha
    /// block the request starts (odd 32-bit offsets straddle a block's end), and
    /// the stream goes on after them exactly as if they had been drawn one by one.
    #[test]
    fn a_requests_words_are_the_streams_next_words() {
        for skip in 0..40 {
            let mut stream = ChaCha8Rng::seed_from_u64(3);
            (0..skip).for_each(|_| {
                stream.next_u32();
            });
            let mut one_by_one = stream.clone();
            let mut draws = RequestDraws::new(&mut stream, 3, 1);
            for i in 0..DRAWS_PER_REQUEST {
                assert_eq!(draws.word(), one_by_one.next_u64(), "skip {skip}, word {i}");
            }
            assert_eq!(stream.next_u64(), one_by_one.next_u64(), "skip {skip}: the stream goes on in step");
            let spilled = draws.word();
            let mut own = ChaCha8Rng::seed_from_u64(3);
            own.set_stream(1);
            assert_eq!(spilled, own.next_u64(), "a ninth word comes from the request's own stream");
        }
    }
}
