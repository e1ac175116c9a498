//! The mock upstream served over TLS (HTTP/2 or HTTP/1.1 by ALPN), with the
//! test certificate in `tests/fixtures/tls`: a leaf for `127.0.0.1` and
//! `localhost`, issued by `ca.pem`, which a gateway trusts through
//! `upstream.ca_file`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::mock::{MockState, MockUpstream};

/// The test certificates' directory.
fn fixtures() -> PathBuf {
    super::root().join("tests/fixtures/tls")
}

/// The authority that issued the mock's certificate (PEM), for
/// `upstream.ca_file`.
pub fn test_ca() -> PathBuf {
    fixtures().join("ca.pem")
}

/// Accepts TCP connections and completes their TLS handshakes; a failed
/// handshake (an untrusting client) is dropped and the next one awaited.
struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((stream, addr)) = self.tcp.accept().await else { continue };
            if let Ok(tls) = self.acceptor.accept(stream).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

impl MockUpstream {
    /// Start a mock named `name` on 127.0.0.1:0, speaking TLS.
    pub async fn start_tls(name: &str) -> Self {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(fixtures().join("upstream.pem"))
            .expect("test certificate")
            .collect::<Result<_, _>>()
            .expect("test certificate");
        let key = PrivateKeyDer::from_pem_file(fixtures().join("upstream.key")).expect("test key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server certificate");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let state = Arc::new(MockState { name: name.to_string(), ..Default::default() });
        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind mock");
        let addr = tcp.local_addr().expect("mock addr");
        let listener = TlsListener { tcp, acceptor: TlsAcceptor::from(Arc::new(config)) };
        let app = Self::app(state.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, state }
    }

    /// Base URL of a mock started with [`MockUpstream::start_tls`].
    pub fn tls_base_url(&self) -> String {
        format!("https://{}/v1", self.addr)
    }
}
