//! The `stream-codec` export: a [`StreamDecoder`] made resumable by
//! serializing it between calls (see `wit/stream.wit`).

pub use crate::bindings::exports::wasmgate::plugin::stream_codec::Decoded;
use crate::{error, ErrorKind, RequestContext, StreamDecoder, StreamEvents, UpstreamError};

/// The decoder `state` describes: a new one for an empty state.
fn restore<D: StreamDecoder>(ctx: RequestContext, state: &[u8]) -> Result<D, UpstreamError> {
    if state.is_empty() {
        return Ok(D::new(ctx));
    }
    serde_json::from_slice(state)
        .map_err(|e| error(ErrorKind::Other, format!("stream decoder state is unreadable: {e}"), None))
}

fn decoded(events: StreamEvents, state: Vec<u8>) -> Decoded {
    Decoded { chunks: events.chunks, usage: events.usage, error: events.error, done: events.done, state }
}

/// One `decode` call: restore, feed, save.
pub fn decode<D: StreamDecoder>(ctx: RequestContext, state: &[u8], bytes: &[u8]) -> Result<Decoded, UpstreamError> {
    let mut decoder = restore::<D>(ctx, state)?;
    let events = decoder.feed(bytes)?;
    let state = serde_json::to_vec(&decoder)
        .map_err(|e| error(ErrorKind::Other, format!("stream decoder state cannot be saved: {e}"), None))?;
    Ok(decoded(events, state))
}

/// One `finish` call: restore and flush.
pub fn finish<D: StreamDecoder>(ctx: RequestContext, state: &[u8]) -> Result<Decoded, UpstreamError> {
    let events = restore::<D>(ctx, state)?.finish()?;
    Ok(decoded(events, Vec::new()))
}
