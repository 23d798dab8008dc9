//! Every refusal and forced close, counted by reason: rare events, so plain shared atomics.

use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::Value;

use crate::auth::AuthError;
use crate::conn::limits::Refusal;
use crate::ws::close::CloseCode;

/// Every refusal and forced close, counted by reason (each is also logged once when it happens).
#[derive(Default)]
pub struct Counters {
    /// Upgrades refused with 401, by [`AuthError`] (in `AuthError::ALL` order).
    auth_refused: [AtomicU64; AuthError::ALL.len()],
    /// Upgrades refused with 403: `Origin` not in `allowed_origins`.
    pub origin_refused: AtomicU64,
    /// Upgrades refused with 503 while draining.
    pub draining_refused: AtomicU64,
    /// Sockets or upgrades refused by admission: server full (503), per-IP connections or
    /// handshakes (429).
    pub server_full: AtomicU64,
    pub ip_connections_refused: AtomicU64,
    pub ip_handshakes_refused: AtomicU64,
    /// Data messages refused by the per-connection rate limits (any of them).
    pub rate_limited: AtomicU64,
    /// Frames of any kind over the per-connection frame rate (pings over it go unanswered).
    pub frames_rate_limited: AtomicU64,
    /// Slow-consumer verdicts reached because a shard was over its share of
    /// `max_total_queued_bytes`.
    pub memory_pressure: AtomicU64,
    /// Publications dropped because a shard's inbox was past `max_shard_inbox_bytes`.
    pub inbox_dropped: AtomicU64,
    /// Room messages refused with "Service unavailable: retry": Redis away or behind.
    pub broker_unavailable: AtomicU64,
    /// Notices (typing, joins and leaves, broadcasts) not shared with the other nodes: Redis
    /// away or behind.
    pub broker_notices_dropped: AtomicU64,
    /// Connections to Redis lost (or never made), each followed by a reconnection.
    pub broker_disconnects: AtomicU64,
    /// Subscriptions restarted because the probe did not come back (a wedged subscriber).
    pub broker_probe_failures: AtomicU64,
    /// Rooms caught up from their Redis history (after a reconnect or a lost message).
    pub broker_catch_ups: AtomicU64,
    /// New cluster generations this node started: Redis had lost data or gone back in time, and
    /// every room started over under a new epoch.
    pub broker_generations: AtomicU64,
    /// Publications from Redis that were not wsgate's, ignored.
    pub broker_malformed: AtomicU64,
    /// Rooms whose members were told to `resync`: stream messages were lost on the way to them
    /// and were no longer in the history.
    pub resyncs: AtomicU64,
    /// Idle plain HTTP connections closed to make room for new ones.
    pub http_evicted: AtomicU64,
    /// Plain HTTP connections closed at `http_max_lifetime`.
    pub http_expired: AtomicU64,
    /// Joins of a new room refused at `max_rooms`.
    pub rooms_refused: AtomicU64,
    /// Joins with `since` answered `recovered: false` because the connection's replay budget
    /// was spent (the history still had what it missed).
    pub replays_refused: AtomicU64,
    /// Requests answered 400 or 431: a malformed or oversized head, a malformed upgrade.
    pub bad_requests: AtomicU64,
    /// Connections dropped for not sending a request head within `handshake_timeout`.
    pub handshake_timeouts: AtomicU64,
    /// `accept` failures (typically out of file descriptors), each followed by a back-off.
    pub accept_errors: AtomicU64,
    /// Connections closed with 1008 for flooding past their strikes.
    pub flood_closed: AtomicU64,
    /// Connections closed with 1008 because their outbound queue passed `max_queued_bytes`.
    pub slow_consumers: AtomicU64,
    /// Broadcasts dropped for slow readers (`slow_consumer_policy = "drop"`).
    pub dropped_messages: AtomicU64,
    /// Connections closed because they did not answer a ping within `heartbeat_timeout`.
    pub heartbeat_timeouts: AtomicU64,
    /// Connections closed for bad frames: 1002 (protocol), 1007 (not UTF-8, or compressed data
    /// that does not inflate), 1009 (too big, compressed or inflated).
    pub protocol_errors: AtomicU64,
    pub invalid_utf8: AtomicU64,
    pub messages_too_big: AtomicU64,
    /// Connections closed with 4001: the token expired without a refresh.
    pub tokens_expired: AtomicU64,
    /// Connections closed because their user was disconnected (`Gateway::disconnect_user`, on
    /// any node).
    pub users_disconnected: AtomicU64,
    /// TLS handshakes that failed (not TLS, no shared version or cipher, a bad certificate).
    pub tls_handshake_failures: AtomicU64,
}

impl Counters {
    pub fn admission_refused(&self, refusal: Refusal) {
        let counter = match refusal {
            Refusal::ServerFull => &self.server_full,
            Refusal::TooManyConnections => &self.ip_connections_refused,
            Refusal::TooManyHandshakes => &self.ip_handshakes_refused,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn frame_error(&self, code: CloseCode) {
        let counter = match code {
            CloseCode::INVALID_PAYLOAD => &self.invalid_utf8,
            CloseCode::MESSAGE_TOO_BIG => &self.messages_too_big,
            _ => &self.protocol_errors,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn auth_refused(&self, error: AuthError) {
        let at = AuthError::ALL
            .iter()
            .position(|e| *e == error)
            .expect("listed");
        self.auth_refused[at].fetch_add(1, Ordering::Relaxed);
    }

    /// Every counter but the per-reason authentication refusals: its public name, what it
    /// counts (the metric's help), and the counter.
    pub fn described(&self) -> [(&'static str, &'static str, &AtomicU64); 34] {
        [
            (
                "origin_refused",
                "Upgrades refused (403): Origin not allowed",
                &self.origin_refused,
            ),
            (
                "draining_refused",
                "Upgrades refused (503) while shutting down",
                &self.draining_refused,
            ),
            (
                "server_full",
                "Sockets or upgrades refused (503): server full",
                &self.server_full,
            ),
            (
                "ip_connections_refused",
                "Sockets refused (429): max_connections_per_ip",
                &self.ip_connections_refused,
            ),
            (
                "ip_handshakes_refused",
                "Upgrades refused (429): max_handshakes_per_ip",
                &self.ip_handshakes_refused,
            ),
            (
                "rate_limited_messages",
                "Data messages refused by the per-connection rate limits",
                &self.rate_limited,
            ),
            (
                "frames_rate_limited",
                "Frames over the per-connection frame rate",
                &self.frames_rate_limited,
            ),
            (
                "memory_pressure",
                "Slow-consumer verdicts reached over a shard's share of max_total_queued_bytes",
                &self.memory_pressure,
            ),
            (
                "inbox_dropped",
                "Publications dropped: a shard's inbox was full",
                &self.inbox_dropped,
            ),
            (
                "resyncs",
                "Rooms whose members were told to resync",
                &self.resyncs,
            ),
            (
                "broker_unavailable",
                "Room messages refused: Redis away or behind",
                &self.broker_unavailable,
            ),
            (
                "broker_notices_dropped",
                "Notices not shared with other nodes: Redis away or behind",
                &self.broker_notices_dropped,
            ),
            (
                "broker_disconnects",
                "Connections to Redis lost or never made",
                &self.broker_disconnects,
            ),
            (
                "broker_probe_failures",
                "Redis subscriptions restarted: the probe did not come back",
                &self.broker_probe_failures,
            ),
            (
                "broker_catch_ups",
                "Rooms caught up from their Redis history",
                &self.broker_catch_ups,
            ),
            (
                "replays_refused",
                "Joins with since not replayed: the connection's replay budget was spent",
                &self.replays_refused,
            ),
            (
                "broker_generations",
                "New cluster generations started: Redis lost data or went back in time",
                &self.broker_generations,
            ),
            (
                "broker_malformed",
                "Publications or keys in Redis that were not wsgate's, skipped",
                &self.broker_malformed,
            ),
            (
                "http_evicted",
                "Idle plain HTTP connections closed to make room",
                &self.http_evicted,
            ),
            (
                "http_expired",
                "Plain HTTP connections closed at http_max_lifetime",
                &self.http_expired,
            ),
            (
                "rooms_refused",
                "New rooms refused at max_rooms",
                &self.rooms_refused,
            ),
            (
                "bad_requests",
                "Requests answered 400 or 431",
                &self.bad_requests,
            ),
            (
                "handshake_timeouts",
                "Connections without a request head (or TLS handshake) within handshake_timeout",
                &self.handshake_timeouts,
            ),
            (
                "tls_handshake_failures",
                "TLS handshakes that failed",
                &self.tls_handshake_failures,
            ),
            (
                "accept_errors",
                "accept() failures (out of file descriptors)",
                &self.accept_errors,
            ),
            (
                "flood_closed",
                "Connections closed with 1008 for flooding",
                &self.flood_closed,
            ),
            (
                "slow_consumers_closed",
                "Connections closed with 1008: outbound queue past max_queued_bytes",
                &self.slow_consumers,
            ),
            (
                "dropped_messages",
                "Broadcasts dropped for slow readers (slow_consumer_policy = drop)",
                &self.dropped_messages,
            ),
            (
                "heartbeat_timeouts",
                "Connections closed: no answer to a ping within heartbeat_timeout",
                &self.heartbeat_timeouts,
            ),
            (
                "tokens_expired",
                "Connections closed with 4001: token expired",
                &self.tokens_expired,
            ),
            (
                "users_disconnected",
                "Connections closed by a disconnect of their user",
                &self.users_disconnected,
            ),
            (
                "protocol_errors",
                "Connections closed with 1002: protocol error",
                &self.protocol_errors,
            ),
            (
                "invalid_utf8",
                "Connections closed with 1007: text not UTF-8, or a compressed message that does \
                 not inflate",
                &self.invalid_utf8,
            ),
            (
                "messages_too_big",
                "Connections closed with 1009: message over max_message_size",
                &self.messages_too_big,
            ),
        ]
    }

    /// A counter by its public name (0 for an unknown name).
    pub fn get(&self, name: &str) -> u64 {
        self.described()
            .iter()
            .find(|(n, ..)| *n == name)
            .map_or(0, |(.., c)| c.load(Ordering::Relaxed))
    }

    /// Upgrades refused with 401, by reason.
    pub fn auth_refused_counts(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        AuthError::ALL
            .iter()
            .zip(&self.auth_refused)
            .map(|(e, c)| (e.code(), c.load(Ordering::Relaxed)))
    }

    /// Every counter's value, flat (`auth_refused.<reason>` for authentication refusals).
    pub fn values(&self) -> Vec<(String, u64)> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let auth = self
            .auth_refused_counts()
            .map(|(reason, n)| (format!("auth_refused.{reason}"), n));
        let named = self
            .described()
            .map(|(name, _, c)| (name.to_owned(), get(c)));
        auth.chain(named).collect()
    }

    /// The counters as JSON, for `/healthz`.
    pub fn snapshot(&self) -> Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let auth: serde_json::Map<String, Value> = self
            .auth_refused_counts()
            .map(|(reason, n)| (reason.to_owned(), n.into()))
            .collect();
        let mut snapshot: serde_json::Map<String, Value> = self
            .described()
            .iter()
            .map(|(name, _, c)| ((*name).to_owned(), get(c).into()))
            .collect();
        snapshot.insert("auth_refused".into(), auth.into());
        snapshot.into()
    }
}
