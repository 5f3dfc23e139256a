//! proxy: the real gateway. An axum/hyper front end that drives gateway-core's
//! `Pipeline` (limits, retry, failover, pools, breakers, token accounting) against
//! real backends over HTTP/1.1 or HTTP/2, with rustls for https.

pub mod config;
pub mod metrics;
pub mod server;
pub mod usage;

pub use config::ProxyConfig;

use axum::routing::{any, get};
use axum::Router;
use std::net::SocketAddr;
use std::sync::Arc;

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
    let front = axum::serve(listener, router(proxy.clone()).into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(wait(rx));
    let back = axum::serve(admin, admin_router(proxy)).with_graceful_shutdown(wait(admin_rx));
    tokio::spawn(async move {
        shutdown.await;
        let _ = tx.send(true);
    });
    let (a, b) = tokio::join!(front, back);
    a.and(b)
}

async fn wait(mut rx: tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}
