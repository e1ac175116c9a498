//! # wasmgate
//!
//! An OpenAI-compatible AI API gateway whose provider adapters and routing
//! policies are WebAssembly components, hot-swapped from a plugins
//! directory. The binary (`main.rs`) is a thin CLI over this library.
//!
//! Modules follow the request's path: [`api`] (HTTP routes and auth) →
//! [`relay`] (validation, retries, failover, streaming) → [`routing`]
//! (candidates, policy plugins, live statistics) → [`plugins`] (the wasm
//! host), with [`channels`] / [`store`] for data.

pub mod api;
pub mod billing;
pub mod channels;
pub mod config;
pub mod console;
pub mod error;
pub mod filters;
pub mod health;
pub mod ingress;
mod lingering;
pub mod listener;
pub mod metrics;
pub mod plugins;
#[cfg(test)]
mod props;
pub mod relay;
pub mod relayed;
pub mod request;
pub mod routing;
pub mod server;
pub mod state;
pub mod store;
pub mod telemetry;
#[cfg(test)]
mod testing;
mod worker_balance;

pub use config::Config;
pub use server::{Gateway, build, run};
