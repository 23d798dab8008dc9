//! Heartbeats: finding dead peers with one timer wheel per shard, not a timer per connection.
//!
//! Every inbound read stamps the connection's `last_seen` tick (one store). Each connection has
//! one entry in the wheel, due when it would next need attention. When it comes out:
//! - traffic since the last check: no ping is needed, it is filed again for `last_seen + interval`;
//! - idle for `heartbeat_interval`: it is pinged and filed for `now + heartbeat_timeout`;
//! - pinged and silent since: it is closed ("heartbeat timeout") and cleaned up like any other.
//!
//! Pings are RFC 6455 ping frames (browsers answer them by themselves), encoded once, or in `json`
//! mode the seed's `{"type":"ping","timestamp":…}`, encoded once per tick for all who get one.

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tracing::debug;

use crate::close::CloseCode;
use crate::config::Config;
use crate::frame::{self, OpCode};
use crate::protocol::now_ms;
use crate::shard::{Endpoint, Shard};
use crate::wheel::{Tick, TimerWheel};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeartbeatMode {
    /// RFC 6455 ping frames.
    Frame,
    /// `{"type":"ping","timestamp":ms}` text messages, answered by `{"type":"pong"}` (the seed's
    /// protocol). The echo endpoint always gets ping frames.
    Json,
}

/// A connection's liveness, in (truncated) ticks of its shard's wheel.
#[derive(Default)]
pub struct Liveness {
    /// The tick of the last read from the peer.
    pub last_seen: u32,
    /// The tick a ping went out and is still unanswered; 0 when none is.
    pinged_at: u32,
}

/// The wheel's items: a connection, by slab key and generation (a stale one is skipped).
type Entry = (u32, u32);

pub struct Heartbeats {
    wheel: TimerWheel<Entry>,
    tick: Duration,
    interval: u32,
    timeout: u32,
    mode: HeartbeatMode,
    ping_frame: Bytes,
    /// Reused between ticks.
    expired: Vec<Entry>,
}

impl Heartbeats {
    pub fn new(config: &Config) -> Self {
        // Coarse: a tenth of the shorter period, within 10 ms..1 s.
        let shorter = config.heartbeat_interval.min(config.heartbeat_timeout);
        let tick = (shorter / 10).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let ticks = |d: Duration| (d.as_nanos() / tick.as_nanos()).max(1) as u32;
        let (interval, timeout) = (
            ticks(config.heartbeat_interval),
            ticks(config.heartbeat_timeout),
        );
        Heartbeats {
            wheel: TimerWheel::new(u64::from(interval.max(timeout)) + 1),
            tick,
            interval,
            timeout,
            mode: config.heartbeat_mode,
            ping_frame: frame::encode(OpCode::Ping, b""),
            expired: Vec::new(),
        }
    }

    pub fn now(&self) -> u32 {
        self.wheel.now() as u32
    }

    /// Starts watching a new connection.
    pub fn watch(&mut self, key: usize, generation: u32) -> Liveness {
        let now = self.wheel.now();
        self.wheel
            .insert(now + u64::from(self.interval), (key as u32, generation));
        Liveness {
            last_seen: now as u32,
            pinged_at: 0,
        }
    }
}

/// Drives a shard's wheel, one coarse tick at a time.
pub async fn run(shard: Rc<Shard>) {
    let tick = shard.heartbeats().tick;
    let start = tokio::time::Instant::now();
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let now = (start.elapsed().as_nanos() / tick.as_nanos()) as Tick;
        on_tick(&shard, now);
    }
}

fn on_tick(shard: &Shard, now: Tick) {
    let mut guard = shard.heartbeats();
    let heartbeats = &mut *guard;
    heartbeats.wheel.advance(now, &mut heartbeats.expired);
    if heartbeats.expired.is_empty() {
        return;
    }
    let now32 = now as u32;
    let mut json_ping = None;
    let mut timed_out = 0;
    let mut state = shard.state();
    for (key, generation) in heartbeats.expired.drain(..) {
        let Some(conn) = state.conns.get_mut(key as usize) else {
            continue;
        };
        if conn.id.generation != generation || conn.outbound.is_closing() {
            continue;
        }
        let live = &mut conn.liveness;
        let due = if live.pinged_at != 0 {
            if live.last_seen.wrapping_sub(live.pinged_at) as i32 >= 0 {
                // Answered (any frame counts).
                live.pinged_at = 0;
                live.last_seen.wrapping_add(heartbeats.interval)
            } else {
                timed_out += 1;
                debug!(client = %conn.id, "heartbeat timeout");
                conn.outbound
                    .push_close(frame::encode_close(CloseCode::NORMAL, HEARTBEAT_TIMEOUT));
                continue;
            }
        } else if now32.wrapping_sub(live.last_seen) < heartbeats.interval {
            // Heard from recently: look again when it would have been idle long enough.
            live.last_seen.wrapping_add(heartbeats.interval)
        } else {
            live.pinged_at = now32.max(1);
            let ping = match (heartbeats.mode, conn.endpoint) {
                (HeartbeatMode::Json, Endpoint::Chat) => json_ping
                    .get_or_insert_with(|| {
                        let ping = format!(r#"{{"type":"ping","timestamp":{}}}"#, now_ms());
                        frame::encode(OpCode::Text, ping.as_bytes())
                    })
                    .clone(),
                _ => heartbeats.ping_frame.clone(),
            };
            conn.outbound.push(ping);
            now32.wrapping_add(heartbeats.timeout)
        };
        // Back to a full tick count (`due` is near `now`; overdue means the next tick).
        let ahead = due.wrapping_sub(now32) as i32;
        let due = now + u64::try_from(ahead).unwrap_or(0);
        heartbeats.wheel.insert(due, (key, generation));
    }
    if timed_out > 0 {
        shard
            .node
            .heartbeat_timeouts
            .fetch_add(timed_out, Ordering::Relaxed);
    }
}

/// The close reason sent to a connection that did not answer a ping in time.
pub const HEARTBEAT_TIMEOUT: &str = "heartbeat timeout";
