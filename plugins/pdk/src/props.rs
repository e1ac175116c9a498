//! Property-based fuzzing of the stream decoders: any bytes, split
//! anywhere, never panic, and decoding in pieces — with the decoder's state
//! serialized between pieces as the host keeps it — gives what decoding
//! the whole gives.

use proptest::prelude::*;

use crate::codec;
use crate::openai_compat::OpenAiSseDecoder;
use crate::sse::SseParser;

fn ctx() -> crate::RequestContext {
    crate::testing::stream_context("m")
}

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

/// An SSE stream of OpenAI chunks, comments and odd line endings.
fn sse_stream() -> impl Strategy<Value = Vec<u8>> {
    let event = prop_oneof![
        "[a-zA-Z ]{0,20}".prop_map(|t| format!(
            "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{t}\"}}}}]}}\n\n"
        )),
        Just(": keep-alive\n\n".to_string()),
        Just("data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2,\"total_tokens\":3}}\r\n\r\n".to_string()),
        Just("event: x\ndata:\n\n".to_string()),
    ];
    prop::collection::vec(event, 0..12).prop_map(|events| {
        let mut s: String = events.concat();
        s.push_str("data: [DONE]\n\n");
        s.into_bytes()
    })
}

/// Feed `bytes` in the pieces cut at `cuts`, through serialized states.
fn decode_in_pieces(bytes: &[u8], cuts: &[usize]) -> Result<(Vec<Vec<u8>>, bool), String> {
    let mut state = Vec::new();
    let (mut chunks, mut done) = (Vec::new(), false);
    let mut start = 0;
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.sort_unstable();
    points.push(bytes.len());
    for end in points {
        let piece = &bytes[start.min(end)..end];
        start = end;
        let d = codec::decode::<OpenAiSseDecoder>(ctx(), &state, piece).map_err(|e| e.message)?;
        chunks.extend(d.chunks);
        done |= d.done;
        state = d.state;
    }
    let d = codec::finish::<OpenAiSseDecoder>(ctx(), &state).map_err(|e| e.message)?;
    chunks.extend(d.chunks);
    Ok((chunks, done | d.done))
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn the_sse_parser_takes_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..2048), cut in any::<usize>()) {
        let mut p = SseParser::new();
        let cut = cut % (bytes.len() + 1);
        let _ = p.push_bounded(&bytes[..cut]);
        let _ = p.push_bounded(&bytes[cut..]);
        let _ = p.finish();
    }

    #[test]
    fn the_sse_parser_gives_the_same_events_however_split(stream in sse_stream(), cut in any::<usize>()) {
        let whole = {
            let mut p = SseParser::new();
            let mut ev = p.push(&stream);
            ev.extend(p.finish());
            ev
        };
        let cut = cut % (stream.len() + 1);
        let mut p = SseParser::new();
        let mut split = p.push(&stream[..cut]);
        split.extend(p.push(&stream[cut..]));
        split.extend(p.finish());
        prop_assert_eq!(whole, split);
    }

    #[test]
    fn resumable_decoding_equals_whole_decoding(stream in sse_stream(), cuts in prop::collection::vec(any::<usize>(), 0..6)) {
        let whole = decode_in_pieces(&stream, &[]);
        let pieces = decode_in_pieces(&stream, &cuts);
        prop_assert_eq!(&whole, &pieces);
        let (chunks, done) = whole.expect("a valid stream decodes");
        prop_assert!(done, "[DONE] ends it");
        for c in chunks {
            prop_assert!(serde_json::from_slice::<serde_json::Value>(&c).is_ok());
        }
    }

    #[test]
    fn resumable_decoding_of_garbage_is_an_error_or_valid_chunks(bytes in prop::collection::vec(any::<u8>(), 0..1024), cuts in prop::collection::vec(any::<usize>(), 0..4)) {
        if let Ok((chunks, _)) = decode_in_pieces(&bytes, &cuts) {
            for c in chunks {
                prop_assert!(serde_json::from_slice::<serde_json::Value>(&c).is_ok());
            }
        }
    }
}
