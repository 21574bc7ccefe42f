//! Certificate pinning (T-44): a different certificate, and the pinned
//! certificate served with a different private key, are both refused with a
//! clear error.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod support;

use std::sync::Arc;

use messenger_proto::msg::Request;
use messenger_rendezvous::limits::Limits;
use messenger_rendezvous::net::quinn_config;
use messenger_rendezvous::tls::ServerIdentity;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_different_certificate_is_refused() {
    let server = start(TestHandler::default(), Limits::default());
    let other = start(TestHandler::default(), Limits::default());
    assert_ne!(server.fingerprint(), other.fingerprint());
    let endpoint = client_endpoint(&other.fingerprint());
    let error = connect_raw(&endpoint, server.addr()).await.unwrap_err();
    let text = error.to_string();
    assert!(text.contains("is not the pinned"), "{text}");
    assert!(text.contains(&other.fingerprint()), "{text}");
    // With the right pin it works.
    let mut client = TestClient::connect(server.addr(), &server.fingerprint()).await;
    assert!(client.request(Request::Users).await.is_ok());
}

/// Serves a fixed certificate with a fixed key, whether or not they match.
#[derive(Debug)]
struct Impostor(Arc<CertifiedKey>);

impl ResolvesServerCert for Impostor {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pinned_certificate_with_another_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let real = ServerIdentity::load_or_create(&dir.path().join("real")).unwrap();
    let stranger = ServerIdentity::load_or_create(&dir.path().join("stranger")).unwrap();
    // The real certificate, signed for by the stranger's key.
    let key =
        rustls::crypto::ring::sign::any_supported_type(&stranger.key_der().to_rustls()).unwrap();
    let certified = CertifiedKey::new(vec![real.cert_der().clone()], key);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Impostor(Arc::new(certified))));
    tls.alpn_protocols = vec![messenger_proto::ALPN.to_vec()];
    let config = quinn_config(tls, &Limits::default()).unwrap();
    let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let accepting = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accepting.accept().await {
            if let Ok(connecting) = incoming.accept() {
                let _ = connecting.await;
            }
        }
    });

    let client = client_endpoint(real.fingerprint());
    let error = connect_raw(&client, addr).await.unwrap_err();
    let text = error.to_string();
    assert!(text.contains("did not prove it holds its key"), "{text}");
    endpoint.close(0u32.into(), b"");
}
