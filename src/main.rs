use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;
use wsgate::config::{Config, FlagOverrides};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Sockets kept back from the open-files limit for listeners, the runtime and logs.
const RESERVED_FDS: u64 = 64;

/// wsgate: a sharded WebSocket gateway with rooms.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// TOML configuration file (every key can also be set as WSGATE_<KEY>).
    #[arg(long, env = "WSGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Number of shards (threads) [default: number of cores].
    #[arg(long)]
    shards: Option<usize>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let flags = FlagOverrides {
        listen: cli.listen,
        shards: cli.shards,
    };
    let config = match Config::load(cli.config.as_deref(), &flags) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("wsgate: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.print_config {
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(&config.log))
        .init();
    raise_open_files_limit();

    let signals = match Signals::install() {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!("wsgate: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let gateway = match wsgate::start(config) {
        Ok(gateway) => gateway,
        Err(e) => {
            eprintln!("wsgate: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("wsgate listening on http://{}/", gateway.local_addr());
    signals.wait();
    info!(
        connections = gateway.connection_count(),
        "shutting down: closing connections with 1001"
    );
    gateway.shutdown();
    gateway.join();
    info!("stopped");
    ExitCode::SUCCESS
}

/// Raises the soft open-files limit to the hard limit: each connection is one file descriptor.
fn raise_open_files_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => info!(
            open_files = limit,
            capacity = limit.saturating_sub(RESERVED_FDS),
            "connection capacity (open-files limit less a reserve)"
        ),
        Err(e) => warn!(error = %e, "cannot raise the open-files limit"),
    }
}

/// SIGTERM and SIGINT, listened for from before the gateway announces itself: a signal that
/// arrives early must start a graceful shutdown, not kill the process.
struct Signals {
    runtime: tokio::runtime::Runtime,
    terminate: Signal,
    interrupt: Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (terminate, interrupt) = runtime.block_on(async {
            Ok::<_, std::io::Error>((
                signal(SignalKind::terminate())?,
                signal(SignalKind::interrupt())?,
            ))
        })?;
        Ok(Signals {
            runtime,
            terminate,
            interrupt,
        })
    }

    fn wait(mut self) {
        self.runtime.block_on(async {
            tokio::select! {
                _ = self.terminate.recv() => {}
                _ = self.interrupt.recv() => {}
            }
        });
    }
}
