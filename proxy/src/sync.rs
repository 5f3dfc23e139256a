//! The lagged replica's exchange with its counter store: every
//! `sync_interval`, ship this replica's counter changes and apply the others'.

use crate::counters::{read_batch, BatchOut, CountersConfig, Mode, Stream, BATCH_CHANGES};
use crate::server::Proxy;
use redis::aio::ConnectionManager;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long one exchange with the store (connecting included) may take before
/// it counts as an error; the next interval tries again.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(1);

/// Syncs until the task is dropped. Never returns an error: a store that
/// cannot be reached is counted, logged, and tried again next interval.
pub async fn run(proxy: Arc<Proxy>, config: CountersConfig) {
    match config.mode {
        Mode::Lagged => run_lagged(proxy, config).await,
        Mode::Exact => run_exact(proxy, config).await,
    }
}

/// Exact mode's background turn: every `sync_interval`, each product catches up
/// with the store and ships what waits (changes made while it was away, or
/// outside a turn), so an idle replica stays current and nothing waits long.
async fn run_exact(proxy: Arc<Proxy>, config: CountersConfig) {
    let mut ticker = tokio::time::interval(config.sync_interval.0.into_std());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        proxy.flush_exact().await;
    }
}

async fn run_lagged(proxy: Arc<Proxy>, config: CountersConfig) {
    let replica = crate::counters::replica_id();
    let client = match config.url().and_then(|url| redis::Client::open(url).map_err(|e| e.to_string())) {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "counters: the store's URL is unusable; counting locally");
            return;
        }
    };
    let mut streams: Vec<Stream> = proxy
        .product_names()
        .map(|name| Stream {
            key: format!("{}:{name}:changes", config.key_prefix),
            last_id: String::new(),
            backlog: Default::default(),
        })
        .collect();
    let mut connection: Option<ConnectionManager> = None;
    let mut ticker = tokio::time::interval(config.sync_interval.0.into_std());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        proxy.drain_journals(&mut streams);
        let state = proxy.store_state();
        state.backlog.store(streams.iter().map(|s| s.backlog.len() as u64).sum(), Ordering::Relaxed);
        let started = Instant::now();
        match tokio::time::timeout(EXCHANGE_TIMEOUT, exchange(&client, &mut connection, &mut streams, &replica, &proxy))
            .await
        {
            Ok(Ok(())) => {
                if !state.reachable.swap(true, Ordering::Relaxed) {
                    tracing::info!("counters: the store is reachable; changes are shared");
                }
                let mut timings = state.timings.lock().unwrap_or_else(|e| e.into_inner());
                timings.round_trip_s.saturating_record(started.elapsed().as_micros().max(1) as u64);
            }
            outcome => {
                let error = match outcome {
                    Ok(Err(e)) => e.to_string(),
                    _ => "no answer in time".to_owned(),
                };
                state.errors.fetch_add(1, Ordering::Relaxed);
                if state.reachable.swap(false, Ordering::Relaxed) || connection.is_none() {
                    tracing::warn!(%error, "counters: the store cannot be reached; deciding on local counters");
                }
                connection = None;
            }
        }
        state.backlog.store(streams.iter().map(|s| s.backlog.len() as u64).sum(), Ordering::Relaxed);
    }
}

/// One exchange: connect if needed, ship the backlog, apply what the others shipped.
async fn exchange(
    client: &redis::Client,
    connection: &mut Option<ConnectionManager>,
    streams: &mut [Stream],
    replica: &str,
    proxy: &Proxy,
) -> redis::RedisResult<()> {
    if connection.is_none() {
        let mut fresh = ConnectionManager::new(client.clone()).await?;
        start_positions(&mut fresh, streams).await?;
        *connection = Some(fresh);
    }
    let con = connection.as_mut().expect("connected above");
    ship(con, streams, replica, proxy).await?;
    apply(con, streams, replica, proxy).await
}

/// Where a replica starts reading each stream: after what is there when it
/// first connects (changes older than that were made before it existed); on a
/// reconnection, where it stopped, so that nothing made meanwhile is missed.
async fn start_positions(con: &mut ConnectionManager, streams: &mut [Stream]) -> redis::RedisResult<()> {
    for stream in streams.iter_mut().filter(|s| s.last_id.is_empty()) {
        let last: redis::streams::StreamRangeReply =
            redis::cmd("XREVRANGE").arg(&stream.key).arg("+").arg("-").arg("COUNT").arg(1).query_async(con).await?;
        stream.last_id = last.ids.first().map_or_else(|| "0-0".to_owned(), |e| e.id.clone());
    }
    Ok(())
}

async fn ship(
    con: &mut ConnectionManager,
    streams: &mut [Stream],
    replica: &str,
    proxy: &Proxy,
) -> redis::RedisResult<()> {
    let mut pipe = redis::pipe();
    let mut count = 0;
    for stream in streams.iter_mut() {
        for chunk in stream.backlog.make_contiguous().chunks(BATCH_CHANGES) {
            let batch = BatchOut { replica, first_seq: None, changes: chunk };
            let text = serde_json::to_string(&batch).expect("a change serializes");
            // Bounded: a stream keeps about the last hundred thousand batches.
            pipe.cmd("XADD")
                .arg(&stream.key)
                .arg("MAXLEN")
                .arg("~")
                .arg(100_000)
                .arg("*")
                .arg("r")
                .arg(replica)
                .arg("e")
                .arg(text)
                .ignore();
            count += chunk.len() as u64;
        }
    }
    if count == 0 {
        return Ok(());
    }
    pipe.query_async::<()>(con).await?;
    streams.iter_mut().for_each(|s| s.backlog.clear());
    proxy.store_state().shipped.fetch_add(count, Ordering::Relaxed);
    Ok(())
}

/// Reads each stream (KEYS) after its position (ARGV[1..#KEYS]), at most
/// ARGV[#KEYS + 2] entries a stream; the entries of replica ARGV[#KEYS + 1]
/// (this one) come back without their changes, which it already holds.
const READ_OTHERS: &str = r"
local own = ARGV[#KEYS + 1]
local out = {}
for i, key in ipairs(KEYS) do
  local entries = redis.call('XRANGE', key, '(' .. ARGV[i], '+', 'COUNT', ARGV[#KEYS + 2])
  for _, entry in ipairs(entries) do
    local fields = entry[2]
    if fields[1] == 'r' and fields[2] == own then entry[2] = {'r', own} end
  end
  out[i] = entries
end
return out
";

/// The most entries (batches) one exchange reads from a stream.
const READ_ENTRIES: usize = 1_000;

async fn apply(
    con: &mut ConnectionManager,
    streams: &mut [Stream],
    replica: &str,
    proxy: &Proxy,
) -> redis::RedisResult<()> {
    // Hashed once: the script goes by its digest on every exchange.
    static SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| redis::Script::new(READ_OTHERS));
    let mut invocation = SCRIPT.prepare_invoke();
    streams.iter().for_each(|s| {
        invocation.key(&s.key).arg(&s.last_id);
    });
    invocation.arg(replica).arg(READ_ENTRIES);
    let replies: Vec<redis::streams::StreamRangeReply> = invocation.invoke_async(con).await?;
    for (product, reply) in replies.into_iter().enumerate() {
        let key = streams[product].key.clone();
        for entry in &reply.ids {
            streams[product].last_id = entry.id.clone();
            let Some(batch) = read_batch(&key, replica, entry) else { continue };
            proxy.apply_deltas(product, &batch.changes);
        }
    }
    Ok(())
}
