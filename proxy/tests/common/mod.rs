//! Helpers shared by the proxy's integration tests.

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
