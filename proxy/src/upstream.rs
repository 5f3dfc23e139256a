//! The backend side of one worker thread: a connection pool of its own.
//!
//! hyper-util's pooled client serves any number of threads: each request takes a
//! lock, hashes its host, waits on a checkout future, and reaches the connection
//! through a readiness channel of the pool's own. A worker needs less. Only its
//! own tasks use its connections, and an HTTP/1.1 connection carries one request
//! at a time, so an idle connection sits on a stack: taken for a request, put
//! back once the response body has been read to its end. HTTP/1.1 is spoken by
//! [`crate::h1`], on the request's own task. A connection whose response was
//! not read to the end (a retried 429, a client that went away mid-stream) is
//! dropped, which closes it. An HTTP/2 connection (a TLS backend that offers
//! `h2`) is hyper's, and shared by every request.

use crate::h1;
use axum::body::Bytes;
use axum::http::{header, HeaderValue, Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::TokioExecutor;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tower_service::Service;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type H2 = http2::SendRequest<Full<Bytes>>;

/// An idle connection older than this is closed rather than reused: servers
/// close theirs after a while (nginx after 75 s), and a request sent just as
/// the server closes would fail.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Idle HTTP/1.1 connections kept per backend; more are closed when put back.
const MAX_IDLE_PER_HOST: usize = 1024;

/// Why an attempt got no response head.
#[derive(Debug)]
pub enum UpstreamError {
    /// No connection: the URL, DNS, TCP or TLS failed.
    Connect(BoxError),
    /// The connection broke after the request went out.
    Http(BoxError),
    /// The backend answered something that is not HTTP.
    Malformed(String),
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::Connect(e) => write!(f, "cannot connect: {e}"),
            UpstreamError::Http(e) => write!(f, "{e}"),
            UpstreamError::Malformed(what) => write!(f, "the backend's answer is not HTTP: {what}"),
        }
    }
}

pub struct Upstream {
    connector: HttpsConnector<HttpConnector>,
    /// One entry per backend origin ever used; never removed, so an index stays valid.
    hosts: Mutex<Vec<Host>>,
}

struct Host {
    scheme: String,
    authority: String,
    /// Idle HTTP/1.1 connections, the most recently used last.
    idle: Vec<(Instant, h1::Conn)>,
    /// The HTTP/2 connection, when the backend negotiated one.
    shared: Option<H2>,
}

/// A connection taken for one request.
enum Conn {
    Pooled(h1::Conn),
    Fresh(h1::Conn),
    Shared(H2),
}

/// Where an HTTP/1.1 response's body leaves its connection once it has ended
/// cleanly; [`Lease::release`] puts the connection back in the pool. A lease
/// dropped instead (or released before the body ended) lets it close.
pub struct Lease {
    upstream: Arc<Upstream>,
    host: usize,
    slot: Option<h1::Slot>,
}

impl Lease {
    pub fn release(self) {
        let Some(slot) = self.slot else { return };
        let conn = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(conn) = conn {
            self.upstream.put_back(self.host, conn);
        }
    }
}

/// A backend's response body, over HTTP/1.1 (left) or HTTP/2 (right).
pub type UpBody = http_body_util::Either<h1::Body, Incoming>;

impl Default for Upstream {
    fn default() -> Upstream {
        Upstream::new()
    }
}

impl Upstream {
    /// Trusts the web's public certificate authorities (Mozilla's list, built in).
    pub fn new() -> Upstream {
        Upstream::with_connector(hyper_rustls::HttpsConnectorBuilder::new().with_webpki_roots())
    }

    /// Trusts the public certificate authorities and those in the PEM files
    /// `ca_files`; an error names the file that cannot be read or holds no
    /// certificate.
    pub fn tls_config_with(ca_files: &[std::path::PathBuf]) -> Result<rustls::ClientConfig, String> {
        use rustls::pki_types::{pem::PemObject, CertificateDer};
        let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        for file in ca_files {
            let certs = CertificateDer::pem_file_iter(file)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("`ca_files`: {}: {e}", file.display()))?;
            if certs.is_empty() {
                return Err(format!("`ca_files`: {}: no certificate in the file", file.display()));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| format!("`ca_files`: {}: {e}", file.display()))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions();
        let builder = builder.map_err(|e| format!("TLS: {e}"))?;
        Ok(builder.with_root_certificates(roots).with_no_client_auth())
    }

    /// Trusts what `tls` trusts (a private certificate authority, say).
    pub fn with_tls_config(tls: rustls::ClientConfig) -> Upstream {
        Upstream::with_connector(hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls))
    }

    fn with_connector(tls: hyper_rustls::HttpsConnectorBuilder<hyper_rustls::builderstates::WantsSchemes>) -> Upstream {
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        // Requests go out whole, at once: Nagle would hold a small write back
        // until the backend acknowledged the previous one.
        tcp.set_nodelay(true);
        let connector = tls.https_or_http().enable_http1().enable_http2().wrap_connector(tcp);
        Upstream { connector, hosts: Mutex::new(Vec::new()) }
    }

    /// Sends `request` (with an absolute URI) and waits for the response head.
    /// A request that an idle connection could not take (the backend had closed
    /// it) goes out on another one; one that went out is never sent twice.
    pub async fn send(self: &Arc<Self>, request: Request<Bytes>) -> Result<(Response<UpBody>, Lease), UpstreamError> {
        let uri = request.uri().clone();
        let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
            return Err(UpstreamError::Connect(format!("`{uri}` is not an absolute URL").into()));
        };
        let host = self.host(scheme, authority.as_str());
        let request = origin_form(request, &uri);
        loop {
            let conn = match self.take(host) {
                Some(conn) => conn,
                // Boxed: connecting (DNS, TCP, TLS, handshake) is a future of
                // kilobytes that most requests never run, and every request's
                // future would otherwise carry its space and be copied with it.
                None => Box::pin(self.connect(host, &uri)).await?,
            };
            let (conn, pooled) = match conn {
                // Boxed, as connecting is: most backends speak HTTP/1.1.
                Conn::Shared(sender) => {
                    return Box::pin(self.send_h2(host, sender, absolute_form(request, &uri))).await
                }
                Conn::Pooled(conn) => (conn, true),
                Conn::Fresh(conn) => (conn, false),
            };
            let slot = h1::Slot::default();
            match conn.send(&request, slot.clone()).await {
                Ok(response) => {
                    let lease = Lease { upstream: self.clone(), host, slot: Some(slot) };
                    return Ok((response.map(UpBody::Left), lease));
                }
                Err(h1::SendError::Unsent(_)) if pooled => {}
                Err(h1::SendError::Malformed(what)) => return Err(UpstreamError::Malformed(what)),
                Err(e) => return Err(UpstreamError::Http(e.into())),
            }
        }
    }

    async fn send_h2(
        self: &Arc<Self>,
        host: usize,
        mut sender: H2,
        request: Request<Full<Bytes>>,
    ) -> Result<(Response<UpBody>, Lease), UpstreamError> {
        let response = sender.send_request(request).await.map_err(|e| UpstreamError::Http(e.into()))?;
        Ok((response.map(UpBody::Right), Lease { upstream: self.clone(), host, slot: None }))
    }

    fn hosts(&self) -> std::sync::MutexGuard<'_, Vec<Host>> {
        self.hosts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The index of the entry of the origin `scheme://authority`, made when new.
    fn host(&self, scheme: &str, authority: &str) -> usize {
        let mut hosts = self.hosts();
        if let Some(i) = hosts.iter().position(|h| h.scheme == scheme && h.authority == authority) {
            return i;
        }
        let host = Host { scheme: scheme.to_owned(), authority: authority.to_owned(), idle: Vec::new(), shared: None };
        hosts.push(host);
        hosts.len() - 1
    }

    /// An open connection to `host`, if one is idle (or shared).
    fn take(&self, host: usize) -> Option<Conn> {
        let mut hosts = self.hosts();
        let host = &mut hosts[host];
        if let Some(shared) = host.shared.as_ref().filter(|s| !s.is_closed()) {
            return Some(Conn::Shared(shared.clone()));
        }
        let now = Instant::now();
        while let Some((since, mut conn)) = host.idle.pop() {
            if now.duration_since(since) < IDLE_TIMEOUT && !conn.is_closed() {
                return Some(Conn::Pooled(conn));
            }
        }
        None
    }

    fn put_back(&self, host: usize, conn: h1::Conn) {
        let now = Instant::now();
        let mut hosts = self.hosts();
        let idle = &mut hosts[host].idle;
        // The oldest are first: close those that have idled too long.
        let stale = idle.iter().take_while(|(since, _)| now.duration_since(*since) >= IDLE_TIMEOUT).count();
        idle.drain(..stale);
        if idle.len() < MAX_IDLE_PER_HOST {
            idle.push((now, conn));
        }
    }

    /// Opens a connection to `uri`'s origin: HTTP/2 when TLS negotiated it, else
    /// HTTP/1.1. Its driving task runs on the current runtime until it closes.
    async fn connect(&self, host: usize, uri: &Uri) -> Result<Conn, UpstreamError> {
        let stream = self.connector.clone().call(uri.clone()).await.map_err(UpstreamError::Connect)?;
        if stream.connected().is_negotiated_h2() {
            let (sender, connection) =
                http2::handshake(TokioExecutor::new(), stream).await.map_err(|e| UpstreamError::Http(e.into()))?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "backend connection ended");
                }
            });
            self.hosts()[host].shared = Some(sender.clone());
            return Ok(Conn::Shared(sender));
        }
        let io = match stream {
            MaybeHttpsStream::Http(tcp) => h1::Io::Left(tcp.into_inner()),
            MaybeHttpsStream::Https(tls) => h1::Io::Right(Box::new(tls.into_inner())),
        };
        Ok(Conn::Fresh(h1::Conn::new(io)))
    }
}

/// HTTP/1.1 sends the path and query, and the authority as `Host`.
fn origin_form(mut request: Request<Bytes>, uri: &Uri) -> Request<Bytes> {
    if !request.headers().contains_key(header::HOST) {
        if let Some(host) = uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()) {
            request.headers_mut().insert(header::HOST, host);
        }
    }
    let path = uri.path_and_query().cloned().unwrap_or_else(|| axum::http::uri::PathAndQuery::from_static("/"));
    *request.uri_mut() = Uri::from(path);
    request
}

/// HTTP/2 sends the whole URI as pseudo-headers, and no `Host`.
fn absolute_form(request: Request<Bytes>, uri: &Uri) -> Request<Full<Bytes>> {
    let mut request = request.map(Full::new);
    request.headers_mut().remove(header::HOST);
    *request.uri_mut() = uri.clone();
    request
}
