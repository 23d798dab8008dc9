//! The `fanout` scenario: subscribers in rooms, publishers sending chat messages to them at a
//! rate; publish-to-receive latency (the send time rides in the message, on the machine's
//! monotonic clock so any worker process can read it) and exact accounting of what each
//! subscriber got: lost, duplicated and out-of-order messages.
//!
//! Accounting across processes: every publisher counts a message as sent before writing it, so
//! no subscriber can hold a sequence number its publisher did not count. Each worker reports,
//! per publisher, how many distinct messages its subscribers got in total, and how many
//! subscribers each room has; expected = Σ sent(p) × subscribers(room of p), and
//! lost = expected − Σ distinct.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use fastwebsockets::OpCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::cli::{Common, FanoutArgs, Worker};
use crate::client::{self, Ws};
use crate::driver::{Outcome, Scenario};
use crate::hist::Latencies;
use crate::progress::Progress;
use crate::ramp::{self, Held, Setup, room_name};
use crate::report::{self, Measured, Opening, OpeningSummary, Percentiles, monotonic_micros};

/// How long a publisher waits for its own copy before it counts an error and stops.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// The text a publisher sends: `ltp:<publisher>:<seq>:<monotonic µs when sent>`, then, up to
/// `chars` characters, words drawn pseudo-randomly from a small English vocabulary (as varied
/// as chat: what compression finds in it is what it would find in real messages). Never a quote
/// or a backslash.
fn encode(publisher: usize, seq: u64, sent_us: u64, chars: usize) -> String {
    const WORDS: [&str; 48] = [
        "we", "could", "ship", "the", "release", "on", "friday", "if", "tests", "pass", "but",
        "staging", "cluster", "still", "shows", "a", "memory", "leak", "in", "session", "store",
        "so", "maybe", "wait", "until", "monday", "when", "everyone", "is", "back", "and", "have",
        "time", "to", "look", "at", "heap", "profiles", "together", "with", "team", "that", "owns",
        "cache", "layer", "because", "their", "change",
    ];
    let mut text = format!("ltp:{publisher}:{seq}:{sent_us}");
    if text.len() < chars {
        text.push(':');
        let mut state = (seq << 20 | publisher as u64) ^ 0x9e37_79b9_7f4a_7c15;
        while text.len() < chars {
            // xorshift64
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            text.push_str(WORDS[(state % WORDS.len() as u64) as usize]);
            text.push(' ');
        }
        text.truncate(chars);
    }
    text
}

fn decode(message: &str) -> Option<(usize, u64, u64)> {
    let mut parts = message.strip_prefix("ltp:")?.split(':');
    let publisher = parts.next()?.parse().ok()?;
    let seq = parts.next()?.parse().ok()?;
    let sent_us = parts.next()?.parse().ok()?;
    Some((publisher, seq, sent_us))
}

/// What one subscriber saw.
#[derive(Default)]
pub struct Tally {
    pub received: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    /// Per publisher of this subscriber's room: which sequence numbers arrived.
    seen: Vec<(usize, Vec<bool>)>,
}

impl Tally {
    pub fn record(&mut self, publisher: usize, seq: u64) {
        self.received += 1;
        let slot = match self.seen.iter_mut().position(|(p, _)| *p == publisher) {
            Some(i) => &mut self.seen[i].1,
            None => {
                self.seen.push((publisher, Vec::new()));
                &mut self.seen.last_mut().expect("just pushed").1
            }
        };
        let seq = seq as usize;
        if seq < slot.len() && slot[seq] {
            self.duplicates += 1;
            return;
        }
        if seq + 1 < slot.len() {
            // A gap behind it was already passed: it came late.
            self.out_of_order += 1;
        }
        if seq >= slot.len() {
            slot.resize(seq + 1, false);
        }
        slot[seq] = true;
    }

    /// Distinct messages from each publisher.
    pub fn distinct(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.seen
            .iter()
            .map(|(p, seqs)| (*p, seqs.iter().filter(|b| **b).count() as u64))
    }
}

pub(crate) struct Fanout(pub FanoutArgs);

pub(crate) struct Connections {
    subscribers: Held,
    publishers: Held,
    opening: Opening,
}

#[derive(Serialize, Deserialize, Default)]
pub(crate) struct FanoutPartial {
    opening: Opening,
    /// Subscribers that joined, by room.
    subscribers_per_room: BTreeMap<usize, u64>,
    /// Messages each publisher sent (attempted), by global publisher number.
    sent: BTreeMap<usize, u64>,
    /// Distinct messages from each publisher, summed over this worker's subscribers.
    distinct: BTreeMap<usize, u64>,
    received: u64,
    duplicates: u64,
    out_of_order: u64,
    publisher_errors: u64,
    latency: Latencies,
}

#[derive(Serialize)]
pub(crate) struct FanoutReport {
    subscribers: usize,
    publishers: usize,
    rooms: usize,
    opening: OpeningSummary,
    published: u64,
    /// Deliveries the subscribers should have had (each message times its room's subscribers).
    expected: u64,
    received: u64,
    lost: u64,
    duplicates: u64,
    out_of_order: u64,
    publisher_errors: u64,
    deliveries_per_second: f64,
    /// Publish-to-receive latency.
    latency: Percentiles,
    measured: Measured,
}

/// Finds a publisher's text (`ltp:…`) in a chat message without parsing the JSON: the
/// subscribers' side is the load generator's hot path (every delivery), and a full parse made
/// it the bottleneck before the gateway was. The text is a JSON string of digits and colons, so
/// it needs no unescaping; other messages (presence, errors) do not contain the marker.
fn find_publication(frame: &[u8]) -> Option<(usize, u64, u64)> {
    let start = memchr::memmem::find(frame, b"\"ltp:")? + 1;
    let len = memchr::memchr(b'"', &frame[start..])?;
    decode(std::str::from_utf8(&frame[start..start + len]).ok()?)
}

/// Reads chat messages until `stop` (or the connection ends), tallying the publishers' ones.
async fn subscribe(ws: &mut Ws, stop: Instant, progress: &Progress) -> (Tally, Latencies) {
    let (mut tally, mut latency) = (Tally::default(), Latencies::default());
    while let Ok(Ok(frame)) = tokio::time::timeout_at(stop, ws.read_frame()).await {
        match frame.opcode {
            OpCode::Close => break,
            OpCode::Text => {
                let Some((publisher, seq, sent_us)) = find_publication(&frame.payload) else {
                    continue;
                };
                latency.record_micros(monotonic_micros().saturating_sub(sent_us));
                tally.record(publisher, seq);
                progress.message();
            }
            _ => {}
        }
    }
    (tally, latency)
}

/// Publishes to `room` at `rate` until `stop` or `limit` messages, waiting for its own copy of
/// each or an error reply (which also drains the room's traffic from this socket). Returns
/// (sent, errors).
async fn publish(
    ws: &mut Ws,
    publisher: usize,
    room: String,
    rate: f64,
    stop: Instant,
    limit: Option<u64>,
    chars: usize,
) -> (u64, u64) {
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.001)));
    let (mut sent, mut errors) = (0u64, 0u64);
    while Instant::now() < stop && limit.is_none_or(|limit| sent < limit) {
        ticker.tick().await;
        let message = encode(publisher, sent, monotonic_micros(), chars);
        let chat = json!({"type": "chat_message", "payload": {"room": room, "message": message}});
        sent += 1; // before the write: a subscriber can never see an uncounted message
        if !client::send_json(ws, &chat).await {
            return (sent, errors + 1);
        }
        let mut answered = false;
        // Bounded: a copy the gateway dropped (drop policy) must not hang the run. A timed-out
        // read is never resumed: the publisher stops.
        let until = Instant::now() + REPLY_TIMEOUT;
        while let Ok(Some(msg)) = tokio::time::timeout_at(until, client::next_json(ws)).await {
            if msg["type"] == "error" {
                // Refused (rate limited, say): it stays counted as sent, so every subscriber
                // of the room counts it lost.
                errors += 1;
                answered = true;
                break;
            }
            if msg["message"].as_str() == Some(message.as_str()) {
                answered = true;
                break;
            }
        }
        if !answered {
            return (sent, errors + 1);
        }
    }
    (sent, errors)
}

impl Scenario for Fanout {
    type Prepared = Connections;
    type Partial = FanoutPartial;
    type Report = FanoutReport;

    fn common(&self) -> &Common {
        &self.0.common
    }

    fn connections(&self) -> usize {
        self.0.ramp.connections + self.0.publishers
    }

    async fn prepare(&self, worker: Worker, progress: Arc<Progress>) -> Connections {
        let args = &self.0;
        let setup = Setup {
            greeting: true,
            rooms: Some(args.rooms.max(1)),
        };
        let (subscribers, mut opening) =
            ramp::open_share(&args.common, &args.ramp, worker, 0, setup, &progress).await;
        // Publishers are numbered after the subscribers (for targets and sources), and their
        // rooms go round-robin from room 0 too.
        let publisher_ramp = crate::cli::Ramp {
            connections: args.publishers,
            ..args.ramp.clone()
        };
        let offset = args.ramp.connections;
        let (publishers, publisher_opening) = ramp::open_share(
            &args.common,
            &publisher_ramp,
            worker,
            offset,
            setup,
            &progress,
        )
        .await;
        opening.merge(publisher_opening);
        Connections {
            subscribers,
            publishers,
            opening,
        }
    }

    async fn run(
        &self,
        c: &mut Connections,
        _worker: Worker,
        progress: Arc<Progress>,
    ) -> FanoutPartial {
        let args = &self.0;
        let rooms = args.rooms.max(1);
        let stop_publishing = Instant::now() + args.duration;
        let stop_reading = stop_publishing + args.settle;
        let mut partial = FanoutPartial {
            opening: std::mem::take(&mut c.opening),
            ..FanoutPartial::default()
        };

        let mut subscriber_tasks = JoinSet::new();
        for (index, mut ws) in c.subscribers.release(&mut c.opening).await {
            let progress = progress.clone();
            *partial
                .subscribers_per_room
                .entry(index % rooms)
                .or_insert(0) += 1;
            subscriber_tasks.spawn(async move {
                let seen = subscribe(&mut ws, stop_reading, &progress).await;
                (index, ws, seen)
            });
        }
        let mut publisher_tasks = JoinSet::new();
        for (index, mut ws) in c.publishers.release(&mut c.opening).await {
            let publisher = index - args.ramp.connections;
            let (rate, limit, chars) = (args.publish_rate, args.messages, args.message_chars);
            publisher_tasks.spawn(async move {
                let room = room_name(publisher % rooms);
                let (sent, errors) = publish(
                    &mut ws,
                    publisher,
                    room,
                    rate,
                    stop_publishing,
                    limit,
                    chars,
                )
                .await;
                // Keep the connection (so the room membership) until the subscribers are done.
                tokio::time::sleep_until(stop_reading).await;
                (index, ws, publisher, sent, errors)
            });
        }

        while let Some(done) = publisher_tasks.join_next().await {
            let (index, ws, publisher, sent, errors) = done.expect("publisher does not panic");
            partial.sent.insert(publisher, sent);
            partial.publisher_errors += errors;
            c.publishers.kept.push((index, ws));
        }
        while let Some(done) = subscriber_tasks.join_next().await {
            let (index, ws, (tally, latency)) = done.expect("subscriber does not panic");
            partial.received += tally.received;
            partial.duplicates += tally.duplicates;
            partial.out_of_order += tally.out_of_order;
            for (publisher, n) in tally.distinct() {
                *partial.distinct.entry(publisher).or_insert(0) += n;
            }
            partial.latency.merge(&latency);
            c.subscribers.kept.push((index, ws));
        }
        partial
    }

    fn merge(total: &mut FanoutPartial, part: FanoutPartial) {
        total.opening.merge(part.opening);
        for (mine, theirs) in [
            (&mut total.subscribers_per_room, part.subscribers_per_room),
            (&mut total.sent, part.sent),
            (&mut total.distinct, part.distinct),
        ] {
            for (key, n) in theirs {
                *mine.entry(key).or_insert(0) += n;
            }
        }
        total.received += part.received;
        total.duplicates += part.duplicates;
        total.out_of_order += part.out_of_order;
        total.publisher_errors += part.publisher_errors;
        total.latency.merge(&part.latency);
    }

    fn report(&self, total: FanoutPartial, measured: Measured) -> Outcome<FanoutReport> {
        let rooms = self.0.rooms.max(1);
        let expected: u64 = total
            .sent
            .iter()
            .map(|(p, sent)| {
                sent * total
                    .subscribers_per_room
                    .get(&(p % rooms))
                    .copied()
                    .unwrap_or(0)
            })
            .sum();
        let distinct: u64 = total.distinct.values().sum();
        let lost = expected.saturating_sub(distinct);
        let report = FanoutReport {
            subscribers: self.0.ramp.connections,
            publishers: self.0.publishers,
            rooms,
            opening: (&total.opening).into(),
            published: total.sent.values().sum(),
            expected,
            received: total.received,
            lost,
            duplicates: total.duplicates,
            out_of_order: total.out_of_order,
            publisher_errors: total.publisher_errors,
            deliveries_per_second: total.received as f64 / measured.run.seconds.max(1e-9),
            latency: Percentiles::of(&total.latency),
            measured,
        };
        let errors = total.opening.failed() + total.publisher_errors;
        let losses = lost + total.duplicates + total.out_of_order;
        Outcome {
            report,
            errors,
            losses,
        }
    }
}

impl fmt::Display for FanoutReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "fanout: {} subscribers, {} publishers, {} rooms: {} published, {} of {} expected deliveries ({:.0}/s over the run)",
            self.subscribers,
            self.publishers,
            self.rooms,
            self.published,
            self.received,
            self.expected,
            self.deliveries_per_second
        )?;
        writeln!(
            f,
            "lost {}  duplicated {}  out of order {}  publisher errors {}",
            self.lost, self.duplicates, self.out_of_order, self.publisher_errors
        )?;
        report::print_failures(f, &self.opening.failures)?;
        writeln!(f, "publish-to-receive: {}", self.latency)?;
        write!(f, "{}", self.measured)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_counts_exactly() {
        let mut t = Tally::default();
        for seq in [0, 1, 3, 3, 2, 5] {
            t.record(7, seq);
        }
        t.record(8, 0);
        assert_eq!(t.received, 7);
        assert_eq!(t.duplicates, 1); // the second 3
        assert_eq!(t.out_of_order, 1); // 2 after 3
        let distinct: BTreeMap<usize, u64> = t.distinct().collect();
        assert_eq!(distinct, BTreeMap::from([(7, 5), (8, 1)])); // 4 never came from 7
        assert_eq!(decode(&encode(3, 9, 12345, 0)), Some((3, 9, 12345)));
        let padded = encode(3, 9, 12345, 200);
        assert_eq!(padded.len(), 200);
        assert_eq!(decode(&padded), Some((3, 9, 12345)));
        assert_eq!(decode("ltp:x:1:2"), None);
        let chat = br#"{"type":"chat_message","room":"lt-0","userId":"u","message":"ltp:4:17:99","timestamp":1}"#;
        assert_eq!(find_publication(chat), Some((4, 17, 99)));
        assert_eq!(
            find_publication(br#"{"type":"user_joined","room":"lt-0"}"#),
            None
        );
    }
}
