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

/// A component implementing `world` of `package`, with every function a
/// trap: a fixture the host must refuse before calling anything.
fn trapping_component(resolve: &wit_parser::Resolve, package: wit_parser::PackageId, world: &str) -> Result<Vec<u8>> {
    use wit_component::{StringEncoding, dummy_module, embed_component_metadata};
    use wit_parser::{LiftLowerAbi, ManglingAndAbi};

    let world = resolve.select_world(&[package], Some(world))?;
    let mut module = dummy_module(resolve, world, ManglingAndAbi::Legacy(LiftLowerAbi::Sync));
    embed_component_metadata(&mut module, resolve, world, StringEncoding::UTF8)?;
    componentize(&module, false)
}

/// The contract in `wit_dir` re-versioned as `wasmgate:plugin@{version}`:
/// proves incompatible plugins are refused with a clear message.
pub fn other_version_fixture(wit_dir: &std::path::Path, world: &str, version: &str) -> Result<Vec<u8>> {
    let tmp = std::env::temp_dir().join(format!("wasmgate-wit-{version}-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    for entry in std::fs::read_dir(wit_dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "wit") {
            let text = reversion(&std::fs::read_to_string(&path)?, version);
            std::fs::write(tmp.join(path.file_name().context("file name")?), text)?;
        }
    }
    let mut resolve = wit_parser::Resolve::default();
    let pushed = resolve.push_dir(&tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    let (package, _) = pushed?;
    trapping_component(&resolve, package, world)
}

/// `text` with every `wasmgate:plugin@X.Y.Z` turned into `@{version}`.
fn reversion(text: &str, version: &str) -> String {
    const PACKAGE: &str = "wasmgate:plugin@";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(PACKAGE) {
        let after = &rest[at + PACKAGE.len()..];
        let old_len = after.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(after.len());
        out.push_str(&rest[..at + PACKAGE.len()]);
        out.push_str(version);
        rest = &after[old_len..];
    }
    out.push_str(rest);
    out
}

/// A valid component of a world that has nothing to do with wasmgate.
pub fn alien_world_fixture() -> Result<Vec<u8>> {
    let wit = "package acme:gadget@1.0.0;\n\
               interface widget { spin: func(speed: u32) -> string; }\n\
               world gadget { export widget; }\n";
    let mut resolve = wit_parser::Resolve::default();
    let package = resolve.push_str("gadget.wit", wit)?;
    trapping_component(&resolve, package, "gadget")
}

/// A component holding one core module of `functions` small functions:
/// a compile bomb (300,000 functions took 39 s and 1.8 GB to compile) that
/// the host must refuse before compiling, or compile within its limits.
pub fn compile_bomb_fixture(functions: u32) -> Vec<u8> {
    use wasm_encoder::{
        CodeSection, Component, Function, FunctionSection, Instruction, Module, ModuleSection, TypeSection, ValType,
    };
    let mut types = TypeSection::new();
    types.ty().function([ValType::I32], [ValType::I32]);
    let mut funcs = FunctionSection::new();
    let mut code = CodeSection::new();
    for i in 0..functions {
        funcs.function(0);
        let mut f = Function::new([]);
        f.instruction(&Instruction::LocalGet(0));
        f.instruction(&Instruction::I32Const(i as i32));
        f.instruction(&Instruction::I32Add);
        f.instruction(&Instruction::I32Const(7));
        f.instruction(&Instruction::I32Mul);
        f.instruction(&Instruction::End);
        code.function(&f);
    }
    let mut module = Module::new();
    module.section(&types).section(&funcs).section(&code);
    let mut component = Component::new();
    component.section(&ModuleSection(&module));
    component.finish()
}

#[cfg(test)]
mod tests {
    #[test]
    fn reversion_replaces_every_package_version() {
        let wit = "package wasmgate:plugin@0.1.2;\nuse wasmgate:plugin@0.1.2/types.{x};";
        assert_eq!(
            super::reversion(wit, "0.2.0"),
            "package wasmgate:plugin@0.2.0;\nuse wasmgate:plugin@0.2.0/types.{x};"
        );
    }
}
