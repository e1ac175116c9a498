//! A loaded routing policy.

use std::sync::Arc;

use wasmtime::component::InstancePre;

use super::adapter::NO_KEY;
use super::bindings::{Candidate, RequestMeta, RouterInfo, RouterWorld, RouterWorldIndices};
use super::engine::PluginEngine;
use super::error::PluginError;
use super::instance::{Instances, plugin_call};
use super::state::{CallInputs, PluginState, RoutingFacts};

/// A routing policy ready to serve calls.
pub struct RouterPlugin {
    /// Plugin name (file stem).
    pub name: Arc<str>,
    /// SHA-256 of the component file, hex.
    pub sha256: String,
    /// What `info()` returned at load time.
    pub info: RouterInfo,
    instances: Instances<RouterWorld>,
}

impl RouterPlugin {
    /// Calls made on this version and how many failed (trap, timeout,
    /// fuel, memory, instantiation), for `GET /api/plugins`.
    pub fn call_counts(&self) -> (u64, u64) {
        self.instances.call_counts()
    }

    /// Prepare the policy compiled into `pre` and call `info()`.
    pub(crate) async fn new(
        name: Arc<str>,
        sha256: String,
        pre: InstancePre<PluginState>,
        engine: Arc<PluginEngine>,
    ) -> Result<Self, PluginError> {
        let indices = RouterWorldIndices::new(&pre);
        let instances = Instances::of_world(engine, name.clone(), pre, "router-plugin", indices, |i, store, inst| {
            i.load(store, inst)
        })?;
        let info = plugin_call!("info", instances, NO_KEY, 0, CallInputs::default(), |store, b| b
            .wasmgate_plugin_router()
            .call_info(store))?;
        instances.set_version(&info.version);
        Ok(Self { name, sha256, info, instances })
    }

    /// `select`, with the result checked: every index in range and unique.
    /// `facts` is what the policy can ask `routing-context` for.
    pub async fn select(
        &self,
        meta: &RequestMeta,
        candidates: &[Candidate],
        facts: RoutingFacts,
    ) -> Result<Vec<usize>, PluginError> {
        let input = std::mem::size_of_val(candidates) + meta.model.len() + meta.group.len();
        let order = plugin_call!("select", self.instances, NO_KEY, input, CallInputs::default(), |store, b| {
            store.data_mut().routing = facts;
            b.wasmgate_plugin_router().call_select(store, meta, candidates)
        })?;
        let mut seen = vec![false; candidates.len()];
        let mut out = Vec::with_capacity(order.len());
        for index in order {
            let i = index as usize;
            if i >= candidates.len() || std::mem::replace(&mut seen[i], true) {
                return Err(PluginError::malformed(&self.name, format!("invalid or repeated index {index}")));
            }
            out.push(i);
        }
        Ok(out)
    }

    /// Take every idle instance out of service (the plugin is replaced).
    pub(crate) fn retire(&self) {
        let _ = self.instances.clear();
    }
}
