//! The floor of `limitlab proxy`'s design: its transport with none of its work.
//! hyper's HTTP/1 server on a current-thread Tokio runtime per worker thread,
//! each accepting from one shared listening socket, and the proxy's own
//! backend client (`proxy::upstream`, HTTP/1.1 on the request's task), bodies
//! read whole as the proxy reads them; but no policy, no limits, no usage
//! reading, no metrics, no log. Run in the peer bench in the proxy's place, it
//! tells how much of the gap to nginx is the design's and how much the proxy's
//! own work.
//!
//!   bare-proxy LISTEN BACKEND [THREADS]   (e.g. 127.0.0.1:8083 127.0.0.1:8081 2)

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use proxy::upstream::Upstream;
use std::convert::Infallible;
use std::sync::Arc;

// The allocator `limitlab` uses, so that the two compare like for like.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
            let (listener, backend) = (listener.try_clone()?, backend.clone());
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
        let upstream = Arc::new(Upstream::new());
        let backend: Arc<str> = backend.into();
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let (upstream, backend) = (upstream.clone(), backend.clone());
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                forward(upstream.clone(), backend.clone(), request)
            });
            let connection = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            tokio::spawn(connection);
        }
    })
}

async fn forward(
    upstream: Arc<Upstream>,
    backend: Arc<str>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (mut parts, body) = request.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = format!("http://{backend}{path}").parse().expect("a valid URI");
    let Ok(body) = body.collect().await else { return Ok(status(StatusCode::BAD_REQUEST)) };
    let Ok((response, lease)) = upstream.send(Request::from_parts(parts, body.to_bytes())).await else {
        return Ok(status(StatusCode::BAD_GATEWAY));
    };
    let (parts, body) = response.into_parts();
    let Ok(body) = body.collect().await else { return Ok(status(StatusCode::BAD_GATEWAY)) };
    lease.release();
    Ok(Response::from_parts(parts, Full::new(body.to_bytes())))
}

fn status(code: StatusCode) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = code;
    response
}
