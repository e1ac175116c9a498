//! Turning a compiled core module into a component (what `cargo component`
//! does), with `wit-component`.

use anyhow::{Context, Result};
use wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER;

/// Encode `module` as a component. WIT worlds come from the `component-type`
/// custom sections wit-bindgen embedded; a WASI preview 1 module also gets
/// the preview 1 → preview 2 adapter. A component is returned unchanged.
pub fn componentize(module: &[u8], wasip1: bool) -> Result<Vec<u8>> {
    if wasmparser::Parser::is_component(module) {
        return Ok(module.to_vec());
    }
    let mut encoder = wit_component::ComponentEncoder::default()
        .validate(true)
        .module(module)
        .context("reading the module's component-type sections")?;
    if wasip1 {
        encoder = encoder
            .adapter("wasi_snapshot_preview1", WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER)
            .context("adding the WASI preview 1 adapter")?;
    }
    encoder.encode().context("encoding the component")
}
