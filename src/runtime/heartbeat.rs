//! Heartbeats: finding dead peers with one timer wheel per shard, not a timer per connection.
//!
//! Every inbound read stamps the connection's `last_seen` tick (one store). Each connection has
//! one entry in the wheel, due when it would next need attention. When it comes out:
//! - traffic since the last check: no ping is needed, it is filed again for `last_seen + interval`;
//! - idle for `heartbeat_interval`: it is pinged and filed for `now + heartbeat_timeout`;
//! - pinged and silent since: it is closed ("heartbeat timeout") and cleaned up like any other.
//!
//! The same pass closes connections whose token expired without a refresh (4001): an entry is
//! due no later than its token's expiry.
//!
//! Pings are RFC 6455 ping frames (browsers answer them by themselves), encoded once, or the
//! connection's app's own ping (the chat protocol's `{"type":"ping","timestamp":…}` in `json`
//! mode), encoded once per tick for all who get one.

use std::time::Duration;

use bytes::Bytes;
use slab::Slab;
use tracing::debug;

use crate::base::time::now_secs;
use crate::config::Config;
use crate::conn::outbound::QueueTotal;
use crate::ws::close::CloseCode;
use crate::ws::frame::{self, OpCode};

use super::AppId;
use super::entry::{ConnEntry, Liveness};
use super::wheel::{Tick, TimerWheel};

/// The wheel's items: a connection (slab key, generation) and the tick it was filed for. One
/// whose connection is gone, or that is not the connection's live entry, is skipped.
type Entry = (u32, u32, u32);

pub struct Heartbeats {
    wheel: TimerWheel<Entry>,
    tick: Duration,
    interval: u32,
    timeout: u32,
    /// Tokens get this much grace past `exp`, as at the upgrade.
    leeway_secs: u64,
    ping_frame: Bytes,
    /// Reused between ticks.
    expired: Vec<Entry>,
    /// Each app's ping in the current tick, by app: not asked yet, or its answer.
    app_pings: Vec<Option<Option<Bytes>>>,
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
            leeway_secs: config.jwt_leeway.as_secs(),
            ping_frame: frame::encode(OpCode::Ping, b""),
            expired: Vec::new(),
            app_pings: Vec::new(),
        }
    }

    pub fn now(&self) -> u32 {
        self.wheel.now() as u32
    }

    /// Starts watching a new connection (whose token, if any, expires at `expires_at`).
    pub fn watch(&mut self, key: usize, generation: u32, expires_at: Option<u64>) -> Liveness {
        let now = self.wheel.now();
        let mut live = Liveness {
            last_seen: now as u32,
            pinged_at: 0,
            due: 0,
        };
        let due = now + u64::from(self.interval);
        self.file(
            key as u32,
            generation,
            &mut live,
            due.min(self.tick_of(expires_at)),
        );
        live
    }

    /// Makes sure the connection is looked at by `expires_at` (after a refresh to a token that
    /// expires sooner than its entry is due).
    pub fn expire_by(&mut self, key: usize, generation: u32, live: &mut Liveness, expires_at: u64) {
        let at = self.tick_of(Some(expires_at));
        let now = self.wheel.now();
        let current = now + u64::from(live.due.wrapping_sub(now as u32));
        if at < current {
            self.file(key as u32, generation, live, at);
        }
    }

    fn file(&mut self, key: u32, generation: u32, live: &mut Liveness, due: Tick) {
        live.due = due as u32;
        self.wheel.insert(due, (key, generation, due as u32));
    }

    /// The first tick at or after a token's expiry (plus leeway); far away for no token.
    fn tick_of(&self, expires_at: Option<u64>) -> Tick {
        let Some(exp) = expires_at else {
            return Tick::MAX;
        };
        let until = exp.saturating_add(self.leeway_secs);
        let left = Duration::from_secs(until.saturating_sub(now_secs()));
        self.wheel.now() + (left.as_nanos() / self.tick.as_nanos()) as Tick + 1
    }
}

/// What a tick closed, for the shard's counters.
#[derive(Default, Debug, PartialEq, Eq)]
pub struct Closed {
    /// Connections that did not answer a ping within `heartbeat_timeout`.
    pub timed_out: u64,
    /// Connections whose token expired without a refresh (4001).
    pub expired_tokens: u64,
}

impl Heartbeats {
    /// How long a tick of the wheel is: the driver advances it this often.
    pub fn tick(&self) -> Duration {
        self.tick
    }

    /// Advances the wheel to `now`: pings the idle connections of `conns` (with their app's ping,
    /// `app_ping`, asked once per app per tick; an RFC 6455 ping frame when it has none), closes
    /// those that did not answer the last one or whose token expired, and files each again.
    pub fn on_tick(
        &mut self,
        now: Tick,
        conns: &mut Slab<ConnEntry>,
        queued: &mut QueueTotal,
        mut app_ping: impl FnMut(AppId) -> Option<Bytes>,
    ) -> Closed {
        let mut expired = std::mem::take(&mut self.expired);
        self.wheel.advance(now, &mut expired);
        let mut closed = Closed::default();
        if expired.is_empty() {
            self.expired = expired;
            return closed;
        }
        let now32 = now as u32;
        let now_secs = now_secs();
        // Each app's ping this tick, encoded once for all its connections that get one.
        self.app_pings.clear();
        for (key, generation, filed_for) in expired.drain(..) {
            let Some(conn) = conns.get_mut(key as usize) else {
                continue;
            };
            if conn.id.generation != generation
                || conn.liveness.due != filed_for
                || conn.outbound.is_closing()
            {
                continue;
            }
            let expires_at = conn
                .identity
                .expires_at
                .map(|exp| exp.saturating_add(self.leeway_secs));
            if expires_at.is_some_and(|exp| now_secs >= exp) {
                closed.expired_tokens += 1;
                debug!(client = %conn.id, "closing (4001): token expired");
                let close = frame::encode_close(CloseCode::TOKEN_EXPIRED, "token expired");
                conn.outbound.push_close(close, queued);
                continue;
            }
            let live = &mut conn.liveness;
            let due = if live.pinged_at != 0 {
                if live.last_seen.wrapping_sub(live.pinged_at) as i32 >= 0 {
                    // Answered (any frame counts).
                    live.pinged_at = 0;
                    live.last_seen.wrapping_add(self.interval)
                } else {
                    closed.timed_out += 1;
                    debug!(client = %conn.id, "closing: heartbeat timeout");
                    let close = frame::encode_close(CloseCode::NORMAL, HEARTBEAT_TIMEOUT);
                    conn.outbound.push_close(close, queued);
                    continue;
                }
            } else if now32.wrapping_sub(live.last_seen) < self.interval {
                // Heard from recently: look again when it would have been idle long enough.
                live.last_seen.wrapping_add(self.interval)
            } else {
                live.pinged_at = now32.max(1);
                let app = usize::from(conn.app.0);
                if self.app_pings.len() <= app {
                    self.app_pings.resize(app + 1, None);
                }
                let ping = self.app_pings[app]
                    .get_or_insert_with(|| app_ping(conn.app))
                    .clone()
                    .unwrap_or_else(|| self.ping_frame.clone());
                conn.outbound.push(ping, queued);
                now32.wrapping_add(self.timeout)
            };
            // Back to a full tick count (`due` is near `now`; overdue means the next tick).
            let ahead = due.wrapping_sub(now32) as i32;
            let due = now + u64::try_from(ahead).unwrap_or(0);
            let by_expiry = expires_at.map_or(Tick::MAX, |exp| {
                let left = Duration::from_secs(exp.saturating_sub(now_secs));
                now + (left.as_nanos() / self.tick.as_nanos()) as Tick + 1
            });
            self.file(key, generation, &mut conn.liveness, due.min(by_expiry));
        }
        self.expired = expired;
        closed
    }
}

/// The close reason sent to a connection that did not answer a ping in time.
pub const HEARTBEAT_TIMEOUT: &str = "heartbeat timeout";

#[cfg(test)]
mod tests {
    //! The heartbeat policy on a fake clock: the wheel is driven tick by tick, and reads are
    //! simulated by stamping `last_seen`.

    use std::net::IpAddr;
    use std::rc::Rc;
    use std::sync::Arc;

    use std::sync::atomic::Ordering;

    use super::*;
    use crate::base::identity::Identity;
    use crate::base::time::now_secs;
    use crate::config::HeartbeatMode;
    use crate::node::{CHAT, ECHO, Node};
    use crate::runtime::shard::Shard;
    use crate::runtime::{AppId, Newcomer};

    /// A one-shard node with 30 s heartbeats and a 10 s timeout: one tick a second.
    fn shard(mode: HeartbeatMode) -> Rc<Shard> {
        let config = Config {
            shards: 1,
            heartbeat_mode: mode,
            ..Config::default()
        };
        let (node, _inboxes, _) = Node::new(Arc::new(config), 1024).unwrap();
        node.shard(0)
    }

    fn connect(shard: &Shard, app: AppId, identity: Identity) -> usize {
        let key = shard.register(Newcomer::plain(
            app,
            Arc::new(identity),
            IpAddr::from([127, 0, 0, 1]),
        ));
        shard.take_written(key); // the greeting
        key
    }

    fn heard_from(shard: &Shard, key: usize, tick: Tick) {
        shard.state().conns[key].liveness.last_seen = tick as u32;
    }

    /// Drives the wheel through `ticks` (with traffic from the peer at `heard_at`), checking that
    /// nothing is sent meanwhile.
    fn quiet_through(shard: &Shard, key: usize, ticks: std::ops::Range<Tick>, heard_at: Tick) {
        for tick in ticks {
            if tick == heard_at {
                heard_from(shard, key, tick);
            }
            shard.tick(tick);
            assert!(shard.take_written(key).is_empty(), "tick {tick}");
        }
    }

    fn timeouts(shard: &Shard) -> u64 {
        let counters = &shard.shared.counters;
        counters.heartbeat_timeouts.load(Ordering::Relaxed)
    }

    #[test]
    fn an_idle_connection_is_pinged_after_the_interval_and_closed_after_the_timeout() {
        let shard = shard(HeartbeatMode::Frame);
        let key = connect(&shard, CHAT, Identity::anonymous());
        quiet_through(&shard, key, 1..30, 0);
        shard.tick(30);
        assert_eq!(shard.take_written(key), vec![(0x9, vec![])], "pinged");
        quiet_through(&shard, key, 31..40, 0);
        shard.tick(40);
        let mut close = vec![0x03, 0xe8];
        close.extend_from_slice(HEARTBEAT_TIMEOUT.as_bytes());
        assert_eq!(shard.take_written(key), vec![(0x8, close)]);
        assert_eq!(timeouts(&shard), 1);
    }

    #[test]
    fn any_frame_answers_and_traffic_postpones_the_ping() {
        let shard = shard(HeartbeatMode::Frame);
        let key = connect(&shard, ECHO, Identity::anonymous());
        // Traffic at tick 20: no ping at 30, but at 50.
        quiet_through(&shard, key, 1..50, 20);
        shard.tick(50);
        assert_eq!(shard.take_written(key), vec![(0x9, vec![])]);
        // Answered (any frame) at tick 55: not closed at 60, pinged again at 85.
        quiet_through(&shard, key, 51..85, 55);
        shard.tick(85);
        assert_eq!(shard.take_written(key), vec![(0x9, vec![])]);
        assert_eq!(timeouts(&shard), 0);
    }

    #[test]
    fn json_mode_pings_chat_clients_with_the_seed_message_and_echo_clients_with_frames() {
        let shard = shard(HeartbeatMode::Json);
        let chat = connect(&shard, CHAT, Identity::anonymous());
        let echo = connect(&shard, ECHO, Identity::anonymous());
        for tick in 1..=30 {
            shard.tick(tick);
        }
        let pinged = shard.take_written(chat);
        assert_eq!(pinged.len(), 1);
        assert_eq!(pinged[0].0, 0x1);
        let ping: serde_json::Value = serde_json::from_slice(&pinged[0].1).unwrap();
        assert_eq!(ping["type"], "ping");
        assert!(ping["timestamp"].as_u64().unwrap() > 1_600_000_000_000);
        assert_eq!(shard.take_written(echo), vec![(0x9, vec![])]);
    }

    #[test]
    fn an_expired_token_closes_with_4001_even_with_traffic() {
        // The expiry is read from the wall clock: this token is past its `exp` and the 10 s
        // leeway already, and is due on the first tick.
        let shard = shard(HeartbeatMode::Frame);
        let expired = Identity {
            expires_at: Some(now_secs() - 11),
            ..Identity::anonymous()
        };
        let key = connect(&shard, CHAT, expired);
        heard_from(&shard, key, 1);
        shard.tick(1);
        let queued = shard.take_written(key);
        assert_eq!(queued.len(), 1, "{queued:?}");
        assert_eq!(queued[0].0, 0x8);
        assert_eq!(queued[0].1[..2], 4001u16.to_be_bytes());
        assert_eq!(&queued[0].1[2..], b"token expired");
        assert_eq!(
            shard.shared.counters.tokens_expired.load(Ordering::Relaxed),
            1
        );
    }
}
