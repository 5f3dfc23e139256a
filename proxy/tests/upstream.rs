//! The worker's own backend connection pool against a raw TCP backend that
//! counts its connections and records what arrives on them.

use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use proxy::upstream::Upstream;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;

/// What the backend saw: connections accepted, and each request's head.
#[derive(Default)]
struct Seen {
    connections: usize,
    heads: Vec<String>,
}

const OK: &str = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

/// A keep-alive HTTP/1.1 backend answering `200 ok`; with `close_after_one` it
/// closes each connection after its first answer.
async fn backend(close_after_one: bool) -> (String, Arc<Mutex<Seen>>) {
    backend_answering(OK, close_after_one).await
}

/// A backend that writes `answer` for every request.
async fn backend_answering(answer: &'static str, close_after_one: bool) -> (String, Arc<Mutex<Seen>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Seen::default()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            log.lock().unwrap().connections += 1;
            tokio::spawn(serve(socket, log.clone(), answer, close_after_one));
        }
    });
    (base, seen)
}

async fn serve(mut socket: tokio::net::TcpStream, log: Arc<Mutex<Seen>>, answer: &str, close_after_one: bool) {
    let mut buf = Vec::new();
    loop {
        let Some(end) = head_end(&buf) else {
            let mut chunk = [0u8; 4096];
            match socket.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let length = content_length(&head);
        while buf.len() < end + length {
            let mut chunk = [0u8; 4096];
            match socket.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..end + length);
        log.lock().unwrap().heads.push(head);
        if socket.write_all(answer.as_bytes()).await.is_err() || close_after_one {
            return;
        }
    }
}

fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

fn content_length(head: &str) -> usize {
    let value = head.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(str::to_owned));
    value.and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

fn request(base: &str) -> hyper::Request<Bytes> {
    let uri = format!("{base}/openai/deployments/d/chat/completions?api-version=2024-10-21");
    hyper::Request::post(uri).body(Bytes::from_static(b"{\"messages\":[]}")).unwrap()
}

/// Sends one request and reads its body to the end; `release` puts the connection back.
async fn call(upstream: &Arc<Upstream>, base: &str, release: bool) -> String {
    let (response, lease) = upstream.send(request(base)).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    if release {
        lease.release();
    }
    String::from_utf8(body.to_vec()).unwrap()
}

#[tokio::test]
async fn requests_one_after_another_reuse_one_connection() {
    let (base, seen) = backend(false).await;
    let upstream = Arc::new(Upstream::new());
    for _ in 0..3 {
        assert_eq!(call(&upstream, &base, true).await, "ok");
    }
    let seen = seen.lock().unwrap();
    assert_eq!((seen.connections, seen.heads.len()), (1, 3));
}

#[tokio::test]
async fn requests_go_out_in_origin_form_with_the_backends_host() {
    let (base, seen) = backend(false).await;
    let upstream = Arc::new(Upstream::new());
    call(&upstream, &base, true).await;
    let head = seen.lock().unwrap().heads[0].to_ascii_lowercase();
    let authority = base.strip_prefix("http://").unwrap();
    assert!(
        head.starts_with("post /openai/deployments/d/chat/completions?api-version=2024-10-21 http/1.1\r\n"),
        "{head}"
    );
    assert!(head.contains(&format!("\r\nhost: {authority}\r\n")), "{head}");
    assert!(head.contains("\r\ncontent-length: 15\r\n"), "{head}");
}

#[tokio::test]
async fn a_connection_not_released_is_not_reused() {
    let (base, seen) = backend(false).await;
    let upstream = Arc::new(Upstream::new());
    call(&upstream, &base, false).await;
    call(&upstream, &base, true).await;
    assert_eq!(seen.lock().unwrap().connections, 2);
}

#[tokio::test]
async fn a_connection_the_backend_closed_is_replaced() {
    let (base, seen) = backend(true).await;
    let upstream = Arc::new(Upstream::new());
    for _ in 0..3 {
        assert_eq!(call(&upstream, &base, true).await, "ok");
        // Let the close reach the pooled connection before the next request.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let seen = seen.lock().unwrap();
    assert_eq!((seen.connections, seen.heads.len()), (3, 3));
}

#[tokio::test]
async fn requests_at_once_each_get_a_connection_and_all_return_to_the_pool() {
    let (base, seen) = backend(false).await;
    let upstream = Arc::new(Upstream::new());
    let calls = (0..4).map(|_| call(&upstream, &base, true));
    futures_util::future::join_all(calls).await;
    assert_eq!(seen.lock().unwrap().connections, 4);
    let calls = (0..4).map(|_| call(&upstream, &base, true));
    futures_util::future::join_all(calls).await;
    assert_eq!(seen.lock().unwrap().connections, 4, "the second round reuses the first round's connections");
}

/// Three calls to a backend that gives `answer` (closing each connection
/// after one answer with `close_after_one`): each body is `ok`, and the
/// backend saw `connections` connections.
async fn check_answer(answer: &'static str, close_after_one: bool, connections: usize) {
    let (base, seen) = backend_answering(answer, close_after_one).await;
    let upstream = Arc::new(Upstream::new());
    for _ in 0..3 {
        assert_eq!(call(&upstream, &base, true).await, "ok", "{answer:?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(seen.lock().unwrap().connections, connections, "{answer:?}");
}

#[tokio::test]
async fn every_framing_of_a_response_body_is_read_and_only_reusable_connections_are_reused() {
    let chunked = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\no\r\n1;x=y\r\nk\r\n0\r\nt: 1\r\n\r\n";
    check_answer(chunked, false, 1).await;
    check_answer("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", false, 1).await;
    check_answer("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok", false, 3).await;
    check_answer("HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok", false, 3).await;
    // No length: the body ends with the connection.
    check_answer("HTTP/1.1 200 OK\r\n\r\nok", true, 3).await;
}

#[tokio::test]
async fn a_body_cut_short_is_an_error_not_a_short_body() {
    let (base, _) = backend_answering("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nok", true).await;
    let upstream = Arc::new(Upstream::new());
    let (response, _lease) = upstream.send(request(&base)).await.unwrap();
    assert!(response.into_body().collect().await.is_err());
    let chunked = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nok";
    let (base, _) = backend_answering(chunked, true).await;
    let (response, _lease) = upstream.send(request(&base)).await.unwrap();
    assert!(response.into_body().collect().await.is_err());
}

#[tokio::test]
async fn a_malformed_answer_is_told_apart_from_a_broken_connection() {
    let upstream = Arc::new(Upstream::new());
    let (base, _) =
        backend_answering("HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok", true).await;
    let error = upstream.send(request(&base)).await.err().expect("lengths that disagree");
    assert!(matches!(error, proxy::upstream::UpstreamError::Malformed(_)), "{error}");
    let (base, _) = backend_answering("SMTP ready\r\n\r\n", true).await;
    let error = upstream.send(request(&base)).await.err().expect("not HTTP");
    assert!(matches!(error, proxy::upstream::UpstreamError::Malformed(_)), "{error}");
    let (base, _) = backend_answering("HTTP/1.1 200 OK\r\ncontent-", true).await;
    let error = upstream.send(request(&base)).await.err().expect("closed mid-head");
    assert!(matches!(error, proxy::upstream::UpstreamError::Http(_)), "{error}");
}

#[tokio::test]
async fn a_relative_url_is_a_connect_error() {
    let upstream = Arc::new(Upstream::new());
    let request = hyper::Request::get("/openai/x").body(Bytes::new()).unwrap();
    let error = upstream.send(request).await.err().expect("no origin to connect to");
    assert!(matches!(error, proxy::upstream::UpstreamError::Connect(_)), "{error}");
}

/// A TLS backend that offers only `h2`, trusted through its own self-signed
/// certificate; it records each request's version and URI.
async fn h2_backend() -> (String, rustls::ClientConfig, Arc<Mutex<Seen>>) {
    let (acceptor, cert, _) = common::localhost_tls(&[b"h2"]);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("https://localhost:{}", listener.local_addr().unwrap().port());
    let seen = Arc::new(Mutex::new(Seen::default()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            log.lock().unwrap().connections += 1;
            let (acceptor, log) = (acceptor.clone(), log.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(socket).await else { return };
                let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                    let head = format!("{:?} {}", request.version(), request.uri());
                    log.lock().unwrap().heads.push(head);
                    async { Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from("ok")))) }
                });
                let builder = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
                let _ = builder.serve_connection(hyper_util::rt::TokioIo::new(tls), service).await;
            });
        }
    });
    (base, client, seen)
}

#[tokio::test]
async fn a_tls_backend_that_offers_http2_gets_one_shared_http2_connection() {
    let (base, tls, seen) = h2_backend().await;
    let upstream = Arc::new(Upstream::with_tls_config(tls));
    assert_eq!(call(&upstream, &base, true).await, "ok");
    let calls = (0..3).map(|i| call(&upstream, &base, i % 2 == 0));
    assert_eq!(futures_util::future::join_all(calls).await, ["ok"; 3]);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.connections, 1, "one connection carries every request, released or not");
    let expected = format!("HTTP/2.0 {base}/openai/deployments/d/chat/completions?api-version=2024-10-21");
    assert_eq!(seen.heads, vec![expected; 4]);
}
