//! Command-line arguments: one subcommand per scenario, sharing how to reach the gateway
//! (`Common`) and how to open connections (`Ramp`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    version,
    about = "Load generator for wsgate: bounded runs against loopback gateways"
)]
pub struct Cli {
    #[command(subcommand)]
    pub scenario: ScenarioArgs,
}

#[derive(Subcommand)]
pub enum ScenarioArgs {
    /// Open N connections, hold them idle, report handshake latency and the gateway's memory.
    Connect(ConnectArgs),
    /// Echo: each connection sends a message and waits for it to come back — as fast as it can
    /// (closed loop) or on a schedule (--open-loop); round-trip latency and messages/s.
    Echo(EchoArgs),
    /// Subscribers in rooms and publishers sending to them: publish-to-receive latency,
    /// deliveries per second, and exact loss, duplicate and out-of-order counts.
    Fanout(FanoutArgs),
    /// Connections opening and closing at a rate while steady connections exchange echoes.
    Churn(ChurnArgs),
}

#[derive(Args, Clone)]
pub struct Common {
    /// Gateway address; repeat for several nodes (connections are spread round-robin).
    #[arg(long = "target", default_value = "127.0.0.1:8080", required = true)]
    pub targets: Vec<SocketAddr>,
    /// WebSocket path: /ws (the chat protocol) or /echo (raw echo).
    #[arg(long, default_value = "/ws")]
    pub path: String,
    /// A token to present (as `?token=`), e.g. from `wsgate token --user loadtest`.
    #[arg(long)]
    pub token: Option<String>,
    /// Speak TLS (wss://), trusting this CA certificate (PEM); the name checked is `localhost`.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Offer permessage-deflate, as browsers do (`permessage-deflate; client_max_window_bits`);
    /// where the server agrees, compressed messages are inflated (what the load generator
    /// sends stays uncompressed).
    #[arg(long)]
    pub compression: bool,
    /// Local source addresses, as a range (127.0.0.1-127.0.0.8) or a comma list: each source
    /// address has its own ~28k ephemeral ports.
    #[arg(long, default_value = "127.0.0.1", value_parser = parse_sources)]
    pub source_ips: Sources,
    /// Gateway process id, to report its RSS and CPU; repeat for several nodes.
    #[arg(long = "gateway-pid")]
    pub gateway_pids: Vec<u32>,
    /// Worker processes to spread the connections over (one process holds at most ~19.9k
    /// sockets here); their results are merged.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub procs: u32,
    /// Write the report as JSON here too.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Exit non-zero when more than this many connections fail or break off.
    #[arg(long, default_value_t = 0)]
    pub max_errors: u64,
    /// Exit non-zero when more than this many messages are lost (or duplicated, or reordered).
    #[arg(long, default_value_t = 0)]
    pub max_loss: u64,
    /// Set by the coordinator on the worker processes it starts: `INDEX/COUNT`.
    #[arg(long, hide = true, value_parser = parse_worker)]
    pub worker: Option<Worker>,
}

impl Common {
    pub fn url_path(&self) -> String {
        match &self.token {
            Some(token) => format!("{}?token={token}", self.path),
            None => self.path.clone(),
        }
    }

    /// The chat endpoint greets every connection and speaks JSON; /echo and the baselines don't.
    pub fn chat_protocol(&self) -> bool {
        !self.path.starts_with("/echo") && self.path != "/"
    }

    pub fn check(&self) -> Result<(), String> {
        match self.targets.iter().find(|t| !t.ip().is_loopback()) {
            Some(t) => Err(format!(
                "{t} is not a loopback address: loadtest only targets this machine"
            )),
            None => Ok(()),
        }
    }
}

/// How connections are opened.
#[derive(Args, Clone)]
pub struct Ramp {
    /// Connections to open.
    #[arg(short = 'n', long, default_value_t = 1000)]
    pub connections: usize,
    /// New connections per second during the ramp (over all worker processes).
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// Handshakes in flight at once (per worker process).
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Give up on one connection attempt after this long.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,
    /// Open connections waiting for the run to start send a ping this often, so a long ramp
    /// does not get the first ones closed for silence.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub keepalive: Duration,
}

#[derive(Args, Clone)]
pub struct ConnectArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub ramp: Ramp,
    /// How long to hold the connections once all are open.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub hold: Duration,
    /// After the hold, send one chat message to a room every connection joined (`room_joined`
    /// is awaited by each) and count who got it: the broadcast-to-all check. One message per
    /// target, since each gateway node has its own rooms — unless `--cluster`.
    #[arg(long)]
    pub broadcast: bool,
    /// The targets are nodes of one cluster (`broker = "redis"`): the broadcast is one message,
    /// sent through the first target, and must reach every connection on every node.
    #[arg(long, requires = "broadcast")]
    pub cluster: bool,
}

#[derive(Args, Clone)]
pub struct EchoArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub ramp: Ramp,
    /// Message size in bytes (binary frames on /echo, a JSON `echo` message's string on /ws).
    #[arg(long, default_value_t = 20)]
    pub payload: usize,
    /// How long to send for, once every connection is open.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Stop each connection after this many round trips (whichever comes first with --duration).
    #[arg(long)]
    pub messages: Option<u64>,
    /// Open loop: send this many messages per second in total, each connection on its own fixed
    /// schedule; latency counts from when a message was due, not when it went out, so a stall
    /// is not hidden (coordinated omission corrected). Without it: closed loop, one in flight.
    #[arg(long)]
    pub open_loop: Option<f64>,
}

#[derive(Args, Clone)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub common: Common,
    /// The subscribers: how many, and how fast they connect.
    #[command(flatten)]
    pub ramp: Ramp,
    /// Rooms the subscribers and publishers are spread over (round-robin).
    #[arg(long, default_value_t = 10)]
    pub rooms: usize,
    /// Publishing connections.
    #[arg(long, default_value_t = 10)]
    pub publishers: usize,
    /// Messages per second each publisher sends (keep it under the gateway's rate limit).
    #[arg(long, default_value_t = 10.0)]
    pub publish_rate: f64,
    /// How long to publish.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Stop each publisher after this many messages (whichever comes first with --duration).
    #[arg(long)]
    pub messages: Option<u64>,
    /// How long subscribers keep reading after publishing stops.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    /// Pad each chat message's text with words to this many characters (the publisher's marker
    /// alone is ~25): chat of a realistic size, for what compression does to it.
    #[arg(long, default_value_t = 0)]
    pub message_chars: usize,
}

#[derive(Args, Clone)]
pub struct ChurnArgs {
    #[command(flatten)]
    pub common: Common,
    /// The steady connections, which exchange echoes for the whole run.
    #[command(flatten)]
    pub ramp: Ramp,
    /// Short-lived connections opened per second (over all worker processes) during the run.
    #[arg(long, default_value_t = 100.0)]
    pub churn_rate: f64,
    /// How long each short-lived connection stays open before it closes (close handshake).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub lifetime: Duration,
    /// Echo messages per second each steady connection sends.
    #[arg(long, default_value_t = 10.0)]
    pub message_rate: f64,
    /// Echo message size in bytes.
    #[arg(long, default_value_t = 20)]
    pub payload: usize,
    /// How long the run lasts once the steady connections are open.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
}

#[derive(Clone, Debug)]
pub struct Sources(pub Vec<IpAddr>);

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

/// Which worker process this is, of how many.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Worker {
    pub index: u32,
    pub count: u32,
}

fn parse_worker(s: &str) -> Result<Worker, String> {
    let (index, count) = s.split_once('/').ok_or("expected INDEX/COUNT")?;
    let index: u32 = index.parse().map_err(|e| format!("{index}: {e}"))?;
    let count: u32 = count.parse().map_err(|e| format!("{count}: {e}"))?;
    if index >= count {
        return Err(format!("worker {index} of {count}"));
    }
    Ok(Worker { index, count })
}

impl Worker {
    /// The single process of a run without --procs.
    pub const ALONE: Worker = Worker { index: 0, count: 1 };

    /// This worker's contiguous part of `total` items: (first global index, how many).
    pub fn share(self, total: usize) -> (usize, usize) {
        let (count, index) = (self.count as usize, self.index as usize);
        let (base, extra) = (total / count, total % count);
        (
            index * base + index.min(extra),
            base + usize::from(index < extra),
        )
    }

    /// This worker's part of a rate.
    pub fn rate(self, total: f64) -> f64 {
        total / f64::from(self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_every_item_once() {
        for total in [0, 1, 5, 6, 7, 100_000] {
            for count in 1..=7 {
                let mut next = 0;
                for index in 0..count {
                    let (first, n) = Worker { index, count }.share(total);
                    assert_eq!(first, next, "total {total}, {index}/{count}");
                    next += n;
                }
                assert_eq!(next, total);
            }
        }
    }

    #[test]
    fn sources_parse_ranges_and_refuse_non_loopback() {
        assert_eq!(parse_sources("127.0.0.1-127.0.0.8").unwrap().0.len(), 8);
        assert_eq!(parse_sources("127.0.0.2,127.0.0.3").unwrap().0.len(), 2);
        assert!(parse_sources("10.0.0.1").is_err());
        assert!(parse_sources("127.0.0.9-127.0.0.1").is_err());
        assert_eq!(parse_worker("2/3"), Ok(Worker { index: 2, count: 3 }));
        assert!(parse_worker("3/3").is_err());
    }
}
