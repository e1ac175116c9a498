//! A Python virtual environment with the official `openai` SDK, used by the
//! tests that check OpenAI compatibility with a real client.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Result;

/// The SDK version range the tests are written against.
const OPENAI_REQUIREMENT: &str = "openai>=1.40,<4";

/// Create `target/py-venv` with the `openai` package; returns its python.
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
    let has_sdk = Command::new(&python).args(["-c", "import openai"]).output().is_ok_and(|o| o.status.success());
    if !has_sdk {
        crate::run_checked(Command::new(&python).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            OPENAI_REQUIREMENT,
        ]))?;
    }
    Ok(python)
}
