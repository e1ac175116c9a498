//! # wasmgate-pdk-filter — write a wasmgate traffic filter
//!
//! A filter is a WebAssembly component implementing
//! `wasmgate:plugin/filter@0.1.6` (see `wit/filter.wit`, vendored in this
//! crate). Implement [`Filter`] — only the hooks you declare in
//! [`FilterInfo::hooks`] are called — and register it with
//! [`export_filter!`]. Filters see OpenAI chat-completions JSON whatever
//! protocol the client spoke; the helpers below walk its text:
//! [`prompt_texts_mut`] for a request, [`answer_texts_mut`] for an answer or
//! a stream chunk.

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "filter-plugin",
        path: "wit",
        pub_export_macro: true,
        export_macro_name: "__export_filter_world",
        default_bindings_module: "wasmgate_pdk_filter::bindings",
    });
}

pub use bindings::exports::wasmgate::plugin::filter::{
    ChunkAction, ChunkVerdict, FilterContext, FilterInfo, Hook, Refusal, RequestEdit, RequestVerdict, ResponseVerdict,
};
pub use bindings::wasmgate::plugin::types::{Endpoint, Header, LogLevel};
pub use serde_json;
use serde_json::Value;

/// The version of the WIT contract this kit implements.
pub const WIT_VERSION: &str = "0.1.6";

/// The contract this kit implements, as the host names it.
pub const CONTRACT: &str = "wasmgate:plugin@0.1.6";

/// Most bytes of state a stream filter may carry from one chunk to the next.
pub const MAX_STATE: usize = 4096;

/// A traffic filter. Every hook defaults to "pass"; override the ones you
/// declare in [`FilterInfo::hooks`].
pub trait Filter {
    /// Name, version and hooks; called at load time as validation.
    fn info() -> FilterInfo;
    /// The client's request (OpenAI JSON), before routing.
    fn on_request(_ctx: &FilterContext, _body: Vec<u8>) -> RequestVerdict {
        RequestVerdict::Pass
    }
    /// A non-streamed answer (OpenAI JSON).
    fn on_response(_ctx: &FilterContext, _body: Vec<u8>) -> ResponseVerdict {
        ResponseVerdict::Pass
    }
    /// One stream chunk, with the state returned for the previous one.
    fn on_stream_chunk(_ctx: &FilterContext, _chunk: Vec<u8>, _state: Vec<u8>) -> ChunkVerdict {
        ChunkVerdict { action: ChunkAction::Pass, state: Vec::new() }
    }
}

/// Log one line through the host.
pub fn log(level: LogLevel, message: &str) {
    bindings::wasmgate::plugin::log::log(level, message);
}

/// A refusal with `status`, a machine-readable `code` and a `message`.
pub fn refuse(status: u16, code: &str, message: impl Into<String>) -> Refusal {
    Refusal { status, code: code.into(), message: message.into() }
}

/// The rule's settings as JSON (an empty object when they are not one).
pub fn settings(ctx: &FilterContext) -> Value {
    match serde_json::from_str(&ctx.settings) {
        Ok(v @ Value::Object(_)) => v,
        _ => Value::Object(Default::default()),
    }
}

/// A string list setting (`["a", "b"]`); non-strings are skipped.
pub fn string_list(settings: &Value, key: &str) -> Vec<String> {
    match settings.get(key) {
        Some(Value::Array(items)) => items.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => Vec::new(),
    }
}

/// Call `f` on every piece of prompt text in an OpenAI request: each
/// message's `content` (a string, or the `text` of its text parts) and
/// `name`-less tool results alike, and `prompt`/`input` strings of
/// completions and embeddings requests. `f` may change the text in place;
/// the roles are given so system prompts can be treated apart.
pub fn prompt_texts_mut(body: &mut Value, mut f: impl FnMut(&str, &mut String)) {
    if let Some(Value::Array(messages)) = body.get_mut("messages") {
        for message in messages {
            let role = message.get("role").and_then(Value::as_str).unwrap_or("user").to_owned();
            if let Some(content) = message.get_mut("content") {
                content_texts_mut(content, &mut |s| f(&role, s));
            }
        }
    }
    for key in ["prompt", "input"] {
        match body.get_mut(key) {
            Some(Value::String(s)) => f("user", s),
            Some(Value::Array(items)) => {
                for item in items {
                    if let Value::String(s) = item {
                        f("user", s);
                    }
                }
            }
            _ => {}
        }
    }
}

/// Call `f` on every piece of generated text in an OpenAI answer or stream
/// chunk: `choices[].message.content`, `choices[].delta.content`, and
/// `choices[].text` (text completions).
pub fn answer_texts_mut(body: &mut Value, mut f: impl FnMut(&mut String)) {
    let Some(Value::Array(choices)) = body.get_mut("choices") else { return };
    for choice in choices {
        for key in ["message", "delta"] {
            if let Some(content) = choice.get_mut(key).and_then(|m| m.get_mut("content")) {
                content_texts_mut(content, &mut f);
            }
        }
        if let Some(Value::String(s)) = choice.get_mut("text") {
            f(s);
        }
    }
}

/// A message `content`: a string, or a list of parts whose text parts carry
/// `text`.
fn content_texts_mut(content: &mut Value, f: &mut dyn FnMut(&mut String)) {
    match content {
        Value::String(s) => f(s),
        Value::Array(parts) => {
            for part in parts {
                if let Some(Value::String(s)) = part.get_mut("text") {
                    f(s);
                }
            }
        }
        _ => {}
    }
}

/// The concatenated prompt text of a request, in order (for measuring or
/// matching; use [`prompt_texts_mut`] to change it).
pub fn prompt_text(body: &Value) -> String {
    let mut copy = body.clone();
    let mut out = String::new();
    prompt_texts_mut(&mut copy, |_, s| {
        out.push_str(s);
        out.push('\n');
    });
    out
}

/// A filter context for unit tests: a chat completion of model `m` with the
/// rule settings `settings` (JSON).
pub fn test_context(settings: &str, stream: bool) -> FilterContext {
    FilterContext {
        endpoint: Endpoint::ChatCompletions,
        route: "chat_completions".into(),
        model: "m".into(),
        group: "default".into(),
        stream,
        request_id: "req_test".into(),
        user_id: None,
        token_id: None,
        settings: settings.into(),
    }
}

/// Register `$ty` (a [`Filter`]) as this component's filter export.
#[macro_export]
macro_rules! export_filter {
    ($ty:ty) => {
        #[doc(hidden)]
        pub struct __WasmgateFilter;

        impl $crate::bindings::exports::wasmgate::plugin::filter::Guest for __WasmgateFilter {
            fn info() -> $crate::FilterInfo {
                <$ty as $crate::Filter>::info()
            }
            fn on_request(ctx: $crate::FilterContext, body: ::std::vec::Vec<u8>) -> $crate::RequestVerdict {
                <$ty as $crate::Filter>::on_request(&ctx, body)
            }
            fn on_response(ctx: $crate::FilterContext, body: ::std::vec::Vec<u8>) -> $crate::ResponseVerdict {
                <$ty as $crate::Filter>::on_response(&ctx, body)
            }
            fn on_stream_chunk(
                ctx: $crate::FilterContext,
                chunk: ::std::vec::Vec<u8>,
                state: ::std::vec::Vec<u8>,
            ) -> $crate::ChunkVerdict {
                <$ty as $crate::Filter>::on_stream_chunk(&ctx, chunk, state)
            }
        }

        $crate::bindings::__export_filter_world!(__WasmgateFilter with_types_in $crate::bindings);
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_and_answer_texts_are_walked_in_every_shape() {
        let mut req = serde_json::json!({"messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}]},
        ], "input": ["x", 1]});
        let mut seen = Vec::new();
        prompt_texts_mut(&mut req, |role, s| {
            seen.push(format!("{role}:{s}"));
            s.make_ascii_uppercase();
        });
        assert_eq!(seen, ["system:sys", "user:a", "user:x"]);
        assert_eq!(req["messages"][1]["content"][0]["text"], "A");
        let mut chunk = serde_json::json!({"choices": [{"delta": {"content": "hi"}}, {"text": "t"}]});
        let mut texts = Vec::new();
        answer_texts_mut(&mut chunk, |s| texts.push(s.clone()));
        assert_eq!(texts, ["hi", "t"]);
        assert_eq!(prompt_text(&serde_json::json!({"prompt": "p"})), "p\n");
    }
}
