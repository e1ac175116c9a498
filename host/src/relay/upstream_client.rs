//! The HTTP clients the relay sends upstream requests through.
//!
//! Plain-HTTP/1.1 upstreams use each thread's own connections
//! ([`super::http1_pool`]). `https` and HTTP/2 upstreams go straight
//! through hyper's pooled client (`hyper_util`'s legacy client over rustls,
//! webpki roots), which negotiates and multiplexes them: reqwest's layers on top of it
//! (request building, its redirect and retry services, proxy matching, a
//! second URL parse) cost about as much CPU per request as the pool and
//! connection themselves. When the environment names a proxy
//! (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, with `NO_PROXY`), requests go
//! through reqwest instead, which honours those variables as it always did.
//! Both trust webpki's roots, the operator's `upstream.ca_file` and the
//! environment's `SSL_CERT_FILE`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// Variables reqwest reads a proxy from.
const PROXY_VARS: [&str; 6] = ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"];

/// The first proxy variable set in the environment, if any.
pub(super) fn proxy_from_env() -> Option<&'static str> {
    PROXY_VARS.into_iter().find(|v| std::env::var_os(v).is_some_and(|value| !value.is_empty()))
}

/// Settings every client is built with.
#[derive(Clone)]
pub(super) struct ClientSettings {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// Route through reqwest, for its proxy support.
    pub proxied: bool,
    /// The operator's extra certificate authorities (PEM).
    pub extra_roots: Arc<[rustls::pki_types::CertificateDer<'static>]>,
    /// TLS settings of the direct client: webpki's roots and the extra ones.
    pub tls: Arc<rustls::ClientConfig>,
}

impl ClientSettings {
    /// Settings with the roots of `ca_file` added to webpki's, and those
    /// of `env_file` (the environment's `SSL_CERT_FILE`) unless it cannot
    /// be read (then a warning: an inherited variable must not stop the
    /// gateway, while a configured file must be right).
    pub(super) fn new(
        connect_timeout: Duration,
        idle_timeout: Duration,
        proxied: bool,
        ca_file: Option<&Path>,
        env_file: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let mut extra = match ca_file {
            None => Vec::new(),
            Some(path) => authorities(path).with_context(|| format!("upstream.ca_file {}", path.display()))?,
        };
        if let Some(path) = env_file {
            match authorities(path) {
                Ok(certs) => extra.extend(certs),
                Err(error) => tracing::warn!(
                    file = %path.display(),
                    error = format!("{error:#}"),
                    "SSL_CERT_FILE is not used for upstream TLS"
                ),
            }
        }
        let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        for cert in &extra {
            roots.add(cert.clone()).context("an extra certificate authority is not usable")?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS settings")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self { connect_timeout, idle_timeout, proxied, extra_roots: extra.into(), tls: Arc::new(tls) })
    }

    /// A TCP connector for plain-HTTP upstreams: name resolution, the
    /// connect timeout, happy eyeballs between address families, and
    /// TCP_NODELAY.
    pub(super) fn tcp_connector(&self) -> HttpConnector {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(self.connect_timeout));
        http
    }
}

/// The certificates of the PEM file at `path` (at least one).
fn authorities(path: &Path) -> anyhow::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject as _;
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .context("not a readable PEM file")?;
    anyhow::ensure!(!certs.is_empty(), "holds no certificate");
    Ok(certs)
}

/// One upstream client.
#[derive(Clone)]
pub(super) enum Client {
    /// hyper's pooled client (shared: it is a few hundred bytes).
    Direct(Arc<HyperClient<HttpsConnector<HttpConnector>, Full<Bytes>>>),
    /// reqwest, when the environment names a proxy.
    Proxied(reqwest::Client),
}

/// How long an idle pooled connection is kept (by every client, and by a
/// thread's own HTTP/1 connections).
pub(super) const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Connections kept per host: idle ones per client, busy and idle ones
/// per thread for its own HTTP/1 connections.
pub(super) const POOL_MAX_IDLE_PER_HOST: usize = 256;

/// The `user-agent` sent when the adapter set none.
pub(super) const USER_AGENT: &str = concat!("wasmgate/", env!("CARGO_PKG_VERSION"));

impl Client {
    /// A client with its own connection pool; `h2c`: HTTP/2 only, with
    /// prior knowledge (for plain-HTTP upstreams: the relay picks a client
    /// without it for `https`, where HTTP/2 is negotiated by ALPN).
    pub(super) fn build(settings: &ClientSettings, h2c: bool) -> anyhow::Result<Self> {
        if settings.proxied {
            return Ok(Self::Proxied(proxied(settings, h2c)?));
        }
        let mut http = settings.tcp_connector();
        http.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*settings.tls).clone())
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = HyperClient::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
            .http2_only(h2c)
            .build(https);
        Ok(Self::Direct(Arc::new(client)))
    }
}

/// The reqwest client used behind a proxy: the settings the direct client
/// has, and no redirects followed.
fn proxied(settings: &ClientSettings, h2c: bool) -> reqwest::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder();
    for cert in settings.extra_roots.iter() {
        builder = builder.add_root_certificate(reqwest::Certificate::from_der(cert)?);
    }
    let builder = if h2c { builder.http2_prior_knowledge() } else { builder };
    builder
        .tcp_nodelay(true)
        .connect_timeout(settings.connect_timeout)
        // Each read of a response (its headers included) must come within
        // the idle limit: a stalled upstream is cut.
        .read_timeout(settings.idle_timeout)
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(USER_AGENT)
        .build()
}
