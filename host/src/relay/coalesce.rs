//! Upstream body pieces joined while more is already there.
//!
//! hyper hands an upstream body on one piece at a time (a chunk of its
//! chunked encoding), through a channel from the connection's task that
//! holds one piece at most — and an SSE upstream usually writes a chunk per
//! event. Without joining, every event costs its own stream-decoder call
//! and its own write to the client. [`Coalesced`] lets the connection's
//! task run once more after each piece (a yield: it is already woken by the
//! piece taken) and joins what it hands on, until a poll finds nothing new
//! or [`Coalesced::MAX`] bytes are joined: nothing waits for data that has
//! not arrived.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_util::Stream;

/// `inner`, with the pieces that are ready together joined into one item.
pub(crate) struct Coalesced<S, E> {
    inner: S,
    /// Pieces taken, not yet handed on.
    held: Held,
    /// The last poll of `inner` found nothing and the task yielded once.
    yielded: bool,
    /// The end or error that came right after the bytes last handed on:
    /// the next item.
    after: Option<Option<Result<Bytes, E>>>,
}

enum Held {
    Nothing,
    One(Bytes),
    Joined(BytesMut),
}

impl Held {
    fn len(&self) -> usize {
        match self {
            Held::Nothing => 0,
            Held::One(b) => b.len(),
            Held::Joined(b) => b.len(),
        }
    }

    fn push(&mut self, piece: Bytes) {
        *self = match std::mem::replace(self, Held::Nothing) {
            Held::Nothing => Held::One(piece),
            Held::One(first) => {
                let mut joined = BytesMut::with_capacity(first.len() + piece.len());
                joined.extend_from_slice(&first);
                joined.extend_from_slice(&piece);
                Held::Joined(joined)
            }
            Held::Joined(mut joined) => {
                joined.extend_from_slice(&piece);
                Held::Joined(joined)
            }
        }
    }

    fn take(&mut self) -> Option<Bytes> {
        match std::mem::replace(self, Held::Nothing) {
            Held::Nothing => None,
            Held::One(b) => Some(b),
            Held::Joined(b) => Some(b.freeze()),
        }
    }
}

impl<S, E> Coalesced<S, E> {
    /// Stop joining once this many bytes are joined (one piece more may
    /// pass it).
    pub const MAX: usize = 64 * 1024;

    /// Wrap `inner`.
    pub fn new(inner: S) -> Self {
        Self { inner, held: Held::Nothing, yielded: false, after: None }
    }
}

impl<S, E> Stream for Coalesced<S, E>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: Unpin,
{
    type Item = Result<Bytes, E>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some(after) = this.after.take() {
            return Poll::Ready(after);
        }
        loop {
            match Pin::new(&mut this.inner).poll_next(cx) {
                Poll::Ready(Some(Ok(piece))) => {
                    this.held.push(piece);
                    this.yielded = false;
                    if this.held.len() >= Self::MAX {
                        return Poll::Ready(this.held.take().map(Ok));
                    }
                }
                Poll::Ready(end_or_error) => {
                    let Some(bytes) = this.held.take() else { return Poll::Ready(end_or_error) };
                    this.after = Some(end_or_error);
                    return Poll::Ready(Some(Ok(bytes)));
                }
                Poll::Pending if this.held.len() == 0 => return Poll::Pending,
                Poll::Pending if !this.yielded => {
                    // Let the connection's task hand on what it holds.
                    this.yielded = true;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Poll::Pending => {
                    this.yielded = false;
                    return Poll::Ready(this.held.take().map(Ok));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use futures_util::{StreamExt, stream};

    use super::*;

    type Item = Result<Bytes, &'static str>;

    fn ready(pieces: &[&'static str]) -> Vec<Item> {
        pieces.iter().map(|p| Ok(Bytes::from_static(p.as_bytes()))).collect()
    }

    async fn next<S: Stream<Item = Item> + Unpin>(s: &mut S) -> Item {
        s.next().await.expect("an item")
    }

    #[tokio::test]
    async fn pieces_ready_together_come_as_one_and_the_end_follows() {
        let mut s = Coalesced::new(stream::iter(ready(&["data: a\n\n", "data: b\n\n", "data: [DONE]\n\n"])));
        assert_eq!(next(&mut s).await, Ok(Bytes::from_static(b"data: a\n\ndata: b\n\ndata: [DONE]\n\n")));
        assert!(s.next().await.is_none());
    }

    #[tokio::test]
    async fn an_error_after_data_is_the_next_item_and_data_is_not_lost() {
        let mut items = ready(&["x", "y"]);
        items.push(Err("reset"));
        items.extend(ready(&["z"]));
        let mut s = Coalesced::new(stream::iter(items));
        assert_eq!(next(&mut s).await, Ok(Bytes::from_static(b"xy")));
        assert_eq!(next(&mut s).await, Err("reset"));
        assert_eq!(next(&mut s).await, Ok(Bytes::from_static(b"z")));
    }

    /// As hyper hands on a body: a task sends pieces through a channel that
    /// holds one, so each next piece needs that task to run again.
    #[tokio::test]
    async fn pieces_a_task_hands_on_one_by_one_are_joined() {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Item>(1);
        tokio::spawn(async move {
            for piece in ready(&["a", "b", "c"]) {
                let _ = tx.send(piece).await;
            }
        });
        let mut s = Coalesced::new(stream::poll_fn(move |cx| rx.poll_recv(cx)));
        assert_eq!(next(&mut s).await, Ok(Bytes::from_static(b"abc")));
        assert!(s.next().await.is_none());
    }

    #[tokio::test]
    async fn a_piece_not_yet_there_is_not_waited_for() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Item>();
        let mut s = Coalesced::new(stream::poll_fn(move |cx| rx.poll_recv(cx)));
        tx.send(Ok(Bytes::from_static(b"first"))).expect("open");
        assert_eq!(next(&mut s).await, Ok(Bytes::from_static(b"first")));
        tx.send(Ok(Bytes::from_static(b"second"))).expect("open");
        drop(tx);
        assert_eq!(next(&mut s).await, Ok(Bytes::from_static(b"second")));
        assert!(s.next().await.is_none());
    }

    #[tokio::test]
    async fn joining_stops_at_the_bound() {
        let piece = Bytes::from(vec![b'x'; 40 * 1024]);
        let mut s = Coalesced::new(stream::iter((0..3).map(|_| Ok(piece.clone()))));
        let lengths: Vec<usize> = s.by_ref().map(|b: Item| b.map_or(0, |b| b.len())).collect().await;
        assert_eq!(lengths, [80 * 1024, 40 * 1024]);
    }
}
