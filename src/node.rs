//! What the shards of one gateway process share: configuration, the room directory, the
//! bus between them and a few gauges. Nothing here is touched per message except through atomics.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use std::time::Duration;

use serde_json::Value;
use tracing::info;

use crate::auth::{AuthError, Authenticator, Identity};
use crate::broker::{Broker, Engine};
use crate::bus::{Bus, Inbox};
use crate::close::CloseCode;
use crate::config::Config;
use crate::http::idle::HttpConnections;
use crate::limits::{Admission, Refusal};
use crate::rooms::RoomDirectory;
use crate::routing::Delivery;
use crate::stream::HistoryLimits;

pub struct Node {
    /// This node's name among the nodes of a cluster: 8 random hex digits, new at each start.
    pub id: Arc<str>,
    pub config: Arc<Config>,
    /// What joins this node to others (or nothing, with the memory broker).
    pub broker: Broker,
    pub rooms: RoomDirectory,
    /// Carries publications between this node's shards.
    pub bus: Bus,
    /// Open WebSocket connections, one gauge per shard (each written by its shard only).
    pub connections: Box<[AtomicUsize]>,
    /// Bytes queued for writing, one gauge per shard, refreshed by each shard once per heartbeat
    /// tick (not per message).
    pub queued_bytes: Box<[AtomicUsize]>,
    pub auth: Authenticator,
    /// The identity of token-less connections when `allow_anonymous` is on (shared by all).
    pub anonymous: Arc<Identity>,
    pub counters: Counters,
    pub admission: Admission,
    /// Plain HTTP connections, for closing the longest idle first when descriptors run short.
    pub http: HttpConnections,
    /// Set when shutdown begins: upgrades are refused, `/readyz` fails, connections get 1001.
    pub draining: AtomicBool,
}

impl Node {
    /// A node for `config` (whose `max_connections` is already resolved) that may hold up to
    /// `max_sockets` sockets, the inbox of each of its shards, and the broker's engine to run
    /// (with Redis).
    pub fn new(
        config: Arc<Config>,
        max_sockets: usize,
    ) -> Result<(Self, Vec<Inbox>, Option<Engine>), String> {
        let (bus, inboxes) = Bus::new(config.shards, config.max_shard_inbox_bytes);
        let id = crate::stream::new_epoch();
        let (broker, engine) = Broker::new(&config, id.clone());
        let node = Node {
            id,
            rooms: RoomDirectory::new(
                config.shards,
                broker.is_shared(),
                HistoryLimits {
                    size: config.history_size,
                    ttl: config.history_ttl,
                },
                config.max_rooms,
            ),
            connections: (0..config.shards).map(|_| AtomicUsize::new(0)).collect(),
            queued_bytes: (0..config.shards).map(|_| AtomicUsize::new(0)).collect(),
            auth: Authenticator::from_config(&config)?,
            anonymous: Arc::new(Identity::anonymous()),
            counters: Counters::default(),
            admission: Admission::new(&config, max_sockets),
            http: HttpConnections::default(),
            draining: AtomicBool::new(false),
            config,
            broker,
            bus,
        };
        Ok((node, inboxes, engine))
    }

    /// Hands a publication to other shards' inboxes; those it cannot reach are counted.
    pub fn forward(&self, shards: &[usize], delivery: Delivery) {
        let dropped = self.bus.send(shards, delivery);
        if dropped > 0 {
            self.counters
                .inbox_dropped
                .fetch_add(dropped as u64, Ordering::Relaxed);
        }
    }

    pub fn shards(&self) -> usize {
        self.connections.len()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Bytes queued for writing across all shards (as of each shard's last heartbeat tick).
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
            .iter()
            .map(|q| q.load(Ordering::Relaxed))
            .sum()
    }

    pub fn connection_count(&self) -> usize {
        self.connections
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

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
    /// Connections closed for bad frames: 1002 (protocol), 1007 (not UTF-8), 1009 (too big).
    pub protocol_errors: AtomicU64,
    pub invalid_utf8: AtomicU64,
    pub messages_too_big: AtomicU64,
    /// Connections closed with 4001: the token expired without a refresh.
    pub tokens_expired: AtomicU64,
    /// Connections closed because their user was disconnected (`Gateway::disconnect_user`, on
    /// any node).
    pub users_disconnected: AtomicU64,
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

    /// Every counter but the per-reason authentication refusals, by its public name.
    fn named(&self) -> [(&'static str, &AtomicU64); 31] {
        [
            ("origin_refused", &self.origin_refused),
            ("draining_refused", &self.draining_refused),
            ("server_full", &self.server_full),
            ("ip_connections_refused", &self.ip_connections_refused),
            ("ip_handshakes_refused", &self.ip_handshakes_refused),
            ("rate_limited_messages", &self.rate_limited),
            ("frames_rate_limited", &self.frames_rate_limited),
            ("memory_pressure", &self.memory_pressure),
            ("inbox_dropped", &self.inbox_dropped),
            ("resyncs", &self.resyncs),
            ("broker_unavailable", &self.broker_unavailable),
            ("broker_notices_dropped", &self.broker_notices_dropped),
            ("broker_disconnects", &self.broker_disconnects),
            ("broker_probe_failures", &self.broker_probe_failures),
            ("broker_catch_ups", &self.broker_catch_ups),
            ("broker_malformed", &self.broker_malformed),
            ("http_evicted", &self.http_evicted),
            ("http_expired", &self.http_expired),
            ("rooms_refused", &self.rooms_refused),
            ("bad_requests", &self.bad_requests),
            ("handshake_timeouts", &self.handshake_timeouts),
            ("accept_errors", &self.accept_errors),
            ("flood_closed", &self.flood_closed),
            ("slow_consumers_closed", &self.slow_consumers),
            ("dropped_messages", &self.dropped_messages),
            ("heartbeat_timeouts", &self.heartbeat_timeouts),
            ("tokens_expired", &self.tokens_expired),
            ("users_disconnected", &self.users_disconnected),
            ("protocol_errors", &self.protocol_errors),
            ("invalid_utf8", &self.invalid_utf8),
            ("messages_too_big", &self.messages_too_big),
        ]
    }

    /// Every counter's value, flat (`auth_refused.<reason>` for authentication refusals).
    pub fn values(&self) -> Vec<(String, u64)> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let auth = AuthError::ALL
            .iter()
            .zip(&self.auth_refused)
            .map(|(e, c)| (format!("auth_refused.{}", e.code()), get(c)));
        let named = self.named().map(|(name, c)| (name.to_owned(), get(c)));
        auth.chain(named).collect()
    }

    /// The counters as JSON, for `/healthz`.
    pub fn snapshot(&self) -> Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let auth: serde_json::Map<String, Value> = AuthError::ALL
            .iter()
            .zip(&self.auth_refused)
            .map(|(e, c)| (e.code().to_owned(), get(c).into()))
            .collect();
        let mut snapshot: serde_json::Map<String, Value> = self
            .named()
            .iter()
            .map(|(name, c)| ((*name).to_owned(), get(c).into()))
            .collect();
        snapshot.insert("auth_refused".into(), auth.into());
        snapshot.into()
    }
}

/// The node's chores, once per `every`: forgetting rooms whose members are gone and whose history
/// expired, and logging refusals and forced closes as one line with the count of each reason
/// (exact totals stay in the counters), not one line per event: under an attack or a mass
/// disconnect, per-event lines would let a client drive the log volume and stall the shards on
/// the log writer's lock.
pub async fn housekeeping(node: Arc<Node>, every: Duration) {
    let mut last: Vec<(String, u64)> = node.counters.values();
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        node.rooms.sweep();
        let now = node.counters.values();
        let changed: Vec<String> = now
            .iter()
            .zip(&last)
            .filter(|((_, new), (_, old))| new > old)
            .map(|((name, new), (_, old))| format!("{name}={}", new - old))
            .collect();
        if !changed.is_empty() {
            info!(
                interval = ?every,
                "refused or closed: {}",
                changed.join(" ")
            );
        }
        last = now;
    }
}
