//! One call on the wire: a fresh connection (from the caller's own source
//! address on loopback), one HTTP/1.1 request, the whole answer read.

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

/// Where calls go.
#[derive(Clone, Debug)]
pub struct Target {
    pub https: bool,
    /// `host` or `host:port`, as the Host header gives it.
    pub authority: String,
    pub host: String,
    pub port: u16,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, String> {
        let bad = || format!("`{url}` is not an http:// or https:// URL with a host");
        let (https, rest) = match url.split_once("://") {
            Some(("http", rest)) => (false, rest),
            Some(("https", rest)) => (true, rest),
            _ => return Err(bad()),
        };
        let authority = rest.split('/').next().unwrap_or_default().to_owned();
        if authority.is_empty() || rest.trim_end_matches('/') != authority {
            return Err(format!("{}: give the gateway's root, without a path", bad()));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || host.starts_with('[') => {
                (host.to_owned(), port.parse::<u16>().map_err(|_| bad())?)
            }
            _ => (authority.clone(), if https { 443 } else { 80 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        Ok(Target { https, authority, host, port })
    }

    /// Whether the target is on this machine, where callers can have source
    /// addresses of their own.
    pub fn is_loopback(&self) -> bool {
        self.host == "localhost" || self.host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }

    pub async fn resolve(&self) -> Result<SocketAddr, String> {
        let mut addrs = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("cannot resolve {}: {e}", self.host))?;
        // A loopback target is reached over IPv4, where callers' source addresses live.
        let all: Vec<SocketAddr> = addrs.by_ref().collect();
        all.iter()
            .find(|a| a.is_ipv4())
            .or(all.first())
            .copied()
            .ok_or_else(|| format!("{} resolves to nothing", self.host))
    }
}

/// What came back, as far as it came.
#[derive(Debug, Default)]
pub struct Reply {
    pub status: u16,
    /// `retry-after`, `retry-after-ms` and `x-ms-retry-after-ms`, as sent.
    pub retry_headers: Vec<(String, String)>,
    pub event_stream: bool,
    pub body: Vec<u8>,
    /// Whether the body broke before its end.
    pub broken: bool,
}

/// Why no answer came.
#[derive(Debug)]
pub enum Failure {
    /// Refused, reset, or not HTTP: the call could not be carried.
    Transport(String),
    /// No complete answer within the call's deadline.
    Timeout,
}

pub struct Wire {
    pub target: Target,
    pub addr: SocketAddr,
    tls: Option<tokio_rustls::TlsConnector>,
    pub deadline: Duration,
}

impl Wire {
    pub fn new(target: Target, addr: SocketAddr, deadline: Duration) -> Wire {
        let tls = target.https.then(|| {
            let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("ring supports the default TLS versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
            tokio_rustls::TlsConnector::from(Arc::new(config))
        });
        Wire { target, addr, tls, deadline }
    }

    /// Sends `request` from `source` (or any address), within the deadline.
    pub async fn send(&self, source: Option<IpAddr>, request: hyper::Request<Full<Bytes>>) -> Result<Reply, Failure> {
        match tokio::time::timeout(self.deadline, self.exchange(source, request)).await {
            Ok(result) => result,
            Err(_) => Err(Failure::Timeout),
        }
    }

    async fn exchange(&self, source: Option<IpAddr>, request: hyper::Request<Full<Bytes>>) -> Result<Reply, Failure> {
        let socket = match self.addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
        }
        .map_err(transport)?;
        if let Some(ip) = source {
            socket.bind(SocketAddr::new(ip, 0)).map_err(|e| Failure::Transport(format!("cannot bind {ip}: {e}")))?;
        }
        let stream = socket.connect(self.addr).await.map_err(transport)?;
        let _ = stream.set_nodelay(true);
        match &self.tls {
            None => exchange_on(stream, request).await,
            Some(tls) => {
                let name = rustls::pki_types::ServerName::try_from(self.target.host.clone()).map_err(transport)?;
                let stream = tls.connect(name, stream).await.map_err(transport)?;
                exchange_on(stream, request).await
            }
        }
    }
}

fn transport(e: impl std::fmt::Display) -> Failure {
    Failure::Transport(e.to_string())
}

async fn exchange_on<T>(io: T, request: hyper::Request<Full<Bytes>>) -> Result<Reply, Failure>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await.map_err(transport)?;
    tokio::spawn(async move {
        // The connection's own error shows in the response or its body.
        let _ = connection.await;
    });
    let response = sender.send_request(request).await.map_err(transport)?;
    let (parts, mut body) = response.into_parts();
    let retry_headers = parts
        .headers
        .iter()
        .filter(|(n, _)| matches!(n.as_str(), "retry-after" | "retry-after-ms" | "x-ms-retry-after-ms"))
        .filter_map(|(n, v)| v.to_str().ok().map(|v| (n.as_str().to_owned(), v.to_owned())))
        .collect();
    let event_stream = parts
        .headers
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let mut reply = Reply { status: parts.status.as_u16(), retry_headers, event_stream, ..Reply::default() };
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    reply.body.extend_from_slice(data);
                }
            }
            Err(_) => {
                reply.broken = true;
                break;
            }
        }
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::Target;

    #[test]
    fn targets_are_roots_of_http_urls() {
        let t = Target::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!((t.https, t.host.as_str(), t.port, t.is_loopback()), (false, "127.0.0.1", 8080, true));
        let t = Target::parse("https://contoso.azure-api.net/").unwrap();
        assert_eq!((t.https, t.host.as_str(), t.port, t.is_loopback()), (true, "contoso.azure-api.net", 443, false));
        for bad in ["ftp://x", "127.0.0.1:8080", "http://", "http://host/openai/deployments"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }
}
