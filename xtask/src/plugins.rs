//! Building every plugin crate under `plugins/` into `.wasm` components.
//!
//! Shipped plugins land in `plugins/*.wasm` (the gateway's default plugins
//! directory); test fixtures in `target/wasm-fixtures/`. Files are replaced
//! atomically and only when their bytes change, so a running gateway's
//! watcher sees each new version exactly once.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

use crate::componentize::componentize;
use crate::toolchain::{self, CORE_TARGET, Toolchain, WASIP1_TARGET};

/// Crates whose component ships in the default plugins directory:
/// (crate artifact name, plugin file stem).
const SHIPPED: &[(&str, &str)] = &[
    ("openai", "openai"),
    ("azure", "azure"),
    ("anthropic", "anthropic"),
    ("gemini", "gemini"),
    ("baidu", "baidu"),
    ("qwen", "qwen"),
    ("ollama", "ollama"),
    ("weighted", "weighted"),
    ("round_robin", "round-robin"),
    ("latency", "latency"),
    ("affinity", "affinity"),
    ("cheapest", "cheapest"),
    ("block_list", "block-list"),
    ("pii_redact", "pii-redact"),
    ("prompt_cap", "prompt-cap"),
];
/// Test fixtures: (crate artifact name, file stem).
const FIXTURES: &[(&str, &str)] = &[
    ("hostile", "hostile"),
    ("openai_v2", "openai-v2"),
    ("pick_last", "pick-last"),
    ("bad_policy", "bad-policy"),
    ("acme", "acme"),
    ("trap_filter", "trap-filter"),
];

/// Build all plugins and fixtures.
pub fn build_all(root: &Path) -> Result<()> {
    let plugins_dir = root.join("plugins");
    let fixtures = root.join("target/wasm-fixtures");
    fs::create_dir_all(&fixtures)?;

    let chain = toolchain::select(CORE_TARGET)?;
    eprintln!("xtask: building plugins for {CORE_TARGET} with {chain:?}");
    crate::run_checked(&mut toolchain::cargo_build(chain, CORE_TARGET, &plugins_dir))?;
    let out = plugins_dir.join("target").join(CORE_TARGET).join("release");
    for (artifact, stem) in SHIPPED {
        install(&out.join(format!("{artifact}.wasm")), &plugins_dir.join(format!("{stem}.wasm")), false)?;
    }
    for (artifact, stem) in FIXTURES {
        install(&out.join(format!("{artifact}.wasm")), &fixtures.join(format!("{stem}.wasm")), false)?;
    }

    // An adapter built against a future contract version, to be refused.
    let future = crate::componentize::other_version_fixture(&root.join("wit"), "adapter-plugin", "0.2.0")?;
    write_if_changed(&fixtures.join("future-wit.wasm"), &future)?;
    // A valid component of an unrelated world, to be refused.
    write_if_changed(&fixtures.join("alien-world.wasm"), &crate::componentize::alien_world_fixture()?)?;
    // A compile bomb: refused by its function count, or bounded while compiling.
    write_if_changed(&fixtures.join("compile-bomb.wasm"), &crate::componentize::compile_bomb_fixture(300_000))?;

    // Adapters built the way `cargo component` builds them (WASI preview 1
    // + adapter): the openai adapter, to prove such components load, and
    // the fixtures whose misbehaviour needs WASI (stderr, sleeping).
    if let Some(chain) = wasip1_toolchain(chain) {
        let mut cmd = toolchain::cargo_build(chain, WASIP1_TARGET, &plugins_dir);
        cmd.args(["--package", "openai", "--package", "hostile", "--package", "slow-info"]);
        crate::run_checked(&mut cmd)?;
        let out = plugins_dir.join("target").join(WASIP1_TARGET).join("release");
        for (artifact, stem) in [("openai", "openai-wasip1"), ("hostile", "hostile-wasip1"), ("slow_info", "slow-info")]
        {
            install(&out.join(format!("{artifact}.wasm")), &fixtures.join(format!("{stem}.wasm")), true)?;
        }
    } else {
        eprintln!("xtask: no {WASIP1_TARGET} toolchain; skipping the WASI preview 1 fixture");
    }
    // The template built by the real `cargo component build`, when the tool
    // is there; a failure here is reported, not fatal (the golden build in
    // tests/fixtures/compat is tested either way).
    if let Err(e) = crate::cargo_component::build_template(root, chain) {
        eprintln!("xtask: cargo component build of plugins/template failed: {e:#}");
    }
    Ok(())
}

fn wasip1_toolchain(core: Toolchain) -> Option<Toolchain> {
    match core {
        Toolchain::DebianBuildStd => Some(Toolchain::DebianBuildStd),
        Toolchain::Rustup => toolchain::select(WASIP1_TARGET).ok(),
    }
}

/// Componentize `module` and write it to `dest` if its bytes changed.
fn install(module: &Path, dest: &Path, wasip1: bool) -> Result<()> {
    let bytes = fs::read(module).with_context(|| format!("reading {}", module.display()))?;
    let component = componentize(&bytes, wasip1).with_context(|| format!("componentizing {}", module.display()))?;
    write_if_changed(dest, &component)
}

/// Replace `dest` atomically with `component` unless it already holds it.
pub(crate) fn write_if_changed(dest: &Path, component: &[u8]) -> Result<()> {
    if fs::read(dest).is_ok_and(|old| old == component) {
        return Ok(());
    }
    let tmp = dest.with_extension("wasm.tmp");
    fs::write(&tmp, component)?;
    fs::rename(&tmp, dest)?;
    eprintln!("xtask: wrote {} ({} bytes)", dest.display(), component.len());
    Ok(())
}
