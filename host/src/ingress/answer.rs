//! What the translators read of a relayed, non-streamed chat completion,
//! borrowed from its body where the JSON allows: one typed pass, no JSON
//! tree (the answer is translated on the request's worker).

use std::borrow::Cow;

use axum::response::Response;
use bytes::Bytes;
use serde::Deserialize;

use super::chat_stream::{Delta, ToolCallDelta};
use crate::error::ApiError;

/// A chat completion answer. Its message has the fields of a stream
/// chunk's delta, read the same way ([`Delta`], [`ToolCallDelta`]).
#[derive(Debug, Default, Deserialize)]
pub struct ChatAnswer<'a> {
    /// The choices; translators read the first.
    #[serde(default, borrow, deserialize_with = "or_default")]
    pub choices: Vec<AnswerChoice<'a>>,
    /// The usage the upstream reported.
    #[serde(default, deserialize_with = "usage")]
    pub usage: Option<ChatUsage>,
}

/// One choice of an answer.
#[derive(Debug, Default, Deserialize)]
pub struct AnswerChoice<'a> {
    /// The assistant's message (text, reasoning, tool calls).
    #[serde(default, borrow, deserialize_with = "or_default")]
    pub message: Delta<'a>,
    /// Why the choice ended.
    #[serde(default, borrow, deserialize_with = "text")]
    pub finish_reason: Option<Cow<'a, str>>,
}

/// A chat completion's usage as the translators read it: typed, every
/// count 0 when missing, null or not a non-negative integer.
#[derive(Debug, Default, Clone, Copy, PartialEq, Deserialize)]
pub struct ChatUsage {
    /// Prompt tokens, cached ones included.
    #[serde(default, deserialize_with = "count")]
    pub prompt_tokens: u64,
    /// Generated tokens, reasoning included.
    #[serde(default, deserialize_with = "count")]
    pub completion_tokens: u64,
    /// `cached_tokens`.
    #[serde(default, deserialize_with = "or_default")]
    pub prompt_tokens_details: PromptDetails,
    /// `reasoning_tokens`.
    #[serde(default, deserialize_with = "or_default")]
    pub completion_tokens_details: CompletionDetails,
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Deserialize)]
pub struct PromptDetails {
    /// Prompt tokens read from the provider's cache.
    #[serde(default, deserialize_with = "count")]
    pub cached_tokens: u64,
}

/// `usage.completion_tokens_details`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Deserialize)]
pub struct CompletionDetails {
    /// Generated tokens spent reasoning.
    #[serde(default, deserialize_with = "count")]
    pub reasoning_tokens: u64,
}

impl ChatUsage {
    /// Prompt tokens not read from the cache.
    pub fn uncached_prompt(&self) -> u64 {
        self.prompt_tokens.saturating_sub(self.prompt_tokens_details.cached_tokens)
    }

    /// Prompt plus generated tokens.
    pub fn total(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }
}

/// Visitor methods for the JSON shapes a lenient field does not want:
/// each consumes the value and reads as `$value`. `$de` is the visitor's
/// input lifetime; the shapes are listed by name.
macro_rules! other_shapes_read_as {
    ($de:lifetime, $value:expr; $($shape:ident),*) => { $(other_shapes_read_as!(@ $de, $value, $shape);)* };
    (@ $de:lifetime, $value:expr, unit) => {
        fn visit_unit<E>(self) -> Result<Self::Value, E> { Ok($value) }
        fn visit_none<E>(self) -> Result<Self::Value, E> { Ok($value) }
    };
    (@ $de:lifetime, $value:expr, bool) => { fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> { Ok($value) } };
    (@ $de:lifetime, $value:expr, i64) => { fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> { Ok($value) } };
    (@ $de:lifetime, $value:expr, u64) => { fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> { Ok($value) } };
    (@ $de:lifetime, $value:expr, f64) => { fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> { Ok($value) } };
    (@ $de:lifetime, $value:expr, str) => { fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> { Ok($value) } };
    (@ $de:lifetime, $value:expr, seq) => {
        fn visit_seq<A: serde::de::SeqAccess<$de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
            Ok($value)
        }
    };
    (@ $de:lifetime, $value:expr, map) => {
        fn visit_map<A: serde::de::MapAccess<$de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            while map.next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?.is_some() {}
            Ok($value)
        }
    };
}

/// A `usage` field: an object reads as [`ChatUsage`], anything else as
/// absent (an odd usage never loses the frame it came in).
pub(crate) fn usage<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<ChatUsage>, D::Error> {
    struct Usage;
    impl<'de> serde::de::Visitor<'de> for Usage {
        type Value = Option<ChatUsage>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            ChatUsage::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Some)
        }
        other_shapes_read_as!('de, None; unit, bool, i64, u64, f64, str, seq);
    }
    d.deserialize_any(Usage)
}

/// A token count: a non-negative integer; any other JSON value reads as 0.
fn count<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    struct Count;
    impl<'de> serde::de::Visitor<'de> for Count {
        type Value = u64;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_u64<E>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }
        other_shapes_read_as!('de, 0; unit, bool, i64, f64, str, seq, map);
    }
    d.deserialize_any(Count)
}

/// A string field, borrowed when it has no escapes; any other JSON value
/// reads as absent.
pub(crate) fn text<'de: 'a, 'a, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Cow<'a, str>>, D::Error> {
    struct Text;
    impl<'de> serde::de::Visitor<'de> for Text {
        type Value = Option<Cow<'de, str>>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Borrowed(v)))
        }
        fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Owned(v.to_string())))
        }
        fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
            Ok(Some(Cow::Owned(v)))
        }
        other_shapes_read_as!('de, None; unit, bool, i64, u64, f64, seq, map);
    }
    d.deserialize_any(Text)
}

/// A field whose `null` reads as its default (serde's `default` covers
/// only a missing field).
pub(crate) fn or_default<'de, D: serde::Deserializer<'de>, T: Deserialize<'de> + Default>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

impl<'a> ChatAnswer<'a> {
    /// Parse a relayed answer's `body`; anything but a chat completion
    /// object is the adapter's fault.
    pub fn parse(body: &'a [u8]) -> Result<Self, ApiError> {
        serde_json::from_slice(body).map_err(|error| {
            tracing::warn!(%error, "a relayed answer is not a chat completion");
            ApiError::plugin()
        })
    }

    /// The first choice's message text, reasoning, tool calls and finish
    /// reason (empty when there is no choice).
    pub fn message(&self) -> (&str, &str, &[ToolCallDelta<'a>], Option<&str>) {
        let choice = self.choices.first();
        let message = choice.map(|c| &c.message);
        (
            message.and_then(|m| m.content.as_deref()).unwrap_or_default(),
            message.and_then(|m| m.reasoning_content.as_deref()).unwrap_or_default(),
            message.map(|m| m.tool_calls.as_slice()).unwrap_or_default(),
            choice.and_then(|c| c.finish_reason.as_deref()),
        )
    }
}

/// The body of a relayed, non-streamed answer.
pub async fn body(response: Response) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(response.into_body(), super::MAX_ANSWER_BYTES).await.map_err(|error| {
        tracing::warn!(%error, "reading a relayed answer failed");
        ApiError::internal()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nulls_and_missing_parts_read_as_empty() {
        let body = br#"{"choices":[{"message":{"content":null,"tool_calls":null},"finish_reason":null}],"usage":null}"#;
        let answer = ChatAnswer::parse(body).expect("parses");
        assert_eq!(answer.message(), ("", "", &[][..], None));
        let body = br#"{"choices":[{"message":{"content":"hi","tool_calls":[{"id":"c1","function":{"name":"f","arguments":"{}"}}]},"finish_reason":"tool_calls"}]}"#;
        let answer = ChatAnswer::parse(body).expect("parses");
        let (text, _, calls, finish) = answer.message();
        assert_eq!((text, calls[0].parts(), finish), ("hi", ("c1", "f", "{}"), Some("tool_calls")));
        assert!(ChatAnswer::parse(b"[1]").is_err());
        // Text in another shape (a list of parts, a number) reads as none, not as a broken answer.
        let body = br#"{"choices":[{"message":{"content":[{"type":"text","text":"x"}],"tool_calls":[{"function":{"name":"f","arguments":{"a":1}}}]},"finish_reason":7}]}"#;
        let answer = ChatAnswer::parse(body).expect("parses");
        let (text, _, calls, finish) = answer.message();
        assert_eq!((text, calls[0].parts(), finish), ("", ("", "f", ""), None));
        let escaped = ChatAnswer::parse(br#"{"choices":[{"message":{"content":"a\nb"}}]}"#).expect("parses");
        assert_eq!(escaped.message().0, "a\nb");
    }

    #[test]
    fn usage_reads_typed_with_odd_counts_as_zero_and_odd_shapes_as_absent() {
        let body = br#"{"choices":[],"usage":{"prompt_tokens":10,"completion_tokens":-1,"prompt_tokens_details":{"cached_tokens":4},"completion_tokens_details":null,"total_tokens":"x"}}"#;
        let usage = ChatAnswer::parse(body).expect("parses").usage.expect("usage");
        assert_eq!(
            (usage.prompt_tokens, usage.completion_tokens, usage.uncached_prompt(), usage.total()),
            (10, 0, 6, 10)
        );
        assert_eq!(usage.completion_tokens_details.reasoning_tokens, 0);
        for odd in [&br#"{"usage":[1,2]}"#[..], br#"{"usage":"n/a"}"#, br#"{"usage":7}"#, br#"{"usage":null}"#] {
            assert_eq!(ChatAnswer::parse(odd).expect("parses").usage, None);
        }
    }
}
