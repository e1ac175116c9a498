//! The rest of the OpenAI surface — image generation, audio (speech,
//! transcriptions, translations), moderations and rerank — relayed without
//! translation through adapters that export `passthrough` (WIT 0.1.6).
//!
//! Here: reading what admission, routing and billing need out of the
//! client's body (its model, and the units it is billed by), and out of the
//! upstream's answer (the units it reports). The body itself goes upstream
//! as the client sent it.

use bytes::Bytes;
use serde_json::Value;

use crate::error::ApiError;
use crate::plugins::{Endpoint, Operation};
use crate::request::{ClientRequest, PromptSize};

/// Most images one request may ask for (OpenAI's limit).
const MAX_IMAGES: u64 = 10;
/// Most characters of speech input (OpenAI's limit).
const MAX_SPEECH_CHARS: usize = 4096;
/// Characters of speech billed as one unit.
pub const SPEECH_UNIT_CHARS: usize = 1000;
/// Largest body of a relayed request: audio files (OpenAI's 25 MB) and
/// their multipart framing.
pub const MAX_RELAYED_BODY: usize = 26 << 20;

/// What a relayed request is.
#[derive(Debug, Clone)]
pub struct Relayed {
    /// The operation.
    pub operation: Operation,
    /// The client's `content-type` (a multipart body's boundary included).
    pub content_type: String,
    /// Units it is billed by at a per-unit price, as asked: images for
    /// image generation, started thousands of characters for speech, 1
    /// otherwise (minutes of audio are known from the answer only).
    pub units: u64,
}

/// A client request in a provider's own protocol, passed through to the
/// channels whose adapter relays it (see `ClientRequest::native`).
#[derive(Debug, Clone)]
pub struct Native {
    /// The protocol (`messages`).
    pub operation: Operation,
    /// The client's body, as received.
    pub body: Bytes,
    /// Whether it asks for a stream.
    pub stream: bool,
    /// The client's headers an adapter may forward (`anthropic-beta`).
    pub headers: Vec<crate::plugins::Header>,
}

/// Marks a response that is the upstream's own answer to a [`Native`]
/// request: the ingress returns it as it is, without translating it back.
#[derive(Debug, Clone, Copy)]
pub struct NativeAnswer;

/// The route label of `operation` (metrics, logs).
pub fn route(operation: Operation) -> &'static str {
    match operation {
        Operation::ImagesGenerations => "images_generations",
        Operation::AudioSpeech => "audio_speech",
        Operation::AudioTranscriptions => "audio_transcriptions",
        Operation::AudioTranslations => "audio_translations",
        Operation::Moderations => "moderations",
        Operation::Rerank => "rerank",
        Operation::Messages => "messages",
        Operation::Responses => "responses",
    }
}

/// The model used when a request names none (OpenAI's defaults).
fn default_model(operation: Operation) -> Option<&'static str> {
    match operation {
        Operation::ImagesGenerations => Some("dall-e-2"),
        Operation::Moderations => Some("omni-moderation-latest"),
        _ => None,
    }
}

fn missing(param: &str) -> ApiError {
    ApiError::bad_request(format!("Missing required parameter: '{param}'.")).param(param)
}

/// Validate a relayed request's body and build the request the relay
/// serves.
pub fn parse(operation: Operation, content_type: &str, body: Bytes) -> Result<ClientRequest, ApiError> {
    let multipart = matches!(operation, Operation::AudioTranscriptions | Operation::AudioTranslations);
    let (model, units, text_bytes) = if multipart {
        let boundary = boundary(content_type).ok_or_else(|| {
            ApiError::bad_request("This endpoint takes multipart/form-data with a boundary.").param("file")
        })?;
        let fields = form_fields(&body, &boundary);
        if !fields.iter().any(|(name, _, is_file)| name == "file" && *is_file) {
            return Err(missing("file"));
        }
        let model = fields.into_iter().find(|(name, _, _)| name == "model").map(|(_, v, _)| v);
        (model, 1, 0)
    } else {
        json_fields(operation, content_type, &body)?
    };
    let model = match model.filter(|m| !m.is_empty()) {
        Some(m) => m,
        None => default_model(operation).map(str::to_string).ok_or_else(|| missing("model"))?,
    };
    Ok(ClientRequest {
        endpoint: Endpoint::Embeddings,
        route: route(operation),
        model,
        stream: false,
        include_usage: false,
        max_tokens: None,
        n: 1,
        prompt: PromptSize { text_bytes, ..PromptSize::default() },
        user: None,
        body,
        session: None,
        request_id: String::new(),
        relayed: Some(Relayed { operation, content_type: content_type.to_string(), units }),
        native: None,
    })
}

/// The model, billing units and text bytes of a JSON request.
fn json_fields(operation: Operation, content_type: &str, body: &[u8]) -> Result<(Option<String>, u64, u64), ApiError> {
    if !content_type.trim_start().to_ascii_lowercase().starts_with("application/json") {
        return Err(ApiError::bad_request("This endpoint takes a JSON body (content-type: application/json)."));
    }
    let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) else {
        return Err(ApiError::bad_request(
            "We could not parse the JSON body of your request: it must be a JSON object.",
        ));
    };
    let model = match map.get("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(m)) => Some(m.clone()),
        Some(_) => return Err(ApiError::bad_request("Invalid type for 'model': expected a string.").param("model")),
    };
    let text = |key: &str| map.get(key).map_or(0, |v| v.to_string().len() as u64);
    let units = match operation {
        Operation::ImagesGenerations => {
            if !map.get("prompt").is_some_and(Value::is_string) {
                return Err(missing("prompt"));
            }
            match map.get("n") {
                None | Some(Value::Null) => 1,
                Some(v) => v.as_u64().filter(|n| (1..=MAX_IMAGES).contains(n)).ok_or_else(|| {
                    ApiError::bad_request(format!("'n' must be an integer between 1 and {MAX_IMAGES}.")).param("n")
                })?,
            }
        }
        Operation::AudioSpeech => {
            let input = map.get("input").and_then(Value::as_str).ok_or_else(|| missing("input"))?;
            let chars = input.chars().count();
            if chars == 0 || chars > MAX_SPEECH_CHARS {
                return Err(ApiError::bad_request(format!(
                    "'input' must be between 1 and {MAX_SPEECH_CHARS} characters."
                ))
                .param("input"));
            }
            if map.get("voice").is_none_or(Value::is_null) {
                return Err(missing("voice"));
            }
            chars.div_ceil(SPEECH_UNIT_CHARS) as u64
        }
        Operation::Moderations => {
            if map.get("input").is_none_or(Value::is_null) {
                return Err(missing("input"));
            }
            1
        }
        Operation::Rerank => {
            if !map.get("query").is_some_and(Value::is_string) {
                return Err(missing("query"));
            }
            if map.get("documents").and_then(Value::as_array).is_none_or(Vec::is_empty) {
                return Err(ApiError::bad_request("'documents' must be a non-empty array.").param("documents"));
            }
            1
        }
        Operation::AudioTranscriptions | Operation::AudioTranslations | Operation::Messages | Operation::Responses => 1,
    };
    let text_bytes =
        text("input").saturating_add(text("prompt")).saturating_add(text("query")).saturating_add(text("documents"));
    Ok((model, units, text_bytes))
}

/// The boundary of a `multipart/form-data` content type.
fn boundary(content_type: &str) -> Option<String> {
    let (kind, params) = content_type.split_once(';')?;
    if !kind.trim().eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params
        .split(';')
        .find_map(|p| {
            let (k, v) = p.split_once('=')?;
            k.trim().eq_ignore_ascii_case("boundary").then(|| v.trim().trim_matches('"').to_string())
        })
        .filter(|b| !b.is_empty() && b.len() <= 200)
}

/// The parts of a multipart body: (field name, value for text fields —
/// empty for files, whether it is a file). Only small text values are
/// read; file contents are skipped.
fn form_fields(body: &[u8], boundary: &str) -> Vec<(String, String, bool)> {
    let delimiter = format!("--{boundary}");
    let mut out = Vec::new();
    let mut rest = body;
    while let Some(start) = find(rest, delimiter.as_bytes()) {
        rest = &rest[start + delimiter.len()..];
        if rest.starts_with(b"--") {
            break;
        }
        let Some(headers_end) = find(rest, b"\r\n\r\n") else { break };
        let headers = String::from_utf8_lossy(&rest[..headers_end]).to_string();
        let content = &rest[headers_end + 4..];
        let end = find(content, format!("\r\n{delimiter}").as_bytes()).unwrap_or(content.len());
        let disposition = headers.lines().find(|l| l.to_ascii_lowercase().starts_with("content-disposition"));
        if let Some(d) = disposition {
            let name = param(d, "name").unwrap_or_default();
            let is_file = param(d, "filename").is_some();
            let value = if is_file || end > 4096 {
                String::new()
            } else {
                String::from_utf8_lossy(&content[..end]).trim().to_string()
            };
            out.push((name, value, is_file));
        }
        rest = &content[end..];
    }
    out
}

/// The value of `key="…"` in a header line.
fn param(line: &str, key: &str) -> Option<String> {
    line.split(';').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
    })
}

/// Where `needle` starts in `haystack` (SIMD search: an upload is up to
/// 26 MiB and this runs on a request worker).
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(haystack, needle)
}

/// What the upstream's JSON answer says it served, for billing: its token
/// usage if it reported one, and the units (images returned; minutes of
/// audio transcribed, rounded up) when it says.
pub fn answered_units(operation: Operation, body: &[u8]) -> (Option<crate::plugins::Usage>, Option<u64>) {
    let Ok(value) = serde_json::from_slice::<Value>(body) else { return (None, None) };
    let usage = value.get("usage").and_then(usage_of);
    let units = match operation {
        Operation::ImagesGenerations => value.get("data").and_then(Value::as_array).map(|d| d.len() as u64),
        Operation::AudioTranscriptions | Operation::AudioTranslations => value
            .get("duration")
            .and_then(Value::as_f64)
            .or_else(|| value.get("usage").and_then(|u| u.get("seconds")).and_then(Value::as_f64))
            .map(|secs| (secs / 60.0).ceil().max(1.0) as u64),
        _ => None,
    };
    (usage, units)
}

/// Token usage in OpenAI's shapes (`prompt_tokens`, or `input_tokens` of
/// the newer APIs) and Anthropic's (`input_tokens` not counting the prompt
/// cache's `cache_read_input_tokens` and `cache_creation_input_tokens`).
pub fn usage_of(u: &Value) -> Option<crate::plugins::Usage> {
    let tokens = |k: &str| u.get(k).and_then(Value::as_u64).map(|n| u32::try_from(n).unwrap_or(u32::MAX));
    let cache_read = tokens("cache_read_input_tokens").unwrap_or(0);
    // (The Responses API counts its cached tokens inside `input_tokens`.)
    let details_cached = u
        .get("input_tokens_details")
        .and_then(|d| d.get("cached_tokens"))
        .and_then(Value::as_u64)
        .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX));
    let prompt = tokens("input_tokens")
        .or_else(|| tokens("prompt_tokens"))?
        .saturating_add(cache_read)
        .saturating_add(tokens("cache_creation_input_tokens").unwrap_or(0));
    let completion = tokens("output_tokens").or_else(|| tokens("completion_tokens")).unwrap_or(0);
    Some(crate::plugins::Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        cached_tokens: cache_read.max(details_cached),
        total_tokens: prompt.saturating_add(completion),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipart_fields_and_boundaries() {
        let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--XyZ\r\n\
Content-Disposition: form-data; name=\"file\"; filename=\"a.mp3\"\r\nContent-Type: audio/mpeg\r\n\r\n\x00\x01\x02\r\n--XyZ--\r\n";
        let fields = form_fields(body, "XyZ");
        assert_eq!(fields[0], ("model".into(), "whisper-1".into(), false));
        assert_eq!(fields[1], ("file".into(), String::new(), true));
        assert_eq!(boundary("multipart/form-data; boundary=\"XyZ\"").as_deref(), Some("XyZ"));
        assert_eq!(boundary("application/json"), None);
        let req = parse(Operation::AudioTranscriptions, "multipart/form-data; boundary=XyZ", Bytes::from_static(body))
            .expect("parsed");
        assert_eq!(req.model, "whisper-1");
    }

    #[test]
    fn units_asked_and_answered() {
        let ct = "application/json";
        let images = br#"{"prompt":"a cat","n":3}"#;
        let req = parse(Operation::ImagesGenerations, ct, Bytes::from_static(images)).expect("images");
        assert_eq!((req.model.as_str(), req.relayed.expect("relayed").units), ("dall-e-2", 3));
        let speech = format!(r#"{{"model":"tts-1","voice":"alloy","input":"{}"}}"#, "a".repeat(2500));
        let req = parse(Operation::AudioSpeech, ct, Bytes::from(speech)).expect("speech");
        assert_eq!(req.relayed.expect("relayed").units, 3, "2,500 characters: three started thousands");
        assert!(
            parse(Operation::Rerank, ct, Bytes::from_static(br#"{"model":"r","query":"q","documents":[]}"#)).is_err()
        );
        assert_eq!(answered_units(Operation::AudioTranscriptions, br#"{"text":"hi","duration":61.5}"#).1, Some(2));
        assert_eq!(answered_units(Operation::ImagesGenerations, br#"{"data":[{},{}]}"#).1, Some(2));
    }
}
