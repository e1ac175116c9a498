//! The client's request: validated just enough to route it. The body itself
//! travels to the adapter as the original bytes, unknown fields included.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::ApiError;
use crate::plugins::Endpoint;

/// A validated client request.
#[derive(Debug, Clone)]
pub struct ClientRequest {
    /// Endpoint called.
    pub endpoint: Endpoint,
    /// Requested model.
    pub model: String,
    /// `"stream": true`.
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    /// The body as received.
    pub body: Bytes,
}

#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(borrow)]
    stream: Option<&'a RawValue>,
    #[serde(borrow)]
    stream_options: Option<&'a RawValue>,
    #[serde(borrow)]
    messages: Option<&'a RawValue>,
    #[serde(borrow)]
    input: Option<&'a RawValue>,
    #[serde(borrow)]
    prompt: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

fn is_null(v: Option<&RawValue>) -> bool {
    v.is_none_or(|v| v.get() == "null")
}

fn starts_with(v: &RawValue, c: char) -> bool {
    v.get().trim_start().starts_with(c)
}

fn require(v: Option<&RawValue>, name: &str) -> Result<(), ApiError> {
    if is_null(v) {
        return Err(ApiError::bad_request(format!("Missing required parameter: '{name}'.")).param(name));
    }
    Ok(())
}

impl ClientRequest {
    /// Validate `body` for `endpoint`.
    pub fn parse(endpoint: Endpoint, body: Bytes) -> Result<Self, ApiError> {
        let first = body.iter().find(|b| !b.is_ascii_whitespace());
        if first != Some(&b'{') {
            return Err(ApiError::bad_request(
                "We could not parse the JSON body of your request: it must be a JSON object.",
            ));
        }
        let head: Head<'_> = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("We could not parse the JSON body of your request: {e}.")))?;

        require(head.model, "model")?;
        let model: String =
            head.model.and_then(|m| serde_json::from_str(m.get()).ok()).filter(|m: &String| !m.is_empty()).ok_or_else(
                || ApiError::bad_request("Invalid type for 'model': expected a non-empty string.").param("model"),
            )?;

        let stream = match head.stream {
            None => false,
            Some(v) => match v.get() {
                "true" => true,
                "false" | "null" => false,
                _ => {
                    return Err(ApiError::bad_request("Invalid type for 'stream': expected a boolean.").param("stream"));
                }
            },
        };
        let include_usage = match head.stream_options.filter(|v| v.get() != "null") {
            None => false,
            Some(v) => serde_json::from_str::<StreamOptions>(v.get())
                .map_err(|_| {
                    ApiError::bad_request("Invalid type for 'stream_options': expected an object.")
                        .param("stream_options")
                })?
                .include_usage
                .unwrap_or(false),
        };

        match endpoint {
            Endpoint::ChatCompletions => {
                require(head.messages, "messages")?;
                let messages = head.messages.filter(|m| starts_with(m, '[')).ok_or_else(|| {
                    ApiError::bad_request("Invalid type for 'messages': expected an array.").param("messages")
                })?;
                if messages.get().trim_start()[1..].trim_start().starts_with(']') {
                    return Err(
                        ApiError::bad_request("'messages' must contain at least one message.").param("messages")
                    );
                }
            }
            Endpoint::Embeddings => require(head.input, "input")?,
            Endpoint::Completions => require(head.prompt, "prompt")?,
            Endpoint::Models => {}
        }
        if stream && endpoint == Endpoint::Embeddings {
            return Err(ApiError::bad_request("Embeddings cannot be streamed.").param("stream"));
        }
        Ok(Self { endpoint, model, stream, include_usage, body })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<ClientRequest, ApiError> {
        ClientRequest::parse(Endpoint::ChatCompletions, Bytes::from(body.to_string()))
    }

    #[test]
    fn accepts_valid_chat() {
        let r = parse(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true},"x":1}"#)
            .expect("valid");
        assert_eq!(r.model, "m");
        assert!(r.stream && r.include_usage);
    }

    #[test]
    fn rejects_bad_input_with_param() {
        for (body, param) in [
            (r#"{"messages":[{"role":"user","content":"hi"}]}"#, Some("model")),
            (r#"{"model":5,"messages":[]}"#, Some("model")),
            (r#"{"model":"m","messages":"hi"}"#, Some("messages")),
            (r#"{"model":"m","messages":[]}"#, Some("messages")),
            (r#"{"model":"m","messages":[{}],"stream":"yes"}"#, Some("stream")),
            (r#"[1,2]"#, None),
            ("not json", None),
            (r#"{"model":"m","#, None),
        ] {
            let e = parse(body).expect_err(body);
            assert_eq!(e.status, 400, "{body}");
            assert_eq!(e.param.as_deref(), param, "{body}");
        }
    }
}
