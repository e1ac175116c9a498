//! `prompt-cap`: a budget on the size of prompts, checked before anything
//! is routed or charged. Settings of the rule:
//!
//! - `max_chars`: most characters of prompt text (all messages, `prompt`
//!   and `input` together);
//! - `max_messages`: most chat messages;
//! - `trim`: `false` by default (refuse with 400 `prompt_too_large`); when
//!   `true`, the oldest messages that are not system messages are dropped
//!   until the prompt fits, keeping at least the last one — refused only
//!   if that is still too large.
//!
//! Only the request hook is declared.

use wasmgate_pdk_filter::serde_json::{self, Value};
use wasmgate_pdk_filter::{
    prompt_texts_mut, refuse, settings, Filter, FilterContext, FilterInfo, Hook, RequestEdit, RequestVerdict,
};

/// Characters of prompt text in `body`.
fn prompt_chars(body: &mut Value) -> u64 {
    let mut chars = 0u64;
    prompt_texts_mut(body, |_, text| chars += text.chars().count() as u64);
    chars
}

fn messages(body: &Value) -> usize {
    body.get("messages").and_then(Value::as_array).map_or(0, Vec::len)
}

/// Drop the oldest non-system message except the last; whether one went.
fn drop_oldest(body: &mut Value) -> bool {
    let Some(Value::Array(list)) = body.get_mut("messages") else { return false };
    let last = list.len().saturating_sub(1);
    match list.iter().position(|m| m.get("role").and_then(Value::as_str) != Some("system")) {
        Some(i) if i < last => {
            list.remove(i);
            true
        }
        _ => false,
    }
}

struct PromptCap;

impl Filter for PromptCap {
    fn info() -> FilterInfo {
        FilterInfo {
            name: "prompt-cap".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "refuses (or trims) prompts over a character or message budget".into(),
            hooks: vec![Hook::Request],
        }
    }

    fn on_request(ctx: &FilterContext, body: Vec<u8>) -> RequestVerdict {
        let settings = settings(ctx);
        let max_chars = settings.get("max_chars").and_then(Value::as_u64).unwrap_or(u64::MAX);
        let max_messages = settings.get("max_messages").and_then(Value::as_u64).unwrap_or(u64::MAX) as usize;
        let trim = settings.get("trim").and_then(Value::as_bool).unwrap_or(false);
        let Ok(mut value) = serde_json::from_slice::<Value>(&body) else { return RequestVerdict::Pass };
        let fits = |v: &mut Value| prompt_chars(v) <= max_chars && messages(v) <= max_messages;
        if fits(&mut value) {
            return RequestVerdict::Pass;
        }
        if trim {
            while drop_oldest(&mut value) {
                if fits(&mut value) {
                    let body = serde_json::to_vec(&value).unwrap_or(body);
                    return RequestVerdict::Edit(RequestEdit { body: Some(body), headers: Vec::new() });
                }
            }
        }
        let (chars, count) = (prompt_chars(&mut value), messages(&value));
        let message = if count > max_messages {
            format!("The prompt has {count} messages; this gateway accepts at most {max_messages}.")
        } else {
            format!("The prompt has {chars} characters; this gateway accepts at most {max_chars}.")
        };
        RequestVerdict::Refuse(refuse(400, "prompt_too_large", message))
    }
}

wasmgate_pdk_filter::export_filter!(PromptCap);

#[cfg(test)]
mod tests {
    use super::*;
    use wasmgate_pdk_filter::test_context;

    fn chat(texts: &[&str]) -> Vec<u8> {
        let mut messages = vec![serde_json::json!({"role": "system", "content": "be brief"})];
        messages.extend(texts.iter().map(|t| serde_json::json!({"role": "user", "content": t})));
        serde_json::to_vec(&serde_json::json!({"model": "m", "messages": messages})).unwrap()
    }

    #[test]
    fn over_budget_prompts_are_refused_with_the_numbers() {
        let ctx = test_context(r#"{"max_chars": 20}"#, false);
        assert!(matches!(PromptCap::on_request(&ctx, chat(&["short"])), RequestVerdict::Pass));
        let RequestVerdict::Refuse(r) = PromptCap::on_request(&ctx, chat(&["a much longer prompt text"])) else {
            panic!("refused")
        };
        assert_eq!((r.status, r.code.as_str()), (400, "prompt_too_large"));
        assert!(r.message.contains("at most 20"), "{}", r.message);
        let few = test_context(r#"{"max_messages": 2}"#, false);
        assert!(matches!(PromptCap::on_request(&few, chat(&["a", "b"])), RequestVerdict::Refuse(_)));
    }

    #[test]
    fn trimming_drops_the_oldest_turns_but_keeps_system_and_last() {
        let ctx = test_context(r#"{"max_chars": 30, "trim": true}"#, false);
        let RequestVerdict::Edit(edit) = PromptCap::on_request(&ctx, chat(&["first old turn", "second", "last"]))
        else {
            panic!("trimmed")
        };
        let v: Value = serde_json::from_slice(&edit.body.unwrap()).unwrap();
        let texts: Vec<&str> =
            v["messages"].as_array().unwrap().iter().map(|m| m["content"].as_str().unwrap()).collect();
        assert_eq!(texts, ["be brief", "second", "last"]);
        assert!(matches!(PromptCap::on_request(&ctx, chat(&["x".repeat(40).as_str()])), RequestVerdict::Refuse(_)));
    }
}
