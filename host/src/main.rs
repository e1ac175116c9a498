//! The `wasmgate` binary.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc's malloc: a tenth of the gateway's CPU went to
/// glibc's allocator under load, and its per-thread arenas kept memory that
/// mimalloc returns (see docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Log line format on stderr: `text` for people, `json` (one object a
    /// line, span fields included) for log shippers.
    #[arg(long, env = "WASMGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Without a command, run the gateway.
    #[command(subcommand)]
    command: Option<Command>,
}

/// `--log-format`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line.
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Copy what several nodes share (channels and their health, the API's
    /// routing/filter/pricing tables, the configuration import's markers,
    /// and with `--plugins` the plugin files) from a stopped node's data
    /// directory into PostgreSQL; idempotent, verified (docs/deployment.md).
    Migrate {
        /// The data directory to copy from (stop its gateway first).
        #[arg(long)]
        from: PathBuf,
        /// The database, `postgres://user:password@host:port/db`.
        #[arg(long)]
        to: String,
        /// The `secrets_key` the nodes will use: upstream keys are sealed with it.
        #[arg(long, env = "WASMGATE_SECRETS_KEY")]
        secrets_key: String,
        /// The `secrets_key` the source store used (default: its key file).
        #[arg(long)]
        from_secrets_key: Option<String>,
        /// A plugins directory whose `*.wasm` go into the shared table too.
        #[arg(long)]
        plugins: Option<PathBuf>,
    },
    /// Work with plugin components.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
}

#[derive(Subcommand, Debug)]
enum PluginCommand {
    /// Validate a component as the hot-swap loader does and run the
    /// conformance suite for its kind; exits 1 when any check fails.
    Check {
        /// The `.wasm` component.
        file: PathBuf,
        /// A directory of the provider's recorded examples (`chat.json`,
        /// `stream.sse` or `stream.ndjson`, `error.json`) to run as well.
        #[arg(long)]
        fixtures: Option<PathBuf>,
        /// A gateway's compiled-plugin cache (`[plugins] cache_dir`): take
        /// the compiled code from it when there, add it when not.
        #[arg(long)]
        cache_dir: Option<PathBuf>,
    },
    /// Start a standalone plugin crate: `Cargo.toml` (size-optimised
    /// release profile), a working `src/lib.rs` and a README.
    New {
        /// `adapter`, `router` or `filter`.
        kind: String,
        /// The plugin's name (its file stem, what channels and policies use).
        name: String,
        /// Where to create the crate's directory.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The directory holding the kits (`pdk/`, `pdk-router/`, `pdk-filter/`) to depend
        /// on by path; default: from git.
        #[arg(long)]
        kits: Option<PathBuf>,
    },
    /// Compile a component into a precompiled artifact, with this process's
    /// address space limited (the gateway runs this in a child process).
    #[command(hide = true)]
    Compile {
        /// The `.wasm` component.
        input: PathBuf,
        /// Where to write the artifact.
        output: PathBuf,
        /// Address-space limit, in MiB.
        #[arg(long, default_value_t = 2048)]
        memory_mib: u64,
    },
}

/// The main thread's runtime is the first request worker (and runs the
/// background tasks); `[server] workers` − 1 more threads serve requests
/// with runtimes of their own.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    // Everything the gateway creates is its user's alone (data directory,
    // journal, plugin cache, key file).
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let cli = Cli::parse();
    let json_logs = cli.log_format == LogFormat::Json;
    if cli.command.is_some() {
        // Subcommands log, but never trace.
        drop(wasmgate::telemetry::init(json_logs, &wasmgate::config::TelemetryConfig::default()));
    }
    match &cli.command {
        Some(Command::Migrate { from, to, secrets_key, from_secrets_key, plugins }) => {
            let (from, to, key, from_key, plugins) =
                (from.clone(), to.clone(), secrets_key.clone(), from_secrets_key.clone(), plugins.clone());
            let report = tokio::task::spawn_blocking(move || {
                wasmgate::store::migrate_pg::migrate(&from, from_key.as_deref(), &to, &key, plugins.as_deref())
            })
            .await??;
            println!(
                "migrated and verified: {} channels, {} options, {} plugins, {} users, {} tokens, {} usage rows, \
                 {} stored responses",
                report.channels,
                report.options,
                report.plugins,
                report.users,
                report.tokens,
                report.log_rows,
                report.responses
            );
            return Ok(());
        }
        Some(Command::Plugin { command: PluginCommand::Check { file, fixtures, cache_dir } }) => {
            let report = wasmgate::plugins::check::check_file(file, fixtures.as_deref(), cache_dir.as_deref()).await;
            println!("{report}");
            std::process::exit(if report.passed() { 0 } else { 1 });
        }
        Some(Command::Plugin { command: PluginCommand::New { kind, name, dir, kits } }) => {
            use wasmgate::plugins::scaffold::{Kind, scaffold};
            let kind = match kind.as_str() {
                "adapter" => Kind::Adapter,
                "router" => Kind::Router,
                "filter" => Kind::Filter,
                other => {
                    eprintln!("cannot scaffold a `{other}`: kinds are `adapter`, `router` and `filter`");
                    std::process::exit(2);
                }
            };
            match scaffold(kind, name, dir, kits.as_deref()) {
                Ok(path) => println!(
                    "created {}
next: cd {} && cargo build --release --target wasm32-wasip2",
                    path.display(),
                    path.display()
                ),
                Err(e) => {
                    eprintln!("{e:#}");
                    std::process::exit(1);
                }
            }
            return Ok(());
        }
        Some(Command::Plugin { command: PluginCommand::Compile { input, output, memory_mib } }) => {
            if let Err(e) = wasmgate::plugins::compile_child(input, output, *memory_mib) {
                eprintln!("{e:#}");
                std::process::exit(1);
            }
            return Ok(());
        }
        None => {}
    }
    let mut config = wasmgate::Config::load(cli.config.as_deref())?;
    // Flushes the last spans when the gateway stops.
    let _telemetry = wasmgate::telemetry::init(json_logs, &config.telemetry);
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
