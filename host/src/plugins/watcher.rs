//! Debounced watcher on the plugins directory: a new, replaced or deleted
//! `*.wasm` file is synced into the registry without a restart.

use std::sync::Arc;
use std::time::Duration;

use notify::RecursiveMode;
use notify_debouncer_mini::{DebounceEventResult, Debouncer, new_debouncer};

use super::registry::Registry;

/// Keeps the watch alive; dropping it stops watching.
pub struct PluginWatcher {
    _debouncer: Debouncer<notify::RecommendedWatcher>,
}

/// Watch the registry's directory, syncing changed files after `debounce`
/// of quiet.
pub fn watch(registry: Arc<Registry>, debounce: Duration) -> anyhow::Result<PluginWatcher> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut debouncer = new_debouncer(debounce, move |events: DebounceEventResult| match events {
        Ok(events) => {
            for event in events {
                let _ = tx.send(event.path);
            }
        }
        Err(e) => tracing::warn!(error = %e, "plugin watcher error"),
    })?;
    debouncer.watcher().watch(registry.dir(), RecursiveMode::NonRecursive)?;
    tokio::spawn(async move {
        while let Some(path) = rx.recv().await {
            if Registry::name_for(&path).is_some() {
                let _ = registry.sync_file(&path).await;
            }
        }
    });
    Ok(PluginWatcher { _debouncer: debouncer })
}
