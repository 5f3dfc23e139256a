//! The floor for a reverse proxy built as `limitlab proxy` is (hyper's HTTP/1
//! server, a current-thread Tokio runtime per worker thread, each accepting from
//! one shared listening socket) but that does nothing else: no policy, no
//! limits, no usage reading, hyper's own pooled client to the backend. Run in
//! the peer bench in place of the proxy, it tells how much of the gap to nginx
//! is the design's and how much limitlab's own work.
//!
//!   bare-proxy LISTEN BACKEND [THREADS]   (e.g. 127.0.0.1:8083 127.0.0.1:8081 2)

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;

// The allocator `limitlab` uses, so that the two compare like for like.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Body = http_body_util::combinators::BoxBody<bytes::Bytes, hyper::Error>;

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(listen), Some(backend)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: bare-proxy LISTEN BACKEND [THREADS]");
        std::process::exit(2);
    };
    let threads: usize = args.get(3).and_then(|t| t.parse().ok()).unwrap_or(2);
    let listener = std::net::TcpListener::bind(listen)?;
    listener.set_nonblocking(true)?;
    println!("listening on http://{listen}");
    let workers = (0..threads)
        .map(|i| {
            let (listener, backend) = (listener.try_clone().expect("a clone of the socket"), backend.clone());
            std::thread::Builder::new().name(format!("bare-worker-{i}")).spawn(move || serve(listener, backend))
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    for worker in workers {
        let _ = worker.join();
    }
    Ok(())
}

fn serve(listener: std::net::TcpListener, backend: String) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let client: Client<_, Incoming> = Client::builder(TokioExecutor::new()).build_http();
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let (client, backend) = (client.clone(), backend.clone());
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                forward(client.clone(), backend.clone(), request)
            });
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service));
        }
    })
}

async fn forward(
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Incoming>,
    backend: String,
    mut request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
    *request.uri_mut() = format!("http://{backend}{path}").parse().expect("a valid URI");
    match client.request(request).await {
        Ok(response) => Ok(response.map(|body| body.boxed())),
        Err(_) => {
            let mut response = Response::new(http_body_util::Empty::new().map_err(|never| match never {}).boxed());
            *response.status_mut() = hyper::StatusCode::BAD_GATEWAY;
            Ok(response)
        }
    }
}
