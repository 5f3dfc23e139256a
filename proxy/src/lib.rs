//! proxy: the real gateway. An axum/hyper front end that drives gateway-core's
//! `Pipeline` (limits, retry, failover, pools, breakers, token accounting) against
//! real backends over HTTP/1.1 or HTTP/2, with rustls for https.

pub mod config;
pub mod metrics;
pub mod server;
pub mod usage;

pub use config::ProxyConfig;

use axum::extract::ConnectInfo;
use axum::routing::{any, get};
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;
use tower_service::Service;

/// The client-facing router.
pub fn router(proxy: Arc<server::Proxy>) -> Router {
    Router::new().fallback(any(server::handle)).with_state(proxy)
}

/// The admin router: `/metrics`, `/healthz`, `/readyz`.
pub fn admin_router(proxy: Arc<server::Proxy>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ready\n" }))
        .with_state(proxy)
}

async fn metrics(axum::extract::State(proxy): axum::extract::State<Arc<server::Proxy>>) -> String {
    proxy.render_metrics()
}

/// Serves both listeners until `shutdown` completes; requests and streams in
/// progress then finish (the caller bounds how long with its own deadline).
pub async fn serve(
    proxy: Arc<server::Proxy>,
    listener: tokio::net::TcpListener,
    admin: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let admin_rx = rx.clone();
    let client_timeout = proxy.client_timeout();
    let front = serve_front(listener, router(proxy.clone()), client_timeout, wait(rx));
    let back = axum::serve(admin, admin_router(proxy)).with_graceful_shutdown(wait(admin_rx));
    tokio::spawn(async move {
        shutdown.await;
        let _ = tx.send(true);
    });
    let (a, b) = tokio::join!(front, back.into_future());
    a.and(b)
}

/// The client-facing accept loop: HTTP/1.1 and HTTP/2 on one port, each
/// connection told its peer's address. A client gets `client_timeout` to send a
/// request's headers, which also closes keep-alive connections idle that long
/// (hyper starts the clock whenever it waits for a request head); HTTP/2 peers
/// that stop answering pings are dropped.
async fn serve_front(
    listener: tokio::net::TcpListener,
    app: Router,
    client_timeout: Duration,
    stop: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(client_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(client_timeout / 2))
        .keep_alive_timeout(Duration::from_secs(20));
    let graceful = GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut request: axum::http::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            app.clone().call(request)
        });
        let (builder, watcher) = (builder.clone(), graceful.watcher());
        tokio::spawn(async move {
            // The first bytes decide HTTP/1 or HTTP/2 before hyper's own clock
            // runs: a client that sends nothing at all is timed out here.
            let mut first = [0u8; 1];
            if !matches!(tokio::time::timeout(client_timeout, stream.peek(&mut first)).await, Ok(Ok(1..))) {
                return;
            }
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(connection.into_owned()).await {
                tracing::debug!(%peer, error = %e, "client connection ended");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

async fn wait(mut rx: tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}
