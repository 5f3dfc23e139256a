//! Slow and idle clients: a connection that sends no request head within
//! `client_timeout` is closed, whether it never starts, dribbles its headers, or
//! sits idle on keep-alive after a request; a slow body gets 408.

use proxy::server::Proxy;
use proxy::ProxyConfig;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CONFIG: &str = r#"
client_timeout = "1s"

[[subscriptions]]
id = "s"
key = "k"
products = ["p"]

[[products]]
name = "p"

[routing]
set_backend = "b"
backends = [{ id = "b", url = "http://127.0.0.1:9" }]
"#;

async fn start() -> String {
    let config = ProxyConfig::from_toml("test.toml", CONFIG).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    tokio::spawn(proxy::serve(Arc::new(Proxy::new(config).unwrap()), listener, admin, std::future::pending()));
    address
}

/// Reads until the proxy closes the connection; returns what it sent and when.
async fn until_closed(stream: &mut TcpStream, started: Instant) -> (String, Duration) {
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the proxy kept the connection open for 10 s");
    (String::from_utf8_lossy(&got).into_owned(), started.elapsed())
}

#[tokio::test]
async fn a_connection_that_never_sends_a_request_is_closed() {
    let address = start().await;
    let started = Instant::now();
    let mut stream = TcpStream::connect(&address).await.unwrap();
    let (_, after) = until_closed(&mut stream, started).await;
    assert!(after >= Duration::from_millis(900) && after < Duration::from_secs(3), "{after:?}");
}

#[tokio::test]
async fn headers_dribbled_slower_than_the_timeout_are_cut_off() {
    let address = start().await;
    let started = Instant::now();
    let mut stream = TcpStream::connect(&address).await.unwrap();
    stream.write_all(b"POST /openai/deployments/d/chat/completions HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    // One header byte every 200 ms: each write is fast, the head never completes.
    let dribble = async {
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if stream.write_all(b"X").await.is_err() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), dribble).await;
    let (_, after) = until_closed(&mut stream, started).await;
    assert!(after < Duration::from_secs(4), "a slow-headers client held on for {after:?}");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_a_request() {
    let address = start().await;
    let mut stream = TcpStream::connect(&address).await.unwrap();
    // A key-less request: the proxy answers 401 itself and keeps the connection.
    stream.write_all(b"GET /openai/deployments/d/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 401");
    let started = Instant::now();
    let (_, after) = until_closed(&mut stream, started).await;
    assert!(after >= Duration::from_millis(800) && after < Duration::from_secs(3), "{after:?}");
}

#[tokio::test]
async fn a_body_slower_than_the_timeout_gets_408() {
    let address = start().await;
    let mut stream = TcpStream::connect(&address).await.unwrap();
    let head = "POST /openai/deployments/d/chat/completions?api-version=2024-10-21 HTTP/1.1\r\nHost: x\r\n\
                api-key: k\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"messages\":";
    stream.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let (answer, after) = until_closed(&mut stream, started).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(after < Duration::from_secs(3), "{after:?}");
}
