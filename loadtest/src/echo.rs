//! The `echo` scenario: every connection sends a message and waits for it to come back, either
//! as fast as it can (closed loop) or on its own fixed schedule (open loop, latency counted from
//! when each message was due). The paced loop is also the steady traffic of `churn`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use fastwebsockets::{Frame, OpCode, Payload};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::cli::{Common, EchoArgs, Worker};
use crate::driver::{Outcome, Scenario};
use crate::hist::Latencies;
use crate::progress::Progress;
use crate::ramp::{self, Held, Setup};
use crate::report::{self, Measured, Opening, OpeningSummary, Percentiles};

/// What one connection sends, and the reply it expects.
#[derive(Clone)]
pub(crate) struct Message {
    bytes: Arc<[u8]>,
    text: bool,
}

impl Message {
    /// `size` bytes of payload: a binary frame for raw echo servers, or the chat protocol's
    /// `{"type":"echo","payload":"…"}`, which the gateway answers with the same bytes.
    pub fn new(size: usize, chat_protocol: bool) -> Self {
        if chat_protocol {
            let json = format!(r#"{{"type":"echo","payload":"{}"}}"#, "z".repeat(size));
            Message {
                bytes: json.into_bytes().into(),
                text: true,
            }
        } else {
            Message {
                bytes: vec![0x5a; size].into(),
                text: false,
            }
        }
    }
}

/// How a connection paces its messages.
#[derive(Clone, Copy)]
pub(crate) enum Pace {
    /// Next message as soon as the last came back.
    Closed,
    /// One message every `interval`, the first at `start + phase` (`start` shared by the run).
    Every {
        start: Instant,
        interval: Duration,
        phase: Duration,
    },
}

impl Pace {
    /// One message every `interval`, the connections' schedules spread evenly over one interval
    /// by their index (of `total`), so they do not all send at once.
    pub fn staggered(start: Instant, interval: Duration, index: usize, total: usize) -> Self {
        let phase = interval.mul_f64(index as f64 / total.max(1) as f64);
        Pace::Every {
            start,
            interval,
            phase,
        }
    }
}

/// How long a reply may take before the connection counts as broken (a run always ends).
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// The echo of `message`, skipping control frames (the pongs to a parked connection's keepalive
/// pings arrive first); false on anything else, an error, or no reply in time.
async fn read_echo(ws: &mut crate::client::Ws, message: &Message) -> bool {
    let opcode = if message.text {
        OpCode::Text
    } else {
        OpCode::Binary
    };
    // Cancelling a read mid-frame would corrupt the stream, but a timed-out connection is
    // counted broken and never read again.
    let reply = tokio::time::timeout(REPLY_TIMEOUT, async {
        loop {
            match ws.read_frame().await {
                Ok(frame) if matches!(frame.opcode, OpCode::Ping | OpCode::Pong) => continue,
                Ok(frame) => {
                    return frame.opcode == opcode && frame.payload[..] == message.bytes[..];
                }
                Err(_) => return false,
            }
        }
    });
    reply.await.unwrap_or(false)
}

/// What one connection's loop measured.
pub(crate) struct Exchanged {
    pub latency: Latencies,
    /// The connection broke off (error, close, or a reply that was not the echo).
    pub broken: bool,
}

/// Sends `message` and waits for its echo until `deadline` or `limit` round trips.
pub(crate) async fn exchange(
    ws: &mut crate::client::Ws,
    message: &Message,
    pace: Pace,
    deadline: Instant,
    limit: Option<u64>,
    progress: &Progress,
) -> Exchanged {
    let mut latency = Latencies::default();
    let mut sent = 0u64;
    loop {
        let due = match pace {
            Pace::Closed => Instant::now(),
            Pace::Every {
                start,
                interval,
                phase,
            } => start + phase + interval * sent as u32,
        };
        if due >= deadline || limit.is_some_and(|limit| sent >= limit) {
            return Exchanged {
                latency,
                broken: false,
            };
        }
        tokio::time::sleep_until(due).await;
        let payload = Payload::Borrowed(&message.bytes);
        let frame = if message.text {
            Frame::text(payload)
        } else {
            Frame::binary(payload)
        };
        if ws.write_frame(frame).await.is_err() {
            return Exchanged {
                latency,
                broken: true,
            };
        }
        sent += 1;
        let echoed = read_echo(ws, message).await;
        if !echoed {
            return Exchanged {
                latency,
                broken: true,
            };
        }
        // From when it was due: a late send (the loop stalled) counts against the latency.
        latency.record(due.elapsed());
        progress.message();
    }
}

pub(crate) struct Echo(pub EchoArgs);

#[derive(Serialize, Deserialize, Default)]
pub(crate) struct EchoPartial {
    opening: Opening,
    latency: Latencies,
    broken_off: u64,
}

#[derive(Serialize)]
pub(crate) struct EchoReport {
    connections: usize,
    payload_bytes: usize,
    /// "closed" or "open at N/s".
    pace: String,
    opening: OpeningSummary,
    round_trips: u64,
    messages_per_second: f64,
    /// Open loop: from when each message was due (coordinated omission corrected).
    latency: Percentiles,
    broken_off: u64,
    /// Messages per second of gateway CPU: steadier than messages/s on a shared machine.
    messages_per_gateway_cpu_second: Option<f64>,
    measured: Measured,
}

impl Scenario for Echo {
    type Prepared = (Held, Opening);
    type Partial = EchoPartial;
    type Report = EchoReport;

    fn common(&self) -> &Common {
        &self.0.common
    }

    fn connections(&self) -> usize {
        self.0.ramp.connections
    }

    async fn prepare(&self, worker: Worker, progress: Arc<Progress>) -> Self::Prepared {
        let setup = Setup {
            greeting: self.0.common.chat_protocol(),
            rooms: None,
        };
        ramp::open_share(&self.0.common, &self.0.ramp, worker, 0, setup, &progress).await
    }

    async fn run(
        &self,
        (held, opening): &mut Self::Prepared,
        _worker: Worker,
        progress: Arc<Progress>,
    ) -> EchoPartial {
        let args = &self.0;
        let message = Message::new(args.payload, args.common.chat_protocol());
        let start = Instant::now();
        let deadline = start + args.duration;
        let total = args.ramp.connections.max(1);
        let mut loops = JoinSet::new();
        for (index, mut ws) in held.release(opening).await {
            let pace = match args.open_loop {
                None => Pace::Closed,
                Some(rate) => {
                    let interval = Duration::from_secs_f64(total as f64 / rate.max(1e-3));
                    // Spread the connections' schedules over one interval.
                    Pace::staggered(start, interval, index, total)
                }
            };
            let (message, progress, limit) = (message.clone(), progress.clone(), args.messages);
            loops.spawn(async move {
                let done = exchange(&mut ws, &message, pace, deadline, limit, &progress).await;
                (index, ws, done)
            });
        }
        let mut partial = EchoPartial {
            opening: std::mem::take(opening),
            ..EchoPartial::default()
        };
        while let Some(joined) = loops.join_next().await {
            let (index, ws, done) = joined.expect("echo loop does not panic");
            partial.latency.merge(&done.latency);
            partial.broken_off += u64::from(done.broken);
            held.kept.push((index, ws));
        }
        partial
    }

    fn merge(total: &mut EchoPartial, part: EchoPartial) {
        total.opening.merge(part.opening);
        total.latency.merge(&part.latency);
        total.broken_off += part.broken_off;
    }

    fn report(&self, total: EchoPartial, measured: Measured) -> Outcome<EchoReport> {
        let round_trips = total.latency.count();
        let report = EchoReport {
            connections: self.0.ramp.connections,
            payload_bytes: self.0.payload,
            pace: match self.0.open_loop {
                None => "closed".into(),
                Some(rate) => format!("open at {rate}/s"),
            },
            opening: (&total.opening).into(),
            round_trips,
            messages_per_second: round_trips as f64 / measured.run.seconds.max(1e-9),
            latency: Percentiles::of(&total.latency),
            broken_off: total.broken_off,
            messages_per_gateway_cpu_second: measured.run.per_gateway_cpu_second(round_trips),
            measured,
        };
        let errors = total.opening.failed() + total.broken_off;
        Outcome {
            report,
            errors,
            losses: 0,
        }
    }
}

impl fmt::Display for EchoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "echo ({} loop): {} of {} connections × {} B, {} round trips in {:.1} s: {:.0} messages/s",
            self.pace,
            self.opening.connected,
            self.connections,
            self.payload_bytes,
            self.round_trips,
            self.measured.run.seconds,
            self.messages_per_second
        )?;
        report::print_failures(f, &self.opening.failures)?;
        if self.broken_off > 0 {
            writeln!(f, "  connections broken off: {}", self.broken_off)?;
        }
        writeln!(f, "round trip: {}", self.latency)?;
        if let Some(per_cpu) = self.messages_per_gateway_cpu_second {
            writeln!(f, "{per_cpu:.0} messages per gateway CPU-second")?;
        }
        write!(f, "{}", self.measured)
    }
}
