//! The chat completion request the translated protocols (Messages,
//! Responses) are relayed as, serialized straight from typed parts, and the
//! helpers their typed, borrowed reads of the client's body share: no JSON
//! tree is built on the request's worker (`docs/performance.md`).

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::answer::text;
use crate::error::ApiError;

/// A JSON value of the client's body, kept as written (`None` when absent
/// or `null`).
pub type Raw<'a> = Option<&'a RawValue>;

/// A 400 naming `param`.
pub fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request(message).param(param)
}

/// The client's body as `T`, a struct of its top-level fields; anything but
/// a JSON object is refused (serde would take a list for a struct too).
pub fn top_level<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    let refused = || ApiError::bad_request("The request body must be a JSON object.");
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(refused());
    }
    serde_json::from_slice(body).map_err(|_| refused())
}

/// Parse `raw` as `T`, or fail with `error`. Every parse here reads bytes
/// (`from_slice`), as the relay's own parses do, so this path shares their
/// already-warm parser code instead of instantiating a second one.
pub fn read<'a, T: Deserialize<'a>>(raw: &'a RawValue, error: impl FnOnce() -> ApiError) -> Result<T, ApiError> {
    serde_json::from_slice(raw.get().as_bytes()).map_err(|_| error())
}

/// A string parameter (borrowed when it has no escapes), or fail with
/// `error` for any other JSON value.
pub fn string<'a>(raw: &'a RawValue, error: impl FnOnce() -> ApiError) -> Result<Cow<'a, str>, ApiError> {
    let text = text(&mut serde_json::Deserializer::from_slice(raw.get().as_bytes()));
    text.ok().flatten().ok_or_else(error)
}

/// A JSON value as compact JSON text (a tool call's arguments).
pub fn compact(raw: &RawValue) -> String {
    serde_json::from_slice::<serde_json::Value>(raw.get().as_bytes())
        .map_or_else(|_| raw.get().to_string(), |v| v.to_string())
}

/// A JSON literal as a raw value (`true`, `"auto"`, `{}`).
pub fn literal(json: &'static str) -> &'static RawValue {
    serde_json::from_slice(json.as_bytes()).unwrap_or(RawValue::NULL)
}

/// Content the client wrote as a string or as a list.
pub enum InContent<'a> {
    /// A string.
    Text(Cow<'a, str>),
    /// A list, each element as written.
    List(Vec<&'a RawValue>),
}

impl<'a> InContent<'a> {
    /// `raw` as content, if it is a string or a list.
    pub fn parse(raw: &'a RawValue) -> Option<Self> {
        match raw.get().as_bytes().first() {
            Some(b'"') => string(raw, ApiError::internal).ok().map(InContent::Text),
            Some(b'[') => serde_json::from_slice(raw.get().as_bytes()).ok().map(InContent::List),
            _ => None,
        }
    }
}

/// The chat completion request.
#[derive(Serialize)]
pub struct ChatRequest<'a> {
    /// The requested model.
    pub model: Cow<'a, str>,
    /// The conversation.
    pub messages: Vec<ChatMessage<'a>>,
    /// `max_tokens`, as the client wrote its limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Raw<'a>,
    /// As written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Raw<'a>,
    /// As written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Raw<'a>,
    /// Stop sequences, as written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop: Raw<'a>,
    /// The end user, as written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Raw<'a>,
    /// Function tools.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<ChatTool<'a>>>,
    /// `tool_choice`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<ChatToolChoice<'a>>,
    /// As written (or `false` when the client turned parallel calls off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parallel_tool_calls: Raw<'a>,
    /// Structured output.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_format: Option<ResponseFormat<'a>>,
    /// Whether to stream.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
    /// Usage on the last chunk of a stream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
}

impl<'a> ChatRequest<'a> {
    /// A request for `model` with `messages` and nothing else set.
    pub fn new(model: Cow<'a, str>, messages: Vec<ChatMessage<'a>>) -> Self {
        Self {
            model,
            messages,
            max_tokens: None,
            temperature: None,
            top_p: None,
            stop: None,
            user: None,
            tools: None,
            tool_choice: None,
            parallel_tool_calls: None,
            response_format: None,
            stream: false,
            stream_options: None,
        }
    }

    /// Stream, with usage on the last chunk (what billing reads).
    pub fn streamed(mut self, stream: bool) -> Self {
        self.stream = stream;
        self.stream_options = stream.then_some(StreamOptions { include_usage: true });
        self
    }

    /// The request as JSON.
    pub fn to_vec(&self) -> Result<Vec<u8>, ApiError> {
        serde_json::to_vec(self).map_err(|_| ApiError::internal())
    }
}

/// `stream_options`.
#[derive(Serialize)]
pub struct StreamOptions {
    include_usage: bool,
}

/// A chat message.
#[derive(Serialize)]
#[serde(untagged)]
pub enum ChatMessage<'a> {
    /// A message translated from the client's request.
    New(NewMessage<'a>),
    /// A message of a stored conversation, as it was kept.
    Kept(&'a serde_json::Value),
}

/// A chat message translated from the client's request.
#[derive(Serialize)]
#[serde(tag = "role", rename_all = "lowercase")]
pub enum NewMessage<'a> {
    /// Instructions.
    System {
        /// Text or parts.
        content: UserContent<'a>,
    },
    /// The user's turn.
    User {
        /// Text or parts.
        content: UserContent<'a>,
    },
    /// The assistant's turn.
    Assistant {
        /// Its text, if any.
        content: Option<Cow<'a, str>>,
        /// Its tool calls.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        tool_calls: Vec<ToolCall<'a>>,
    },
    /// A tool's result.
    Tool {
        /// The call it answers.
        tool_call_id: Cow<'a, str>,
        /// The result as text.
        content: String,
    },
}

impl<'a> From<NewMessage<'a>> for ChatMessage<'a> {
    fn from(m: NewMessage<'a>) -> Self {
        ChatMessage::New(m)
    }
}

/// A message's content: one text or a list of parts.
#[derive(Serialize)]
#[serde(untagged)]
pub enum UserContent<'a> {
    /// Text.
    Text(Cow<'a, str>),
    /// Parts.
    Parts(Vec<Part<'a>>),
}

impl<'a> UserContent<'a> {
    /// One text part alone reads as text, anything else as parts.
    pub fn of(parts: Vec<Part<'a>>) -> Self {
        match <[Part; 1]>::try_from(parts) {
            Ok([Part::Text { text }]) => UserContent::Text(text),
            Ok(one) => UserContent::Parts(one.into()),
            Err(parts) => UserContent::Parts(parts),
        }
    }
}

/// A content part.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Part<'a> {
    /// Text.
    Text {
        /// The text.
        text: Cow<'a, str>,
    },
    /// An image by URL (or data URL).
    ImageUrl {
        /// The image.
        image_url: ImageUrl<'a>,
    },
}

/// `image_url`.
#[derive(Serialize)]
pub struct ImageUrl<'a> {
    /// A URL or a data URL.
    pub url: Cow<'a, str>,
    /// `detail`, as written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Raw<'a>,
}

/// A tool call of an assistant message.
#[derive(Serialize)]
pub struct ToolCall<'a> {
    /// The call's id.
    pub id: Cow<'a, str>,
    #[serde(rename = "type")]
    kind: &'static str,
    /// The function called.
    pub function: FunctionCall<'a>,
}

impl<'a> ToolCall<'a> {
    /// A function call.
    pub fn function(id: Cow<'a, str>, name: Cow<'a, str>, arguments: Cow<'a, str>) -> Self {
        Self { id, kind: "function", function: FunctionCall { name, arguments } }
    }
}

/// A called function.
#[derive(Serialize)]
pub struct FunctionCall<'a> {
    /// Its name.
    pub name: Cow<'a, str>,
    /// Its arguments, a JSON text.
    pub arguments: Cow<'a, str>,
}

/// A function tool.
#[derive(Serialize)]
pub struct ChatTool<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    function: FunctionDef<'a>,
}

/// A function tool's definition.
#[derive(Serialize)]
pub struct FunctionDef<'a> {
    /// Its name.
    pub name: Cow<'a, str>,
    /// What it does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<Cow<'a, str>>,
    /// Its parameters' JSON schema, as written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Raw<'a>,
    /// Strict schema adherence, as written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strict: Raw<'a>,
}

impl<'a> From<FunctionDef<'a>> for ChatTool<'a> {
    fn from(function: FunctionDef<'a>) -> Self {
        ChatTool { kind: "function", function }
    }
}

/// `tool_choice`.
#[derive(Serialize)]
#[serde(untagged)]
pub enum ChatToolChoice<'a> {
    /// `auto`, `none` or `required`.
    Mode(&'static str),
    /// One named function.
    Function {
        #[serde(rename = "type")]
        /// `function`.
        kind: &'static str,
        /// The function.
        function: FunctionName<'a>,
    },
}

impl<'a> ChatToolChoice<'a> {
    /// The function `name`.
    pub fn function(name: Cow<'a, str>) -> Self {
        ChatToolChoice::Function { kind: "function", function: FunctionName { name } }
    }
}

/// A function's name.
#[derive(Serialize)]
pub struct FunctionName<'a> {
    name: Cow<'a, str>,
}

/// `response_format`.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat<'a> {
    /// Any JSON object.
    JsonObject,
    /// JSON following a schema.
    JsonSchema {
        /// The schema and its name.
        json_schema: JsonSchema<'a>,
    },
}

/// `response_format.json_schema`, each field as written.
#[derive(Serialize)]
pub struct JsonSchema<'a> {
    /// The schema's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Raw<'a>,
    /// The schema.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schema: Raw<'a>,
    /// Strict adherence.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strict: Raw<'a>,
    /// What the schema is for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Raw<'a>,
}
