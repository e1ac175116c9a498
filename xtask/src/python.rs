//! A Python virtual environment with the official `openai`, `anthropic`
//! and `google-genai` SDKs, used by the tests that check compatibility with
//! real clients, Playwright, which drives Debian's Chromium through the
//! console (it never downloads a browser of its own), and componentize-py,
//! which builds the Python adapter of `examples/`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Result;

/// The SDK version ranges the tests are written against.
const REQUIREMENTS: [&str; 5] = [
    "openai>=1.40,<4",
    "anthropic>=0.40,<1",
    "google-genai>=1.0,<2",
    "playwright>=1.40,<2",
    crate::examples::COMPONENTIZE_PY,
];

/// Create `target/py-venv` with the SDKs; returns its python.
pub fn ensure_venv(root: &Path) -> Result<PathBuf> {
    let venv = root.join("target/py-venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        let made = Command::new("python3").args(["-m", "venv"]).arg(&venv).status().is_ok_and(|s| s.success());
        if !made {
            // Debian's system Python ships venv separately.
            let _ = std::fs::remove_dir_all(&venv);
            crate::run_checked(
                Command::new("apt-get")
                    .args(["install", "-y", "-qq", "python3-venv"])
                    .env("DEBIAN_FRONTEND", "noninteractive"),
            )?;
            crate::run_checked(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        }
    }
    let has_sdk = Command::new(&python)
        .args(["-c", "import openai, anthropic, google.genai, playwright, componentize_py"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_sdk {
        crate::run_checked(
            Command::new(&python)
                .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
                .args(REQUIREMENTS),
        )?;
    }
    Ok(python)
}
