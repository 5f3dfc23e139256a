//! proxy: the real gateway. An axum/hyper front end that drives gateway-core's
//! `Lifecycle` (limits, retry, failover, pools, breakers, token accounting) against
//! real backends over HTTP/1.1 or HTTP/2, with rustls for https.

mod background;
mod batch;
pub mod config;
pub mod counters;
pub mod decisions;
pub mod exact;
mod h1;
pub mod logs;
pub mod metrics;
pub mod server;
mod sync;
pub mod upstream;
pub mod usage;

pub use config::ProxyConfig;

use axum::body::Body;
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use server::Worker;
use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

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

/// Serves both listeners on the current runtime until `shutdown` completes;
/// requests and streams in progress then finish (the caller bounds how long
/// with its own deadline). Tests use this; `limitlab proxy` runs [`run_threads`].
pub async fn serve(
    proxy: Arc<server::Proxy>,
    listener: tokio::net::TcpListener,
    admin: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let sync = proxy.counters().cloned().map(|c| tokio::spawn(sync::run(proxy.clone(), c)));
    let (tx, rx) = watch::channel(false);
    // The admin server (metrics) stops only once the front end has.
    let (admin_tx, admin_rx) = watch::channel(false);
    let client_timeout = proxy.client_timeout();
    let front = serve_front(listener, Worker::new(proxy.clone()), client_timeout, wait(rx));
    let back = axum::serve(admin, admin_router(proxy)).with_graceful_shutdown(wait(admin_rx));
    tokio::spawn(async move {
        shutdown.await;
        let _ = tx.send(true);
    });
    let front = async move {
        let served = front.await;
        let _ = admin_tx.send(true);
        served
    };
    let (a, b) = tokio::join!(front, back.into_future());
    if let Some(sync) = sync {
        sync.abort();
    }
    a.and(b)
}

/// Runs the proxy as nginx runs its workers: `threads` OS threads, each with a
/// single-threaded runtime that accepts from the shared listening socket and
/// keeps its connections, both client and backend, to itself, so a request
/// never wakes another thread. The admin server and `shutdown` run on the
/// calling thread. When `shutdown` completes, every thread stops accepting and
/// requests in flight get `grace` to finish; returns whether they all did.
pub fn run_threads(
    proxy: Arc<server::Proxy>,
    listener: std::net::TcpListener,
    admin: std::net::TcpListener,
    threads: usize,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> std::io::Result<bool> {
    assert!(threads > 0, "at least one worker thread");
    listener.set_nonblocking(true)?;
    admin.set_nonblocking(true)?;
    let (tx, rx) = watch::channel(false);
    let done = (0..threads)
        .map(|i| spawn_worker(i, proxy.clone(), &listener, wait(rx.clone())))
        .collect::<std::io::Result<Vec<_>>>()?;
    drop(listener);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let proxy_for_sync = proxy.clone();
    runtime.block_on(async move {
        let admin = tokio::net::TcpListener::from_std(admin)?;
        // `/metrics` is served until the work in flight has ended (or the grace
        // period has), so the last scrape sees every request.
        let (admin_tx, admin_rx) = watch::channel(false);
        let back = axum::serve(admin, admin_router(proxy)).with_graceful_shutdown(wait(admin_rx));
        let back = tokio::spawn(back.into_future());
        let sync = proxy_for_sync.counters().cloned().map(|c| tokio::spawn(sync::run(proxy_for_sync.clone(), c)));
        shutdown.await;
        // Changes still journaled are shipped at the next interval; a replica
        // that stops takes only its last interval's changes with it.
        if let Some(sync) = sync {
            sync.abort();
        }
        let _ = tx.send(true);
        let workers = async {
            for worker in done {
                worker.await.unwrap_or(Ok(()))?;
            }
            Ok::<(), std::io::Error>(())
        };
        let finished = tokio::time::timeout(grace, workers).await;
        let _ = admin_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(1), back).await;
        match finished {
            Ok(result) => result.map(|()| true),
            Err(_) => Ok(false),
        }
    })
}

/// Starts worker thread `i` on a clone of `listener`; the receiver hears how its
/// serving ended. Everything that can fail is set up before the thread starts,
/// so a failure is reported before anything is served.
fn spawn_worker(
    i: usize,
    proxy: Arc<server::Proxy>,
    listener: &std::net::TcpListener,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<tokio::sync::oneshot::Receiver<std::io::Result<()>>> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let listener = {
        let _entered = runtime.enter();
        tokio::net::TcpListener::from_std(listener.try_clone()?)?
    };
    let (finished, finished_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new().name(format!("limitlab-worker-{i}")).spawn(move || {
        let client_timeout = proxy.client_timeout();
        let serving = runtime.block_on(serve_front(listener, Worker::new(proxy), client_timeout, stop));
        let _ = finished.send(serving);
    })?;
    Ok(finished_rx)
}

/// The client-facing accept loop: HTTP/1.1 and HTTP/2 on one port, each
/// connection told its peer's address. A client gets `client_timeout` to send a
/// request's headers, which also closes keep-alive connections idle that long
/// (hyper starts the clock whenever it waits for a request head); HTTP/2 peers
/// that stop answering pings are dropped.
async fn serve_front(
    listener: tokio::net::TcpListener,
    worker: Worker,
    client_timeout: Duration,
    stop: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // A read buffer well above the proxy's own URI and header limits, so that
    // their refusals are the proxy's APIM-style 414 and 431, with bodies.
    builder.http1().timer(TokioTimer::new()).header_read_timeout(client_timeout).max_buf_size(1 << 20);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(client_timeout / 2))
        .keep_alive_timeout(Duration::from_secs(20));
    // The same HTTP/1 settings, for connections known to be HTTP/1 from their
    // first bytes: served without `auto`'s rewinding reader in between.
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1.timer(TokioTimer::new()).header_read_timeout(client_timeout).max_buf_size(1 << 20);
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
        let (worker, from) = (worker.clone(), Arc::new(server::Peer::new(peer)));
        let service = hyper::service::service_fn(move |request: axum::http::Request<hyper::body::Incoming>| {
            // Boxed: the request's future is a few kilobytes, and hyper would
            // otherwise move it by value more than once.
            let response = Box::pin(server::handle(worker.clone(), from.clone(), request.map(Body::new)));
            async move { Ok::<_, std::convert::Infallible>(response.await) }
        });
        let (builder, http1, watcher) = (builder.clone(), http1.clone(), graceful.watcher());
        tokio::spawn(async move {
            // The first bytes decide HTTP/1 or HTTP/2 before hyper's own clock
            // runs: a client that sends nothing at all is timed out here.
            let mut first = [0u8; 3];
            let Ok(Ok(seen @ 1..)) = tokio::time::timeout(client_timeout, stream.peek(&mut first)).await else {
                return;
            };
            // HTTP/2's preface starts with `PRI`, a method HTTP/1 never uses.
            // A start that may still become it is left to `auto` to read.
            let served = match b"PRI".starts_with(&first[..seen]) {
                true => {
                    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    watcher.watch(connection.into_owned()).await
                }
                false => watcher.watch(http1.serve_connection(TokioIo::new(stream), service)).await.map_err(Into::into),
            };
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "client connection ended");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

async fn wait(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}
