//! The client's request, read once: one pass over the body validates it,
//! extracts what admission and routing need (model, stream flags, the
//! completion limit, `n`) and tallies the size of the prompt for the quota
//! estimate, without copying any text. The body itself travels to the
//! adapter as the original bytes, unknown fields included.
//!
//! The tally counts UTF-8 bytes of prompt text: every token of a
//! byte-level BPE tokenizer is at least one byte, so bytes bound the
//! prompt's tokens from above. Images and other binary parts are not text;
//! each counts a fixed number of tokens ([`IMAGE_TOKENS`]).

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::error::ApiError;
use crate::plugins::Endpoint;

/// Tokens counted for one image (or other binary part) of a prompt: above
/// what OpenAI charges for a high-detail image of the largest size.
pub const IMAGE_TOKENS: u64 = 1_500;
/// Largest `n` accepted (OpenAI's own limit).
pub const MAX_N: u64 = 128;

/// How big a prompt is, for the estimate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PromptSize {
    /// UTF-8 bytes of text (an upper bound of its tokens).
    pub text_bytes: u64,
    /// Tokens given as token ids (`prompt`/`input` as integer arrays).
    pub token_ids: u64,
    /// Images, audio and files.
    pub binary_parts: u64,
    /// Chat messages (each costs a few tokens of framing).
    pub messages: u64,
}

impl PromptSize {
    /// An upper bound of the prompt's tokens.
    pub fn token_bound(&self) -> u64 {
        self.text_bytes
            .saturating_add(self.token_ids)
            .saturating_add(self.binary_parts.saturating_mul(IMAGE_TOKENS))
            .saturating_add(self.messages.saturating_mul(4))
            .saturating_add(3)
    }

    /// The prompt's tokens at the rate of ordinary English text (about
    /// four bytes a token): what a stream cut by a crash is billed.
    pub fn typical_tokens(&self) -> u64 {
        self.text_bytes
            .div_ceil(4)
            .saturating_add(self.token_ids)
            .saturating_add(self.binary_parts.saturating_mul(IMAGE_TOKENS))
            .saturating_add(self.messages.saturating_mul(3))
            .saturating_add(3)
    }
}

/// A validated client request.
#[derive(Debug, Clone)]
pub struct ClientRequest {
    /// Endpoint called.
    pub endpoint: Endpoint,
    /// The route the client called, for metrics (`chat_completions`, or
    /// `responses`, `messages`, `gemini` for translated requests).
    pub route: &'static str,
    /// Requested model.
    pub model: String,
    /// `"stream": true`.
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    /// `max_completion_tokens`, else `max_tokens`, when given.
    pub max_tokens: Option<u64>,
    /// `n` (1 when absent).
    pub n: u64,
    /// Size of the prompt.
    pub prompt: PromptSize,
    /// The `user` field, when given.
    pub user: Option<String>,
    /// The body as received.
    pub body: Bytes,
    /// The client's session, for routing affinity: the `x-session-id`
    /// header (set by the handler), else the body's `prompt_cache_key`,
    /// else its `user`.
    pub session: Option<Arc<str>>,
    /// The gateway's id of the request (`x-request-id`): it goes into the
    /// usage rows and the adapter's context; logs get it from the request's
    /// span.
    pub request_id: String,
    /// Set for the rest of the OpenAI surface (images, audio, moderations,
    /// rerank), relayed without translation: see `relayed.rs`.
    pub relayed: Option<crate::relayed::Relayed>,
    /// The client's own request in a protocol some providers speak
    /// natively (Anthropic Messages): a channel whose adapter relays it
    /// gets it unchanged; any other serves the translated `body`.
    pub native: Option<crate::relayed::Native>,
}

/// The fields read out of the body.
#[derive(Default)]
struct Head<'a> {
    model: Option<Option<Cow<'a, str>>>,
    stream: Option<Option<bool>>,
    include_usage: Option<bool>,
    max_tokens: Option<Option<u64>>,
    max_completion_tokens: Option<Option<u64>>,
    n: Option<Option<u64>>,
    user: Option<Option<Cow<'a, str>>>,
    prompt_cache_key: Option<Option<Cow<'a, str>>>,
    /// What `messages` was.
    messages: Option<Msgs>,
    /// `prompt`/`input` was present (not null).
    prompt_given: bool,
    input_given: bool,
    size: PromptSize,
}

/// An error naming a parameter.
fn invalid(param: &str, what: &str) -> String {
    format!("\u{0}{param}\u{0}Invalid type for '{param}': expected {what}.")
}

impl<'de> Visitor<'de> for &mut Head<'de> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            let dup = |given: bool| {
                if given { Err(de::Error::custom(format_args!("duplicate key `{key}`"))) } else { Ok(()) }
            };
            match key.as_ref() {
                "model" => {
                    dup(self.model.is_some())?;
                    self.model = Some(
                        map.next_value::<Option<Cow<'de, str>>>()
                            .map_err(|_| de::Error::custom(invalid("model", "a non-empty string")))?,
                    );
                }
                "stream" => {
                    dup(self.stream.is_some())?;
                    self.stream = Some(
                        map.next_value::<Option<bool>>()
                            .map_err(|_| de::Error::custom(invalid("stream", "a boolean")))?,
                    );
                }
                "stream_options" => {
                    dup(self.include_usage.is_some())?;
                    let options = map
                        .next_value::<Option<StreamOptions>>()
                        .map_err(|_| de::Error::custom(invalid("stream_options", "an object")))?;
                    self.include_usage = Some(options.and_then(|o| o.include_usage).unwrap_or(false));
                }
                "max_tokens" => {
                    dup(self.max_tokens.is_some())?;
                    self.max_tokens = Some(count(&mut map, "max_tokens")?);
                }
                "max_completion_tokens" => {
                    dup(self.max_completion_tokens.is_some())?;
                    self.max_completion_tokens = Some(count(&mut map, "max_completion_tokens")?);
                }
                "n" => {
                    dup(self.n.is_some())?;
                    self.n = Some(count(&mut map, "n")?);
                }
                "user" => {
                    dup(self.user.is_some())?;
                    self.user = Some(
                        map.next_value::<Option<Cow<'de, str>>>()
                            .map_err(|_| de::Error::custom(invalid("user", "a string")))?,
                    );
                }
                "prompt_cache_key" => {
                    dup(self.prompt_cache_key.is_some())?;
                    self.prompt_cache_key = Some(
                        map.next_value::<Option<Cow<'de, str>>>()
                            .map_err(|_| de::Error::custom(invalid("prompt_cache_key", "a string")))?,
                    );
                }
                "messages" => {
                    dup(self.messages.is_some())?;
                    self.messages = Some(map.next_value_seed(Messages(&mut self.size))?);
                }
                "prompt" | "input" => {
                    let given = if key == "prompt" { &mut self.prompt_given } else { &mut self.input_given };
                    dup(*given)?;
                    *given = map.next_value_seed(Tally(&mut self.size))?;
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// The next value as an optional [`Count`], the error naming `param`.
fn count<'de, A: MapAccess<'de>>(map: &mut A, param: &str) -> Result<Option<u64>, A::Error> {
    map.next_value::<Option<Count>>()
        .map(|c| c.map(|c| c.0))
        .map_err(|_| de::Error::custom(invalid(param, "a non-negative integer")))
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// A non-negative integer, also written as an integral float (`1.0`).
struct Count(u64);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Count;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a non-negative integer")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Count, E> {
                Ok(Count(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Count, E> {
                u64::try_from(v).map(Count).map_err(|_| E::custom("a negative integer"))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Count, E> {
                if v.is_finite() && v >= 0.0 && v.fract() == 0.0 {
                    // Saturates above u64::MAX; limits refuse it later.
                    Ok(Count(v as u64))
                } else {
                    Err(E::custom("not a non-negative integer"))
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// Tallies a whole JSON value into a [`PromptSize`]: string bytes,
/// integers (token ids), and binary parts (objects keyed `image_url`,
/// `input_audio`, `file`, `image`, `source`, `inline_data`), whose content
/// is skipped. Returns whether the value was not null.
struct Tally<'s>(&'s mut PromptSize);

const BINARY_KEYS: [&str; 7] = ["image_url", "input_audio", "file", "image", "source", "inline_data", "audio"];

impl<'de> de::DeserializeSeed<'de> for Tally<'_> {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Tally<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_none<E>(self) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_bool<E>(self, _: bool) -> Result<bool, E> {
        Ok(true)
    }
    fn visit_u64<E>(self, _: u64) -> Result<bool, E> {
        self.0.token_ids = self.0.token_ids.saturating_add(1);
        Ok(true)
    }
    fn visit_i64<E>(self, _: i64) -> Result<bool, E> {
        self.0.token_ids = self.0.token_ids.saturating_add(1);
        Ok(true)
    }
    fn visit_f64<E>(self, _: f64) -> Result<bool, E> {
        Ok(true)
    }
    fn visit_str<E>(self, v: &str) -> Result<bool, E> {
        self.0.text_bytes = self.0.text_bytes.saturating_add(v.len() as u64);
        Ok(true)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        while seq.next_element_seed(Tally(&mut *self.0))?.is_some() {}
        Ok(true)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            if BINARY_KEYS.contains(&key.as_ref()) {
                map.next_value::<IgnoredAny>()?;
                self.0.binary_parts = self.0.binary_parts.saturating_add(1);
            } else {
                map.next_value_seed(Tally(&mut *self.0))?;
            }
        }
        Ok(true)
    }
}

/// What `messages` held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Msgs {
    Null,
    NotArray,
    Array(u64),
}

/// `messages`: an array, each element tallied.
struct Messages<'s>(&'s mut PromptSize);

impl<'de> de::DeserializeSeed<'de> for Messages<'_> {
    type Value = Msgs;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Msgs, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Messages<'_> {
    type Value = Msgs;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of messages")
    }
    fn visit_unit<E>(self) -> Result<Msgs, E> {
        Ok(Msgs::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Msgs, A::Error> {
        let mut n = 0u64;
        while seq.next_element_seed(Tally(&mut *self.0))?.is_some() {
            n += 1;
        }
        self.0.messages = n;
        Ok(Msgs::Array(n))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Msgs, A::Error> {
        Tally(&mut *self.0).visit_map(map)?;
        Ok(Msgs::NotArray)
    }
    fn visit_str<E>(self, _: &str) -> Result<Msgs, E> {
        Ok(Msgs::NotArray)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Msgs, E> {
        Ok(Msgs::NotArray)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Msgs, E> {
        Ok(Msgs::NotArray)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Msgs, E> {
        Ok(Msgs::NotArray)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Msgs, E> {
        Ok(Msgs::NotArray)
    }
}

fn missing(name: &str) -> ApiError {
    ApiError::bad_request(format!("Missing required parameter: '{name}'.")).param(name)
}

/// A serde error as the client's 400: errors raised with [`invalid`] carry
/// the parameter they concern.
fn parse_error(e: &serde_json::Error) -> ApiError {
    let text = e.to_string();
    if let Some(rest) = text.strip_prefix('\u{0}')
        && let Some((param, message)) = rest.split_once('\u{0}')
    {
        let message = message.split(" at line ").next().unwrap_or(message);
        return ApiError::bad_request(message.to_string()).param(param);
    }
    ApiError::bad_request(format!("We could not parse the JSON body of your request: {text}."))
}

impl ClientRequest {
    /// Whether the client speaks another protocol than chat completions,
    /// translated to and from it (`responses`, `messages`, `gemini`): its
    /// stream is handed to the route as a [`crate::relay::PendingStream`].
    pub fn translated(&self) -> bool {
        matches!(self.route, "responses" | "messages" | "gemini")
    }

    /// Validate `body` for `endpoint`: one pass, no copy of its text.
    pub fn parse(endpoint: Endpoint, body: Bytes) -> Result<Self, ApiError> {
        let first = body.iter().find(|b| !b.is_ascii_whitespace());
        if first != Some(&b'{') {
            return Err(ApiError::bad_request(
                "We could not parse the JSON body of your request: it must be a JSON object.",
            ));
        }
        let mut head = Head::default();
        {
            let mut de = serde_json::Deserializer::from_slice(&body);
            // Deep nesting is refused by serde_json's recursion limit (128).
            (&mut de).deserialize_map(&mut head).map_err(|e| parse_error(&e))?;
            de.end().map_err(|e| parse_error(&e))?;
        }
        let model = match head.model.flatten() {
            None => return Err(missing("model")),
            Some(m) if m.is_empty() => {
                return Err(
                    ApiError::bad_request("Invalid type for 'model': expected a non-empty string.").param("model")
                );
            }
            Some(m) => m.into_owned(),
        };
        let stream = head.stream.flatten().unwrap_or(false);
        let n = head.n.flatten().unwrap_or(1);
        if n == 0 || n > MAX_N {
            return Err(ApiError::bad_request(format!("'n' must be between 1 and {MAX_N}.")).param("n"));
        }
        let max_tokens = head.max_completion_tokens.flatten().or(head.max_tokens.flatten());
        if max_tokens == Some(0) {
            let param =
                if head.max_completion_tokens.flatten().is_some() { "max_completion_tokens" } else { "max_tokens" };
            return Err(ApiError::bad_request(format!("'{param}' must be at least 1.")).param(param));
        }
        match endpoint {
            Endpoint::ChatCompletions => match head.messages {
                None | Some(Msgs::Null) => return Err(missing("messages")),
                Some(Msgs::NotArray) => {
                    return Err(
                        ApiError::bad_request("Invalid type for 'messages': expected an array.").param("messages")
                    );
                }
                Some(Msgs::Array(0)) => {
                    return Err(
                        ApiError::bad_request("'messages' must contain at least one message.").param("messages")
                    );
                }
                _ => {}
            },
            Endpoint::Embeddings if !head.input_given => return Err(missing("input")),
            Endpoint::Completions if !head.prompt_given => return Err(missing("prompt")),
            _ => {}
        }
        if stream && endpoint == Endpoint::Embeddings {
            return Err(ApiError::bad_request("Embeddings cannot be streamed.").param("stream"));
        }
        Ok(Self {
            endpoint,
            route: crate::relay::endpoint_name(endpoint),
            model,
            stream,
            include_usage: head.include_usage.unwrap_or(false),
            max_tokens,
            n,
            prompt: head.size,
            session: head.prompt_cache_key.flatten().or_else(|| head.user.clone().flatten()).map(|s| Arc::from(&*s)),
            user: head.user.flatten().map(Cow::into_owned),
            body,
            request_id: String::new(),
            relayed: None,
            native: None,
        })
    }

    /// The request, known by the gateway's id `request_id`.
    pub fn with_id(mut self, request_id: String) -> Self {
        self.request_id = request_id;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<ClientRequest, ApiError> {
        ClientRequest::parse(Endpoint::ChatCompletions, Bytes::from(body.to_string()))
    }

    #[test]
    fn accepts_valid_chat_and_tallies_its_prompt() {
        let r = parse(
            r#"{"model":"m","messages":[{"role":"user","content":"hi"},{"role":"user","content":[{"type":"text","text":"abc"},{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]}],"stream":true,"stream_options":{"include_usage":true},"max_tokens":7.0,"n":2,"x":1}"#,
        )
        .expect("valid");
        assert_eq!(r.model, "m");
        assert!(r.stream && r.include_usage);
        assert_eq!((r.max_tokens, r.n), (Some(7), 2));
        assert_eq!(r.prompt.messages, 2);
        assert_eq!(r.prompt.binary_parts, 1);
        // "user" "hi" "user" "text" "abc" "image_url" (the type's value)
        assert_eq!(r.prompt.text_bytes, 4 + 2 + 4 + 4 + 3 + 9);
        assert!(r.prompt.token_bound() >= 2 + 3 + IMAGE_TOKENS);
    }

    #[test]
    fn rejects_bad_input_with_param() {
        for (body, param) in [
            (r#"{"messages":[{"role":"user","content":"hi"}]}"#, Some("model")),
            (r#"{"model":5,"messages":[]}"#, Some("model")),
            (r#"{"model":"m","messages":"hi"}"#, Some("messages")),
            (r#"{"model":"m","messages":[]}"#, Some("messages")),
            (r#"{"model":"m","messages":[{}],"stream":"yes"}"#, Some("stream")),
            (r#"{"model":"m","messages":[{}],"n":0}"#, Some("n")),
            (r#"{"model":"m","messages":[{}],"n":129}"#, Some("n")),
            (r#"{"model":"m","messages":[{}],"max_tokens":0}"#, Some("max_tokens")),
            (r#"[1,2]"#, None),
            ("not json", None),
            (r#"{"model":"m","#, None),
            (r#"{"model":"m","messages":[{}],"max_tokens":1.5}"#, Some("max_tokens")),
            (r#"{"model":"m","messages":[{}],"max_tokens":-1}"#, Some("max_tokens")),
            (r#"{"model":"m","messages":[{}],"n":"2"}"#, Some("n")),
            (r#"{"model":"m","model":"n","messages":[{}]}"#, None),
            (r#"{"model":"m","messages":[{}],"max_tokens":1,"max_tokens":2}"#, None),
        ] {
            let e = parse(body).expect_err(body);
            assert_eq!(e.status, 400, "{body}");
            assert_eq!(e.param.as_deref(), param, "{body}: {}", e.message);
        }
    }

    #[test]
    fn huge_numbers_saturate_instead_of_wrapping() {
        let r = parse(r#"{"model":"m","messages":[{}],"max_tokens":18446744073709551615}"#).expect("parses");
        assert_eq!(r.max_tokens, Some(u64::MAX));
        let r = parse(r#"{"model":"m","messages":[{}],"max_tokens":1e300}"#).expect("parses");
        assert_eq!(r.max_tokens, Some(u64::MAX));
    }
}
