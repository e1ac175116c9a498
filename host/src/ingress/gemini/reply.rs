//! Chat answers as Gemini `GenerateContentResponse`s: one for a
//! non-streamed answer, a sequence of them for a stream (text as it comes,
//! function calls whole, `finishReason` and `usageMetadata` in the last).

use bytes::BytesMut;
use serde_json::{Value, json};

use crate::ingress::answer::ChatAnswer;
use crate::ingress::answer::ChatUsage;
use crate::ingress::chat_stream::{ChatChunk, Translator, non_empty};

/// Gemini's `finishReason` for a chat `finish_reason`.
fn finish_reason(finish: Option<&str>) -> &'static str {
    match finish {
        Some("length") => "MAX_TOKENS",
        Some("content_filter") => "SAFETY",
        _ => "STOP",
    }
}

fn usage_metadata(usage: ChatUsage) -> Value {
    let (cached, reasoning) =
        (usage.prompt_tokens_details.cached_tokens, usage.completion_tokens_details.reasoning_tokens);
    let mut u = json!({"promptTokenCount": usage.prompt_tokens, "candidatesTokenCount": usage.completion_tokens,
                       "totalTokenCount": usage.total()});
    if cached > 0 {
        u["cachedContentTokenCount"] = cached.into();
    }
    if reasoning > 0 {
        u["thoughtsTokenCount"] = reasoning.into();
    }
    u
}

fn function_call(name: &str, arguments: &str) -> Value {
    let args = serde_json::from_str::<Value>(arguments).ok().filter(Value::is_object).unwrap_or(json!({}));
    json!({"functionCall": {"name": name, "args": args}})
}

fn response(parts: Vec<Value>, finish: Option<&str>, usage: Option<ChatUsage>, model: &str, id: &str) -> Value {
    let mut candidate = json!({"content": {"role": "model", "parts": parts}, "index": 0});
    if finish.is_some() || usage.is_some() {
        candidate["finishReason"] = finish_reason(finish).into();
    }
    let mut r = json!({"candidates": [candidate], "modelVersion": model, "responseId": id});
    if let Some(usage) = usage {
        r["usageMetadata"] = usage_metadata(usage);
    }
    r
}

/// The response for a non-streamed chat answer.
pub fn answer(chat: &ChatAnswer<'_>, model: &str, id: &str) -> Value {
    let (text, _, calls, finish) = chat.message();
    let mut parts = Vec::with_capacity(1 + calls.len());
    if !text.is_empty() {
        parts.push(json!({"text": text}));
    }
    for call in calls {
        let (_, name, arguments) = call.parts();
        parts.push(function_call(name, arguments));
    }
    response(parts, Some(finish.unwrap_or("stop")), Some(chat.usage.unwrap_or_default()), model, id)
}

/// How stream responses are framed: SSE (`alt=sse`) or one JSON array.
#[derive(Clone, Copy, PartialEq)]
pub enum Framing {
    /// `data: {…}` events.
    Sse,
    /// `[{…},{…}]`, written as it comes.
    Array,
}

/// The stream translator.
pub struct GeminiStream {
    model: String,
    id: String,
    framing: Framing,
    written: usize,
    /// Tool calls being assembled: (chat index, name, arguments).
    calls: Vec<(u64, String, String)>,
    finish: Option<String>,
    usage: Option<ChatUsage>,
}

impl GeminiStream {
    /// A stream answering for `model`.
    pub fn new(model: String, id: String, framing: Framing) -> Self {
        Self { model, id, framing, written: 0, calls: Vec::new(), finish: None, usage: None }
    }

    fn write(&mut self, out: &mut BytesMut, value: &Value) {
        match self.framing {
            Framing::Sse => {
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(value.to_string().as_bytes());
                out.extend_from_slice(b"\r\n\r\n");
            }
            Framing::Array => {
                out.extend_from_slice(if self.written == 0 { b"[" } else { b",\r\n" });
                out.extend_from_slice(value.to_string().as_bytes());
            }
        }
        self.written += 1;
    }

    fn close_array(&mut self, out: &mut BytesMut) {
        if self.framing == Framing::Array {
            out.extend_from_slice(if self.written == 0 { b"[]" } else { b"]" });
        }
    }
}

impl Translator for GeminiStream {
    fn chunk(&mut self, chunk: &ChatChunk<'_>, out: &mut BytesMut) {
        if chunk.usage.is_some() {
            self.usage = chunk.usage;
        }
        let Some(choice) = chunk.first() else { return };
        for call in &choice.delta.tool_calls {
            let args = call.function.arguments.as_deref().unwrap_or("");
            match self.calls.iter_mut().find(|c| c.0 == call.index) {
                Some(c) => c.2.push_str(args),
                None => self.calls.push((
                    call.index,
                    call.function.name.as_deref().unwrap_or_default().to_string(),
                    args.to_string(),
                )),
            }
        }
        if let Some(reason) = &choice.finish_reason {
            self.finish = Some(reason.to_string());
        }
        if let Some(text) = non_empty(&choice.delta.content) {
            let r = response(vec![json!({"text": text})], None, None, &self.model, &self.id);
            self.write(out, &r);
        }
    }

    fn error(&mut self, error: &Value, out: &mut BytesMut) {
        let message = error["message"].as_str().unwrap_or("The upstream stream failed.");
        let e = json!({"error": {"code": 502, "message": message, "status": "UNAVAILABLE"}});
        self.write(out, &e);
        self.close_array(out);
    }

    fn finish(&mut self, out: &mut BytesMut) {
        let parts: Vec<Value> = self.calls.iter().map(|(_, name, args)| function_call(name, args)).collect();
        let usage = self.usage.take().unwrap_or_default();
        let r = response(parts, Some(self.finish.as_deref().unwrap_or("stop")), Some(usage), &self.model, &self.id);
        self.write(out, &r);
        self.close_array(out);
    }
}
