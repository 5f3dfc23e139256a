//! Helpers shared by the proxy's integration tests.
#![allow(dead_code)]

use std::sync::Arc;

/// A TLS server identity for `localhost` signed by no public authority, offering
/// `alpn`: the acceptor, and the certificate (DER and PEM) a client must trust.
pub fn localhost_tls(
    alpn: &[&[u8]],
) -> (tokio_rustls::TlsAcceptor, rustls::pki_types::CertificateDer<'static>, String) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let key = rustls::pki_types::PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key.into())
        .unwrap();
    server.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    (tokio_rustls::TlsAcceptor::from(Arc::new(server)), cert.cert.der().clone(), cert.cert.pem())
}

/// A proxy served in this process: its front and admin base URLs.
pub struct Replica {
    pub base: String,
    pub admin: String,
}

pub async fn replica(config: &str) -> Replica {
    let config = proxy::ProxyConfig::from_toml("test.toml", config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let admin_base = format!("http://{}", admin.local_addr().unwrap());
    let proxy = Arc::new(proxy::server::Proxy::new(config).unwrap());
    tokio::spawn(proxy::serve(proxy, listener, admin, std::future::pending()));
    Replica { base, admin: admin_base }
}

impl Replica {
    pub async fn call(&self) -> u16 {
        let url = format!("{}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21", self.base);
        reqwest::Client::new()
            .post(url)
            .json(&serde_json::json!({"messages": []}))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.admin)).await.unwrap().text().await.unwrap()
    }
}
