//! An HTTP `CONNECT` proxy on 127.0.0.1, the kind `HTTPS_PROXY` names: it
//! records each target it is asked for and tunnels the bytes both ways.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// A running proxy.
pub struct ConnectProxy {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// The `host:port` of every `CONNECT`, in order.
    pub targets: Arc<Mutex<Vec<String>>>,
}

/// Start it.
pub async fn start() -> ConnectProxy {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let targets = Arc::new(Mutex::new(Vec::new()));
    let seen = targets.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(tunnel(client, seen.clone()));
        }
    });
    ConnectProxy { url, targets }
}

/// Read the `CONNECT` head, dial its target, answer 200 and copy both ways.
async fn tunnel(client: TcpStream, seen: Arc<Mutex<Vec<String>>>) {
    let mut client = BufReader::new(client);
    let mut line = String::new();
    if client.read_line(&mut line).await.is_err() {
        return;
    }
    let Some(target) = line.strip_prefix("CONNECT ").and_then(|rest| rest.split_whitespace().next()) else {
        let _ = client.get_mut().write_all(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n").await;
        return;
    };
    let target = target.to_string();
    // The rest of the head (Host, Proxy-Connection…).
    loop {
        let mut header = String::new();
        match client.read_line(&mut header).await {
            Ok(n) if n > 0 && header != "\r\n" => continue,
            _ => break,
        }
    }
    seen.lock().expect("lock").push(target.clone());
    let Ok(mut upstream) = TcpStream::connect(&target).await else {
        let _ = client.get_mut().write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n").await;
        return;
    };
    if client.get_mut().write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await.is_ok() {
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    }
}
