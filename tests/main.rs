//! wasmgate's integration suite, one test binary for all of it: each module
//! starts the real gateway binary with real compiled plugins against loopback
//! mock upstreams. One binary links wasmtime once instead of once per file,
//! which keeps the suite's build time and disk use down.

mod support;

mod billing;
mod channels_admin;
mod compat;
mod console;
mod database_outage;
mod failover;
mod filters;
mod hardening_billing;
mod hardening_config;
mod hardening_plugins;
mod hardening_server;
mod hardening_storage;
mod hardening_streams;
mod health;
mod hostile_plugins;
mod hot_swap;
mod ingress;
mod multi_node;
mod observability;
mod openai_sdk;
mod other_languages;
mod pdk;
mod plugin_check;
mod providers;
mod relay;
mod relayed;
mod routing;
