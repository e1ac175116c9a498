//! The `wasmgate` binary.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use tracing_subscriber::EnvFilter;

/// OpenAI-compatible AI gateway with WebAssembly provider adapters.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// TOML configuration file (optional; `WASMGATE_*` variables override it).
    #[arg(long, short, env = "WASMGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on (overrides the configuration).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Data directory (overrides the configuration).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Plugins directory (overrides the configuration).
    #[arg(long)]
    plugins_dir: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let mut config = wasmgate::Config::load(cli.config.as_deref())?;
    if let Some(listen) = cli.listen {
        config.listen = listen;
    }
    if let Some(dir) = cli.data_dir {
        config.data_dir = dir;
    }
    if let Some(dir) = cli.plugins_dir {
        config.plugins_dir = dir;
    }
    wasmgate::run(config).await
}
