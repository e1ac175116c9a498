//! The baseline: a bare pass-through proxy (axum + reqwest, no auth, no
//! parsing, no plugins) in its own process, to separate the cost of any
//! extra HTTP hop on this machine from what wasmgate itself adds.

use std::process::Command;

use anyhow::Result;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;

/// Serve the proxy (called when this binary runs as `--bare-proxy URL`).
pub fn serve(upstream: String) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let client = reqwest::Client::builder().tcp_nodelay(true).build()?;
        let app = Router::new().route("/v1/chat/completions", post(forward)).with_state((client, upstream));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("bare proxy listening on http://{}", listener.local_addr()?);
        use axum::serve::ListenerExt;
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, app).await?;
        Ok(())
    })
}

async fn forward(
    State((client, upstream)): State<(reqwest::Client, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut req = client.post(format!("{upstream}/chat/completions")).body(body);
    if let Some(ct) = headers.get("content-type") {
        req = req.header("content-type", ct);
    }
    match req.send().await {
        Ok(resp) => {
            let status = resp.status();
            let ct = resp.headers().get("content-type").cloned();
            let body = axum::body::Body::from_stream(resp.bytes_stream());
            let mut out = Response::new(body);
            *out.status_mut() = status;
            if let Some(ct) = ct {
                out.headers_mut().insert("content-type", ct);
            }
            out
        }
        Err(_) => StatusCode::BAD_GATEWAY.into_response(),
    }
}

/// Start the bare proxy in front of `upstream`; returns it and its base URL.
pub fn start(upstream: &str) -> Result<(crate::ChildGuard, String)> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["--bare-proxy", upstream]);
    let (child, addr) = crate::spawn_listening(cmd, "bare proxy listening on ")?;
    Ok((crate::ChildGuard(child), addr))
}
