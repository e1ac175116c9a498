//! # wasmgate-pdk — write a wasmgate provider adapter in a page of Rust
//!
//! A provider adapter is a WebAssembly component implementing the
//! `wasmgate:plugin/adapter@0.1.6` interface (see `wit/adapter.wit`). This
//! crate hides the generated bindings: implement [`Adapter`] (and a
//! [`StreamDecoder`]) on a type and register it with [`export_adapter!`].
//! The component also exports `stream-codec` (see `wit/stream.wit`): the
//! decoder's state is serialized between calls, so an open stream costs the
//! host a few bytes instead of a plugin instance.
//!
//! ```ignore
//! struct MyProvider;
//! impl wasmgate_pdk::Adapter for MyProvider { /* ... */ }
//! wasmgate_pdk::export_adapter!(MyProvider);
//! ```
//!
//! Helpers for the common cases live in [`openai`] (serde types for the
//! OpenAI shapes), [`sse`] (an incremental Server-Sent Events parser),
//! [`openai_compat`] (a complete OpenAI-compatible adapter to reuse or wrap)
//! and [`log`].

#[doc(hidden)]
pub mod codec;
pub mod log;
pub mod openai;
pub mod openai_compat;
#[cfg(test)]
mod props;
pub mod raw;
pub mod sse;
pub mod testing;
pub mod translate;
mod util;

pub use util::{error, header, json_bytes, origin_url};

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "pdk-adapter-plugin",
        path: "wit",
        // Decoder states hold some of these types (usage, errors) and are
        // serialized between `stream-codec` calls.
        additional_derives: [serde::Serialize, serde::Deserialize],
        pub_export_macro: true,
        export_macro_name: "__export_adapter_world",
        default_bindings_module: "wasmgate_pdk::bindings",
    });
}

pub use bindings::exports::wasmgate::plugin::adapter::{AdapterInfo, ParsedResponse, Probe, StreamEvents};
pub use bindings::exports::wasmgate::plugin::auth::Credential;
pub use bindings::exports::wasmgate::plugin::passthrough::{Operation, PassthroughContext};
pub use bindings::wasmgate::plugin::types::{
    Channel, Endpoint, ErrorKind, Header, HttpMethod, HttpRequest, HttpResponse, LogLevel, RequestContext,
    UpstreamError, Usage,
};

/// The version of the WIT contract this kit implements.
pub const WIT_VERSION: &str = "0.1.6";

/// The contract this kit implements, as the host names it.
pub const CONTRACT: &str = "wasmgate:plugin@0.1.6";

// What adapters need besides the kit, re-exported so that an author's crate
// depends on the kit alone (and on the same versions).
pub use serde;
pub use serde_json;

/// A provider adapter: pure translation between OpenAI's API and a provider's.
///
/// Adapters keep no state between calls: the host may call each function on
/// a fresh instance or on one that served earlier calls of the same channel
/// key. A stream's state lives in its [`StreamDecoder`], which the host
/// keeps (serialized) between the calls of one stream.
pub trait Adapter {
    /// The decoder turning this provider's stream into OpenAI chunks.
    type Decoder: StreamDecoder;

    /// Name, version and capabilities; called at load time as validation.
    fn info() -> AdapterInfo;

    /// Translate the client's OpenAI request body into the upstream request.
    fn build_request(ctx: &RequestContext, channel: &Channel, body: &[u8]) -> Result<HttpRequest, UpstreamError>;

    /// Translate a 2xx upstream response into an OpenAI body plus usage.
    fn parse_response(ctx: &RequestContext, response: &HttpResponse) -> Result<ParsedResponse, UpstreamError>;

    /// Classify a non-2xx upstream response.
    fn classify_error(ctx: &RequestContext, response: &HttpResponse) -> UpstreamError;

    /// The request that tests whether a channel is healthy.
    fn health_probe(channel: &Channel) -> Probe;

    /// For providers whose key must first be traded for a short-lived
    /// credential: the request that does it. The host sends it, caches what
    /// [`Adapter::parse_exchange`] returns until it expires, and hands it to
    /// `build_request` through [`credential`]. Default: no exchange.
    fn exchange_request(_channel: &Channel) -> Option<HttpRequest> {
        None
    }

    /// Read the credential out of the exchange response (any status).
    fn parse_exchange(_channel: &Channel, _response: &HttpResponse) -> Result<Credential, UpstreamError> {
        Err(error(ErrorKind::Other, "this adapter exchanges no credentials", None))
    }

    /// The operations of the rest of the OpenAI surface (images, audio,
    /// moderations, rerank) this adapter relays (since 0.1.6). Default:
    /// none — the host never routes them to this adapter's channels.
    fn operations() -> Vec<Operation> {
        Vec::new()
    }

    /// The upstream request relaying the client's `body` for one of
    /// [`Adapter::operations`]; the upstream's answer goes back to the
    /// client as it is. Default: refused.
    fn build_passthrough(
        _ctx: &PassthroughContext,
        _channel: &Channel,
        _body: &[u8],
    ) -> Result<HttpRequest, UpstreamError> {
        Err(error(ErrorKind::BadRequest, "this provider does not serve this operation", None))
    }
}

/// The credential the host obtained for this call's channel key through
/// [`Adapter::exchange_request`], if any.
pub fn credential() -> Option<String> {
    bindings::wasmgate::plugin::credentials::current()
}

/// The settings of the channel this call is about, as a JSON object (`{}`
/// when it has none) — also in calls that get no `channel` argument
/// (`parse_response`, `classify_error`, stream decoding). Added in WIT 0.1.4.
#[cfg(target_family = "wasm")]
pub fn channel_settings() -> serde_json::Map<String, serde_json::Value> {
    serde_json::from_str(&bindings::wasmgate::plugin::channel_context::settings()).unwrap_or_default()
}

/// No host when a plugin's code runs natively (its unit tests): no settings.
#[cfg(not(target_family = "wasm"))]
pub fn channel_settings() -> serde_json::Map<String, serde_json::Value> {
    serde_json::Map::new()
}

/// Incremental decoder of one upstream stream into OpenAI chunks.
///
/// Between two calls the decoder is serialized (JSON) and handed to the
/// host, which passes it back with the next bytes: derive
/// `serde::Serialize` and `serde::Deserialize`, and keep it small (partial
/// lines, ids, counters — not the text generated so far).
pub trait StreamDecoder: serde::Serialize + serde::de::DeserializeOwned {
    /// Start decoding the stream of the request described by `ctx`.
    fn new(ctx: RequestContext) -> Self;
    /// Consume the next bytes of the upstream body (split anywhere).
    fn feed(&mut self, bytes: &[u8]) -> Result<StreamEvents, UpstreamError>;
    /// The upstream body ended: flush anything buffered.
    fn finish(&mut self) -> Result<StreamEvents, UpstreamError>;
}

impl StreamEvents {
    /// No chunks, no usage, no error, not done.
    pub fn empty() -> Self {
        StreamEvents { chunks: Vec::new(), usage: None, error: None, done: false }
    }
}

/// Register `$ty` (an [`Adapter`]) as this component's adapter export.
#[macro_export]
macro_rules! export_adapter {
    ($ty:ty) => {
        #[doc(hidden)]
        pub struct __WasmgateAdapter;

        #[doc(hidden)]
        pub struct __WasmgateDecoder(
            ::core::cell::RefCell<<$ty as $crate::Adapter>::Decoder>,
        );

        impl $crate::bindings::exports::wasmgate::plugin::adapter::Guest for __WasmgateAdapter {
            type StreamDecoder = __WasmgateDecoder;

            fn info() -> $crate::AdapterInfo {
                <$ty as $crate::Adapter>::info()
            }
            fn build_request(
                ctx: $crate::RequestContext,
                channel: $crate::Channel,
                body: ::std::vec::Vec<u8>,
            ) -> ::core::result::Result<$crate::HttpRequest, $crate::UpstreamError> {
                <$ty as $crate::Adapter>::build_request(&ctx, &channel, &body)
            }
            fn parse_response(
                ctx: $crate::RequestContext,
                response: $crate::HttpResponse,
            ) -> ::core::result::Result<$crate::ParsedResponse, $crate::UpstreamError> {
                <$ty as $crate::Adapter>::parse_response(&ctx, &response)
            }
            fn classify_error(
                ctx: $crate::RequestContext,
                response: $crate::HttpResponse,
            ) -> $crate::UpstreamError {
                <$ty as $crate::Adapter>::classify_error(&ctx, &response)
            }
            fn health_probe(channel: $crate::Channel) -> $crate::Probe {
                <$ty as $crate::Adapter>::health_probe(&channel)
            }
        }

        impl $crate::bindings::exports::wasmgate::plugin::adapter::GuestStreamDecoder
            for __WasmgateDecoder
        {
            fn new(ctx: $crate::RequestContext) -> Self {
                Self(::core::cell::RefCell::new(
                    <<$ty as $crate::Adapter>::Decoder as $crate::StreamDecoder>::new(ctx),
                ))
            }
            fn feed(
                &self,
                bytes: ::std::vec::Vec<u8>,
            ) -> ::core::result::Result<$crate::StreamEvents, $crate::UpstreamError> {
                $crate::StreamDecoder::feed(&mut *self.0.borrow_mut(), &bytes)
            }
            fn finish(&self) -> ::core::result::Result<$crate::StreamEvents, $crate::UpstreamError> {
                $crate::StreamDecoder::finish(&mut *self.0.borrow_mut())
            }
        }

        impl $crate::bindings::exports::wasmgate::plugin::stream_codec::Guest for __WasmgateAdapter {
            fn decode(
                ctx: $crate::RequestContext,
                state: ::std::vec::Vec<u8>,
                bytes: ::std::vec::Vec<u8>,
            ) -> ::core::result::Result<$crate::codec::Decoded, $crate::UpstreamError> {
                $crate::codec::decode::<<$ty as $crate::Adapter>::Decoder>(ctx, &state, &bytes)
            }
            fn finish(
                ctx: $crate::RequestContext,
                state: ::std::vec::Vec<u8>,
            ) -> ::core::result::Result<$crate::codec::Decoded, $crate::UpstreamError> {
                $crate::codec::finish::<<$ty as $crate::Adapter>::Decoder>(ctx, &state)
            }
        }

        impl $crate::bindings::exports::wasmgate::plugin::auth::Guest for __WasmgateAdapter {
            fn exchange_request(channel: $crate::Channel) -> ::core::option::Option<$crate::HttpRequest> {
                <$ty as $crate::Adapter>::exchange_request(&channel)
            }
            fn parse_exchange(
                channel: $crate::Channel,
                response: $crate::HttpResponse,
            ) -> ::core::result::Result<$crate::Credential, $crate::UpstreamError> {
                <$ty as $crate::Adapter>::parse_exchange(&channel, &response)
            }
        }

        impl $crate::bindings::exports::wasmgate::plugin::passthrough::Guest for __WasmgateAdapter {
            fn operations() -> ::std::vec::Vec<$crate::Operation> {
                <$ty as $crate::Adapter>::operations()
            }
            fn build_passthrough(
                ctx: $crate::PassthroughContext,
                channel: $crate::Channel,
                body: ::std::vec::Vec<u8>,
            ) -> ::core::result::Result<$crate::HttpRequest, $crate::UpstreamError> {
                <$ty as $crate::Adapter>::build_passthrough(&ctx, &channel, &body)
            }
        }

        $crate::bindings::__export_adapter_world!(__WasmgateAdapter with_types_in $crate::bindings);
    };
}
