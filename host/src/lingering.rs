//! Lingering close. After answering a request whose body it did not read
//! (413 too large, 408 too slow) the server closes the connection; if the
//! client is still sending, closing with unread data makes the kernel
//! answer with a reset, and the client reports "connection reset" instead
//! of the answer it was sent. Like nginx's `lingering_close`, such a
//! connection's write side is shut and what still arrives is read and
//! discarded, for a bounded time and amount, before the socket closes.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// Longest wait for more of the client's data.
const QUIET: Duration = Duration::from_secs(2);
/// Longest lingering in all.
const TOTAL: Duration = Duration::from_secs(5);
/// Most bytes read and discarded.
const MAX_DISCARD: usize = 64 << 20;

/// A client connection that lingers on close when [`Lingering::flag`] was
/// raised (the response said `Connection: close` with a body unread).
pub struct Lingering {
    stream: Option<TcpStream>,
    linger: Arc<AtomicBool>,
}

impl Lingering {
    /// Wrap `stream`.
    pub fn new(stream: TcpStream) -> Self {
        Self { stream: Some(stream), linger: Arc::new(AtomicBool::new(false)) }
    }

    /// Raise it to linger when the connection closes.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.linger.clone()
    }

    fn inner(&mut self) -> Pin<&mut TcpStream> {
        Pin::new(self.stream.as_mut().expect("stream present until drop"))
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let Some(stream) = self.stream.take() else { return };
        if !self.linger.load(Ordering::Relaxed) {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(discard(stream));
        }
    }
}

/// Shut the write side, then read and drop what the client still sends.
async fn discard(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    let deadline = tokio::time::Instant::now() + TOTAL;
    let mut buf = vec![0u8; 16 * 1024];
    let mut total = 0usize;
    while total < MAX_DISCARD {
        let wait = QUIET.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
        match tokio::time::timeout(wait, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => total += n,
            _ => break,
        }
    }
}

impl AsyncRead for Lingering {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        self.inner().poll_read(cx, buf)
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.inner().poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.inner().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.inner().poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.inner().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.as_ref().is_some_and(TcpStream::is_write_vectored)
    }
}
