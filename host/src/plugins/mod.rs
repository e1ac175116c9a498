//! The WebAssembly plugin host: engine, bindings, instances, loading, the
//! hot-swap registry.

mod adapter;
mod bindings;
mod cache;
pub mod check;
mod compile;
mod engine;
mod epoch_ticker;
mod error;
mod filter;
mod instance;
mod loader;
mod registry;
mod router;
pub mod scaffold;
mod shared;
mod state;
mod watcher;

pub use adapter::{AdapterPlugin, AdapterResult, AdapterStream, NO_KEY};
pub use bindings::{Candidate, Credential, Operation, PassthroughContext, RequestMeta, StreamEvents};
pub use bindings::{
    ChannelView, Endpoint, ErrorKind, Header, HttpMethod, HttpRequest, HttpResponse, LogLevel, RequestContext,
    UpstreamError, Usage,
};
pub use bindings::{
    ChunkAction, ChunkVerdict, FilterContext, FilterInfo, Hook, Refusal, RequestEdit, RequestVerdict, ResponseVerdict,
};
pub use cache::ArtifactCache;
pub use compile::{Compiler, compile_child};
pub use engine::{CallBudget, PluginEngine};
pub use error::PluginError;
pub use filter::{FilterPlugin, MAX_FILTER_STATE};
pub use loader::{
    LoadReport, LoadedPlugin, PluginKind, WIT_PACKAGE, WIT_VERSION, load, sha256_hex, valid_name as valid_plugin_name,
};
pub use registry::{PluginSet, PluginStatus, Registry};
pub use router::RouterPlugin;
pub use shared::{PLUGINS_NOTIFY, SharedPlugins};
pub use state::{Affinity, AffinityCaller, RoutingFacts};
pub use watcher::{PluginWatcher, watch};
