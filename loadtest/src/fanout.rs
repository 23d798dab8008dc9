//! The `fanout` scenario: subscribers in rooms, publishers sending chat messages to them at a
//! rate; publish-to-receive latency (the send time rides in the message) and exact accounting of
//! what each subscriber got: lost, duplicated and out-of-order messages.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fastwebsockets::{Frame, OpCode, Payload};
use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::client::Ws;
use crate::report::{self, FanoutReport};

/// The text a publisher sends: `ltp:<publisher>:<seq>:<µs since the run's epoch>`.
fn encode(publisher: usize, seq: u64, sent_us: u64) -> String {
    format!("ltp:{publisher}:{seq}:{sent_us}")
}

fn decode(message: &str) -> Option<(usize, u64, u64)> {
    let mut parts = message.strip_prefix("ltp:")?.split(':');
    let publisher = parts.next()?.parse().ok()?;
    let seq = parts.next()?.parse().ok()?;
    let sent_us = parts.next()?.parse().ok()?;
    Some((publisher, seq, sent_us))
}

async fn send_json(ws: &mut Ws, value: &Value) -> bool {
    let text = value.to_string();
    ws.write_frame(Frame::text(Payload::Borrowed(text.as_bytes())))
        .await
        .is_ok()
}

/// The next chat-protocol message, skipping control frames.
async fn next_json(ws: &mut Ws) -> Option<Value> {
    loop {
        let frame = ws.read_frame().await.ok()?;
        match frame.opcode {
            OpCode::Text => return serde_json::from_slice(&frame.payload).ok(),
            OpCode::Close => return None,
            _ => {}
        }
    }
}

/// Joins `room` and waits for the confirmation (skipping notices that arrive first).
pub async fn join(ws: &mut Ws, room: &str) -> bool {
    if !send_json(ws, &json!({"type": "join_room", "payload": {"room": room}})).await {
        return false;
    }
    while let Some(msg) = next_json(ws).await {
        if msg["type"] == "room_joined" {
            return true;
        }
    }
    false
}

/// What one subscriber saw.
#[derive(Default)]
pub struct Tally {
    pub received: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    /// Per publisher of this subscriber's room: which sequence numbers arrived.
    seen: Vec<(usize, Vec<bool>)>,
    pub latencies: Option<hdrhistogram::Histogram<u64>>,
}

impl Tally {
    fn record(&mut self, publisher: usize, seq: u64) {
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

    /// Messages from `publisher` this subscriber should have had, but did not.
    pub fn missing(&self, publisher: usize, sent: u64) -> u64 {
        let got = self
            .seen
            .iter()
            .find(|(p, _)| *p == publisher)
            .map_or(0, |(_, s)| {
                s.iter().take(sent as usize).filter(|b| **b).count()
            });
        sent - got as u64
    }
}

/// Runs subscribers and publishers (already connected) for `duration`, then lets in-flight
/// messages land for `settle`.
pub async fn run(
    subscribers: Vec<Ws>,
    publishers: Vec<Ws>,
    rooms: usize,
    rate: f64,
    duration: Duration,
    settle: Duration,
) -> FanoutReport {
    let epoch = Instant::now();
    let rooms = rooms.max(1);
    let sent: Arc<Vec<AtomicU64>> =
        Arc::new((0..publishers.len()).map(|_| AtomicU64::new(0)).collect());
    let stop_publishing = tokio::time::Instant::now() + duration;
    let stop_reading = stop_publishing + settle;

    let mut subscriber_tasks = JoinSet::new();
    for (i, mut ws) in subscribers.into_iter().enumerate() {
        subscriber_tasks.spawn(async move {
            let mut tally = Tally {
                latencies: Some(report::latency_histogram()),
                ..Tally::default()
            };
            while let Ok(Some(msg)) =
                tokio::time::timeout_at(stop_reading, next_json(&mut ws)).await
            {
                if msg["type"] != "chat_message" {
                    continue;
                }
                let Some((publisher, seq, sent_us)) = msg["message"].as_str().and_then(decode)
                else {
                    continue;
                };
                let now_us = epoch.elapsed().as_micros() as u64;
                if let Some(h) = tally.latencies.as_mut() {
                    h.saturating_record(now_us.saturating_sub(sent_us).max(1));
                }
                tally.record(publisher, seq);
            }
            (i % rooms, tally)
        });
    }

    let mut publisher_tasks = JoinSet::new();
    for (p, mut ws) in publishers.into_iter().enumerate() {
        let sent = sent.clone();
        publisher_tasks.spawn(async move {
            let room = format!("lt-{}", p % rooms);
            let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.001)));
            let mut errors = 0u64;
            let mut seq = 0u64;
            while tokio::time::Instant::now() < stop_publishing {
                ticker.tick().await;
                let sent_us = epoch.elapsed().as_micros() as u64;
                let message = encode(p, seq, sent_us);
                let chat =
                    json!({"type": "chat_message", "payload": {"room": room, "message": message}});
                if !send_json(&mut ws, &chat).await {
                    errors += 1;
                    break;
                }
                sent[p].fetch_add(1, Ordering::Relaxed);
                // The sender gets its own message back: read up to it, which also drains the
                // rest of the room's traffic from this socket.
                let mut echoed = false;
                while let Some(msg) = next_json(&mut ws).await {
                    if msg["type"] == "error" {
                        errors += 1;
                    }
                    if msg["message"].as_str() == Some(message.as_str()) {
                        echoed = true;
                        break;
                    }
                }
                if !echoed {
                    errors += 1;
                    break;
                }
                seq += 1;
            }
            // Keep the connection (and so the room membership) until the subscribers are done.
            tokio::time::sleep_until(stop_reading).await;
            drop(ws);
            errors
        });
    }

    let mut report = FanoutReport::default();
    while let Some(done) = publisher_tasks.join_next().await {
        report.publisher_errors += done.expect("publisher does not panic");
    }
    let mut latencies = report::latency_histogram();
    while let Some(done) = subscriber_tasks.join_next().await {
        let (room, tally) = done.expect("subscriber does not panic");
        report.received += tally.received;
        report.duplicates += tally.duplicates;
        report.out_of_order += tally.out_of_order;
        for (p, count) in sent.iter().enumerate().filter(|(p, _)| p % rooms == room) {
            report.expected += count.load(Ordering::Relaxed);
            report.lost += tally.missing(p, count.load(Ordering::Relaxed));
        }
        if let Some(h) = &tally.latencies {
            latencies.add(h).expect("same histogram bounds");
        }
    }
    report.published = sent.iter().map(|c| c.load(Ordering::Relaxed)).sum();
    report.seconds = duration.as_secs_f64();
    report.deliveries_per_second = report.received as f64 / report.seconds;
    report.latency = report::Percentiles::of(&latencies);
    report
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
        assert_eq!(t.received, 6);
        assert_eq!(t.duplicates, 1); // the second 3
        assert_eq!(t.out_of_order, 1); // 2 after 3
        assert_eq!(t.missing(7, 6), 1); // 4
        assert_eq!(t.missing(8, 2), 2); // nothing from publisher 8
        assert_eq!(decode(&encode(3, 9, 12345)), Some((3, 9, 12345)));
    }
}
