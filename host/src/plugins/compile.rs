//! Compiling a component, bounded: a cheap scan refuses oversized files and
//! components with too many functions before any compilation, and the
//! compilation itself runs in a child process (`wasmgate plugin compile`)
//! with an address-space limit and a timeout, so a compile bomb costs the
//! gateway neither its memory nor its CPU for long, and a compiler crash is
//! a rejected plugin instead of a dead gateway.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use wasmtime::component::Component;

use super::engine::{PluginEngine, wasm_config, wasm_err};
use crate::config::PluginConfig;

/// Refuse `bytes` when they exceed the configured size or function count
/// (counted over every core module inside the component).
pub fn check_limits(config: &PluginConfig, bytes: &[u8]) -> Result<(), String> {
    if bytes.len() > config.max_plugin_bytes {
        return Err(format!(
            "the component is {} bytes; plugins are limited to {} bytes (plugins.max_plugin_bytes)",
            bytes.len(),
            config.max_plugin_bytes
        ));
    }
    let mut functions: u64 = 0;
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        match payload {
            Ok(wasmparser::Payload::CodeSectionStart { count, .. }) => functions += u64::from(count),
            Ok(_) => {}
            Err(e) => return Err(format!("not a valid WebAssembly component: {e}")),
        }
        if functions > config.max_plugin_functions {
            return Err(format!(
                "the component defines more than {} functions (plugins.max_plugin_functions)",
                config.max_plugin_functions
            ));
        }
    }
    Ok(())
}

/// Where compilation happens.
#[derive(Debug, Clone)]
pub enum Compiler {
    /// In this process (library users, benchmarks, tests of the library).
    InProcess,
    /// In a child process running this executable's `plugin compile`.
    Child(PathBuf),
}

/// A compiled component and, when it was compiled by a child, the file
/// holding its serialized artifact (to be kept in the cache or deleted).
pub struct Compiled {
    /// The component, ready for this engine.
    pub component: Component,
    /// Serialized artifact written by the child.
    pub artifact: Option<PathBuf>,
}

/// Compile `bytes` for `engine`, using `scratch` for temporary files.
pub fn compile(engine: &PluginEngine, compiler: &Compiler, bytes: &[u8], scratch: &Path) -> Result<Compiled> {
    match compiler {
        Compiler::InProcess => {
            Ok(Compiled { component: Component::new(&engine.engine, bytes).map_err(wasm_err)?, artifact: None })
        }
        Compiler::Child(exe) => compile_in_child(engine, exe, bytes, scratch),
    }
}

fn compile_in_child(engine: &PluginEngine, exe: &Path, bytes: &[u8], scratch: &Path) -> Result<Compiled> {
    std::fs::create_dir_all(scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let stem = format!("compile-{}-{:016x}", std::process::id(), rand::random::<u64>());
    let input = scratch.join(format!("{stem}.wasm"));
    let output = scratch.join(format!("{stem}.cwasm"));
    let cleanup = |paths: &[&Path]| paths.iter().for_each(|p| drop(std::fs::remove_file(p)));
    std::fs::write(&input, bytes).with_context(|| format!("writing {}", input.display()))?;
    let config = &engine.config;
    let result =
        run_child(exe, &input, &output, config.compile_memory_mib, Duration::from_secs(config.compile_timeout_secs));
    cleanup(&[&input]);
    if let Err(e) = result {
        cleanup(&[&output]);
        return Err(e);
    }
    // SAFETY: the file was just written by `Component::serialize` in our own
    // executable (`plugin compile`), into a directory only this gateway
    // writes; wasmtime still checks its header and engine compatibility.
    #[allow(unsafe_code)]
    let component = unsafe { Component::deserialize_file(&engine.engine, &output) }.map_err(wasm_err);
    match component {
        Ok(component) => Ok(Compiled { component, artifact: Some(output) }),
        Err(e) => {
            cleanup(&[&output]);
            Err(e.context("loading the compiled artifact"))
        }
    }
}

fn run_child(exe: &Path, input: &Path, output: &Path, memory_mib: u64, limit: Duration) -> Result<()> {
    let mut child = Command::new(exe)
        .args(["plugin", "compile", "--memory-mib", &memory_mib.to_string()])
        .arg(input)
        .arg(output)
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting the plugin compiler {}", exe.display()))?;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!("compilation took longer than {} s (plugins.compile_timeout_secs)", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    if status.success() {
        return Ok(());
    }
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.by_ref().take(4096).read_to_string(&mut stderr);
    }
    let stderr = stderr.trim();
    if stderr.contains("memory allocation") || stderr.contains("out of memory") || stderr.contains("Cannot allocate") {
        bail!("compilation needed more than {memory_mib} MiB (plugins.compile_memory_mib)");
    }
    match stderr.lines().last() {
        Some(line) if !line.is_empty() => bail!("{line}"),
        _ => bail!("the plugin compiler failed ({status})"),
    }
}

/// The child's side: limit this process's address space, compile `input`
/// with the gateway's engine settings and write the artifact to `output`.
pub fn compile_child(input: &Path, output: &Path, memory_mib: u64) -> Result<()> {
    let bytes = memory_mib.saturating_mul(1024 * 1024);
    let limit = rustix::process::Rlimit { current: Some(bytes), maximum: Some(bytes) };
    rustix::process::setrlimit(rustix::process::Resource::As, limit).context("limiting the compiler's memory")?;
    let engine = wasmtime::Engine::new(&wasm_config()).map_err(wasm_err)?;
    let wasm = std::fs::read(input).with_context(|| format!("reading {}", input.display()))?;
    let artifact = engine.precompile_component(&wasm).map_err(|e| anyhow::anyhow!("compilation failed: {e:#}"))?;
    let tmp = output.with_extension("cwasm.part");
    std::fs::write(&tmp, artifact).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, output)?;
    Ok(())
}
