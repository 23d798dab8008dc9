//! wsgate's load generator. Every run is bounded in connections and time, and targets loopback.

mod client;
mod fanout;
mod report;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::client::Failure;
use crate::report::{ConnectReport, EchoReport};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(version, about = "Load generator for wsgate")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Open N connections, hold them idle, report handshake latency and the gateway's memory.
    Connect(ConnectArgs),
    /// Closed-loop echo: each connection sends a message and waits for it to come back, for a
    /// duration; reports round-trip latency and messages per second (and per gateway CPU-second).
    Echo(EchoArgs),
    /// Subscribers in rooms and publishers sending to them: publish-to-receive latency,
    /// deliveries per second, and exact loss, duplicate and out-of-order counts.
    Fanout(FanoutArgs),
}

#[derive(Args)]
struct Common {
    /// Gateway address; repeat for several nodes (connections are spread round-robin).
    #[arg(long = "target", default_value = "127.0.0.1:8080", required = true)]
    targets: Vec<SocketAddr>,
    /// WebSocket path.
    #[arg(long, default_value = "/ws")]
    path: String,
    /// A token to present (as `?token=`), e.g. from `wsgate token --user loadtest`.
    #[arg(long)]
    token: Option<String>,
    /// Local source addresses, as a range (127.0.0.1-127.0.0.8) or a comma list: each source
    /// address has its own ~28k ephemeral ports.
    #[arg(long, default_value = "127.0.0.1", value_parser = parse_sources)]
    source_ips: Sources,
    /// Gateway process id, to report its RSS and CPU.
    #[arg(long)]
    gateway_pid: Option<u32>,
    /// Write the report as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Exit non-zero when more connections than this fail.
    #[arg(long, default_value_t = 0)]
    max_errors: u64,
}

/// How connections are opened.
#[derive(Args)]
struct Ramp {
    /// Connections to open.
    #[arg(short = 'n', long, default_value_t = 1000)]
    connections: usize,
    /// New connections per second during the ramp.
    #[arg(long, default_value_t = 2000.0)]
    rate: f64,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Give up on one connection attempt after this long.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    handshake_timeout: Duration,
}

#[derive(Args)]
struct ConnectArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    ramp: Ramp,
    /// How long to hold the connections once all are open.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    hold: Duration,
}

#[derive(Args)]
struct EchoArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    ramp: Ramp,
    /// Message size in bytes (binary frames).
    #[arg(long, default_value_t = 20)]
    payload: usize,
    /// How long to send for, once every connection is open.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
}

#[derive(Args)]
struct FanoutArgs {
    #[command(flatten)]
    common: Common,
    /// The subscribers: how many, and how fast they connect.
    #[command(flatten)]
    ramp: Ramp,
    /// Rooms the subscribers and publishers are spread over (round-robin).
    #[arg(long, default_value_t = 10)]
    rooms: usize,
    /// Publishing connections.
    #[arg(long, default_value_t = 10)]
    publishers: usize,
    /// Messages per second each publisher sends (keep it under the gateway's rate limit).
    #[arg(long, default_value_t = 10.0)]
    publish_rate: f64,
    /// How long to publish.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// How long subscribers keep reading after publishing stops.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    settle: Duration,
}

#[derive(Clone)]
struct Sources(Vec<IpAddr>);

fn parse_sources(s: &str) -> Result<Sources, String> {
    let ips = if let Some((from, to)) = s.split_once('-') {
        let from: Ipv4Addr = from.trim().parse().map_err(|e| format!("{from}: {e}"))?;
        let to: Ipv4Addr = to.trim().parse().map_err(|e| format!("{to}: {e}"))?;
        if u32::from(to) < u32::from(from) || u32::from(to) - u32::from(from) > 1024 {
            return Err("range must go up, over at most 1024 addresses".into());
        }
        (u32::from(from)..=u32::from(to))
            .map(|n| IpAddr::V4(n.into()))
            .collect()
    } else {
        s.split(',')
            .map(|ip| ip.trim().parse().map_err(|e| format!("{ip}: {e}")))
            .collect::<Result<Vec<IpAddr>, String>>()?
    };
    if let Some(ip) = ips.iter().find(|ip| !ip.is_loopback()) {
        return Err(format!(
            "{ip} is not a loopback address: loadtest only targets this machine"
        ));
    }
    Ok(Sources(ips))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("loadtest: cannot raise the open-files limit: {e}");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match cli.scenario {
        Scenario::Connect(args) => runtime.block_on(connect(args)),
        Scenario::Echo(args) => runtime.block_on(echo(args)),
        Scenario::Fanout(args) => runtime.block_on(fanout_scenario(args)),
    }
}

fn check_targets(common: &Common) -> Result<(), String> {
    match common.targets.iter().find(|t| !t.ip().is_loopback()) {
        Some(t) => Err(format!(
            "{t} is not a loopback address: loadtest only targets this machine"
        )),
        None => Ok(()),
    }
}

async fn connect(args: ConnectArgs) -> ExitCode {
    let common = &args.common;
    if let Err(e) = check_targets(common) {
        eprintln!("loadtest: {e}");
        return ExitCode::from(2);
    }
    let cpu = report::CpuMeter::start(common.gateway_pid);
    let mut report = ConnectReport {
        target_connections: args.ramp.connections,
        gateway_rss_before_kib: common.gateway_pid.and_then(report::rss_kib),
        ..ConnectReport::default()
    };

    let opened = open_all(common, &args.ramp, !common.path.starts_with("/echo")).await;
    let mut held = opened.held;
    report.ramp_seconds = opened.seconds;
    report.connected = held.len();
    report.connections_per_second = held.len() as f64 / report.ramp_seconds;
    report.handshake = report::Percentiles::of(&opened.handshakes);
    report.failures = opened.failures;
    // Hold: every connection keeps reading, so it answers the gateway's pings (fastwebsockets
    // pongs by itself) and the gateway's CPU over the hold is its idle cost, heartbeats included.
    let mut readers = JoinSet::new();
    for mut ws in held.drain(..) {
        readers.spawn(async move {
            while let Ok(frame) = ws.read_frame().await {
                if frame.opcode == fastwebsockets::OpCode::Close {
                    break;
                }
            }
        });
    }
    let hold_cpu = report::CpuMeter::start(common.gateway_pid);
    tokio::time::sleep(args.hold).await;
    report.gateway_rss_held_kib = common.gateway_pid.and_then(report::rss_kib);
    if let (Some(cpu), _) = hold_cpu.elapsed() {
        report.gateway_cpu_hold_seconds = Some(cpu);
        report.gateway_cpu_hold_percent = Some(100.0 * cpu / args.hold.as_secs_f64());
    }
    // Connections that ended during the hold (closed by the gateway, e.g. missed heartbeats).
    while readers.try_join_next().is_some() {}
    report.held_to_the_end = readers.len();
    if let (Some(before), Some(after)) =
        (report.gateway_rss_before_kib, report.gateway_rss_held_kib)
        && report.connected > 0
    {
        report.gateway_rss_per_connection_bytes =
            Some((after as f64 - before as f64) * 1024.0 / report.connected as f64);
    }
    (report.gateway_cpu_seconds, report.loadtest_cpu_seconds) = cpu.elapsed();
    readers.abort_all();

    report.print();
    let errors = report.failures.values().sum();
    finish(common, &report, errors)
}

/// Connections opened by a ramp, and what opening them measured.
struct Opened {
    held: Vec<client::Ws>,
    handshakes: hdrhistogram::Histogram<u64>,
    failures: BTreeMap<Failure, u64>,
    seconds: f64,
}

/// Opens `ramp.connections` connections at `ramp.rate`, spread over the targets and sources.
/// `greeting`: wait for the chat endpoint's `connected` message on each.
async fn open_all(common: &Common, ramp: &Ramp, greeting: bool) -> Opened {
    let in_flight = Arc::new(Semaphore::new(ramp.concurrency.max(1)));
    let mut attempts = JoinSet::new();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / ramp.rate.max(0.001)));
    let started = Instant::now();
    for i in 0..ramp.connections {
        ticker.tick().await;
        let permit = in_flight
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore open");
        let source = common.source_ips.0[i % common.source_ips.0.len()];
        let target = common.targets[i % common.targets.len()];
        let path = match &common.token {
            Some(token) => format!("{}?token={token}", common.path),
            None => common.path.clone(),
        };
        let timeout = ramp.handshake_timeout;
        attempts.spawn(async move {
            let begun = Instant::now();
            let result = tokio::time::timeout(timeout, async {
                let mut ws = client::connect(source, target, &path).await?;
                if greeting {
                    client::read_greeting(&mut ws).await?;
                }
                Ok(ws)
            })
            .await
            .unwrap_or(Err(Failure::Timeout));
            drop(permit);
            (begun.elapsed(), result)
        });
    }
    let mut held = Vec::with_capacity(ramp.connections);
    let mut handshakes = report::latency_histogram();
    let mut failures = BTreeMap::new();
    while let Some(joined) = attempts.join_next().await {
        let (took, result) = joined.expect("connection task does not panic");
        match result {
            Ok(ws) => {
                handshakes.saturating_record(took.as_micros() as u64);
                held.push(ws);
            }
            Err(cause) => *failures.entry(cause).or_insert(0) += 1,
        }
    }
    Opened {
        held,
        handshakes,
        failures,
        seconds: started.elapsed().as_secs_f64(),
    }
}

async fn echo(args: EchoArgs) -> ExitCode {
    let common = &args.common;
    if let Err(e) = check_targets(common) {
        eprintln!("loadtest: {e}");
        return ExitCode::from(2);
    }
    // Echo servers (wsgate's /echo, the baselines) send no greeting.
    let opened = open_all(common, &args.ramp, false).await;
    let connected = opened.held.len();
    let mut report = EchoReport {
        connections: connected,
        payload_bytes: args.payload,
        failures: opened.failures,
        ..EchoReport::default()
    };
    let cpu = report::CpuMeter::start(common.gateway_pid);
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + args.duration;
    let mut loops = JoinSet::new();
    for mut ws in opened.held {
        let payload = vec![0x5a_u8; args.payload];
        loops.spawn(async move {
            let mut latencies = report::latency_histogram();
            let mut errors = 0u64;
            while tokio::time::Instant::now() < deadline {
                let sent = Instant::now();
                let frame =
                    fastwebsockets::Frame::binary(fastwebsockets::Payload::Borrowed(&payload));
                if ws.write_frame(frame).await.is_err() {
                    errors += 1;
                    break;
                }
                match ws.read_frame().await {
                    Ok(frame) if frame.payload.len() == payload.len() => {
                        latencies.saturating_record(sent.elapsed().as_micros() as u64);
                    }
                    _ => {
                        errors += 1;
                        break;
                    }
                }
            }
            (latencies, errors)
        });
    }
    let mut latencies = report::latency_histogram();
    while let Some(joined) = loops.join_next().await {
        let (h, errors) = joined.expect("echo loop does not panic");
        latencies.add(&h).expect("same histogram bounds");
        report.errors += errors;
    }
    let seconds = started.elapsed().as_secs_f64();
    report.seconds = seconds;
    report.messages = latencies.len();
    report.messages_per_second = latencies.len() as f64 / seconds;
    report.latency = report::Percentiles::of(&latencies);
    (report.gateway_cpu_seconds, report.loadtest_cpu_seconds) = cpu.elapsed();
    report.messages_per_gateway_cpu_second = report
        .gateway_cpu_seconds
        .filter(|cpu| *cpu > 0.0)
        .map(|cpu| latencies.len() as f64 / cpu);
    report.print();
    finish(
        common,
        &report,
        report.errors + report.failures.values().sum::<u64>(),
    )
}

/// Writes the JSON report if asked, and turns the error count into the exit code.
fn finish(common: &Common, report: &impl serde::Serialize, errors: u64) -> ExitCode {
    if let Some(path) = &common.json {
        let json = serde_json::to_string_pretty(report).expect("report serializes");
        if let Err(e) = std::fs::write(path, json) {
            eprintln!("loadtest: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if errors > common.max_errors {
        eprintln!("loadtest: {errors} errors (allowed: {})", common.max_errors);
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

async fn fanout_scenario(args: FanoutArgs) -> ExitCode {
    let common = &args.common;
    if let Err(e) = check_targets(common) {
        eprintln!("loadtest: {e}");
        return ExitCode::from(2);
    }
    let rooms = args.rooms.max(1);
    let mut subscribers = open_all(common, &args.ramp, true).await;
    let publisher_ramp = Ramp {
        connections: args.publishers,
        ..args.ramp
    };
    let mut publishers = open_all(common, &publisher_ramp, true).await;
    let mut join_failures = 0u64;
    for (i, ws) in subscribers.held.iter_mut().enumerate() {
        join_failures += u64::from(!fanout::join(ws, &format!("lt-{}", i % rooms)).await);
    }
    for (p, ws) in publishers.held.iter_mut().enumerate() {
        join_failures += u64::from(!fanout::join(ws, &format!("lt-{}", p % rooms)).await);
    }
    let cpu = report::CpuMeter::start(common.gateway_pid);
    let mut report = fanout::run(
        subscribers.held,
        publishers.held,
        rooms,
        args.publish_rate,
        args.duration,
        args.settle,
    )
    .await;
    report.subscribers = args.ramp.connections;
    report.publishers = args.publishers;
    report.rooms = rooms;
    report.failures = subscribers.failures;
    for (cause, n) in publishers.failures {
        *report.failures.entry(cause).or_insert(0) += n;
    }
    report.join_failures = join_failures;
    (report.gateway_cpu_seconds, report.loadtest_cpu_seconds) = cpu.elapsed();
    report.print();
    let errors = report.lost
        + report.duplicates
        + report.out_of_order
        + report.publisher_errors
        + report.join_failures
        + report.failures.values().sum::<u64>();
    finish(common, &report, errors)
}
