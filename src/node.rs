//! What the shards of one gateway process share: configuration, the room directory, the
//! bus between them and a few gauges. Nothing here is touched per message except through atomics.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use std::time::Duration;

use serde_json::Value;
use tracing::info;

use crate::auth::{AuthError, Authenticator};
use crate::base::identity::Identity;
use crate::broker::{Broker, Engine};
use crate::bus::{Bus, Inbox};
use crate::config::{BrokerKind, Config, ConfigError};
use crate::http::forwarded::TrustedProxies;
use crate::http::idle::HttpConnections;
use crate::limits::{Admission, Refusal, RoomCreation};
use crate::metrics::ShardMetrics;
use crate::rooms::RoomDirectory;
use crate::routing::Delivery;
use crate::stream::HistoryLimits;
use crate::tls::Tls;
use crate::ws::close::CloseCode;

/// What start-up builds from the configuration before anything listens: the checks that need
/// more than the configuration's own values (key files, certificates, proxy lists, the Redis URL)
/// are made by building what they configure.
pub struct Preflight {
    pub auth: Authenticator,
    pub tls: Option<Tls>,
    pub proxies: TrustedProxies,
}

/// Builds what `config` names, or says which setting is wrong (start-up prints it and exits 2).
pub fn preflight(config: &Config) -> Result<Preflight, ConfigError> {
    if config.broker == BrokerKind::Redis {
        crate::broker::redis::check_url(&config.redis_url)
            .map_err(|e| ConfigError::bad("redis_url", &config.redis_url.redacted(), &e))?;
    }
    let proxies = TrustedProxies::parse(&config.trusted_proxies, config.forwarded_header)
        .map_err(|e| ConfigError::new(format!("trusted_proxies: {e}")))?;
    if config.proxy_protocol && proxies.is_empty() {
        return Err(ConfigError::bad(
            "proxy_protocol",
            &true,
            "needs trusted_proxies: the proxies whose PROXY headers are read",
        ));
    }
    let tls = match (&config.tls_cert_file, &config.tls_key_file) {
        (Some(cert), Some(key)) => Some(Tls::load(cert, key).map_err(ConfigError::new)?),
        _ => None,
    };
    // Reads the key file, so a missing or wrong key stops start-up here.
    let auth = Authenticator::from_config(config).map_err(ConfigError::new)?;
    if auth.dev_mode() && !config.listen.ip().is_loopback() && !config.dev_mode {
        return Err(ConfigError::bad(
            "listen",
            &config.listen,
            "dev mode (no jwt_secret or jwt_public_key_file: anyone may get a token at \
             /dev/token) serves loopback addresses only; configure a key, or set \
             dev_mode = true (--dev) to expose it anyway",
        ));
    }
    Ok(Preflight { auth, tls, proxies })
}

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
    /// Per-message metrics, one block per shard (each written by its shard only).
    pub metrics: Box<[ShardMetrics]>,
    pub admission: Admission,
    /// Each user's and address's budget of new rooms.
    pub room_creation: RoomCreation,
    /// The listener's TLS, with `tls_cert_file` and `tls_key_file`.
    pub tls: Option<Tls>,
    /// The proxies whose word on a client's address is taken (`trusted_proxies`).
    pub proxies: TrustedProxies,
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
    ) -> Result<(Self, Vec<Inbox>, Option<Engine>), ConfigError> {
        let Preflight { auth, tls, proxies } = preflight(&config)?;
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
            auth,
            anonymous: Arc::new(Identity::anonymous()),
            counters: Counters::default(),
            metrics: (0..config.shards)
                .map(|_| ShardMetrics::default())
                .collect(),
            admission: Admission::new(&config, max_sockets),
            room_creation: RoomCreation::new(&config),
            http: HttpConnections::default(),
            proxies,
            tls,
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
    /// Connections closed for bad frames: 1002 (protocol), 1007 (not UTF-8), 1009 (too big).
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
                "Connections closed with 1007: text not UTF-8",
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

/// The node's chores, once per `every`: forgetting rooms whose members are gone and whose history
/// expired, and logging refusals and forced closes as one line with the count of each reason
/// (exact totals stay in the counters), not one line per event: under an attack or a mass
/// disconnect, per-event lines would let a client drive the log volume and stall the shards on
/// the log writer's lock.
pub async fn housekeeping(node: Arc<Node>, every: Duration) {
    // From zero, not from the values now: refusals before this task first runs are logged too.
    let mut last: Vec<(String, u64)> = node
        .counters
        .values()
        .into_iter()
        .map(|(name, _)| (name, 0))
        .collect();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_a_bad_redis_url_are_never_printed() {
        let bad = Config {
            broker: BrokerKind::Redis,
            redis_url: "nope://:hunter2@h".into(),
            ..Config::default()
        };
        let error = preflight(&bad).err().expect("refused").to_string();
        assert!(
            error.contains("redis_url") && !error.contains("hunter2"),
            "{error}"
        );
    }
}
