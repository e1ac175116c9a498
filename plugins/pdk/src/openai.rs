//! Serde types for the OpenAI API shapes adapters read and write.
//!
//! Every struct keeps the fields it does not name in `extra`, so a value
//! parsed and serialized again loses nothing.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::Usage;

/// `POST /v1/chat/completions` request body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatCompletionRequest {
    /// Model name.
    pub model: String,
    /// Conversation so far.
    pub messages: Vec<ChatMessage>,
    /// Stream the answer as Server-Sent Events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    /// Options for streaming (`include_usage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    /// Maximum number of tokens to generate (legacy name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Maximum number of tokens to generate, reasoning included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    /// Sampling temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Nucleus sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Number of choices to generate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    /// Stop sequence(s): a string or a list of strings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Value>,
    /// Tools the model may call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Value>>,
    /// Tool choice (`"auto"`, `"none"`, `"required"` or a named function).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<Value>,
    /// Response format (`{"type":"json_object"}` etc.).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<Value>,
    /// Every other field, kept as is.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `stream_options` of a request.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StreamOptions {
    /// Ask for a final chunk carrying usage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_usage: Option<bool>,
    /// Every other field, kept as is.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One chat message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    pub role: String,
    /// Text, or a list of content parts (text, image_url, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<Value>,
    /// Tool calls made by the assistant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<Value>>,
    /// The call a `tool` message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// Every other field, kept as is.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A `chat.completion` response (or a chunk of a stream: same envelope).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatCompletion {
    /// Completion id.
    pub id: String,
    /// `chat.completion` or `chat.completion.chunk`.
    pub object: String,
    /// Unix time of creation.
    pub created: u64,
    /// Model that answered.
    pub model: String,
    /// Choices (for chunks: deltas).
    pub choices: Vec<Value>,
    /// Usage, when reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<OpenAiUsage>,
    /// Every other field, kept as is.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// OpenAI's `usage` object.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OpenAiUsage {
    /// Prompt tokens.
    #[serde(default)]
    pub prompt_tokens: u32,
    /// Generated tokens.
    #[serde(default)]
    pub completion_tokens: u32,
    /// Total tokens.
    #[serde(default)]
    pub total_tokens: u32,
    /// Breakdown of the prompt tokens (cached tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
    /// Every other field, kept as is.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from cache.
    #[serde(default)]
    pub cached_tokens: u32,
}

impl OpenAiUsage {
    /// Convert to the WIT usage record.
    pub fn to_usage(&self) -> Usage {
        let total = if self.total_tokens == 0 {
            self.prompt_tokens.saturating_add(self.completion_tokens)
        } else {
            self.total_tokens
        };
        Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            cached_tokens: self.prompt_tokens_details.as_ref().map_or(0, |d| d.cached_tokens),
            total_tokens: total,
        }
    }
}

/// OpenAI's error envelope: `{"error": {...}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The inside of OpenAI's error envelope.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Human-readable message.
    #[serde(default)]
    pub message: String,
    /// Error type, e.g. `invalid_request_error`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Offending parameter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param: Option<Value>,
    /// Machine-readable code, e.g. `rate_limit_exceeded` (sometimes a number).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<Value>,
}

impl ErrorDetail {
    /// The code as a string, whatever JSON type the upstream used.
    pub fn code_str(&self) -> Option<String> {
        match &self.code {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        }
    }
}

/// Just enough of a response or chunk to find usage and in-band errors
/// without materialising the rest.
#[derive(Debug, Default, Deserialize)]
pub struct Envelope {
    /// Usage, when present and not null.
    #[serde(default)]
    pub usage: Option<OpenAiUsage>,
    /// In-band error, when present.
    #[serde(default)]
    pub error: Option<ErrorDetail>,
    /// Choices, counted only.
    #[serde(default)]
    pub choices: Option<Vec<serde::de::IgnoredAny>>,
}
