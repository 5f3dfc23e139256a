//! The streaming lane's load generator (`benches/peer-stream.sh`): POSTs a
//! streamed chat request (`"stream": true` with the usage chunk) to a URL, reads
//! each SSE response to its end, and reports throughput, time to first byte
//! and time to the stream's end.
//!
//! Time to first byte runs from the moment a stream was due to the first byte
//! of its body (the first SSE event), the figure a chat user feels. As in
//! `load.rs`, a stream whose connection was idle when it was due starts its
//! clock when the timer actually fired; one whose connection was still busy
//! starts it at the scheduled instant, so a stall is not hidden.
//!
//! Every stream is checked: status 200, `EVENTS` events (the `data:` lines),
//! the last `data: [DONE]`. A stream that differs counts as an error, so a
//! proxy that buffers, cuts or reorders a stream cannot look fast.
//!
//! `cargo bench -p limitlab-benches --bench sse_load -- URL RATE SECONDS CONNECTIONS EVENTS [HEADER:VALUE]`
//! (RATE 0: closed loop.) Prints one JSON object.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::time::{Duration, Instant};

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

const BODY: &str = r#"{"messages":[{"role":"user","content":"Hello"}],"max_tokens":100,"stream":true,"stream_options":{"include_usage":true}}"#;

struct Args {
    url: String,
    rate: f64,
    seconds: u64,
    connections: usize,
    events: usize,
    header: Option<(String, String)>,
}

fn parse_args() -> Result<Args, String> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let [url, rate, seconds, connections, events, rest @ ..] = args.as_slice() else {
        return Err("usage: sse_load URL RATE SECONDS CONNECTIONS EVENTS [HEADER:VALUE]".into());
    };
    let number = |name: &str, v: &str| v.parse::<f64>().map_err(|_| format!("{name}: not a number: {v}"));
    let header = match rest.first() {
        None => None,
        Some(h) => {
            let (k, v) = h.split_once(':').ok_or_else(|| format!("HEADER:VALUE expected, got {h}"))?;
            Some((k.to_owned(), v.trim().to_owned()))
        }
    };
    Ok(Args {
        url: url.clone(),
        rate: number("RATE", rate)?,
        seconds: number("SECONDS", seconds)? as u64,
        connections: number("CONNECTIONS", connections)? as usize,
        events: number("EVENTS", events)? as usize,
        header,
    })
}

fn main() {
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2);
    });
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("rt");
    runtime.block_on(run(args));
}

/// One checked stream's figures.
struct Stream {
    ttfb: Duration,
    total: Duration,
    bytes: usize,
}

#[derive(Default)]
struct Tally {
    streams: Vec<Stream>,
    errors: u64,
    first_error: Option<String>,
}

async fn run(args: Args) {
    let args = std::sync::Arc::new(args);
    let client: HttpClient =
        Client::builder(TokioExecutor::new()).pool_max_idle_per_host(args.connections).build_http();
    let start = Instant::now() + Duration::from_millis(200);
    let end = start + Duration::from_secs(args.seconds);
    let workers: Vec<_> =
        (0..args.connections).map(|w| tokio::spawn(worker(client.clone(), args.clone(), w, start, end))).collect();
    let mut tally = Tally::default();
    for w in workers {
        let t = w.await.expect("worker");
        tally.streams.extend(t.streams);
        tally.errors += t.errors;
        tally.first_error = tally.first_error.or(t.first_error);
    }
    report(&args, &tally);
}

async fn worker(client: HttpClient, args: std::sync::Arc<Args>, w: usize, start: Instant, end: Instant) -> Tally {
    let mut tally = Tally::default();
    let (mut n, mut idle_since) = (0u64, start);
    loop {
        // Open loop: worker w sends at start + (w + n·connections)/rate.
        let scheduled = match args.rate > 0.0 {
            true => start + Duration::from_secs_f64((w as u64 + n * args.connections as u64) as f64 / args.rate),
            false => Instant::now().max(start),
        };
        if scheduled >= end {
            return tally;
        }
        tokio::time::sleep_until(scheduled.into()).await;
        let from = if idle_since <= scheduled { Instant::now() } else { scheduled };
        match one_stream(&client, &args, from).await {
            Ok(stream) => tally.streams.push(stream),
            Err(e) => {
                tally.errors += 1;
                tally.first_error.get_or_insert(e);
            }
        }
        n += 1;
        idle_since = Instant::now();
    }
}

async fn one_stream(client: &HttpClient, args: &Args, from: Instant) -> Result<Stream, String> {
    let mut request = hyper::Request::post(&args.url).header("content-type", "application/json");
    if let Some((k, v)) = &args.header {
        request = request.header(k, v);
    }
    let request = request.body(Full::new(Bytes::from_static(BODY.as_bytes()))).expect("request");
    let response = client.request(request).await.map_err(|e| format!("request: {e}"))?;
    let status = response.status();
    let mut body = response.into_body();
    let (mut text, mut ttfb) = (Vec::new(), None);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("body: {e}"))?;
        let Ok(data) = frame.into_data() else { continue };
        if !data.is_empty() && ttfb.is_none() {
            ttfb = Some(from.elapsed());
        }
        text.extend_from_slice(&data);
    }
    let total = from.elapsed();
    if !status.is_success() {
        return Err(format!("status {status}: {}", String::from_utf8_lossy(&text)));
    }
    check_events(&text, args.events)?;
    Ok(Stream { ttfb: ttfb.unwrap_or(total), total, bytes: text.len() })
}

/// The stream has `events` `data:` lines and ends with `data: [DONE]`.
fn check_events(text: &[u8], events: usize) -> Result<(), String> {
    let data: Vec<&[u8]> = text.split(|b| *b == b'\n').filter(|l| l.starts_with(b"data:")).collect();
    if data.len() != events {
        return Err(format!("{} events, expected {events}", data.len()));
    }
    match data.last().map(|l| l.trim_ascii_end()) {
        Some(b"data: [DONE]") => Ok(()),
        _ => Err("the stream does not end with `data: [DONE]`".into()),
    }
}

fn report(args: &Args, tally: &Tally) {
    let percentile = |mut values: Vec<Duration>, p: f64| {
        values.sort();
        let i = ((values.len() as f64 * p) as usize).min(values.len().saturating_sub(1));
        values.get(i).map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    };
    let ttfb: Vec<Duration> = tally.streams.iter().map(|s| s.ttfb).collect();
    let total: Vec<Duration> = tally.streams.iter().map(|s| s.total).collect();
    let seconds = args.seconds as f64;
    let bytes: usize = tally.streams.iter().map(|s| s.bytes).sum();
    let line = serde_json::json!({
        "url": args.url,
        "rate": args.rate,
        "connections": args.connections,
        "seconds": args.seconds,
        "streams_ok": tally.streams.len(),
        "errors": tally.errors,
        "first_error": tally.first_error,
        "streams_per_s": tally.streams.len() as f64 / seconds,
        "events_per_s": (tally.streams.len() * args.events) as f64 / seconds,
        "mb_per_s": bytes as f64 / seconds / 1e6,
        "ttfb_ms_p50": percentile(ttfb.clone(), 0.5),
        "ttfb_ms_p99": percentile(ttfb, 0.99),
        "total_ms_p50": percentile(total.clone(), 0.5),
        "total_ms_p99": percentile(total, 0.99),
    });
    println!("{line}");
}
