//! The `azure` adapter: Azure OpenAI. The wire format is OpenAI's, so this
//! is the PDK's OpenAI-compatible adapter with Azure's addressing:
//! `{base_url}/openai/deployments/{deployment}/chat/completions?api-version=…`,
//! the key in an `api-key` header. The deployment is the upstream model name
//! (use the channel's model mapping to map `gpt-4o` to a deployment name).
//!
//! Channel settings: `api_version` (default `2024-10-21`), plus those of the
//! OpenAI-compatible adapter (`probe_model`, `probe_endpoint`, `headers`).

use serde_json::Value;
use wasmgate_pdk::openai_compat::{self as compat, settings};
use wasmgate_pdk::translate::unsupported;
use wasmgate_pdk::{
    header, Adapter, AdapterInfo, Channel, Endpoint, HttpRequest, HttpResponse, ParsedResponse, Probe, RequestContext,
    UpstreamError,
};

struct Azure;

impl Adapter for Azure {
    type Decoder = compat::OpenAiSseDecoder;

    fn info() -> AdapterInfo {
        AdapterInfo {
            name: "azure".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Azure OpenAI (deployments, api-version, api-key header)".into(),
            endpoints: vec![Endpoint::ChatCompletions, Endpoint::Completions, Endpoint::Embeddings],
            default_models: Vec::new(),
        }
    }

    fn build_request(ctx: &RequestContext, channel: &Channel, body: &[u8]) -> Result<HttpRequest, UpstreamError> {
        if ctx.endpoint == Endpoint::Models {
            return Err(unsupported("Azure OpenAI lists deployments in the Azure portal, not through /models"));
        }
        let mut request = compat::build_request(ctx, channel, body)?;
        let version = settings(channel).get("api_version").and_then(Value::as_str).unwrap_or("2024-10-21").to_string();
        let path = compat::endpoint_path(ctx.endpoint);
        let base = channel.base_url.trim_end_matches('/');
        request.url = format!("{base}/openai/deployments/{}{path}?api-version={version}", ctx.upstream_model);
        request.headers.retain(|h| h.name != "authorization");
        request.headers.push(header("api-key", channel.key.clone()));
        Ok(request)
    }

    fn parse_response(ctx: &RequestContext, response: &HttpResponse) -> Result<ParsedResponse, UpstreamError> {
        compat::parse_response(ctx, response)
    }

    fn classify_error(ctx: &RequestContext, response: &HttpResponse) -> UpstreamError {
        compat::classify_error(ctx, response)
    }

    fn health_probe(channel: &Channel) -> Probe {
        compat::health_probe(channel)
    }
}

wasmgate_pdk::export_adapter!(Azure);
