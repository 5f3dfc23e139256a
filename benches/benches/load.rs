//! A small HTTP load generator for `benches/proxy-bench.sh`: POSTs a chat body to
//! a URL, either open-loop at a fixed rate or closed-loop for peak throughput.
//!
//! Open loop, a request's latency runs from the moment it was due. When its
//! connection was still busy then, that is the scheduled instant, so a stall is
//! not hidden (no coordinated omission). When the connection was idle, it is the
//! instant the timer actually fired: Tokio's timer fires up to a millisecond
//! late, and that lateness belongs to the load generator, not to the server.
//!
//! `cargo bench -p limitlab-benches --bench load -- URL RATE SECONDS [CONNECTIONS] [HEADER:VALUE]`
//! (RATE 0: closed loop, as fast as the connections go.)

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::time::{Duration, Instant};

const BODY: &str = r#"{"messages":[{"role":"user","content":"Hello"}],"max_tokens":20}"#;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let [url, rate, seconds, rest @ ..] = args.as_slice() else {
        eprintln!("usage: load URL RATE SECONDS [CONNECTIONS] [HEADER:VALUE]");
        std::process::exit(2);
    };
    let rate: f64 = rate.parse().expect("RATE");
    let seconds: u64 = seconds.parse().expect("SECONDS");
    let connections: usize = rest.first().and_then(|c| c.parse().ok()).unwrap_or(64);
    let header = rest.get(1).and_then(|h| h.split_once(':')).map(|(k, v)| (k.to_owned(), v.trim().to_owned()));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("rt");
    runtime.block_on(run(url.clone(), rate, seconds, connections, header));
}

async fn run(url: String, rate: f64, seconds: u64, connections: usize, header: Option<(String, String)>) {
    let client: Client<_, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).pool_max_idle_per_host(connections).build_http();
    let start = Instant::now() + Duration::from_millis(200);
    let end = start + Duration::from_secs(seconds);
    let workers: Vec<_> = (0..connections)
        .map(|w| {
            let (client, url, header) = (client.clone(), url.clone(), header.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut errors = 0u64;
                let mut n = 0u64;
                let mut idle_since = start;
                loop {
                    // Open loop: worker w sends at start + (w + n·connections)/rate.
                    let scheduled = match rate > 0.0 {
                        true => start + Duration::from_secs_f64((w as u64 + n * connections as u64) as f64 / rate),
                        false => Instant::now().max(start),
                    };
                    if scheduled >= end {
                        return (latencies, errors);
                    }
                    tokio::time::sleep_until(scheduled.into()).await;
                    let from = if idle_since <= scheduled { Instant::now() } else { scheduled };
                    let mut request = hyper::Request::post(&url).header("content-type", "application/json");
                    if let Some((k, v)) = &header {
                        request = request.header(k, v);
                    }
                    let request = request.body(Full::new(Bytes::from_static(BODY.as_bytes()))).expect("request");
                    match client.request(request).await {
                        Ok(r) if r.status().is_success() => {
                            let _ = r.into_body().collect().await;
                            latencies.push(from.elapsed());
                        }
                        Ok(r) => {
                            let _ = r.into_body().collect().await;
                            errors += 1;
                        }
                        Err(_) => errors += 1,
                    }
                    n += 1;
                    idle_since = Instant::now();
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for w in workers {
        let (l, e) = w.await.expect("worker");
        all.extend(l);
        errors += e;
    }
    all.sort();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    };
    println!(
        "{url} rate {} over {connections} connections: {} ok, {errors} errors, {:.0} req/s, latency_ms_p50 {:.3}, latency_ms_p99 {:.3}",
        if rate > 0.0 { format!("{rate}/s") } else { "max".into() },
        all.len(),
        all.len() as f64 / seconds as f64,
        pct(0.5),
        pct(0.99)
    );
}
