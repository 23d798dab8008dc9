//! Start-up: one listening socket per shard on the same address (SO_REUSEPORT, so the kernel
//! spreads new connections over the shards), one thread and current-thread runtime per shard.

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::task::LocalSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backend::ProxyKind;
use crate::broker::{Disconnect, Disconnected, NotAnApplicationCode};
use crate::cluster::{self, OthersNotTold};
use crate::config::Config;
use crate::fanout::Publication;
use crate::http::{self, ShardEdge};
use crate::node::Node;
use crate::runtime::bus::Inbox;
use crate::runtime::driver::{self, EventLoop};

/// File descriptors kept back from the open-files limit for listeners, the runtime and logs.
const RESERVED_FDS: u64 = 64;

/// How many client sockets this process can hold: one file descriptor each, within the soft
/// open-files limit (which `wsgate` raises to the hard limit at start), less what the proxies to
/// the backend may hold (each shard's calls in flight).
pub fn socket_capacity(config: &Config) -> usize {
    let (soft, _) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap_or((1024, 1024));
    let backend: usize = config.proxies().map(|(_, p)| p.max_in_flight).sum();
    let backend = (backend * config.shards) as u64;
    soft.saturating_sub(RESERVED_FDS + backend) as usize
}

/// Sockets kept for plain HTTP (health probes, the test page) when WebSockets have taken the
/// rest: `max_connections` defaults to the socket capacity less these.
fn probe_reserve(sockets: usize) -> usize {
    (sockets / 64).clamp(4, 256)
}

/// How many WebSocket connections this process accepts by default: its socket capacity less a
/// reserve for probes.
pub fn connection_capacity(config: &Config) -> usize {
    let sockets = socket_capacity(config);
    sockets - probe_reserve(sockets).min(sockets / 2)
}

/// How long a stopping gateway waits for its last webhooks to be taken.
const WEBHOOKS_FLUSH: Duration = Duration::from_secs(5);

/// How often refusals are logged (as counts by reason) and expired room histories forgotten.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);

/// Why [`Gateway::disconnect_user`] did not close a user's connections everywhere.
#[derive(Debug, thiserror::Error)]
pub enum DisconnectError {
    #[error(transparent)]
    NotAnApplicationCode(#[from] NotAnApplicationCode),
    #[error(transparent)]
    OthersNotTold(#[from] OthersNotTold),
}

/// A running gateway. Dropping it does not stop it: call [`Gateway::shutdown`] and [`Gateway::join`].
pub struct Gateway {
    local_addr: SocketAddr,
    node: Arc<Node>,
    shutdown: CancellationToken,
    threads: Vec<JoinHandle<()>>,
}

/// Binds every shard's socket and starts the shard threads; returns once every shard is
/// accepting, or with the first error.
pub fn start(mut config: Config) -> io::Result<Gateway> {
    if config.max_connections == 0 {
        config.max_connections = connection_capacity(&config);
    }
    // From here on the engine in the configuration is the one in use, never `auto`.
    config.engine = driver::choose(config.engine, config.io_uring_buffers)?;
    let config = Arc::new(config);
    if config.listen.port() != 0 {
        refuse_if_taken(config.listen)?;
    }
    let first = bind(config.listen, config.backlog)?;
    // With port 0 the first bind picks the port; the other shards join that one.
    let local_addr = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..config.shards {
        listeners.push(bind(local_addr, config.backlog)?);
    }
    let (node, inboxes, engine) =
        Node::new(config.clone(), socket_capacity(&config)).map_err(io::Error::other)?;
    let node = Arc::new(node);
    if node.edge.auth.dev_mode() {
        warn!(
            "DEV MODE: no jwt_secret or jwt_public_key_file configured. Tokens are signed with a \
             random key, and anyone can get one at GET /dev/token?user=NAME. Configure a key \
             before exposing this gateway."
        );
        if !local_addr.ip().is_loopback() {
            warn!(
                %local_addr,
                "DEV MODE IS EXPOSED (dev_mode = true): anyone who can reach this address can \
                 get a token for any user"
            );
        }
    }
    let shutdown = CancellationToken::new();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let mut gateway = Gateway {
        local_addr,
        node,
        shutdown,
        threads: Vec::new(),
    };
    for (index, (listener, inbox)) in listeners.into_iter().zip(inboxes).enumerate() {
        let (node, shutdown, ready) = (
            gateway.node.clone(),
            gateway.shutdown.clone(),
            ready_tx.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name(format!("wsgate-shard-{index}"))
            .spawn(move || run_shard(index, node, listener, inbox, shutdown, ready));
        match spawned {
            Ok(thread) => gateway.threads.push(thread),
            Err(e) => return Err(gateway.abort(e)),
        }
    }
    if gateway.node.edge.tls.is_some() {
        let (node, stop) = (gateway.node.clone(), gateway.shutdown.clone());
        let spawned = std::thread::Builder::new()
            .name("wsgate-tls".into())
            .spawn(move || watch_certificate(&node, &stop));
        match spawned {
            // Not joined: a read stuck on a file system must not hold up the shutdown.
            Ok(_detached) => {}
            Err(e) => return Err(gateway.abort(e)),
        }
    }
    if let Some(engine) = engine {
        let stop = gateway.shutdown.clone();
        let spawned = std::thread::Builder::new()
            .name("wsgate-broker".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                match runtime {
                    Ok(runtime) => runtime.block_on(engine(stop)),
                    Err(e) => warn!(error = %e, "cannot start the broker's runtime"),
                }
            });
        match spawned {
            Ok(thread) => gateway.threads.push(thread),
            Err(e) => return Err(gateway.abort(e)),
        }
    }
    for _ in 0..config.shards {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(gateway.abort(e)),
            Err(_) => return Err(gateway.abort(io::Error::other("a shard thread died at start"))),
        }
    }
    info!(
        %local_addr,
        shards = config.shards,
        engine = config.engine.name(),
        "wsgate listening"
    );
    Ok(gateway)
}

/// A second gateway on the same port would bind as well (SO_REUSEPORT) and silently take part of
/// the connections. A plain bind first fails on a port that is in use.
fn refuse_if_taken(addr: SocketAddr) -> io::Result<()> {
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    probe.set_reuse_address(true)?;
    probe.bind(&addr.into()).map_err(|e| {
        if e.kind() == io::ErrorKind::AddrInUse {
            io::Error::new(
                e.kind(),
                format!("{addr} is already in use (another wsgate?)"),
            )
        } else {
            e
        }
    })
}

impl Gateway {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Open WebSocket connections across all shards.
    pub fn connection_count(&self) -> usize {
        self.node.shared.connection_count()
    }

    /// Publishes from outside the shards (embedding applications, admin tools): every shard
    /// delivers to its own matching clients, and (with a shared broker, and no `include` list,
    /// whose client ids are this node's) every other node to its own. False when the other nodes
    /// could not be reached (counted): then it is delivered nowhere, and can be retried.
    pub fn publish(&self, publication: Publication) -> bool {
        let node = &self.node;
        cluster::publish_from_outside(&*node.broker, &node.shared, publication)
    }

    /// Closes every connection of `user` with `code` (4000–4999) and `reason`, on this node and,
    /// with the Redis broker, on every node; answers how many were closed (the other nodes' counts
    /// are awaited up to [`crate::broker::CONTROL_ANSWER_WAIT`] once they were told; with Redis
    /// behind, telling them may take up to 5 s more). Await it within a Tokio runtime with its
    /// time driver enabled, on any thread (the future is `Send`).
    pub async fn disconnect_user(
        &self,
        user: &str,
        code: u16,
        reason: &str,
    ) -> Result<Disconnected, DisconnectError> {
        let disconnect = Arc::new(Disconnect::new(user, code, reason)?);
        let node = &self.node;
        Ok(cluster::disconnect_everywhere(&*node.broker, &node.shared, disconnect).await?)
    }

    /// Reads the TLS certificate and key files again, for new handshakes (connections up keep
    /// theirs). `Ok(false)`: the listener has no TLS. On an error the current certificate stays.
    pub fn reload_tls(&self) -> Result<bool, String> {
        reload_tls(&self.node)
    }

    /// [`Gateway::reload_tls`] for another thread: reading the files may block (a network file
    /// system), so a signal handler hands it off rather than wait.
    pub fn tls_reloader(&self) -> impl Fn() -> Result<bool, String> + Send + Sync + 'static {
        let node = self.node.clone();
        move || reload_tls(&node)
    }

    /// Starts a graceful shutdown: upgrades are refused and `/readyz` fails; each shard delivers
    /// what was published before, then closes its connections with 1001 and waits (up to
    /// `drain_timeout`) for their close handshakes. [`Gateway::join`] waits for the end.
    pub fn shutdown(&self) {
        self.node.shared.draining.store(true, Ordering::Release);
        self.shutdown.cancel();
    }

    /// Waits until every shard thread has finished.
    pub fn join(self) {
        for thread in self.threads {
            let _ = thread.join();
        }
        // What the stop itself changed (members leaving with it) is still on its way. (Blocks:
        // `join` is called off the async runtimes.)
        if let Some(webhooks) = &self.node.edge.webhooks {
            webhooks.flush(WEBHOOKS_FLUSH);
        }
    }

    /// Stops the shards started so far, for a start-up that failed half-way.
    fn abort(self, error: io::Error) -> io::Error {
        self.shutdown();
        self.join();
        error
    }
}

fn bind(addr: SocketAddr, backlog: u32) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(socket.into())
}

fn run_shard(
    index: usize,
    node: Arc<Node>,
    listener: std::net::TcpListener,
    mut inbox: Inbox,
    shutdown: CancellationToken,
    ready: Sender<io::Result<()>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let local = LocalSet::new();
    local.block_on(&runtime, async move {
        let listener = match TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let event_loop = match EventLoop::new(&node.shared.config) {
            Ok(event_loop) => Rc::new(event_loop),
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        let shard = node.shard(index);
        let edge = Rc::new(ShardEdge {
            connect_proxy: node.proxy(ProxyKind::Connect, index),
            shard: shard.clone(),
            event_loop: event_loop.clone(),
            edge: node.edge.clone(),
        });
        // The listener stays open while draining, so probes still get answers (`/readyz` 503).
        let accepting = tokio::task::spawn_local(http::accept_loop(edge, listener));
        // One shard does the node's chores.
        let housekeeping = (index == 0).then(|| {
            tokio::task::spawn_local(driver::housekeeping(
                node.shared.clone(),
                HOUSEKEEPING_INTERVAL,
            ))
        });
        driver::run(&shard, &event_loop, &mut inbox, &shutdown, || {
            node.broker.settled()
        })
        .await;
        accepting.abort();
        if let Some(task) = housekeeping {
            task.abort();
        }
    });
}

fn reload_tls(node: &Node) -> Result<bool, String> {
    match &node.edge.tls {
        Some(tls) => tls.reload().map(|()| true),
        None => Ok(false),
    }
}

/// Reloads the TLS certificate when its files change, until `stop`: on a thread of its own, as
/// reading the files may block (a slow disk, a network file system) and must never hold a shard.
fn watch_certificate(node: &Node, stop: &CancellationToken) {
    while !stop.is_cancelled() {
        std::thread::sleep(HOUSEKEEPING_INTERVAL);
        if let Some(tls) = &node.edge.tls {
            tls.reload_if_changed();
        }
    }
}
