//! Local token counting with tiktoken (`o200k_base` for the GPT-4o family
//! and unknown models, the model's own encoding when tiktoken knows it),
//! used only where a bill needs it: when an upstream reports no usage
//! (such rows are marked `estimated`), and at admission when the cheap
//! bound of the prompt does not fit the caller's balance.
//!
//! Counting is never done on an async worker: [`off_worker`] runs it on
//! the blocking pool, at most one count per CPU at a time. An encoding's
//! tables (tens of MB) are loaded on its first use, so a gateway whose
//! upstreams report usage never holds them. Its cost is
//! linear: text is encoded in pieces of at most [`PIECE`] bytes, cut at
//! whitespace where possible (byte-pair merging is quadratic in the length
//! of one unbroken word; a 7 MB one-word prompt took 11–17 s whole). A cut
//! inside a word can add a token at the cut, so counts are at most one
//! token per piece above tiktoken's.

use std::sync::{Arc, LazyLock};

use serde_json::Value;
use tiktoken_rs::CoreBPE;
use tokio::sync::Semaphore;

use crate::request::IMAGE_TOKENS;

/// Longest run of text encoded at once.
pub const PIECE: usize = 4096;
/// Prompts with more text than this are never counted exactly: their
/// bound stands (admission), or their bytes are billed as tokens.
pub const MAX_EXACT_BYTES: usize = 4 << 20;

fn bpe(model: &str) -> &'static CoreBPE {
    tiktoken_rs::bpe_for_model(model).unwrap_or_else(|_| tiktoken_rs::o200k_base_singleton())
}

/// Where a piece of at most `PIECE` bytes starting at `text` should end:
/// after the last whitespace in range, else at a character boundary.
fn piece_end(text: &str) -> usize {
    if text.len() <= PIECE {
        return text.len();
    }
    let mut end = PIECE;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    match text[..end].rfind(char::is_whitespace) {
        Some(i) if i > PIECE / 2 => i,
        _ => end,
    }
}

/// Tokens of `text` for `model`. Blocking: call through [`off_worker`].
pub fn count(model: &str, text: &str) -> u64 {
    let bpe = bpe(model);
    let mut rest = text;
    let mut tokens = 0u64;
    while !rest.is_empty() {
        // A piece never ends at 0: at least one character is consumed.
        let end = piece_end(rest).max(rest.chars().next().map_or(1, char::len_utf8));
        tokens = tokens.saturating_add(bpe.encode_with_special_tokens(&rest[..end]).len() as u64);
        rest = &rest[end..];
    }
    tokens
}

/// Object keys whose values are binary parts (images, audio, files), not text.
const BINARY_KEYS: [&str; 7] = ["image_url", "input_audio", "file", "image", "source", "inline_data", "audio"];

/// Text and binary parts inside a JSON value.
fn collect(v: &Value, text: &mut String, binary: &mut u64, ids: &mut u64) {
    match v {
        Value::String(s) => {
            text.push_str(s);
            text.push('\n');
        }
        Value::Number(_) => *ids += 1,
        Value::Array(items) => items.iter().for_each(|i| collect(i, text, binary, ids)),
        Value::Object(map) => {
            for (k, v) in map {
                if k == "role" || k == "type" {
                    continue;
                }
                if BINARY_KEYS.contains(&k.as_str()) {
                    *binary += 1;
                } else {
                    collect(v, text, binary, ids);
                }
            }
        }
        _ => {}
    }
}

/// The prompt tokens of a request body, counted exactly (chat framing
/// included, images at [`IMAGE_TOKENS`]). Blocking.
pub fn prompt_tokens(model: &str, body: &[u8]) -> u64 {
    let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) else { return 0 };
    let (mut text, mut binary, mut ids) = (String::new(), 0u64, 0u64);
    let mut framing = 0u64;
    if let Some(Value::Array(messages)) = map.get("messages") {
        // OpenAI's chat format adds ~3 tokens per message and 3 per reply.
        framing = 3u64.saturating_mul(messages.len() as u64).saturating_add(3);
        messages.iter().for_each(|m| collect(m, &mut text, &mut binary, &mut ids));
    }
    for key in ["prompt", "input", "system"] {
        if let Some(v) = map.get(key) {
            collect(v, &mut text, &mut binary, &mut ids);
        }
    }
    let text_tokens = if text.len() > MAX_EXACT_BYTES { text.len() as u64 } else { count(model, &text) };
    text_tokens.saturating_add(ids).saturating_add(binary.saturating_mul(IMAGE_TOKENS)).saturating_add(framing)
}

/// Generated text kept to count a completion whose usage the upstream did
/// not report: the first [`GeneratedText::KEPT`] bytes, and the size of
/// all of it. The bill extrapolates from the kept part (see
/// [`GeneratedText::tokens`]).
#[derive(Debug, Default, Clone)]
pub struct GeneratedText {
    kept: String,
    total_bytes: u64,
}

impl GeneratedText {
    /// Bytes of generated text kept.
    pub const KEPT: usize = 64 * 1024;

    /// Add generated text.
    pub fn push(&mut self, text: &str) {
        self.total_bytes = self.total_bytes.saturating_add(text.len() as u64);
        let room = Self::KEPT.saturating_sub(self.kept.len());
        if room > 0 {
            let mut end = room.min(text.len());
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            self.kept.push_str(&text[..end]);
        }
    }

    /// Bytes of generated text seen.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Tokens of the whole text: the kept part counted, the rest billed at
    /// the kept part's tokens per byte (never less than one token per four
    /// bytes). Blocking.
    pub fn tokens(&self, model: &str) -> u64 {
        let kept = count(model, &self.kept);
        let kept_bytes = self.kept.len() as u64;
        if self.total_bytes <= kept_bytes {
            return kept;
        }
        if kept_bytes == 0 {
            return self.total_bytes.div_ceil(4);
        }
        let rest = self.total_bytes - kept_bytes;
        let rate = (kept as f64 / kept_bytes as f64).max(0.25);
        kept.saturating_add((rest as f64 * rate).ceil() as u64)
    }
}

/// Generated text in an OpenAI response or chunk: `choices[].message.content`,
/// `choices[].delta.content`, `choices[].text`, tool-call arguments. The
/// chunk is validated as JSON by the same pass. Returns `false` when it is
/// not JSON.
pub fn generated_text(body: &[u8], out: Option<&mut GeneratedText>) -> bool {
    use std::borrow::Cow;

    use serde::Deserialize;
    #[derive(Deserialize)]
    struct Resp<'a> {
        #[serde(default, borrow)]
        choices: Vec<Choice<'a>>,
    }
    #[derive(Deserialize)]
    struct Choice<'a> {
        #[serde(default, borrow)]
        message: Option<Content<'a>>,
        #[serde(default, borrow)]
        delta: Option<Content<'a>>,
        #[serde(default, borrow)]
        text: Option<Cow<'a, str>>,
    }
    #[derive(Deserialize)]
    struct Content<'a> {
        #[serde(default, borrow)]
        content: Option<&'a serde_json::value::RawValue>,
        #[serde(default, borrow)]
        reasoning_content: Option<Cow<'a, str>>,
        #[serde(default, borrow)]
        tool_calls: Option<Vec<ToolCall<'a>>>,
    }
    #[derive(Deserialize)]
    struct ToolCall<'a> {
        #[serde(default, borrow)]
        function: Option<Function<'a>>,
    }
    #[derive(Deserialize)]
    struct Function<'a> {
        #[serde(default, borrow)]
        name: Option<Cow<'a, str>>,
        #[serde(default, borrow)]
        arguments: Option<Cow<'a, str>>,
    }
    let Some(out) = out else {
        return serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok();
    };
    let Ok(r) = serde_json::from_slice::<Resp<'_>>(body) else { return false };
    for c in r.choices {
        for part in [c.message, c.delta].into_iter().flatten() {
            if let Some(raw) = part.content {
                if raw.get().starts_with('"') {
                    if let Ok(s) = serde_json::from_str::<Cow<'_, str>>(raw.get()) {
                        out.push(&s);
                    }
                } else if let Ok(v) = serde_json::from_str::<Value>(raw.get()) {
                    let (mut text, mut binary, mut ids) = (String::new(), 0, 0);
                    collect(&v, &mut text, &mut binary, &mut ids);
                    out.push(&text);
                }
            }
            if let Some(r) = part.reasoning_content {
                out.push(&r);
            }
            for call in part.tool_calls.into_iter().flatten() {
                if let Some(f) = call.function {
                    out.push(f.name.as_deref().unwrap_or_default());
                    out.push(f.arguments.as_deref().unwrap_or_default());
                }
            }
        }
        if let Some(t) = c.text {
            out.push(&t);
        }
    }
    true
}

/// At most one blocking count per CPU at a time.
static COUNTERS: LazyLock<Arc<Semaphore>> = LazyLock::new(|| {
    let cpus = std::thread::available_parallelism().map_or(2, usize::from);
    Arc::new(Semaphore::new(cpus))
});

/// Run `f` (a count) on the blocking pool, at most one per CPU at a time.
pub async fn off_worker<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let permit = COUNTERS.clone().acquire_owned().await;
    let result = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        f()
    })
    .await;
    match result {
        Ok(value) => value,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_count_messages_and_images() {
        let body = br#"{"model":"gpt-4o-mini","max_tokens":7,"n":2,
            "messages":[{"role":"user","content":"Hello world"},{"role":"user","content":[{"type":"text","text":"again"},{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]}]}"#;
        let tokens = prompt_tokens("gpt-4o-mini", body);
        assert!((IMAGE_TOKENS + 3..IMAGE_TOKENS + 20).contains(&tokens), "{tokens}");
        let mut text = GeneratedText::default();
        assert!(generated_text(br#"{"choices":[{"delta":{"content":"Hi there"}}]}"#, Some(&mut text)));
        assert_eq!(text.tokens("gpt-4o-mini"), 2);
        assert!(!generated_text(b"{not json", Some(&mut text)));
        assert!(!generated_text(b"{not json", None));
    }

    #[test]
    fn one_long_word_counts_in_linear_time() {
        let word = "a".repeat(2 << 20);
        let started = std::time::Instant::now();
        let tokens = count("gpt-4o-mini", &word);
        assert!(tokens > 0 && tokens <= word.len() as u64);
        // Whole, this took seconds (quadratic merges); piecewise it is linear.
        println!("2 MiB one-word prompt: {tokens} tokens in {:?}", started.elapsed());
    }

    #[test]
    fn generated_text_is_sampled_and_extrapolated() {
        let mut text = GeneratedText::default();
        let sentence = "The quick brown fox jumps over the lazy dog. ";
        for _ in 0..10_000 {
            text.push(sentence);
        }
        assert_eq!(text.total_bytes(), 10_000 * sentence.len() as u64);
        assert!(text.kept.len() <= GeneratedText::KEPT);
        let tokens = text.tokens("gpt-4o-mini");
        let exact = 10_000 * count("gpt-4o-mini", sentence);
        let error = (tokens as f64 - exact as f64).abs() / exact as f64;
        assert!(error < 0.02, "extrapolated {tokens}, exact {exact}");
    }
}
