//! A bare HTTP/1.1 upstream over a plain socket, for what an HTTP framework
//! hides: how many connections the gateway opens, and an upstream that
//! closes a kept-alive connection without warning (as one whose keep-alive
//! timeout ran out does).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// What the upstream has seen.
#[derive(Default)]
pub struct Counts {
    /// Connections accepted.
    pub connections: AtomicUsize,
    /// Requests answered.
    pub requests: AtomicUsize,
    /// Connections closed at both ends: it closed its end (or the gateway
    /// did), and then saw the gateway close its own.
    pub closed: AtomicUsize,
}

impl Counts {
    /// (connections, requests, closed).
    pub fn get(&self) -> (usize, usize, usize) {
        let load = |n: &AtomicUsize| n.load(Ordering::SeqCst);
        (load(&self.connections), load(&self.requests), load(&self.closed))
    }
}

/// Start it on 127.0.0.1; every request gets a chat completion (no
/// `connection: close`). `close_after_answer`: each connection is closed
/// once its first answer is written. Returns the base URL (`…/v1`).
pub async fn start(close_after_answer: bool) -> (String, Arc<Counts>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}/v1", listener.local_addr().expect("addr"));
    let counts = Arc::new(Counts::default());
    let seen = counts.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            seen.connections.fetch_add(1, Ordering::SeqCst);
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut socket = BufReader::new(socket);
                while let Some(body) = read_request(&mut socket).await {
                    let reply = answer(&body);
                    if socket.get_mut().write_all(reply.as_bytes()).await.is_err() {
                        break;
                    }
                    seen.requests.fetch_add(1, Ordering::SeqCst);
                    if close_after_answer {
                        break;
                    }
                }
                let _ = socket.get_mut().shutdown().await;
                // Counted once the gateway has let go of the connection too
                // (its end reads as closed): then it can no longer pick it.
                let mut rest = [0; 256];
                while matches!(socket.read(&mut rest).await, Ok(n) if n > 0) {}
                seen.closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (base, counts)
}

/// The next request's body (`None` at the end of the connection).
async fn read_request(socket: &mut BufReader<tokio::net::TcpStream>) -> Option<Vec<u8>> {
    let mut length = 0;
    loop {
        let mut line = String::new();
        if socket.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        if line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().ok()?;
        }
    }
    let mut body = vec![0; length];
    socket.read_exact(&mut body).await.ok()?;
    Some(body)
}

/// A chat completion echoing the request's last message.
fn answer(body: &[u8]) -> String {
    let request: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let said = super::mock::last_user_text(&request);
    let completion = serde_json::json!({
        "id": "chatcmpl-bare", "object": "chat.completion", "created": 1, "model": request["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("bare: {said}")}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    })
    .to_string();
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{completion}",
        completion.len()
    )
}
