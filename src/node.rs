//! The composition root: builds a node's parts from its configuration — the shards' shared
//! state, the broker and the events it reports to, the apps, the HTTP edge — and hands each the
//! others it needs. Nothing else here: what each part does is its own module's.

use std::rc::Rc;
use std::sync::Arc;

use crate::app::chat::ChatApp;
use crate::app::echo::EchoApp;
use crate::auth::Authenticator;
use crate::backend::proxy::Proxy;
use crate::backend::webhook::Webhooks;
use crate::backend::{self, ProxyKind, ShardProxyMetrics};
use crate::broker::memory::MemoryBroker;
use crate::broker::redis::RedisBroker;
use crate::broker::{Broker, BrokerThread, Host};
use crate::cluster::Cluster;
use crate::config::{BrokerKind, Config, ConfigError, redacted_url};
use crate::conn::limits::RoomCreation;
use crate::http::Edge;
use crate::http::forwarded::TrustedProxies;
use crate::http::idle::HttpConnections;
use crate::rooms::RoomDirectory;
use crate::rooms::stream::{HistoryLimits, new_epoch};
use crate::runtime::bus::Inbox;
use crate::runtime::shard::Shard;
use crate::runtime::{App, AppId, Shared};
use crate::transport::certificate::Tls;

/// The apps every shard serves, by [`AppId`]: their places in `Node::apps`.
pub const CHAT: AppId = AppId(0);
pub const ECHO: AppId = AppId(1);

/// What start-up builds from the configuration before anything listens: the checks that need
/// more than the configuration's own values (key files, certificates, proxy lists, the Redis URL)
/// are made by building what they configure.
pub struct Preflight {
    pub auth: Authenticator,
    pub tls: Option<Tls>,
    pub proxies: TrustedProxies,
}

/// Builds what `config` names, or says which setting is wrong (start-up prints it and exits 2):
/// [`build`], and the checks across settings that only a process started from a configuration
/// file needs (an embedding application composes its own).
pub fn preflight(config: &Config) -> Result<Preflight, ConfigError> {
    if config.broker == BrokerKind::Redis {
        crate::broker::redis::check_url(&config.redis_url)
            .map_err(|e| ConfigError::bad("redis_url", &config.redis_url.redacted(), &e))?;
    }
    let built = build(config)?;
    if config.proxy_protocol && built.proxies.is_empty() {
        return Err(ConfigError::bad(
            "proxy_protocol",
            &true,
            "needs trusted_proxies: the proxies whose PROXY headers are read",
        ));
    }
    if built.auth.dev_mode() && !config.listen.ip().is_loopback() && !config.dev_mode {
        return Err(ConfigError::bad(
            "listen",
            &config.listen,
            "dev mode (no jwt_secret or jwt_public_key_file: anyone may get a token at \
             /dev/token) serves loopback addresses only; configure a key, or set \
             dev_mode = true (--dev) to expose it anyway",
        ));
    }
    Ok(built)
}

/// Builds the token checker (reading its key file), the TLS certificate and the trusted proxies.
pub fn build(config: &Config) -> Result<Preflight, ConfigError> {
    let proxies = TrustedProxies::parse(&config.trusted_proxies, config.forwarded_header)
        .map_err(|e| ConfigError::new(format!("trusted_proxies: {e}")))?;
    let urls = config.proxies().map(|(key, proxy)| (key, &proxy.url));
    for (key, url) in urls.chain(config.webhook_url.as_ref().map(|url| ("webhook_url", url))) {
        backend::proxy::parse_url(url)
            .map_err(|e| ConfigError::bad(key, &redacted_url(url), &e))?;
    }
    let tls = match (&config.tls_cert_file, &config.tls_key_file) {
        (Some(cert), Some(key)) => Some(Tls::load(cert, key).map_err(ConfigError::new)?),
        _ => None,
    };
    // Reads the key file, so a missing or wrong key stops start-up here.
    let auth = Authenticator::from_config(config).map_err(ConfigError::new)?;
    Ok(Preflight { auth, tls, proxies })
}

/// One gateway process's parts, composed.
pub struct Node {
    pub shared: Arc<Shared>,
    /// What joins this node to others (or nothing, with the memory broker).
    pub broker: Arc<dyn Broker>,
    pub edge: Arc<Edge>,
    auth: Arc<Authenticator>,
    /// Each user's and address's budget of new rooms.
    room_creation: Arc<RoomCreation>,
}

impl Node {
    /// A node for `config` (whose `max_connections` is already resolved) that may hold up to
    /// `max_sockets` sockets, the inbox of each of its shards, and the broker's engine to run
    /// (with Redis).
    pub fn new(
        config: Arc<Config>,
        max_sockets: usize,
    ) -> Result<(Self, Vec<Inbox>, Option<BrokerThread>), ConfigError> {
        let Preflight { auth, tls, proxies } = build(&config)?;
        let rooms = RoomDirectory::new(
            config.shards,
            config.broker == BrokerKind::Redis,
            HistoryLimits {
                size: config.history_size,
                ttl: config.history_ttl,
            },
            config.max_rooms,
        );
        let (shared, inboxes) = Shared::new(new_epoch(), config.clone(), rooms, max_sockets);
        let shared = Arc::new(shared);
        let webhooks = Webhooks::start(&config, shared.id.clone());
        let cluster = Arc::new(Cluster::new(shared.clone(), webhooks.clone()));
        let host = Host {
            shared: shared.clone(),
            events: cluster.clone(),
        };
        let (broker, engine): (Arc<dyn Broker>, _) = match config.broker {
            BrokerKind::Memory => (Arc::new(MemoryBroker::new(host)), None),
            BrokerKind::Redis => {
                let (broker, engine) = RedisBroker::new(&config, host);
                (Arc::new(broker), Some(engine))
            }
        };
        cluster.reported_by(&broker);
        let auth = Arc::new(auth);
        let edge = Arc::new(Edge {
            shared: shared.clone(),
            broker: broker.clone(),
            auth: auth.clone(),
            tls,
            proxies,
            http: HttpConnections::default(),
            webhooks,
            proxy_metrics: (0..config.shards)
                .map(|_| ShardProxyMetrics::default())
                .collect(),
            chat: CHAT,
            echo: ECHO,
        });
        let node = Node {
            room_creation: Arc::new(RoomCreation::new(&config)),
            shared,
            broker,
            edge,
            auth,
        };
        Ok((node, inboxes, engine))
    }

    /// The apps of shard `index`, each at the place its [`AppId`] says ([`CHAT`], [`ECHO`]).
    fn apps(&self, index: usize) -> Vec<Box<dyn App>> {
        let chat = ChatApp::new(
            &self.shared.config,
            self.broker.clone(),
            self.auth.clone(),
            self.room_creation.clone(),
            [
                self.proxy(ProxyKind::Join, index),
                self.proxy(ProxyKind::Publish, index),
            ],
        );
        vec![Box::new(chat), Box::new(EchoApp)]
    }

    /// Shard `index` of this node, with its apps.
    pub fn shard(&self, index: usize) -> Rc<Shard> {
        Shard::new(index, self.shared.clone(), self.apps(index))
    }

    /// Shard `index`'s proxy to the backend for `kind` events, if one is configured.
    pub fn proxy(&self, kind: ProxyKind, index: usize) -> Option<Rc<Proxy>> {
        let settings = kind.settings(&self.shared.config)?;
        let metrics = self.edge.proxy_metrics.clone();
        let proxy = Proxy::new(kind, settings, metrics, index);
        Some(Rc::new(proxy))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::Newcomer;

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

    #[test]
    fn each_app_id_names_its_app() {
        let (node, _inboxes, _) = Node::new(Arc::new(Config::default()), 16).unwrap();
        let shard = node.shard(0);
        // The chat app greets; echo says nothing first.
        let peer = std::net::IpAddr::from([127, 0, 0, 1]);
        let chat = shard.register(Newcomer::plain(CHAT, node.shared.anonymous.clone(), peer));
        let echo = shard.register(Newcomer::plain(ECHO, node.shared.anonymous.clone(), peer));
        let state = shard.state_ref();
        assert!(!state.conns[chat].outbound.is_empty());
        assert!(state.conns[echo].outbound.is_empty());
        assert!(shard.addressable(CHAT) && !shard.addressable(ECHO));
    }
}
