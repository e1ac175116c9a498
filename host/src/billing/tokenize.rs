//! Local token counting with tiktoken (`o200k_base` for the GPT-4o family
//! and unknown models, the model's own encoding when tiktoken knows it):
//! for the pre-charge estimate, and for the bill when an upstream reports
//! no usage (such rows are marked `estimated`).

use serde::Deserialize;
use serde_json::Value;
use tiktoken_rs::CoreBPE;

fn bpe(model: &str) -> &'static CoreBPE {
    tiktoken_rs::bpe_for_model(model).unwrap_or_else(|_| tiktoken_rs::o200k_base_singleton())
}

/// Load the encodings now (they take a moment), off the request path.
pub fn warm() {
    let _ = tiktoken_rs::o200k_base_singleton();
    let _ = tiktoken_rs::cl100k_base_singleton();
}

/// Tokens of `text` for `model`.
pub fn count(model: &str, text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    bpe(model).encode_with_special_tokens(text).len() as u64
}

#[derive(Deserialize, Default)]
struct Body {
    #[serde(default)]
    messages: Vec<Message>,
    #[serde(default)]
    prompt: Value,
    #[serde(default)]
    input: Value,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    n: Option<u64>,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    content: Value,
    #[serde(default)]
    name: Option<String>,
}

/// Text inside a JSON value: a string, an array of strings or of
/// `{"type":"text","text":...}` parts.
fn text_of(v: &Value, out: &mut String) {
    match v {
        Value::String(s) => {
            out.push_str(s);
            out.push('\n');
        }
        Value::Array(items) => items.iter().for_each(|i| text_of(i, out)),
        Value::Object(map) => {
            if let Some(t) = map.get("text") {
                text_of(t, out);
            }
        }
        _ => {}
    }
}

/// The token estimate of a request: its prompt, and the completion tokens
/// it may generate (`max_tokens` × `n`, or `default_completion` × `n`).
pub fn estimate(model: &str, body: &[u8], default_completion: u64, generates: bool) -> (u64, u64) {
    let parsed: Body = serde_json::from_slice(body).unwrap_or_default();
    let mut text = String::new();
    let mut overhead = 0u64;
    for m in &parsed.messages {
        text_of(&m.content, &mut text);
        // OpenAI's chat format adds ~3 tokens per message (4 with a name).
        overhead += 3 + u64::from(m.name.is_some());
    }
    if !parsed.messages.is_empty() {
        overhead += 3;
    }
    text_of(&parsed.prompt, &mut text);
    text_of(&parsed.input, &mut text);
    let prompt = count(model, &text) + overhead;
    let n = parsed.n.unwrap_or(1).clamp(1, 128);
    let completion = if generates {
        parsed.max_completion_tokens.or(parsed.max_tokens).unwrap_or(default_completion).saturating_mul(n)
    } else {
        0
    };
    (prompt, completion)
}

/// Generated text in an OpenAI response or chunk: `choices[].message.content`,
/// `choices[].delta.content`, `choices[].text`.
pub fn generated_text(body: &[u8], out: &mut String) {
    #[derive(Deserialize)]
    struct Resp {
        #[serde(default)]
        choices: Vec<Choice>,
    }
    #[derive(Deserialize)]
    struct Choice {
        #[serde(default)]
        message: Option<Content>,
        #[serde(default)]
        delta: Option<Content>,
        #[serde(default)]
        text: Option<String>,
    }
    #[derive(Deserialize)]
    struct Content {
        #[serde(default)]
        content: Option<Value>,
    }
    if let Ok(r) = serde_json::from_slice::<Resp>(body) {
        for c in r.choices {
            for part in [c.message, c.delta].into_iter().flatten() {
                match part.content {
                    // Stream deltas concatenate exactly.
                    Some(Value::String(s)) => out.push_str(&s),
                    Some(v) => text_of(&v, out),
                    None => {}
                }
            }
            if let Some(t) = c.text {
                out.push_str(&t);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_count_messages_and_max_tokens() {
        let body = br#"{"model":"gpt-4o-mini","max_tokens":7,"n":2,
            "messages":[{"role":"user","content":"Hello world"},{"role":"user","content":[{"type":"text","text":"again"}]}]}"#;
        let (prompt, completion) = estimate("gpt-4o-mini", body, 100, true);
        assert!((3 + 6 + 3..20).contains(&prompt), "{prompt}");
        assert_eq!(completion, 14);
        assert_eq!(estimate("text-embedding-3-small", br#"{"input":["a b c"]}"#, 100, false).1, 0);
        let mut text = String::new();
        generated_text(br#"{"choices":[{"delta":{"content":"Hi there"}}]}"#, &mut text);
        assert_eq!(text, "Hi there");
        assert_eq!(count("gpt-4o-mini", &text), 2);
    }
}
