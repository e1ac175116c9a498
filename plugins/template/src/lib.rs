//! Template adapter `acme`: an OpenAI-compatible provider that takes its key
//! in an `x-api-key` header and, when the channel's settings name one
//! (`{"tenant": "..."}`), a tenant id in an `x-acme-tenant` header. Everything else —
//! request rewriting, usage, streaming, error classification, the health
//! probe — is the PDK's OpenAI-compatible adapter.
//!
//! `wasmgate plugin new adapter NAME` starts a crate from this file; see
//! docs/plugins.md.

use wasmgate_pdk::openai_compat::{self, settings, OpenAiCompat, OpenAiSseDecoder};
use wasmgate_pdk::serde_json::Value;
use wasmgate_pdk::{
    header, Adapter, AdapterInfo, Channel, HttpRequest, HttpResponse, ParsedResponse, Probe, RequestContext,
    UpstreamError,
};

struct Acme;

impl Adapter for Acme {
    /// The provider streams OpenAI's SSE chunks, so OpenAI's decoder works.
    type Decoder = OpenAiSseDecoder;

    fn info() -> AdapterInfo {
        AdapterInfo {
            name: "acme".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "ACME Inference (OpenAI-compatible, x-api-key auth)".into(),
            ..OpenAiCompat::info()
        }
    }

    fn build_request(ctx: &RequestContext, channel: &Channel, body: &[u8]) -> Result<HttpRequest, UpstreamError> {
        let mut request = openai_compat::build_request(ctx, channel, body)?;
        request.headers.retain(|h| h.name != "authorization");
        request.headers.push(header("x-api-key", channel.key.clone()));
        if let Some(tenant) = settings(channel).get("tenant").and_then(Value::as_str) {
            request.headers.push(header("x-acme-tenant", tenant));
        }
        Ok(request)
    }

    fn parse_response(ctx: &RequestContext, response: &HttpResponse) -> Result<ParsedResponse, UpstreamError> {
        openai_compat::parse_response(ctx, response)
    }

    fn classify_error(ctx: &RequestContext, response: &HttpResponse) -> UpstreamError {
        openai_compat::classify_error(ctx, response)
    }

    fn health_probe(channel: &Channel) -> Probe {
        openai_compat::health_probe(channel)
    }
}

wasmgate_pdk::export_adapter!(Acme);
