//! The only place that touches `bindgen!` output. The rest of the host uses
//! the re-exports below and the wrapper types in `adapter.rs`/`router.rs`.

mod gen_ {
    pub mod adapter {
        wasmtime::component::bindgen!({
            world: "adapter-plugin",
            path: "../wit",
            exports: { default: async },
        });
    }
    pub mod auth {
        wasmtime::component::bindgen!({
            world: "credential-exchange",
            path: "../wit",
            exports: { default: async },
            with: {
                "wasmgate:plugin/types": super::adapter::wasmgate::plugin::types,
            },
        });
    }
    pub mod codec {
        wasmtime::component::bindgen!({
            world: "resumable-stream",
            path: "../wit",
            exports: { default: async },
            with: {
                "wasmgate:plugin/types": super::adapter::wasmgate::plugin::types,
            },
        });
    }
    pub mod passthrough {
        wasmtime::component::bindgen!({
            world: "passthrough-adapter",
            path: "../wit",
            exports: { default: async },
            with: {
                "wasmgate:plugin/types": super::adapter::wasmgate::plugin::types,
                "wasmgate:plugin/log": super::adapter::wasmgate::plugin::log,
            },
        });
    }
    pub mod filter {
        wasmtime::component::bindgen!({
            world: "filter-plugin",
            path: "../wit",
            exports: { default: async },
            with: {
                "wasmgate:plugin/types": super::adapter::wasmgate::plugin::types,
                "wasmgate:plugin/log": super::adapter::wasmgate::plugin::log,
            },
        });
    }
    pub mod router {
        wasmtime::component::bindgen!({
            world: "router-plugin",
            path: "../wit",
            exports: { default: async },
            with: {
                "wasmgate:plugin/types": super::adapter::wasmgate::plugin::types,
                "wasmgate:plugin/log": super::adapter::wasmgate::plugin::log,
            },
        });
    }
}

pub use gen_::adapter::exports::wasmgate::plugin::adapter::{AdapterInfo, ParsedResponse, Probe, StreamEvents};
pub(crate) use gen_::adapter::wasmgate::plugin::log::Host as LogHost;
pub(crate) use gen_::adapter::wasmgate::plugin::types::Host as TypesHost;
pub(crate) use gen_::adapter::{AdapterPlugin as AdapterWorld, AdapterPluginIndices as AdapterWorldIndices};
pub use gen_::auth::exports::wasmgate::plugin::auth::Credential;
pub(crate) use gen_::auth::wasmgate::plugin::channel_context::{
    Host as ChannelContextHost, add_to_linker as add_channel_context_to_linker,
};
pub(crate) use gen_::auth::wasmgate::plugin::clock::{Host as ClockHost, add_to_linker as add_clock_to_linker};
pub(crate) use gen_::auth::wasmgate::plugin::credentials::{
    Host as CredentialsHost, add_to_linker as add_credentials_to_linker,
};
pub(crate) use gen_::auth::{CredentialExchange as AuthWorld, CredentialExchangeIndices as AuthWorldIndices};
pub use gen_::codec::exports::wasmgate::plugin::stream_codec::Decoded;
pub(crate) use gen_::codec::{ResumableStream as CodecWorld, ResumableStreamIndices as CodecWorldIndices};
pub use gen_::filter::exports::wasmgate::plugin::filter::{
    ChunkAction, ChunkVerdict, FilterContext, FilterInfo, Hook, Refusal, RequestEdit, RequestVerdict, ResponseVerdict,
};
pub(crate) use gen_::filter::{FilterPlugin as FilterWorld, FilterPluginIndices as FilterWorldIndices};
pub use gen_::passthrough::exports::wasmgate::plugin::passthrough::{Operation, PassthroughContext};
pub(crate) use gen_::passthrough::{
    PassthroughAdapter as PassthroughWorld, PassthroughAdapterIndices as PassthroughWorldIndices,
};
pub use gen_::router::exports::wasmgate::plugin::router::{Candidate, RequestMeta, RouterInfo};
pub(crate) use gen_::router::wasmgate::plugin::routing_context::Host as RoutingContextHost;
pub(crate) use gen_::router::{RouterPlugin as RouterWorld, RouterPluginIndices as RouterWorldIndices};

/// Types of the WIT contract, as the host uses them.
pub use gen_::adapter::wasmgate::plugin::types::{
    Channel as ChannelView, Endpoint, ErrorKind, Header, HttpMethod, HttpRequest, HttpResponse, LogLevel,
    RequestContext, UpstreamError, Usage,
};
