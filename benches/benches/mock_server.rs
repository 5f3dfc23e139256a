//! The mock server alone under load: requests per second and latency percentiles
//! with zero configured latency (`mocks/fast.toml`), so the proxy's benchmarks can
//! show the mock is not their bottleneck. Server and load share this machine.
//!
//! `cargo bench -p limitlab-benches --bench mock_server [-- SECONDS CONCURRENCY]`

use mock_aoai::MockConfig;
use serde_json::json;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let seconds: u64 = args.first().and_then(|s| s.parse().ok()).unwrap_or(5);
    let concurrency: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(32);
    let text = include_str!("../../mocks/fast.toml");
    let config = MockConfig::from_toml("mocks/fast.toml", text).expect("valid");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!(
            "http://{}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
            listener.local_addr().expect("addr")
        );
        tokio::spawn(mock_aoai::server::serve(listener, config, std::future::pending()));
        let client = reqwest::Client::new();
        let body = json!({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 20});
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let workers: Vec<_> = (0..concurrency)
            .map(|_| {
                let (client, url, body) = (client.clone(), url.clone(), body.clone());
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    while Instant::now() < deadline {
                        let started = Instant::now();
                        let r = client.post(&url).json(&body).send().await.expect("request");
                        assert_eq!(r.status(), 200);
                        r.bytes().await.expect("body");
                        latencies.push(started.elapsed());
                    }
                    latencies
                })
            })
            .collect();
        let mut all = Vec::new();
        for w in workers {
            all.extend(w.await.expect("worker"));
        }
        all.sort();
        let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)].as_secs_f64() * 1e3;
        println!(
            "mock_server: {} requests in {seconds} s over {concurrency} connections: {:.0} req/s, \
             latency_ms_p50 {:.3}, latency_ms_p99 {:.3}, latency_ms_max {:.3}",
            all.len(),
            all.len() as f64 / seconds as f64,
            pct(0.50),
            pct(0.99),
            pct(1.0)
        );
    });
}
