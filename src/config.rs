//! Configuration: built-in defaults, then an optional TOML file, then `WSGATE_*` environment
//! variables, then command-line flags — each overriding the one before.
//!
//! Every key is documented here with its default; `wsgate --print-config` shows the result.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// The largest `max_message_size` accepted: a message is buffered whole before it is handled.
const MAX_MESSAGE_SIZE_LIMIT: usize = 1 << 30;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address every shard listens on (SO_REUSEPORT). Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Number of shards: one thread, runtime and listening socket each. Default: number of cores.
    pub shards: usize,
    /// Listen backlog per shard socket. Default 1024.
    pub backlog: u32,
    /// The I/O engine of the shards' event loops: `auto` (default: io_uring where the kernel and
    /// the sandbox allow it, else epoll, saying why in the log), `io_uring` (refuse to start
    /// without it) or `epoll`. The engine in use is in the start-up log, `/healthz` and
    /// `/metrics`.
    pub engine: Engine,
    /// Receive buffers (4 KiB each) of each shard's io_uring ring: what arrives waits in them
    /// until its connection's turn. More cost memory (4 MiB per shard by default, taken at
    /// start); fewer make receives wait for buffers under load (counted in
    /// `wsgate_io_uring_buffer_waits_total`). A power of two, 2 to 32768. Default 1024.
    pub io_uring_buffers: u16,
    /// Largest message (after reassembling fragments) a client may send; bigger closes with
    /// 1009. Default 64 KiB. For a compressed message, both what arrives and what it inflates to.
    pub max_message_size: usize,
    /// permessage-deflate (RFC 7692): `off` (default: offers are declined) or `on` (a client's
    /// offer is accepted, always without context takeover either way). Publications of 128
    /// bytes or more (replies: 256) to a connection that agreed go out compressed — a
    /// publication compressed once for all of them — and its compressed messages are inflated within
    /// `max_message_size`. Costs no memory per connection (each shard thread has its own
    /// compressors and inflater), CPU per compressed message.
    pub compression: Compression,
    /// Bytes queued for one connection before it counts as a slow consumer: reading from it
    /// pauses (so a client that sends without reading is pushed back by TCP), and a broadcast that
    /// would pass this closes it with 1008 "slow consumer" after what is queued. Default 1 MiB.
    pub max_queued_bytes: usize,
    /// What happens to a reader whose queue a broadcast would push past `max_queued_bytes`:
    /// `close` (default; 1008 "slow consumer" after what is queued) or `drop` (its oldest queued
    /// broadcasts are dropped and counted; it gets `{"type":"dropped","count":N}` once it catches
    /// up).
    pub slow_consumer_policy: SlowConsumerPolicy,
    /// Longest chat message, in characters. Default 1000 (as the seed).
    pub max_chat_message_chars: usize,
    /// Rooms one connection may be in at once. Default 100.
    pub max_rooms_per_connection: usize,
    /// Rooms this node holds at once (with members, or with history not yet expired); joining a
    /// new room past it is refused. Default 100,000.
    pub max_rooms: usize,
    /// New rooms (rooms this node holds nothing of) each user (anonymous connections: each
    /// address) may join, per second, after a burst of `room_creation_burst`: one client cannot
    /// fill `max_rooms` (or Redis) for everyone. Default 2/s, burst 200.
    pub room_creation_rate: f32,
    pub room_creation_burst: u32,
    /// Messages each room keeps for clients that reconnect (`join_room` with `since`); 0 keeps
    /// none. Default 100.
    pub history_size: usize,
    /// How long a room keeps a message for reconnecting clients. Default 5 min.
    #[serde(with = "humantime_serde")]
    pub history_ttl: Duration,
    /// How long a `chat_message`'s `messageId` is remembered: a retry with the same id within it
    /// is published once (cluster-wide with Redis). Default 2 min.
    #[serde(with = "humantime_serde")]
    pub dedup_window: Duration,
    /// What joins this node to others: `memory` (default: one node, nothing shared) or `redis`
    /// (rooms, their order and history shared through the Redis at `redis_url`).
    pub broker: BrokerKind,
    /// The Redis of `broker = "redis"`. Default `redis://127.0.0.1:6379/`.
    pub redis_url: RedisUrl,
    /// How long a node stays subscribed to a room after its last local member left (a member
    /// that comes back meanwhile costs no resubscription). Default 2 s.
    #[serde(with = "humantime_serde")]
    pub redis_unsubscribe_grace: Duration,
    /// Room messages waiting to be published to Redis, at most; past it (Redis slow or away) a
    /// message is refused with "Service unavailable: retry". Default 10,000.
    pub redis_publish_queue: usize,
    /// `user_joined`/`user_left` notices are sent only in rooms of at most this many members:
    /// each notice costs O(members), so in huge rooms they would turn joins into O(N²) traffic.
    /// Default 1000.
    pub presence_max_members: u32,
    /// How long closing a connection may take: sending what is queued and our close frame, then
    /// waiting for the client to hang up. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub close_timeout: Duration,
    /// A connection silent this long is pinged. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// A pinged connection silent this long (any frame is an answer) is closed. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub heartbeat_timeout: Duration,
    /// `frame` (RFC 6455 pings, answered by browsers themselves) or `json` (the seed's
    /// `{"type":"ping"}`, answered with `{"type":"pong"}`). Default `frame`.
    pub heartbeat_mode: HeartbeatMode,
    /// On SIGTERM/SIGINT, how long to wait for clients to finish their close handshakes before
    /// exiting anyway. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// WebSocket connections this process accepts; more get 503. 0 (default): the open-files
    /// limit less a small reserve (each connection is one file descriptor).
    pub max_connections: usize,
    /// WebSocket connections from one IP address; more get 429. Default 1000.
    pub max_connections_per_ip: u32,
    /// Upgrade attempts per second from one IP address (the burst is the same number); more get
    /// 429. Default 50.
    pub max_handshakes_per_ip: f32,
    /// How long a client may take to send its HTTP request headers (slow-loris). Default 10 s.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// How long a plain HTTP connection may sit idle between requests before it is closed.
    /// Idle HTTP connections are also the first to be closed when file descriptors run short.
    /// Default 5 s.
    #[serde(with = "humantime_serde")]
    pub http_idle_timeout: Duration,
    /// How long a plain HTTP connection may live (until it upgrades to a WebSocket), however busy:
    /// a client that pipelines requests and never reads the answers is not idle. Default 60 s.
    #[serde(with = "humantime_serde")]
    pub http_max_lifetime: Duration,
    /// The kernel send buffer of every accepted socket (`SO_SNDBUF`), in bytes; 0 leaves it to
    /// the kernel, which grows it up to `net.ipv4.tcp_wmem`'s maximum (4 MiB by default) for a
    /// client that does not read — kernel memory on top of `max_queued_bytes`. Default 256 KiB.
    pub socket_send_buffer: usize,
    /// Largest HTTP request head (at least 8192); bigger gets 431. Default 16 KiB.
    pub max_header_bytes: usize,
    /// Chat messages per second one connection may send, sustained. Default 20.
    pub rate_limit_messages: f32,
    /// Chat messages one connection may send in a burst. Default 40.
    pub rate_limit_burst: u32,
    /// Chat bytes per second one connection may send, sustained. Default 64 KiB.
    pub rate_limit_bytes: u64,
    /// Bytes one connection may send in a burst (at least `max_message_size`). Default: the larger
    /// of 256 KiB and `max_message_size`, so raising the message size alone just works.
    pub rate_limit_burst_bytes: Option<u64>,
    /// Frames per second one connection may send, sustained, counting every frame: control frames
    /// and fragments too, so a flood of tiny frames is bounded like a flood of messages. Default 200.
    pub rate_limit_frames: f32,
    /// Frames one connection may send in a burst. Default 1000.
    pub rate_limit_frame_burst: u32,
    /// Messages or frames over the limit a connection may send (refilled at one per second) before
    /// it is closed with 1008. Default 20.
    pub rate_limit_strikes: u32,
    /// All bytes queued for all connections together (charged as `max_queued_bytes` is), split
    /// evenly between the shards. Past its share a shard treats every reader with a backlog as a
    /// slow consumer and stops reading from clients whose replies are still queued. Default 1 GiB.
    pub max_total_queued_bytes: usize,
    /// Bytes of publications waiting in one shard's inbox from the other shards; past it they are
    /// dropped for that shard and counted (`inbox_dropped`). Default 64 MiB.
    pub max_shard_inbox_bytes: usize,
    /// Shared secret for HS256/384/512 tokens (at least 16 bytes). With neither this nor
    /// `jwt_public_key_file`, the gateway runs in dev mode: a random key and `GET /dev/token`.
    pub jwt_secret: Option<Secret>,
    /// PEM public key (RSA, EC P-256/P-384, or Ed25519) for RS*/ES*/EdDSA tokens.
    pub jwt_public_key_file: Option<PathBuf>,
    /// Algorithms accepted, e.g. `["RS256"]`. Default: every algorithm of the key's kind.
    pub jwt_algorithms: Vec<String>,
    /// Required `iss` claim, if set.
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim, if set.
    pub jwt_audience: Option<String>,
    /// Clock skew tolerated on `exp`. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub jwt_leeway: Duration,
    /// Accept connections without a token (as "Anonymous"); a token given is still verified.
    /// Default false.
    pub allow_anonymous: bool,
    /// Browser origins allowed to open WebSockets (`Origin` header), e.g.
    /// `["https://app.example.com"]`. Empty (default): any. Requests without `Origin` (non-browser
    /// clients) are not affected.
    pub allowed_origins: Vec<String>,
    /// Serve the raw echo endpoint `/echo` (the RFC 6455 conformance target). Default true.
    pub echo_endpoint: bool,
    /// One `info` line per WebSocket connection when it ends (target `wsgate::access`): its
    /// client id, user, address, seconds connected and the close code it was sent (0: none, the
    /// peer vanished or hung up first). Default true.
    pub access_log: bool,
    /// Include the refusal counters in `/healthz`, for the callers `/metrics` serves (loopback,
    /// or with `metrics_key`). Default true.
    pub healthz_detail: bool,
    /// The server API's key: backends call `/api/…` with `Authorization: Bearer <api_key>`. At
    /// least 16 characters. Unset (default): the API is off (404).
    pub api_key: Option<Secret>,
    /// TLS: the certificate chain (PEM, leaf first) and its private key (PEM: PKCS#8, PKCS#1 or
    /// SEC1). With both, the listener speaks only TLS (wss://, https://). Reloaded on SIGHUP and
    /// when either file changes. Default: none (plain TCP).
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Proxies whose word on the client's address is taken (CIDR blocks or addresses, e.g.
    /// `["10.0.0.0/8", "127.0.0.1"]`): from them, `Forwarded`/`X-Forwarded-For` (or the PROXY
    /// header) name the client that per-IP limits and logs see. Default: none.
    pub trusted_proxies: Vec<String>,
    /// The header trusted proxies name the client in: `x-forwarded-for` (default) or
    /// `forwarded` (RFC 7239). Only that one is read.
    pub forwarded_header: ForwardedHeader,
    /// Trusted proxies start every connection with a PROXY protocol header (v1 or v2), which
    /// names the client. Default false.
    pub proxy_protocol: bool,
    /// Prometheus's key for `GET /metrics` (`Authorization: Bearer <metrics_key>`), 16+
    /// characters. Unset (default): `/metrics` answers loopback callers only.
    pub metrics_key: Option<Secret>,
    /// Run without a token key (dev mode: a random key and `GET /dev/token` for anyone) on an
    /// address other than loopback. Default false: dev mode serves loopback only.
    pub dev_mode: bool,
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `wsgate=debug`. Default `info`.
    pub log: String,
    /// `text` (default; colours only on a terminal) or `json` (one object per line).
    pub log_format: LogFormat,
    /// Webhooks: what happens in rooms, POSTed to this URL in signed batches (see the README's
    /// "Webhooks"). Unset (default): none.
    pub webhook_url: Option<String>,
    /// The key webhook requests are signed with (HMAC-SHA256, `X-Wsgate-Signature`), 16+
    /// characters; required with `webhook_url`.
    pub webhook_secret: Option<Secret>,
    /// The events sent. Default: `room_occupied`, `room_vacated`, `member_added`,
    /// `member_removed` (`chat_message`, every client's chat message once published, on request).
    pub webhook_events: Vec<WebhookEvent>,
    /// Events waiting to be sent, at most; past it new ones are dropped (counted in
    /// `wsgate_webhook_events_total{outcome="dropped"}`). Default 10,000.
    pub webhook_queue: usize,
    /// Events in one request, at most. Default 100.
    pub webhook_batch: usize,
    /// How long one request may take. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub webhook_timeout: Duration,
    /// How long a batch is retried (with back-off) before its events are dropped (counted).
    /// Default 5 min.
    #[serde(with = "humantime_serde")]
    pub webhook_retry_for: Duration,
    /// Request headers of an upgrade passed to the connect proxy (e.g. `["cookie"]`, for a
    /// backend that knows its users by their session cookie). Default: none.
    pub proxy_headers: Vec<String>,
    /// Proxies to the application's backend: an HTTP POST per event, answered before the event
    /// takes effect (see the README's "Backend integration"). Each is unset (default: no call)
    /// or a URL (`publish_proxy = "http://backend:3000/wsgate/publish"`), or a table with the
    /// URL and its [`ProxySettings`]. `connect_proxy`: after the token is verified (allow, deny
    /// with a close code, or name the user and attach data to the greeting).
    pub connect_proxy: Option<ProxySettings>,
    /// `join_proxy`: each `join_room` the token allows (allow, or deny with an error).
    pub join_proxy: Option<ProxySettings>,
    /// `publish_proxy`: each `chat_message`, before it gets its offset and is broadcast (allow,
    /// deny with an error, or replace its text).
    pub publish_proxy: Option<ProxySettings>,
}

/// One proxy to the backend: where, how long to wait, how many calls at once, and what a
/// failure means. Written as a URL alone, it takes the defaults.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ProxySettings {
    /// `http://host:port/path` (plain HTTP: the backend is on the private network).
    pub url: String,
    /// How long an answer may take; past it the call failed. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Calls waiting for an answer at once, per shard; more fail at once (counted as
    /// `overloaded`). Each is a socket to the backend, kept out of the connection capacity.
    /// Default 100.
    pub max_in_flight: usize,
    /// What a failed call (timeout, unreachable, not 200, an answer that is not one, overloaded,
    /// or the breaker open) does: `refuse` (default: the client gets an error, a connection is
    /// closed with 1013 "try again later") or `allow` (as if the backend had allowed it).
    pub on_error: ProxyFailure,
    /// Failures in a row that open the proxy's circuit breaker: calls then fail at once for
    /// `breaker_cooldown`, then one call tries the backend again. Default 5.
    pub breaker_failures: u32,
    #[serde(with = "humantime_serde")]
    pub breaker_cooldown: Duration,
}

impl ProxySettings {
    /// A proxy at `url` with the defaults.
    pub fn at(url: &str) -> Self {
        ProxySettings {
            url: url.to_owned(),
            timeout: Duration::from_secs(1),
            max_in_flight: 100,
            on_error: ProxyFailure::Refuse,
            breaker_failures: 5,
            breaker_cooldown: Duration::from_secs(5),
        }
    }
}

/// A proxy written as a URL or as a table (every key but `url` optional).
impl<'de> Deserialize<'de> for ProxySettings {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            url: String,
            #[serde(default, with = "humantime_serde")]
            timeout: Option<Duration>,
            max_in_flight: Option<usize>,
            on_error: Option<ProxyFailure>,
            breaker_failures: Option<u32>,
            #[serde(default, with = "humantime_serde")]
            breaker_cooldown: Option<Duration>,
        }
        #[derive(Deserialize)]
        #[serde(
            untagged,
            expecting = "a URL, or a table with `url` and proxy settings"
        )]
        enum Written {
            Url(String),
            Table(Table),
        }
        Ok(match Written::deserialize(d)? {
            Written::Url(url) => ProxySettings::at(&url),
            Written::Table(t) => {
                let default = ProxySettings::at(&t.url);
                ProxySettings {
                    timeout: t.timeout.unwrap_or(default.timeout),
                    max_in_flight: t.max_in_flight.unwrap_or(default.max_in_flight),
                    on_error: t.on_error.unwrap_or(default.on_error),
                    breaker_failures: t.breaker_failures.unwrap_or(default.breaker_failures),
                    breaker_cooldown: t.breaker_cooldown.unwrap_or(default.breaker_cooldown),
                    url: t.url,
                }
            }
        })
    }
}

impl ProxySettings {
    /// Checks the numbers (the URL is checked by the backend layer, which parses it).
    fn validate(&self, key: &str) -> Result<(), ConfigError> {
        for (name, value) in [
            ("timeout", self.timeout),
            ("breaker_cooldown", self.breaker_cooldown),
        ] {
            if !(Duration::from_millis(1)..=Duration::from_secs(3600)).contains(&value) {
                let shown = humantime::format_duration(value);
                return Err(ConfigError::bad(
                    &format!("{key}.{name}"),
                    &shown,
                    "must be between 1ms and 1h",
                ));
            }
        }
        if self.max_in_flight == 0 {
            return Err(ConfigError::bad(
                &format!("{key}.max_in_flight"),
                &0,
                "must be at least 1",
            ));
        }
        if self.breaker_failures == 0 {
            return Err(ConfigError::bad(
                &format!("{key}.breaker_failures"),
                &0,
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// What webhooks report (`webhook_events`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookEvent {
    /// A room got its first connection, anywhere in the cluster.
    RoomOccupied,
    /// A room lost its last connection.
    RoomVacated,
    /// A user's first connection joined a room.
    MemberAdded,
    /// A user's last connection left a room.
    MemberRemoved,
    /// A client's chat message, once published (with its offset).
    ChatMessage,
}

impl WebhookEvent {
    pub const ALL: [WebhookEvent; 5] = [
        WebhookEvent::RoomOccupied,
        WebhookEvent::RoomVacated,
        WebhookEvent::MemberAdded,
        WebhookEvent::MemberRemoved,
        WebhookEvent::ChatMessage,
    ];

    pub fn name(self) -> &'static str {
        match self {
            WebhookEvent::RoomOccupied => "room_occupied",
            WebhookEvent::RoomVacated => "room_vacated",
            WebhookEvent::MemberAdded => "member_added",
            WebhookEvent::MemberRemoved => "member_removed",
            WebhookEvent::ChatMessage => "chat_message",
        }
    }
}

/// What a failed proxy call does (`on_error`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyFailure {
    Refuse,
    Allow,
}

/// The cluster's Redis URL, which may hold a password: `Debug` and `--print-config` show it
/// without its credentials.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RedisUrl(String);

impl RedisUrl {
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL without its credentials, for logs.
    pub fn redacted(&self) -> String {
        redacted_url(&self.0)
    }
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl<S: Into<String>> From<S> for RedisUrl {
    fn from(url: S) -> Self {
        RedisUrl(url.into())
    }
}

/// A secret setting (a key): shown as `<redacted>` by `Debug` and `--print-config`, never logged.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl From<&str> for Secret {
    fn from(secret: &str) -> Self {
        Secret(secret.to_owned())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            shards: std::thread::available_parallelism().map_or(1, |n| n.get()),
            backlog: 1024,
            engine: Engine::Auto,
            io_uring_buffers: 1024,
            max_message_size: 64 * 1024,
            compression: Compression::Off,
            max_queued_bytes: 1024 * 1024,
            slow_consumer_policy: SlowConsumerPolicy::Close,
            max_chat_message_chars: 1000,
            max_rooms_per_connection: 100,
            max_rooms: 100_000,
            room_creation_rate: 2.0,
            room_creation_burst: 200,
            history_size: 100,
            history_ttl: Duration::from_secs(300),
            dedup_window: Duration::from_secs(120),
            broker: BrokerKind::Memory,
            redis_url: "redis://127.0.0.1:6379/".into(),
            redis_unsubscribe_grace: Duration::from_secs(2),
            redis_publish_queue: 10_000,
            presence_max_members: 1000,
            close_timeout: Duration::from_secs(5),
            heartbeat_interval: Duration::from_secs(30),
            heartbeat_timeout: Duration::from_secs(10),
            heartbeat_mode: HeartbeatMode::Frame,
            drain_timeout: Duration::from_secs(10),
            max_connections: 0,
            max_connections_per_ip: 1000,
            max_handshakes_per_ip: 50.0,
            handshake_timeout: Duration::from_secs(10),
            http_idle_timeout: Duration::from_secs(5),
            http_max_lifetime: Duration::from_secs(60),
            socket_send_buffer: 256 * 1024,
            max_header_bytes: 16 * 1024,
            rate_limit_messages: 20.0,
            rate_limit_burst: 40,
            rate_limit_bytes: 64 * 1024,
            rate_limit_burst_bytes: None,
            rate_limit_frames: 200.0,
            rate_limit_frame_burst: 1000,
            rate_limit_strikes: 20,
            max_total_queued_bytes: 1 << 30,
            max_shard_inbox_bytes: 64 << 20,
            jwt_secret: None,
            jwt_public_key_file: None,
            jwt_algorithms: Vec::new(),
            jwt_issuer: None,
            jwt_audience: None,
            jwt_leeway: Duration::from_secs(10),
            allow_anonymous: false,
            allowed_origins: Vec::new(),
            echo_endpoint: true,
            access_log: true,
            healthz_detail: true,
            api_key: None,
            tls_cert_file: None,
            tls_key_file: None,
            trusted_proxies: Vec::new(),
            forwarded_header: ForwardedHeader::XForwardedFor,
            proxy_protocol: false,
            metrics_key: None,
            dev_mode: false,
            log: "info".to_owned(),
            log_format: LogFormat::Text,
            webhook_url: None,
            webhook_secret: None,
            webhook_events: WebhookEvent::ALL[..4].to_vec(),
            webhook_queue: 10_000,
            webhook_batch: 100,
            webhook_timeout: Duration::from_secs(5),
            webhook_retry_for: Duration::from_secs(300),
            proxy_headers: Vec::new(),
            connect_proxy: None,
            join_proxy: None,
            publish_proxy: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeartbeatMode {
    /// RFC 6455 ping frames.
    Frame,
    /// `{"type":"ping","timestamp":ms}` text messages, answered by `{"type":"pong"}` (the seed's
    /// protocol). The echo endpoint always gets ping frames.
    Json,
}

/// Which header the trusted proxies write the chain in (`forwarded_header`). Only that one is
/// read: proxies pass the other through as the client wrote it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ForwardedHeader {
    /// `X-Forwarded-For` (nginx's `$proxy_add_x_forwarded_for`, HAProxy's `option forwardfor`).
    #[default]
    XForwardedFor,
    /// `Forwarded` (RFC 7239).
    Forwarded,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BrokerKind {
    Memory,
    Redis,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    Auto,
    IoUring,
    Epoll,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Auto => "auto",
            Engine::IoUring => "io_uring",
            Engine::Epoll => "epoll",
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Off,
    On,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SlowConsumerPolicy {
    Close,
    Drop,
}

/// Values given as command-line flags; `None` leaves the lower layers' value.
#[derive(Debug, Default, Serialize)]
pub struct FlagOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shards: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dev_mode: Option<bool>,
}

/// A configuration problem, worded to name the key: start-up prints it on one line, exits 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl ConfigError {
    /// `key = value: problem`.
    pub fn bad(key: &str, value: &dyn std::fmt::Display, problem: &str) -> Self {
        ConfigError(format!("{key} = {value}: {problem}"))
    }

    /// A problem in words of its own (that name the key).
    pub fn new(problem: String) -> Self {
        ConfigError(problem)
    }
}

impl Config {
    /// Loads the layered configuration (file, if given, must exist).
    pub fn load(file: Option<&Path>, flags: &FlagOverrides) -> Result<Config, ConfigError> {
        if let Some(path) = file.filter(|path| !path.is_file()) {
            return Err(ConfigError(format!(
                "config file {} does not exist",
                path.display()
            )));
        }
        let config: Config = Self::layers(file, flags)
            .extract()
            .map_err(|e| ConfigError(describe(e)))?;
        let config = config.without_empty_values();
        config.validate()?;
        Ok(config)
    }

    /// The configuration as [`Config::load`] reads it, unchecked: for `wsgate probe`, which only
    /// needs the address and must not fail on what the gateway's own flags would have fixed.
    pub fn load_unchecked(file: Option<&Path>, flags: &FlagOverrides) -> Config {
        Self::layers(file, flags).extract().unwrap_or_default()
    }

    /// Defaults, then the file, the environment and the flags, each over the one before.
    fn layers(file: Option<&Path>, flags: &FlagOverrides) -> Figment {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            figment = figment.merge(Toml::file_exact(path));
        }
        figment
            .merge(Env::prefixed("WSGATE_").ignore(&["config"]))
            .merge(Serialized::defaults(flags))
    }

    /// Optional keys and files set to an empty value (`WSGATE_API_KEY=` in an environment file,
    /// `${VAR:-}` in compose) are unset, not a key of zero characters.
    fn without_empty_values(mut self) -> Config {
        for secret in [
            &mut self.jwt_secret,
            &mut self.api_key,
            &mut self.metrics_key,
            &mut self.webhook_secret,
        ] {
            if secret.as_ref().is_some_and(|s| s.expose().is_empty()) {
                *secret = None;
            }
        }
        if self.webhook_url.as_deref() == Some("") {
            self.webhook_url = None;
        }
        for proxy in [
            &mut self.connect_proxy,
            &mut self.join_proxy,
            &mut self.publish_proxy,
        ] {
            if proxy.as_ref().is_some_and(|p| p.url.is_empty()) {
                *proxy = None;
            }
        }
        for file in [
            &mut self.jwt_public_key_file,
            &mut self.tls_cert_file,
            &mut self.tls_key_file,
        ] {
            if file.as_ref().is_some_and(|f| f.as_os_str().is_empty()) {
                *file = None;
            }
        }
        self
    }

    fn validate(&self) -> Result<(), ConfigError> {
        // Names the key and echoes the value it was given.
        let bad = |key: &str, value: &dyn std::fmt::Display, problem: &str| {
            Err(ConfigError::bad(key, value, problem))
        };
        if !(1..=1024).contains(&self.shards) {
            return bad("shards", &self.shards, "must be between 1 and 1024");
        }
        if !self.io_uring_buffers.is_power_of_two() || self.io_uring_buffers < 2 {
            return bad(
                "io_uring_buffers",
                &self.io_uring_buffers,
                "must be a power of two, 2 to 32768",
            );
        }
        if !(125..=MAX_MESSAGE_SIZE_LIMIT).contains(&self.max_message_size) {
            return bad(
                "max_message_size",
                &self.max_message_size,
                "must be between 125 bytes and 1 GiB",
            );
        }
        if !(64 * 1024..=1 << 30).contains(&self.max_queued_bytes) {
            return bad(
                "max_queued_bytes",
                &self.max_queued_bytes,
                "must be between 64 KiB and 1 GiB",
            );
        }
        if self.max_chat_message_chars == 0 {
            return bad("max_chat_message_chars", &0, "must be at least 1");
        }
        if self.max_rooms_per_connection == 0 {
            return bad("max_rooms_per_connection", &0, "must be at least 1");
        }
        if self.max_rooms == 0 {
            return bad("max_rooms", &0, "must be at least 1");
        }
        if self.room_creation_burst == 0 {
            return bad("room_creation_burst", &0, "must be at least 1");
        }
        if self.redis_publish_queue == 0 {
            return bad("redis_publish_queue", &0, "must be at least 1");
        }
        if self.max_header_bytes < 8192 {
            return bad(
                "max_header_bytes",
                &self.max_header_bytes,
                "must be at least 8192",
            );
        }
        // Each float check also refuses NaN.
        let at_least = |value: f32, min: f32| value.partial_cmp(&min).is_some_and(|o| o.is_ge());
        if !at_least(self.max_handshakes_per_ip, 1.0) {
            return bad(
                "max_handshakes_per_ip",
                &self.max_handshakes_per_ip,
                "must be at least 1",
            );
        }
        if !at_least(self.room_creation_rate, f32::MIN_POSITIVE) {
            return bad(
                "room_creation_rate",
                &self.room_creation_rate,
                "must be above 0",
            );
        }
        if !at_least(self.rate_limit_messages, f32::MIN_POSITIVE) {
            return bad(
                "rate_limit_messages",
                &self.rate_limit_messages,
                "must be positive",
            );
        }
        if self.rate_limit_burst == 0 {
            return bad("rate_limit_burst", &0, "must be positive");
        }
        if let Some(burst) = self.rate_limit_burst_bytes
            && burst < self.max_message_size as u64
        {
            return bad(
                "rate_limit_burst_bytes",
                &burst,
                &format!(
                    "less than max_message_size ({}): the largest messages would never pass \
                     (leave it unset to follow max_message_size)",
                    self.max_message_size
                ),
            );
        }
        if !at_least(self.rate_limit_frames, f32::MIN_POSITIVE) {
            return bad(
                "rate_limit_frames",
                &self.rate_limit_frames,
                "must be positive",
            );
        }
        if self.rate_limit_frame_burst == 0 {
            return bad("rate_limit_frame_burst", &0, "must be positive");
        }
        if self.max_total_queued_bytes < self.max_queued_bytes {
            return bad(
                "max_total_queued_bytes",
                &self.max_total_queued_bytes,
                "must be at least max_queued_bytes (one connection's bound)",
            );
        }
        for (key, value) in [
            ("heartbeat_interval", self.heartbeat_interval),
            ("heartbeat_timeout", self.heartbeat_timeout),
            ("handshake_timeout", self.handshake_timeout),
            ("http_idle_timeout", self.http_idle_timeout),
            ("http_max_lifetime", self.http_max_lifetime),
            ("dedup_window", self.dedup_window),
        ] {
            if !(Duration::from_millis(10)..=Duration::from_secs(24 * 3600)).contains(&value) {
                let shown = humantime::format_duration(value);
                return bad(key, &shown, "must be between 10ms and 24h");
            }
        }
        if self.backlog == 0 {
            return bad("backlog", &0, "must be at least 1");
        }
        if let Err(e) = self.log.parse::<tracing_subscriber::EnvFilter>() {
            return bad("log", &format!("{:?}", self.log), &e.to_string());
        }
        for (name, key) in [
            ("api_key", &self.api_key),
            ("metrics_key", &self.metrics_key),
            ("webhook_secret", &self.webhook_secret),
        ] {
            if key
                .as_ref()
                .is_some_and(|k| k.expose().chars().count() < 16)
            {
                return bad(name, &"<redacted>", "must be at least 16 characters");
            }
        }
        for (key, proxy) in self.proxies() {
            proxy.validate(key)?;
            // A connection waiting for the backend is not read: its answer to a ping waits too.
            if proxy.timeout >= self.heartbeat_timeout {
                let shown = humantime::format_duration(proxy.timeout);
                return bad(
                    &format!("{key}.timeout"),
                    &shown,
                    "must be less than heartbeat_timeout (a connection waiting for the backend \
                     cannot answer pings)",
                );
            }
        }
        if let Some(header) = self.proxy_headers.iter().find(|h| {
            h.is_empty()
                || !h
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        }) {
            return bad("proxy_headers", &format!("{header:?}"), "not a header name");
        }
        if self.webhook_url.is_some() && self.webhook_secret.is_none() {
            return bad(
                "webhook_url",
                &self.webhook_url.as_deref().unwrap_or_default(),
                "needs webhook_secret (16+ characters): the backend checks each request's \
                 signature with it",
            );
        }
        if !(1..=1_000_000).contains(&self.webhook_queue)
            || !(1..=10_000).contains(&self.webhook_batch)
        {
            return bad(
                "webhook_queue",
                &format!(
                    "{} (webhook_batch {})",
                    self.webhook_queue, self.webhook_batch
                ),
                "webhook_queue must be 1 to 1,000,000 and webhook_batch 1 to 10,000",
            );
        }
        for (key, value) in [
            ("webhook_timeout", self.webhook_timeout),
            ("webhook_retry_for", self.webhook_retry_for),
        ] {
            if !(Duration::from_millis(10)..=Duration::from_secs(24 * 3600)).contains(&value) {
                let shown = humantime::format_duration(value);
                return bad(key, &shown, "must be between 10ms and 24h");
            }
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return bad(
                "tls_cert_file",
                &"…",
                "set both tls_cert_file and tls_key_file, or neither",
            );
        }
        Ok(())
    }

    /// The proxies configured, each with its key.
    pub fn proxies(&self) -> impl Iterator<Item = (&'static str, &ProxySettings)> {
        [
            ("connect_proxy", &self.connect_proxy),
            ("join_proxy", &self.join_proxy),
            ("publish_proxy", &self.publish_proxy),
        ]
        .into_iter()
        .filter_map(|(key, proxy)| Some((key, proxy.as_ref()?)))
    }

    /// The byte burst in effect: as configured, or the larger of 256 KiB and `max_message_size`.
    pub fn rate_limit_burst_bytes(&self) -> u64 {
        self.rate_limit_burst_bytes
            .unwrap_or((self.max_message_size as u64).max(256 * 1024))
    }

    /// The configuration as TOML, for `--print-config`, with the secret redacted.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        shown.rate_limit_burst_bytes = Some(self.rate_limit_burst_bytes());
        for secret in [
            &mut shown.jwt_secret,
            &mut shown.api_key,
            &mut shown.metrics_key,
            &mut shown.webhook_secret,
        ] {
            if secret.is_some() {
                *secret = Some("<redacted>".into());
            }
        }
        shown.redis_url = RedisUrl(self.redis_url.redacted());
        let mut text = toml::to_string(&shown).expect("config serializes to TOML");
        // TOML has no null: keys with no value would vanish. They are listed, commented out, so
        // that every key can be seen (and set) from this output.
        let unset: Vec<String> = match serde_json::to_value(&shown) {
            Ok(serde_json::Value::Object(keys)) => keys
                .into_iter()
                .filter(|(_, value)| value.is_null())
                .map(|(key, _)| key)
                .collect(),
            _ => Vec::new(),
        };
        if !unset.is_empty() {
            text.push_str("\n# Not set (see the README's Configuration):\n");
            for key in unset {
                text.push_str(&format!("# {key} =\n"));
            }
        }
        text
    }
}

/// A URL without its credentials (`scheme://***@host…`), for logs and `--print-config`.
pub fn redacted_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

/// The first of figment's problems on one line, saying where the bad setting came from (the
/// file and line, or the environment variable), and for a misspelt key the nearest real one.
fn describe(errors: figment::Error) -> String {
    let first = errors
        .into_iter()
        .next()
        .expect("an error has at least one problem");
    let (key, problem) = match &first.kind {
        figment::error::Kind::UnknownField(field, known) => {
            let problem = match nearest(field, known) {
                Some(near) => format!("unknown key (did you mean `{near}`?)"),
                None => "unknown key".to_owned(),
            };
            (field.clone(), problem)
        }
        kind => (
            first.path.last().cloned().unwrap_or_default(),
            kind.to_string(),
        ),
    };
    let origin = match first.metadata.as_ref() {
        Some(meta) => match &meta.source {
            Some(figment::Source::File(path)) => match line_of(path, &key) {
                Some(line) => format!("{}, line {line}: ", path.display()),
                None => format!("{}: ", path.display()),
            },
            _ if meta.name.contains("environment") => {
                format!("environment variable WSGATE_{}: ", key.to_uppercase())
            }
            _ => String::new(),
        },
        None => String::new(),
    };
    let problem = plainly(&problem);
    // A syntax error is a snippet of the file with a caret under the spot: kept as lines. Any
    // other problem is one line.
    if problem.contains("parse error") {
        return format!("{origin}{problem}").trim_end().to_owned();
    }
    format!("{origin}{key}: {problem}").replace('\n', " ")
}

/// figment's and serde's wording, for a person: no Rust type names, no doubled quoting.
fn plainly(problem: &str) -> String {
    let mut problem = problem.replace("``", "`");
    for (rust, words) in [
        ("expected usize", "expected a whole number"),
        ("expected u64", "expected a whole number"),
        ("expected u32", "expected a whole number"),
        ("expected u16", "expected a whole number up to 65535"),
        ("expected u8", "expected a whole number up to 255"),
        ("expected f32", "expected a number"),
        ("expected f64", "expected a number"),
        ("expected a boolean", "expected true or false"),
    ] {
        problem = problem.replace(rust, words);
    }
    problem
}

/// The known key closest to a misspelt one, if any is close.
fn nearest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (strsim::levenshtein(key, k), *k))
        .min()
        .filter(|(distance, _)| *distance <= (key.len() / 3).max(2))
        .map(|(_, k)| k)
}

/// The line of a TOML file on which `key` is set, if it can be found.
fn line_of(path: &Path, key: &str) -> Option<usize> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .position(|line| {
            line.trim_start()
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_shows_no_secret() {
        let config = Config {
            jwt_secret: Some("jwt-secret-0123456789".into()),
            api_key: Some("api-key-0123456789".into()),
            redis_url: "redis://:redis-password@127.0.0.1:6379/".into(),
            ..Config::default()
        };
        let shown = format!("{config:?}");
        for secret in [
            "jwt-secret-0123456789",
            "api-key-0123456789",
            "redis-password",
        ] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn defaults_validate_and_round_trip_through_toml() {
        let config = Config::default();
        config.validate().unwrap();
        let back: Config = toml::from_str(&config.to_toml()).unwrap();
        // Printed with the byte burst it resolves to.
        assert_eq!(back.rate_limit_burst_bytes, Some(256 * 1024));
        assert_eq!(
            Config {
                rate_limit_burst_bytes: None,
                ..back
            },
            config
        );
    }

    #[test]
    fn credentials_in_the_redis_url_are_never_printed() {
        let config = Config {
            redis_url: "redis://:hunter2@cache.internal:6379/0".into(),
            ..Config::default()
        };
        let printed = config.to_toml();
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains("redis://***@cache.internal:6379/0"));
        assert_eq!(redacted_url("redis://h:1/"), "redis://h:1/");
    }
}
