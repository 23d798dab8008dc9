//! The application's backend, as the gateway calls it: proxies ([`proxy`]), an HTTP POST per
//! event (a connection, a join, a chat message) answered before the event takes effect.
//!
//! Each shard has its own proxies (pooled keep-alive connections, its in-flight bound and circuit
//! breaker) and writes its own block of [`ProxyMetrics`]; a scrape sums them.

pub mod proxy;
pub mod webhook;

use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::base::identity::Identity;
use crate::config::{Config, ProxySettings};
use crate::protocol::NodeClientId;
use crate::runtime::metrics::{LocalCounter, LocalHistogram};

/// A backend's HTTP client (proxies' and webhooks').
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A client keeping up to `max_idle` keep-alive connections to a backend, each connect bounded by
/// `connect_timeout`.
pub fn http_client(connect_timeout: Duration, max_idle: usize) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    // Idle connections are let go before common backends close them (Node 5 s, gunicorn 2 s
    // keep-alive): a call written onto a connection the backend is closing fails.
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_millis(1500))
        .pool_max_idle_per_host(max_idle)
        .pool_timer(TokioTimer::new())
        .build(connector)
}

/// What a proxy is told about an event (the body of its POST): who, from where, and what.
#[derive(Serialize)]
pub struct Event<'a> {
    /// `connect`, `join` or `publish`.
    pub event: &'static str,
    /// The node the client is on.
    pub node: &'a str,
    /// The connection's id (`<node>.<shard>.<slot>.<generation>`); none yet at connect.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<NodeClientId<'a>>,
    /// The token's user (`anonymous` without a token) and display name.
    pub user: &'a str,
    pub username: &'a str,
    /// The client's address (as the trusted proxies name it).
    pub address: IpAddr,
    /// Every claim of the connection's token, if it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claims: Option<&'a RawValue>,
    /// connect: the upgrade request's headers named in `proxy_headers` (lower-case names).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub headers: Option<&'a serde_json::Map<String, serde_json::Value>>,
    /// join, publish: the room.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub room: Option<&'a str>,
    /// publish: the chat message's text and its client-given id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<&'a str>,
    #[serde(rename = "messageId", skip_serializing_if = "Option::is_none")]
    pub message_id: Option<&'a str>,
}

impl<'a> Event<'a> {
    /// A `kind` event of `identity`'s connection from `address`.
    pub fn new(kind: ProxyKind, node: &'a str, identity: &'a Identity, address: IpAddr) -> Self {
        Event {
            event: kind.name(),
            node,
            client: None,
            user: &identity.user_id,
            username: &identity.username,
            address,
            claims: identity.claims.as_deref(),
            headers: None,
            room: None,
            message: None,
            message_id: None,
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("serializing to memory cannot fail")
    }
}

/// The events a proxy is called for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyKind {
    Connect,
    Join,
    Publish,
}

impl ProxyKind {
    pub const ALL: [ProxyKind; 3] = [ProxyKind::Connect, ProxyKind::Join, ProxyKind::Publish];

    /// Its name in request bodies and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            ProxyKind::Connect => "connect",
            ProxyKind::Join => "join",
            ProxyKind::Publish => "publish",
        }
    }

    /// Its proxy's settings, if `config` has one.
    pub fn settings(self, config: &Config) -> Option<&ProxySettings> {
        config
            .proxies()
            .find(|(key, _)| key.strip_suffix("_proxy") == Some(self.name()))
            .map(|(_, settings)| settings)
    }
}

/// How a backend answered, as counted.
pub const ANSWERS: [&str; 3] = ["allowed", "denied", "disconnected"];

/// Why a call failed, as counted (what followed is the proxy's `on_error`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No answer within the proxy's timeout.
    Timeout,
    /// The backend could not be reached (refused, reset, DNS).
    Unreachable,
    /// A 5xx answer: the backend is unwell.
    ServerError,
    /// Another answer than 200 (a 4xx, a redirect): the backend refused the call itself, which
    /// does not count towards the breaker (a client's odd input must not open it for everyone).
    Status,
    /// A 200 whose body is not one of the proxy answers.
    Malformed,
    /// `max_in_flight` calls were waiting already.
    Overloaded,
    /// The circuit breaker is open: recent calls failed.
    BreakerOpen,
}

impl Failure {
    pub const ALL: [Failure; 7] = [
        Failure::Timeout,
        Failure::Unreachable,
        Failure::ServerError,
        Failure::Status,
        Failure::Malformed,
        Failure::Overloaded,
        Failure::BreakerOpen,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::Unreachable => "unreachable",
            Failure::ServerError => "status_5xx",
            Failure::Status => "status",
            Failure::Malformed => "malformed",
            Failure::Overloaded => "overloaded",
            Failure::BreakerOpen => "breaker_open",
        }
    }

    /// Whether it says the backend is unwell (and counts towards opening the breaker).
    fn trips_breaker(self) -> bool {
        matches!(
            self,
            Failure::Timeout | Failure::Unreachable | Failure::ServerError | Failure::Malformed
        )
    }
}

/// What one shard counts of one proxy.
#[derive(Default)]
pub struct ProxyMetrics {
    pub answers: [LocalCounter; ANSWERS.len()],
    pub failures: [LocalCounter; Failure::ALL.len()],
    /// Calls that reached the backend, from the request to the answer read (or the timeout).
    pub latency: LocalHistogram,
}

/// One shard's proxies' metrics, by [`ProxyKind`] (a block of its own: no false sharing).
#[derive(Default)]
#[repr(align(128))]
pub struct ShardProxyMetrics(pub [ProxyMetrics; ProxyKind::ALL.len()]);

impl ShardProxyMetrics {
    pub fn of(&self, kind: ProxyKind) -> &ProxyMetrics {
        &self.0[kind as usize]
    }
}
