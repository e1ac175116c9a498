//! A loaded routing policy.

use std::sync::Arc;

use super::bindings::{Candidate, RequestMeta, RouterInfo, RouterWorldPre};
use super::engine::PluginEngine;
use super::error::PluginError;
use super::state::{PluginState, RoutingFacts};

/// A routing policy ready to serve calls.
pub struct RouterPlugin {
    /// Plugin name (file stem).
    pub name: Arc<str>,
    /// SHA-256 of the component file, hex.
    pub sha256: String,
    /// What `info()` returned at load time.
    pub info: RouterInfo,
    pre: RouterWorldPre<PluginState>,
    engine: Arc<PluginEngine>,
}

impl RouterPlugin {
    pub(crate) fn new(
        name: Arc<str>,
        sha256: String,
        pre: RouterWorldPre<PluginState>,
        engine: Arc<PluginEngine>,
    ) -> Result<Self, PluginError> {
        let info = {
            let mut store = engine.store(name.clone());
            let world = pre.instantiate(&mut store).map_err(|e| PluginError::instantiate(&name, e))?;
            world.wasmgate_plugin_router().call_info(&mut store).map_err(|e| PluginError::from_wasm(&name, e))?
        };
        Ok(Self { name, sha256, info, pre, engine })
    }

    /// `select`, with the result checked: every index in range and unique.
    /// `facts` is what the policy can ask `routing-context` for.
    pub fn select(
        &self,
        meta: &RequestMeta,
        candidates: &[Candidate],
        facts: RoutingFacts,
    ) -> Result<Vec<usize>, PluginError> {
        let mut store = self.engine.store(self.name.clone());
        store.data_mut().routing = facts;
        let world = self.pre.instantiate(&mut store).map_err(|e| PluginError::instantiate(&self.name, e))?;
        let order = world
            .wasmgate_plugin_router()
            .call_select(&mut store, meta, candidates)
            .map_err(|e| PluginError::from_wasm(&self.name, e))?;
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
}
