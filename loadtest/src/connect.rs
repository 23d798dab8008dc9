//! The `connect` scenario: open N connections, hold them idle (answering the gateway's pings),
//! measure handshakes and the gateway's memory and CPU; optionally end with one broadcast to
//! every connection and count who got it.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use fastwebsockets::OpCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::cli::{Common, ConnectArgs, Worker};
use crate::client::{self, Ws};
use crate::driver::{Outcome, Scenario};
use crate::hist::Latencies;
use crate::progress::Progress;
use crate::ramp::{self, Held, Setup, room_name};
use crate::report::{
    self, Measured, Opening, OpeningSummary, Percentiles, monotonic_micros, percent,
};

/// How long connections wait for the broadcast after the hold.
const BROADCAST_WAIT: Duration = Duration::from_secs(10);
/// The broadcast's text: `ltb:<target>:<monotonic µs when sent>`.
const BROADCAST_PREFIX: &str = "ltb:";

pub(crate) struct Connect(pub ConnectArgs);

#[derive(Serialize, Deserialize, Default)]
pub(crate) struct ConnectPartial {
    opening: Opening,
    held_to_the_end: u64,
    broadcast: Broadcast,
}

/// The broadcast-to-all check.
#[derive(Serialize, Deserialize, Default)]
pub(crate) struct Broadcast {
    /// Broadcasts sent (one per target, or one for a cluster) and confirmed by the sender's own
    /// copy.
    sent: u64,
    sender_errors: u64,
    /// Connections that should have got their node's broadcast, and those that did.
    expected: u64,
    received: u64,
    /// From send to receipt.
    latency: Latencies,
}

#[derive(Serialize)]
pub(crate) struct ConnectReport {
    target_connections: usize,
    opening: OpeningSummary,
    connections_per_second: f64,
    /// Connections opened per second of gateway CPU during the ramp.
    connections_per_gateway_cpu_second: Option<f64>,
    /// RSS growth of all gateway nodes over the connections open at the end.
    gateway_rss_per_connection_bytes: Option<f64>,
    hold_seconds: f64,
    /// Gateway CPU (all nodes) while holding, as a percentage of one core: the idle cost,
    /// heartbeats included (and the broadcast, when asked for).
    gateway_cpu_hold_percent: Option<f64>,
    held_to_the_end: u64,
    broadcast: Option<BroadcastReport>,
    measured: Measured,
}

#[derive(Serialize)]
struct BroadcastReport {
    sent: u64,
    sender_errors: u64,
    expected: u64,
    received: u64,
    lost: u64,
    latency: Percentiles,
}

/// Holds one connection until `until`, answering pings; with `broadcast`, until then or its
/// node's broadcast arrives. Returns whether it is still open, and the broadcast's latency.
async fn hold(mut ws: Ws, until: Instant, broadcast: bool) -> (Ws, bool, Option<u64>) {
    loop {
        let frame = match tokio::time::timeout_at(until, ws.read_frame()).await {
            Err(_) => return (ws, true, None), // held to the end
            Ok(Err(_)) => return (ws, false, None),
            Ok(Ok(frame)) => frame,
        };
        match frame.opcode {
            OpCode::Close => return (ws, false, None),
            OpCode::Text if broadcast => {
                let sent = serde_json::from_slice::<serde_json::Value>(&frame.payload)
                    .ok()
                    .filter(|m| m["type"] == "chat_message")
                    .and_then(|m| {
                        let text = m["message"].as_str()?.strip_prefix(BROADCAST_PREFIX)?;
                        text.split_once(':')?.1.parse::<u64>().ok()
                    });
                if let Some(sent) = sent {
                    return (ws, true, Some(monotonic_micros().saturating_sub(sent)));
                }
            }
            _ => {}
        }
    }
}

/// Sends one broadcast to the room every connection joined, on each target node (on the first
/// only, for a `cluster`), from a new connection, and waits for the sender's own copy.
async fn send_broadcasts(common: &Common, cluster: bool, timeout: Duration, tally: &mut Broadcast) {
    let targets = if cluster { 1 } else { common.targets.len() };
    for target in 0..targets {
        let sent = async {
            let mut ws = ramp::open_one(common, target, true, Some(room_name(0)), timeout)
                .await
                .ok()?;
            let text = format!("{BROADCAST_PREFIX}{target}:{}", monotonic_micros());
            let chat =
                json!({"type": "chat_message", "payload": {"room": room_name(0), "message": text}});
            if !client::send_json(&mut ws, &chat).await {
                return None;
            }
            while let Some(msg) = client::next_json(&mut ws).await {
                if msg["message"].as_str() == Some(text.as_str()) {
                    return Some(());
                }
            }
            None
        };
        match tokio::time::timeout(timeout, sent).await {
            Ok(Some(())) => tally.sent += 1,
            _ => tally.sender_errors += 1,
        }
    }
}

impl Scenario for Connect {
    type Prepared = (Held, Opening);
    type Partial = ConnectPartial;
    type Report = ConnectReport;

    fn common(&self) -> &Common {
        &self.0.common
    }

    fn connections(&self) -> usize {
        self.0.ramp.connections
    }

    async fn prepare(&self, worker: Worker, progress: Arc<Progress>) -> Self::Prepared {
        let rooms = self.0.broadcast.then_some(1);
        let setup = Setup {
            greeting: self.0.common.chat_protocol(),
            rooms,
        };
        ramp::open_share(&self.0.common, &self.0.ramp, worker, 0, setup, &progress).await
    }

    async fn run(
        &self,
        (held, opening): &mut Self::Prepared,
        worker: Worker,
        _progress: Arc<Progress>,
    ) -> ConnectPartial {
        let args = &self.0;
        let hold_end = Instant::now() + args.hold;
        let until = if args.broadcast {
            hold_end + BROADCAST_WAIT
        } else {
            hold_end
        };
        let mut readers = JoinSet::new();
        for (index, ws) in held.release(opening).await {
            let broadcast = args.broadcast;
            readers.spawn(async move { (index, hold(ws, until, broadcast).await) });
        }
        let mut partial = ConnectPartial {
            broadcast: Broadcast {
                expected: opening.connected,
                ..Broadcast::default()
            },
            opening: std::mem::take(opening),
            ..ConnectPartial::default()
        };
        if args.broadcast && worker.index == 0 {
            tokio::time::sleep_until(hold_end).await;
            send_broadcasts(
                &args.common,
                args.cluster,
                args.ramp.handshake_timeout,
                &mut partial.broadcast,
            )
            .await;
        }
        while let Some(joined) = readers.join_next().await {
            let (index, (ws, open, latency)) = joined.expect("reader does not panic");
            partial.held_to_the_end += u64::from(open);
            if let Some(micros) = latency {
                partial.broadcast.received += 1;
                partial.broadcast.latency.record_micros(micros);
            }
            held.kept.push((index, ws));
        }
        partial
    }

    fn merge(total: &mut ConnectPartial, part: ConnectPartial) {
        total.opening.merge(part.opening);
        total.held_to_the_end += part.held_to_the_end;
        let (t, p) = (&mut total.broadcast, part.broadcast);
        t.sent += p.sent;
        t.sender_errors += p.sender_errors;
        t.expected += p.expected;
        t.received += p.received;
        t.latency.merge(&p.latency);
    }

    fn report(&self, total: ConnectPartial, measured: Measured) -> Outcome<ConnectReport> {
        let connected = total.opening.connected;
        let b = &total.broadcast;
        let lost = b.expected.saturating_sub(b.received);
        let broadcast = self.0.broadcast.then(|| BroadcastReport {
            sent: b.sent,
            sender_errors: b.sender_errors,
            expected: b.expected,
            received: b.received,
            lost,
            latency: Percentiles::of(&b.latency),
        });
        let report = ConnectReport {
            target_connections: self.0.ramp.connections,
            opening: (&total.opening).into(),
            connections_per_second: connected as f64 / measured.ramp.seconds.max(1e-9),
            connections_per_gateway_cpu_second: measured.ramp.per_gateway_cpu_second(connected),
            gateway_rss_per_connection_bytes: measured
                .rss_per_connection_bytes(total.held_to_the_end as usize),
            hold_seconds: measured.run.seconds,
            gateway_cpu_hold_percent: measured
                .run
                .gateway_cpu_seconds
                .map(|cpu| percent(cpu, measured.run.seconds)),
            held_to_the_end: total.held_to_the_end,
            broadcast,
            measured,
        };
        let errors = total.opening.failed() + (connected - total.held_to_the_end) + b.sender_errors;
        let losses = if self.0.broadcast { lost } else { 0 };
        Outcome {
            report,
            errors,
            losses,
        }
    }
}

impl fmt::Display for ConnectReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "connect: {} of {} connected in {:.2} s ({:.0} connections/s{})",
            self.opening.connected,
            self.target_connections,
            self.measured.ramp.seconds,
            self.connections_per_second,
            self.connections_per_gateway_cpu_second
                .map(|c| format!(", {c:.0} per gateway CPU-second"))
                .unwrap_or_default()
        )?;
        report::print_failures(f, &self.opening.failures)?;
        writeln!(f, "handshake: {}", self.opening.handshake)?;
        if let Some(bytes) = self.gateway_rss_per_connection_bytes {
            writeln!(f, "gateway RSS per connection: {bytes:.0} bytes")?;
        }
        write!(
            f,
            "held {} connections to the end of {:.1} s",
            self.held_to_the_end, self.hold_seconds
        )?;
        match self.gateway_cpu_hold_percent {
            Some(pct) => writeln!(f, "; gateway CPU {pct:.2}% of a core")?,
            None => writeln!(f)?,
        }
        if let Some(b) = &self.broadcast {
            writeln!(
                f,
                "broadcast: {} sent ({} sender errors), {} of {} received, {} lost; latency {}",
                b.sent, b.sender_errors, b.received, b.expected, b.lost, b.latency
            )?;
        }
        write!(f, "{}", self.measured)
    }
}
