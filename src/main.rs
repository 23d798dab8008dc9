use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;
use wsgate::config::{Config, FlagOverrides, LogFormat};
use wsgate::http::forwarded::TrustedProxies;
use wsgate::probe::{Probe, Trust};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// wsgate: a sharded WebSocket gateway with rooms.
#[derive(Parser)]
#[command(
    version,
    after_help = "Every configuration key (README, Configuration) can be set in the --config \
                  file or as an environment variable WSGATE_<KEY>, e.g. WSGATE_JWT_SECRET, \
                  WSGATE_BROKER=redis, WSGATE_ENGINE=epoll; flags win over the environment, \
                  which wins over the file. --print-config lists every key with its value."
)]
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
    /// Dev mode (no token key configured) on a non-loopback address too (dev_mode = true).
    #[arg(long)]
    dev: bool,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Mint a token with the configured jwt_secret (or --private-key), for scripts and tests.
    Token(TokenArgs),
    /// GET an http:// or https:// URL (default: this gateway's /healthz, over TLS when it serves
    /// TLS); exit 0 on a 2xx answer, 1 otherwise. For container health checks, where no curl is
    /// installed.
    Probe(ProbeArgs),
}

#[derive(Args)]
struct ProbeArgs {
    url: Option<String>,
    /// Probe this gateway's readiness (/readyz: refuses while its broker is away or it drains)
    /// instead of its liveness (/healthz: it serves). A health check that restarts what fails
    /// wants liveness; a load balancer choosing where to send clients wants readiness.
    #[arg(long, conflicts_with = "url")]
    ready: bool,
    /// Trust the CA certificates in this PEM file for an https:// URL (default: the system's).
    #[arg(long, conflicts_with = "insecure", requires = "url")]
    ca: Option<PathBuf>,
    /// Believe any certificate an https:// URL presents (the connection is still encrypted).
    /// Implied when probing this gateway's own listener.
    #[arg(long, requires = "url")]
    insecure: bool,
}

#[derive(Args)]
struct TokenArgs {
    /// The user id (`sub`).
    #[arg(long)]
    user: String,
    /// Display name (default: the user id).
    #[arg(long)]
    username: Option<String>,
    /// Lifetime.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// A role claim; repeat for several.
    #[arg(long = "role")]
    roles: Vec<String>,
    /// A room the token may join (`team-*` matches a prefix); repeat for several. Default: any.
    #[arg(long = "room")]
    rooms: Vec<String>,
    /// Sign with this PEM private key (RSA, EC or Ed25519) instead of jwt_secret.
    #[arg(long)]
    private_key: Option<PathBuf>,
    /// Algorithm for --private-key (default RS256, ES256 or EdDSA by key kind).
    #[arg(long)]
    alg: Option<String>,
}

/// Prints a token signed as `args` asks; the configuration supplies the secret, issuer, audience.
fn mint_token(config: &Config, args: &TokenArgs) -> Result<String, String> {
    let (key, alg) = match &args.private_key {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| format!("--private-key: cannot read {}: {e}", path.display()))?;
            let (key, default_alg) = if let Ok(k) = EncodingKey::from_rsa_pem(&pem) {
                (k, Algorithm::RS256)
            } else if let Ok(k) = EncodingKey::from_ec_pem(&pem) {
                (k, Algorithm::ES256)
            } else if let Ok(k) = EncodingKey::from_ed_pem(&pem) {
                (k, Algorithm::EdDSA)
            } else {
                return Err(format!(
                    "--private-key: {} is not a PEM private key",
                    path.display()
                ));
            };
            let alg = match &args.alg {
                Some(name) => name.parse().map_err(|_| format!("--alg: unknown {name}"))?,
                None => default_alg,
            };
            (key, alg)
        }
        None => {
            let secret = config.jwt_secret.as_ref().ok_or(
                "no jwt_secret configured (dev-mode keys are random per process: ask the running \
                 gateway's GET /dev/token instead), or pass --private-key",
            )?;
            let alg = match &args.alg {
                Some(name) => name.parse().map_err(|_| format!("--alg: unknown {name}"))?,
                None => Algorithm::HS256,
            };
            (EncodingKey::from_secret(secret.expose().as_bytes()), alg)
        }
    };
    let mut claims = wsgate::auth::claims_for(&args.user, args.username.as_deref(), args.ttl);
    claims.roles = args.roles.clone();
    claims.rooms = (!args.rooms.is_empty()).then(|| args.rooms.clone());
    claims.iss = config.jwt_issuer.clone();
    claims.aud = config.jwt_audience.clone().map(serde_json::Value::String);
    jsonwebtoken::encode(&Header::new(alg), &claims, &key).map_err(|e| format!("signing: {e}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let flags = FlagOverrides {
        listen: cli.listen,
        shards: cli.shards,
        dev_mode: cli.dev.then_some(true),
    };
    if let Some(Command::Probe(args)) = &cli.command {
        let (url, how) = probe_target(args, &cli, &flags);
        return match wsgate::probe::probe(&url, &how) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("wsgate probe {url}: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let config = match Config::load(cli.config.as_deref(), &flags)
        .and_then(|config| wsgate::node::preflight(&config).map(|_| config))
    {
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
    if let Some(Command::Token(args)) = &cli.command {
        return match mint_token(&config, args) {
            Ok(token) => {
                println!("{token}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("wsgate token: {e}");
                ExitCode::from(2)
            }
        };
    }
    // Logs go to stderr; stdout carries only the "listening on" line (and `token`'s output).
    let logs = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(&config.log))
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => logs.json().init(),
        // Colour codes only on a terminal: in files and log collectors they are noise.
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
    }
    raise_open_files_limit(&config);

    let signals = match Signals::install() {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!("wsgate: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let config_has_tls = config.tls_cert_file.is_some();
    let log_format = config.log_format;
    let gateway = match wsgate::start(config) {
        Ok(gateway) => gateway,
        Err(e) => {
            // A log line, so that it is JSON with JSON logs.
            error!("cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let scheme = if config_has_tls { "https" } else { "http" };
    let url = format!("{scheme}://{}/", gateway.local_addr());
    // Scripts wait for this line on stdout (its address when the port was 0). With JSON logs it
    // is a JSON object too: collectors that merge stdout and stderr get no line of another kind.
    match log_format {
        LogFormat::Text => println!("wsgate listening on {url}"),
        LogFormat::Json => println!(
            "{}",
            serde_json::json!({
                "level": "INFO",
                "fields": {"message": format!("wsgate listening on {url}"), "url": url},
                "target": "wsgate",
            })
        ),
    }
    // SIGHUP reloads the TLS certificate, on a thread of its own (a read stuck on a file system
    // must not keep SIGTERM from being handled); SIGTERM or SIGINT stop.
    let reload = std::sync::Arc::new(gateway.tls_reloader());
    signals.wait(|| {
        let reload = reload.clone();
        let spawned = std::thread::Builder::new()
            .name("wsgate-reload".into())
            .spawn(move || match reload() {
                Ok(true) => info!("TLS certificate reloaded (SIGHUP)"),
                Ok(false) => info!("SIGHUP: nothing to reload (no TLS configured)"),
                Err(e) => warn!(
                    error = %e,
                    "SIGHUP: cannot reload the TLS certificate; keeping the current one"
                ),
            });
        if let Err(e) = spawned {
            warn!(error = %e, "SIGHUP: cannot start the reload");
        }
    });
    info!(
        connections = gateway.connection_count(),
        "shutting down: closing connections with 1001"
    );
    gateway.shutdown();
    gateway.join();
    info!("stopped");
    ExitCode::SUCCESS
}

/// What `wsgate probe` GETs, and how.
fn probe_target(args: &ProbeArgs, cli: &Cli, flags: &FlagOverrides) -> (String, Probe) {
    if let Some(url) = &args.url {
        let trust = match (&args.ca, args.insecure) {
            (Some(ca), _) => Trust::CaFile(ca.clone().into_boxed_path()),
            (None, true) => Trust::Anyone,
            (None, false) => Trust::System,
        };
        let how = Probe {
            trust,
            proxy_header: false,
        };
        return (url.clone(), how);
    }
    // This gateway's own /healthz (or /readyz). Only its address, whether it serves TLS and
    // whether loopback must send a PROXY header are needed: the flags the gateway runs with are
    // not the probe's (a container's HEALTHCHECK sees its environment only). Its certificate
    // names the public host, not loopback: any is believed.
    let config = Config::load_unchecked(cli.config.as_deref(), flags);
    let mut addr = config.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let scheme = if config.tls_cert_file.is_some() {
        "https"
    } else {
        "http"
    };
    let loopback_is_a_proxy =
        TrustedProxies::parse(&config.trusted_proxies, config.forwarded_header)
            .is_ok_and(|proxies| proxies.trusts(addr.ip()));
    let how = Probe {
        trust: Trust::Anyone,
        proxy_header: config.proxy_protocol && loopback_is_a_proxy,
    };
    let path = if args.ready { "readyz" } else { "healthz" };
    (format!("{scheme}://{addr}/{path}"), how)
}

/// Raises the soft open-files limit to the hard limit: each connection is one file descriptor.
fn raise_open_files_limit(config: &Config) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => info!(
            open_files = limit,
            capacity = wsgate::server::connection_capacity(config),
            "connection capacity (open-files limit less a reserve, and the backend's sockets)"
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
    hangup: Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (terminate, interrupt, hangup) = runtime.block_on(async {
            Ok::<_, std::io::Error>((
                signal(SignalKind::terminate())?,
                signal(SignalKind::interrupt())?,
                signal(SignalKind::hangup())?,
            ))
        })?;
        Ok(Signals {
            runtime,
            terminate,
            interrupt,
            hangup,
        })
    }

    /// Waits for SIGTERM or SIGINT, calling `on_hangup` at each SIGHUP meanwhile.
    fn wait(mut self, on_hangup: impl Fn()) {
        self.runtime.block_on(async {
            loop {
                tokio::select! {
                    _ = self.terminate.recv() => return,
                    _ = self.interrupt.recv() => return,
                    _ = self.hangup.recv() => on_hangup(),
                }
            }
        });
    }
}
