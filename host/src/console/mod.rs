//! The web console: a static single-page app embedded in the binary (no
//! build step, nothing fetched at run time) served at `/` and `/assets/…`,
//! over the admin and self-service JSON API; and its sign-in sessions.

pub mod sessions;
pub mod signouts_pg;

use std::collections::HashMap;
use std::io::Write;
use std::sync::OnceLock;

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::error::ApiError;

#[derive(rust_embed::RustEmbed)]
#[folder = "console/"]
struct Embedded;

/// One file ready to serve.
struct Asset {
    body: Bytes,
    gzip: Option<Bytes>,
    etag: HeaderValue,
    mime: &'static str,
}

/// Every file, compressed once, and the version the page references them by.
struct Prepared {
    version: String,
    files: HashMap<String, Asset>,
}

fn mime(name: &str) -> &'static str {
    match name.rsplit('.').next() {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("json") => "application/json",
        _ => "application/octet-stream",
    }
}

fn gzip(body: &[u8]) -> Option<Bytes> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(body).ok()?;
    let out = encoder.finish().ok()?;
    (out.len() < body.len()).then(|| Bytes::from(out))
}

fn asset(body: Vec<u8>, name: &str) -> Asset {
    let digest = hex::encode(&Sha256::digest(&body)[..8]);
    let etag = HeaderValue::from_str(&format!("\"{digest}\"")).unwrap_or(HeaderValue::from_static("\"0\""));
    let gzip = if body.len() > 1024 && !name.ends_with(".png") { gzip(&body) } else { None };
    Asset { body: Bytes::from(body), gzip, etag, mime: mime(name) }
}

fn prepared() -> &'static Prepared {
    static PREPARED: OnceLock<Prepared> = OnceLock::new();
    PREPARED.get_or_init(|| {
        let mut names: Vec<String> = Embedded::iter().map(|n| n.to_string()).collect();
        names.sort();
        let mut hasher = Sha256::new();
        let raw: Vec<(String, Vec<u8>)> = names
            .into_iter()
            .filter_map(|n| {
                let file = Embedded::get(&n)?;
                hasher.update(n.as_bytes());
                hasher.update(file.data.as_ref());
                Some((n, file.data.into_owned()))
            })
            .collect();
        let version = hex::encode(&hasher.finalize()[..6]);
        let files = raw
            .into_iter()
            .map(|(name, body)| {
                let body = if name == "index.html" {
                    String::from_utf8_lossy(&body).replace("{{version}}", &version).into_bytes()
                } else {
                    body
                };
                let a = asset(body, &name);
                (name, a)
            })
            .collect();
        Prepared { version, files }
    })
}

/// Headers every console answer carries: no framing, no sniffing, and
/// scripts, styles and connections from this origin only.
fn harden(headers: &mut HeaderMap) {
    let csp = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; \
               connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(csp));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
}

fn serve(name: &str, request: &HeaderMap, immutable: bool) -> Response {
    let Some(a) = prepared().files.get(name) else { return ApiError::not_found_url().into_response() };
    let cache = if immutable { "public, max-age=31536000, immutable" } else { "no-cache" };
    let fresh = request.get(header::IF_NONE_MATCH).is_some_and(|v| v == a.etag);
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let accepts_gzip = request
            .get(header::ACCEPT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|e| e.trim().starts_with("gzip")));
        match (&a.gzip, accepts_gzip) {
            (Some(z), true) => {
                let mut r = z.clone().into_response();
                r.headers_mut().insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                r
            }
            _ => a.body.clone().into_response(),
        }
    };
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(a.mime));
    headers.insert(header::ETAG, a.etag.clone());
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    harden(headers);
    response
}

async fn index(headers: HeaderMap) -> Response {
    serve("index.html", &headers, false)
}

async fn file(Path(name): Path<String>, uri: Uri, headers: HeaderMap) -> Response {
    let wanted = format!("v={}", prepared().version);
    let immutable = uri.query().is_some_and(|q| q.split('&').any(|p| p == wanted));
    serve(&name, &headers, immutable)
}

/// The console's routes (`/` and `/assets/{file}`).
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new().route("/", get(index)).route("/assets/{*file}", get(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_the_page_references_is_embedded_and_versioned() {
        let p = prepared();
        let page = String::from_utf8_lossy(&p.files["index.html"].body).to_string();
        assert!(!page.contains("{{version}}"));
        for name in ["app.js", "style.css", "i18n.js"] {
            assert!(p.files.contains_key(name), "{name} is not embedded");
            assert!(page.contains(&format!("/assets/{name}?v={}", p.version)), "{name} is not referenced");
        }
        assert!(p.files["app.js"].gzip.is_some());
    }
}
