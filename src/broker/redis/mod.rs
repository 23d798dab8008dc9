//! The Redis broker: nodes joined through one Redis (what is kept there: [`keys`]).
//!
//! A room message is published by one Lua script: next offset, history, PUBLISH — so every node
//! receives a room's messages in one order, gap-free. Each node SUBSCRIBEs to the rooms it has
//! members in (batched, once per node, not per client) and UNSUBSCRIBEs
//! `redis_unsubscribe_grace` after its last member left.
//!
//! A node keeps each followed room's position and recent history in its own [`Stream`]. A message
//! that is not the next one (lost on the way, during a reconnect, or while the room's first sync
//! was being read) makes the node catch the room up ([`sync`]); when the history no longer has
//! what was missed, or the epoch changed (the room's data expired or Redis lost it), members are
//! told to `resync`.
//!
//! Presence: each node owns its entries and publishes each change, numbered per node and room;
//! the others keep a copy ([`crate::rooms::presence`]). Nodes beat into Redis every `BEAT_INTERVAL`;
//! one silent for `NODE_TTL` leaves every room on every node.
//!
//! Outages: sockets stay open. Publishing is refused at once ("Service unavailable: retry") and
//! `/readyz` answers 503 until the node has reconnected (with a jittered back-off), resubscribed
//! every room it follows, written its presence again and caught each room up (its sessions are
//! written again as it turns ready). A probe published to the node's own channel every second
//! finds a subscription that stopped delivering while the connection looks alive.
//!
//! Everything here runs on the broker's own thread (`Engine::run`); shards reach it through
//! queues and never wait for it.
//!
//! [`Stream`]: crate::rooms::stream::Stream

pub mod answers;
mod directory;
pub mod envelope;
pub mod keys;
mod publisher;
pub mod sync;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ::redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};
use ::redis::{AsyncConnectionConfig, Client, Msg, RedisError, RedisResult, Value};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc::{self, Receiver, Sender, UnboundedReceiver, UnboundedSender};
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, info, warn};

use self::answers::Answers;
pub use self::directory::Lookup;
use self::directory::LookupSlot;
use self::keys::{
    BROADCAST_CHANNEL, CONTROL_CHANNEL, ERA_KEY, NODE_STATUS_KEY, NODES_KEY, Scripts,
    USERS_CHANNEL, answers_channel, probe_channel, room_channel, room_of, sessions_key,
};
use self::publisher::{entry_json, publish_loop, refuse};
use self::sync::{CatchUpError, catch_up};
use super::{
    Broker, CONTROL_ANSWER_WAIT, Disconnect, Disconnected, HistoryQuery, Host, LocalFuture,
    NodeStatus, PresenceChange, PublishError, Publisher, RoomHistory, RoomRef, SendFuture,
    Unavailable,
};
use crate::base::client_id::ClientId;
use crate::config::{Config, RedisUrl};
use crate::protocol::{self, ErrorReply, NodeClientId};
use crate::rooms::RoomState;
use crate::rooms::presence::{Entry, Fit, Presence};
use crate::rooms::stream::{Arrival, HistoryLimits};
use crate::rooms::{RoomsPage, Target};
use crate::runtime::Shared;
use crate::ws::deflate::Prepared;

/// Channels per SUBSCRIBE or UNSUBSCRIBE command, at most.
const SUBSCRIBE_BATCH: usize = 512;
/// How often the probe is published, and how long without one before the subscription is
/// considered wedged and the connection restarted.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Connecting, and any answer from Redis, may take this long.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// Reconnection back-off: from the first to the second, doubling, with jitter.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));
/// How long a room's keys stay in Redis past their last change or read while it has members (once
/// it has none: [`empty_room_ttl`]); a room whose keys expired starts over under a new epoch (its
/// clients are told they cannot recover).
const META_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long a room's keys live in Redis once it has no member: as long as its history is kept
/// (`history_ttl`), at least a second.
fn empty_room_ttl(history: HistoryLimits) -> u64 {
    history.ttl.as_secs().max(1)
}

/// How often rooms past their unsubscribe grace are looked at.
const GRACE_TICK: Duration = Duration::from_millis(250);
/// How often a node says it is alive, and how long after its last word it counts as dead (its
/// presence then leaves every room): a node killed without a goodbye stops counting within
/// `NODE_TTL + BEAT_INTERVAL`.
const BEAT_INTERVAL: Duration = Duration::from_secs(2);
const NODE_TTL: Duration = Duration::from_secs(8);
/// How long after its end a dead node is forgotten by Redis.
const NODE_FORGOTTEN_AFTER: Duration = Duration::from_secs(60);
/// What a stopping node publishes on its probe channel after its last messages, and how long it
/// waits for it to come back.
const FENCE: &str = "fence";
const STOP_FENCE: Duration = Duration::from_secs(1);
/// How long a stopping node may take to say goodbye.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a disconnect may wait for its order to be published to the other nodes.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);

/// What the shards ask of the engine.
enum Command {
    /// Follow a room (its first local member joined).
    Follow(Arc<RoomState>),
    /// Its last local member left.
    LastMemberLeft(Arc<str>),
}

/// What goes to Redis, in the order it was sent.
enum Outgoing {
    /// A room message (JSON text), from a client or the server API, with its dedup key.
    Message {
        room: Arc<str>,
        message: Vec<u8>,
        from: Publisher,
        dedup: Option<Box<str>>,
    },
    /// A publication for the other nodes (JSON text): for a room's members, every chat client,
    /// or one user's connections.
    Notice { target: Target, payload: Bytes },
    /// An order for every other node (JSON text); `published` is told how many subscribers it
    /// reached (dropped: it was not published, or it is unknown).
    Control {
        payload: Vec<u8>,
        published: oneshot::Sender<u64>,
    },
}

/// A change of what Redis records of this node.
enum Record {
    /// Its presence in a room: a user's connections here are now `entry.conns`; `seq` numbers
    /// the node's changes of the room.
    Presence {
        room: Arc<str>,
        entry: Entry,
        seq: u64,
    },
    /// A session (a connection) opened: its client id, and its record (JSON).
    SessionOpened {
        client_id: String,
        record: Vec<u8>,
    },
    SessionClosed {
        client_id: String,
    },
}

/// What waits for the publisher: room messages and notices (bounded: refused when full), and
/// records (never refused: while Redis is away they are dropped, and the node's presence and
/// sessions are written again, whole, once it is back).
struct Queues {
    outgoing: Receiver<Outgoing>,
    records: UnboundedReceiver<Record>,
}

/// Whether `url` is a Redis URL the client can use (checked at start-up, before any connection).
pub fn check_url(url: &RedisUrl) -> Result<(), String> {
    ::redis::IntoConnectionInfo::into_connection_info(url.expose())
        .map(drop)
        .map_err(|e| e.to_string())
}

/// The shards' handle on the Redis broker.
pub struct RedisBroker {
    /// This node's name in its publications (it ignores its own).
    node_id: Arc<str>,
    commands: UnboundedSender<Command>,
    outgoing: Sender<Outgoing>,
    records: UnboundedSender<Record>,
    ready: Arc<AtomicBool>,
    probe: Arc<ProbeClock>,
    lookup: Arc<LookupSlot>,
    /// This node's disconnects waiting for the other nodes' counts.
    answers: Arc<Answers>,
    /// Cancelled once the engine has stopped and every room message queued for Redis was sent
    /// or refused (their senders answered).
    settled: CancellationToken,
}

/// The probe's round trip through Redis (PUBLISH on the command connection, delivery on the
/// subscription): how far behind the subscription runs.
struct ProbeClock {
    /// What the probes carry: microseconds since `epoch`.
    epoch: Instant,
    /// The last round trip, in microseconds (`u64::MAX`: none yet).
    last_micros: AtomicU64,
}

impl ProbeClock {
    fn now_micros(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// A probe sent at `sent` (its payload) came back now.
    fn came_back(&self, payload: &[u8]) {
        let sent = std::str::from_utf8(payload)
            .ok()
            .and_then(|p| p.parse::<u64>().ok());
        if let Some(sent) = sent {
            let round_trip = self.now_micros().saturating_sub(sent);
            self.last_micros.store(round_trip, Ordering::Relaxed);
        }
    }
}

impl RedisBroker {
    /// The broker `config` names, for the node `host` describes, and its engine to run.
    pub fn new(config: &Config, host: Host) -> (Self, super::BrokerThread) {
        let node_id = host.shared.id.clone();
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (outgoing, outgoing_rx) = mpsc::channel(config.redis_publish_queue);
        let (records, records_rx) = mpsc::unbounded_channel();
        let ready = Arc::new(AtomicBool::new(false));
        let probe = Arc::new(ProbeClock {
            epoch: Instant::now(),
            last_micros: AtomicU64::new(u64::MAX),
        });
        let lookup = Arc::new(LookupSlot::default());
        let answers = Arc::new(Answers::default());
        let settled = CancellationToken::new();
        let broker = RedisBroker {
            node_id: node_id.clone(),
            commands,
            outgoing,
            records,
            ready: ready.clone(),
            probe: probe.clone(),
            lookup: lookup.clone(),
            answers: answers.clone(),
            settled: settled.clone(),
        };
        let engine = Engine {
            answers_channel: answers_channel(&node_id),
            url: config.redis_url.clone(),
            grace: config.redis_unsubscribe_grace,
            node_id,
            ready,
            commands: command_rx,
            queues: Some(Queues {
                outgoing: outgoing_rx,
                records: records_rx,
            }),
            followed: HashMap::new(),
            leaving: HashMap::new(),
            rewrite: HashSet::new(),
            nodes: Nodes::default(),
            judge_after: Instant::now(),
            probe,
            lookup,
            answers,
            generation: None,
            clock: Arc::new(AtomicU64::new(0)),
            force_new_era: false,
            settled,
            empty_room_ttl: empty_room_ttl(HistoryLimits {
                size: config.history_size,
                ttl: config.history_ttl,
            }),
            sweeps: HashMap::new(),
        };
        let run: super::BrokerThread = Box::new(move |stop| Box::pin(engine.run(host, stop)));
        (broker, run)
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// The last probe's round trip through Redis, if one came back yet.
    pub fn probe_round_trip(&self) -> Option<Duration> {
        let micros = self.probe.last_micros.load(Ordering::Relaxed);
        (micros != u64::MAX).then(|| Duration::from_micros(micros))
    }

    /// Room messages waiting to be sent to Redis.
    pub fn publish_queue_len(&self) -> usize {
        self.outgoing.max_capacity() - self.outgoing.capacity()
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The id clients see for one of this node's connections.
    fn client_id(&self, id: ClientId) -> String {
        NodeClientId {
            node: &self.node_id,
            id,
        }
        .to_string()
    }

    /// Reads of the cluster's rooms for the server API, while connected to Redis.
    pub fn lookup(&self) -> Option<Lookup> {
        self.is_ready().then(|| self.lookup.get()).flatten()
    }
}

impl Broker for RedisBroker {
    fn health(&self) -> serde_json::Value {
        serde_json::json!({
            "kind": "redis",
            "ready": self.is_ready(),
            "node": self.node_id(),
        })
    }

    fn is_ready(&self) -> bool {
        RedisBroker::is_ready(self)
    }

    fn gauges(&self) -> Vec<(&'static str, &'static str, f64)> {
        let mut gauges = Vec::new();
        if let Some(round_trip) = self.probe_round_trip() {
            gauges.push((
                "wsgate_redis_probe_round_trip_seconds",
                "The last probe's round trip through Redis (PUBLISH, then delivery on this node's \
                 subscription): how far behind the subscription runs",
                round_trip.as_secs_f64(),
            ));
        }
        gauges.push((
            "wsgate_redis_publish_queue",
            "Room messages waiting to be sent to Redis (at most redis_publish_queue)",
            self.publish_queue_len() as f64,
        ));
        gauges
    }

    /// Resolves once the stopped engine has answered every room message queued for Redis.
    fn settled(&self) -> LocalFuture<'_, ()> {
        Box::pin(self.settled.cancelled())
    }

    fn follow(&self, room: &Arc<RoomState>) {
        // Fails only once the engine has stopped (shutdown), when nothing is followed any more.
        let _ = self.commands.send(Command::Follow(room.clone()));
    }

    fn last_member_left(&self, room: &Arc<str>) {
        let _ = self.commands.send(Command::LastMemberLeft(room.clone()));
    }

    /// Queues a change of this node's presence in `room` for Redis (see
    /// [`Presence::change`]).
    /// Queued for Redis, whose script counts the cluster (this node's copy may lag).
    fn presence_changed(&self, room: Arc<str>, change: PresenceChange) {
        let PresenceChange { entry, seq, .. } = change;
        let _ = self.records.send(Record::Presence { room, entry, seq });
    }

    /// Records a session in Redis, under the client id clients see. Sessions are kept in one hash
    /// per node, which lives while the node beats.
    fn session_opened(&self, client: ClientId, user_id: &str, connected_at: u64) {
        let client_id = self.client_id(client);
        let record = serde_json::json!({
            "user": user_id,
            "node": &*self.node_id,
            "connectedAt": connected_at,
        });
        let record = serde_json::to_vec(&record).expect("serializing to memory cannot fail");
        let _ = self
            .records
            .send(Record::SessionOpened { client_id, record });
    }

    fn session_closed(&self, client: ClientId) {
        let client_id = self.client_id(client);
        let _ = self.records.send(Record::SessionClosed { client_id });
    }

    /// Queues a room message for Redis, which gives it its offset; refused while Redis is away or
    /// the queue is full.
    fn publish(
        &self,
        room: RoomRef<'_>,
        message: Vec<u8>,
        from: Publisher,
        dedup: Option<&str>,
    ) -> Result<(), PublishError> {
        if !self.is_ready() {
            return Err(PublishError::Unavailable);
        }
        let room = match room {
            RoomRef::State(state) => state.name.clone(),
            RoomRef::Name(name) => Arc::from(name),
        };
        self.outgoing
            .try_send(Outgoing::Message {
                room,
                message,
                from,
                dedup: dedup.map(Box::from),
            })
            .map_err(|_| PublishError::Unavailable)
    }

    fn control(&self, disconnect: &Disconnect) -> SendFuture<Result<Disconnected, Unavailable>> {
        let waiter = self.answers.wait();
        let payload = envelope::control_order(disconnect, waiter.id());
        let (published, was_published) = oneshot::channel();
        let queued = self.is_ready()
            && self
                .outgoing
                .try_send(Outgoing::Control { payload, published })
                .is_ok();
        Box::pin(async move {
            if !queued {
                return Err(Unavailable);
            }
            match tokio::time::timeout(CONTROL_TIMEOUT, was_published).await {
                Ok(Ok(subscribers)) => Ok(waiter.count(subscribers).await),
                _ => Err(Unavailable),
            }
        })
    }

    fn share(&self, target: &Target, payload: Bytes) -> bool {
        let target = target.clone();
        self.is_ready()
            && self
                .outgoing
                .try_send(Outgoing::Notice { target, payload })
                .is_ok()
    }

    fn nodes(&self) -> LocalFuture<'_, Result<Vec<NodeStatus>, Unavailable>> {
        Box::pin(async move {
            let lookup = self.lookup().ok_or(Unavailable)?;
            lookup.nodes().await.map_err(|_| Unavailable)
        })
    }

    /// The cluster's rooms index (a node knows only the rooms it has members in).
    fn rooms(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> LocalFuture<'_, Result<RoomsPage, Unavailable>> {
        let after = after.map(str::to_owned);
        Box::pin(async move {
            let lookup = self.lookup().ok_or(Unavailable)?;
            lookup
                .rooms(after.as_deref(), limit)
                .await
                .map_err(|_| Unavailable)
        })
    }

    fn history(
        &self,
        room: &str,
        query: HistoryQuery,
    ) -> LocalFuture<'_, Result<RoomHistory, Unavailable>> {
        let room = room.to_owned();
        Box::pin(async move {
            let lookup = self.lookup().ok_or(Unavailable)?;
            lookup.history(&room, query).await.map_err(|_| Unavailable)
        })
    }

    /// Synced: its copy of the other nodes' presence is Redis's, kept up to date (while Redis is
    /// there).
    fn knows_presence(&self, room: &RoomState) -> bool {
        self.is_ready() && room.stream().is_synced()
    }

    fn presence(
        &self,
        room: &str,
    ) -> LocalFuture<'_, Result<Option<(Presence, u64)>, Unavailable>> {
        let room = room.to_owned();
        Box::pin(async move {
            let lookup = self.lookup().ok_or(Unavailable)?;
            let found = lookup.presence(&room).await.map_err(|_| Unavailable)?;
            Ok(Some(found))
        })
    }
}

/// The broker's side: one Redis connection for commands, one for subscriptions.
struct Engine {
    url: RedisUrl,
    grace: Duration,
    node_id: Arc<str>,
    ready: Arc<AtomicBool>,
    probe: Arc<ProbeClock>,
    commands: UnboundedReceiver<Command>,
    /// Lent to the publisher while connected.
    queues: Option<Queues>,
    /// Rooms the node follows (has members in, or had within the grace), by name.
    followed: HashMap<Arc<str>, Arc<RoomState>>,
    /// Rooms whose last local member left, with when to stop following them.
    leaving: HashMap<Arc<str>, Instant>,
    /// Rooms whose records of this node's presence may not have reached Redis (dropped while
    /// away, or in a pipeline that failed): written whole at the next connection.
    rewrite: HashSet<Arc<str>>,
    nodes: Nodes,
    lookup: Arc<LookupSlot>,
    answers: Arc<Answers>,
    /// Where the other nodes answer this node's disconnects.
    answers_channel: String,
    /// No node is judged dead before then: after this node (re)connects, or finds it had lapsed
    /// itself, the others need a beat's time to be heard.
    judge_after: Instant,
    /// The cluster's generation as this node last read it (see `era.lua`), and the highest era
    /// clock its writes got in it.
    generation: Option<Arc<str>>,
    clock: Arc<AtomicU64>,
    /// A followed room was found behind what this node saw of it: the next connection starts a
    /// new generation.
    force_new_era: bool,
    settled: CancellationToken,
    /// See [`empty_room_ttl`].
    empty_room_ttl: u64,
    /// Dead nodes being swept out of Redis's rooms (see [`forget_node`]).
    sweeps: HashMap<Arc<str>, tokio::task::JoinHandle<()>>,
}

/// Which other nodes are alive, as the beats tell.
#[derive(Default)]
struct Nodes {
    /// Alive at the last beat.
    alive: HashSet<Arc<str>>,
    /// Found dead: their presence left every room, and what they still publish is ignored.
    dead: HashSet<Arc<str>>,
    /// Known only from the presence copies and not listed by the last beat.
    unlisted: HashSet<Arc<str>>,
}

/// What a beat read: Redis's clock, until when this node was alive before it (0: not listed),
/// until when each node is alive, and the era.
struct Beat {
    now: u64,
    before: u64,
    nodes: Vec<(String, u64)>,
    /// Whether the node's generation is still the cluster's.
    same_era: bool,
    /// The era's clock, and the highest this node had seen when it sent the beat: lower means
    /// Redis went back in time.
    era_clock: u64,
    seen_clock: u64,
}

impl Beat {
    /// Why this node's generation is not to be written any more, if it is not.
    fn era_trouble(&self) -> Option<&'static str> {
        if !self.same_era {
            Some("the cluster's generation changed (Redis lost or replaced its data)")
        } else if self.era_clock < self.seen_clock {
            Some("Redis went back in time (it has fewer writes than this node saw)")
        } else {
            None
        }
    }
}

/// One connection to Redis and what depends on it.
struct Session {
    commands: MultiplexedConnection,
    scripts: Arc<Scripts>,
    sink: PubSubSink,
    messages: PubSubStream,
    /// Rooms SUBSCRIBEd on this connection.
    subscribed: HashSet<Arc<str>>,
    /// Catch-ups running.
    catch_ups: JoinSet<Result<(), CatchUpError>>,
    /// Beats, from their own task (so a long reconnection still beats).
    beats: Receiver<RedisResult<Beat>>,
    _beater: AbortOnDropHandle<()>,
    last_probe: Instant,
    probe_channel: String,
    /// The fence of a stopping node came back (see `Engine::finish_publishing`).
    fenced: bool,
}

impl Engine {
    /// Runs until `stop`: connects, serves, and reconnects after any failure; says goodbye when
    /// stopped while connected. Room messages still queued then are sent if Redis answers, else
    /// refused, before the broker counts as settled.
    pub async fn run(mut self, node: Host, stop: CancellationToken) {
        self.run_until(&node, &stop).await;
        // Not sent, so not published: refused, not dropped in silence.
        self.refuse_queued(&node);
    }

    async fn run_until(&mut self, node: &Host, stop: &CancellationToken) {
        let node = node.clone();
        let client = match Client::open(self.url.expose()) {
            Ok(client) => client,
            // The URL was checked with the configuration.
            Err(e) => return warn!(error = %e, "invalid redis_url"),
        };
        let mut backoff = BACKOFF.0;
        let mut failures = 0u32;
        loop {
            let connected = tokio::select! {
                _ = stop.cancelled() => return,
                session = self.connect(&client, &node) => session,
            };
            match connected {
                Ok(session) => {
                    info!(url = %self.url.redacted(), rooms = self.followed.len(), "connected to Redis");
                    backoff = BACKOFF.0;
                    failures = 0;
                    let reason = self.serve(session, &node, stop).await;
                    if stop.is_cancelled() {
                        return;
                    }
                    warn!(%reason, "Redis connection lost: room messages are refused until it is back");
                }
                Err(e) => {
                    failures += 1;
                    // The first failure, then one line in ten while Redis stays away.
                    if failures % 10 == 1 {
                        warn!(error = %e, url = %self.url.redacted(), failures, "cannot reach Redis");
                    }
                }
            }
            self.ready.store(false, Ordering::Release);
            node.shared
                .counters
                .broker_disconnects
                .fetch_add(1, Ordering::Relaxed);
            let pause = jittered(backoff);
            backoff = (backoff * 2).min(BACKOFF.1);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.offline(&node, pause) => {}
            }
        }
    }

    /// While away from Redis: refuses what was queued for it and keeps track of the rooms the
    /// node must follow once back.
    async fn offline(&mut self, node: &Host, pause: Duration) {
        let deadline = tokio::time::sleep(pause);
        tokio::pin!(deadline);
        let queues = self.queues.as_mut().expect("returned by the publisher");
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                Some(command) = self.commands.recv() => match command {
                    Command::Follow(room) => {
                        self.followed.insert(room.name.clone(), room);
                    }
                    Command::LastMemberLeft(room) => {
                        self.leaving.insert(room, Instant::now() + self.grace);
                    }
                },
                Some(out) = queues.outgoing.recv() => refuse(node, out, ErrorReply::Unavailable),
                // Written again, whole, once Redis is back.
                Some(record) = queues.records.recv() => {
                    if let Record::Presence { room, .. } = record {
                        self.rewrite.insert(room);
                    }
                }
            }
        }
    }

    async fn connect(&mut self, client: &Client, node: &Host) -> RedisResult<Session> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT));
        let mut commands = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        self.read_era(&mut commands, node).await?;
        let generation = self.generation.clone().expect("read above");
        let scripts = Arc::new(Scripts::load(&mut commands, generation).await?);
        // Alive before anything of this node's is read by others, and beating from here on. The
        // others may have lost Redis too: they get a beat's time to be heard before any is
        // judged dead.
        let first = beat(&mut commands, &scripts, &node.shared, &self.clock).await?;
        self.judge_after = Instant::now() + NODE_TTL + BEAT_INTERVAL;
        self.on_beat(node, first, None);
        let (beat_tx, beats) = mpsc::channel(4);
        let beater = AbortOnDropHandle::new(tokio::spawn(beat_forever(
            commands.clone(),
            scripts.clone(),
            node.shared.clone(),
            self.clock.clone(),
            beat_tx,
        )));
        // What the shards recorded while Redis was away is superseded by the whole rewrite below.
        while let Some(record) = self
            .queues
            .as_mut()
            .and_then(|queues| queues.records.try_recv().ok())
        {
            self.superseded(record);
        }
        ::redis::cmd("DEL")
            .arg(sessions_key(&self.node_id))
            .query_async::<i64>(&mut commands)
            .await?;
        let pubsub = within(client.get_async_pubsub()).await?;
        let (mut sink, messages) = pubsub.split();
        let probe_channel = probe_channel(&self.node_id);
        within(sink.subscribe(&[
            probe_channel.as_str(),
            self.answers_channel.as_str(),
            BROADCAST_CHANNEL,
            USERS_CHANNEL,
            CONTROL_CHANNEL,
        ]))
        .await?;
        let mut session = Session {
            commands,
            scripts,
            sink,
            messages,
            subscribed: HashSet::new(),
            catch_ups: JoinSet::new(),
            beats,
            _beater: beater,
            last_probe: Instant::now(),
            probe_channel,
            fenced: false,
        };
        if let Err(e) = self.restore(&mut session, node).await {
            session.catch_ups.shutdown().await;
            return Err(e);
        }
        self.lookup
            .set(Some((session.commands.clone(), session.scripts.clone())));
        self.ready.store(true, Ordering::Release);
        node.events.sessions_lost();
        Ok(session)
    }

    /// Reads the cluster's generation (see `era.lua`); a new one (Redis lost data, or went back
    /// in time) starts every room over, and the keys of the one it replaced are deleted in the
    /// background.
    async fn read_era(
        &mut self,
        commands: &mut MultiplexedConnection,
        node: &Host,
    ) -> RedisResult<()> {
        let seen = self.clock.load(Ordering::Relaxed);
        let era = keys::read_era(
            commands,
            self.generation.as_deref(),
            seen,
            self.force_new_era,
        )
        .await?;
        self.force_new_era = false;
        if era.malformed {
            node.shared
                .counters
                .broker_malformed
                .fetch_add(1, Ordering::Relaxed);
            warn!("wsgate:era held a record that is not wsgate's: a new generation replaces it");
        }
        if era.started {
            tokio::spawn(keys::delete_stale_generations(
                commands.clone(),
                era.generation.clone(),
            ));
        }
        if era.started && self.generation.is_some() {
            node.shared
                .counters
                .broker_generations
                .fetch_add(1, Ordering::Relaxed);
            warn!(
                generation = %era.generation,
                "Redis lost data or went back in time: a new generation starts every room over \
                 (members are told to resync)"
            );
        } else if self.generation.as_ref() != Some(&era.generation) {
            info!(generation = %era.generation, "joined the cluster's generation");
        }
        if self.generation.as_ref() != Some(&era.generation) {
            self.clock.store(era.clock, Ordering::Relaxed);
        }
        self.generation = Some(era.generation);
        Ok(())
    }

    /// Resubscribes every room the node follows, writes its presence in each whole, and catches
    /// each up; messages arriving meanwhile wait in the subscription.
    async fn restore(&mut self, session: &mut Session, node: &Host) -> RedisResult<()> {
        let rooms: Vec<Arc<RoomState>> = self.followed.values().cloned().collect();
        subscribe(session, rooms.iter().map(|r| &r.name)).await?;
        self.rewrite_presence(session, node).await?;
        for room in rooms {
            catch_up(
                &mut session.catch_ups,
                &session.commands,
                &session.scripts,
                node,
                room,
            );
        }
        while let Some(done) = session.catch_ups.join_next().await {
            let done = done.map_err(|e| RedisError::from(std::io::Error::other(e)))?;
            self.caught_up(done)?;
        }
        Ok(())
    }

    /// What a catch-up ended with: a room found behind what this node saw of it asks for a new
    /// generation at the next connection.
    fn caught_up(&mut self, done: Result<(), CatchUpError>) -> RedisResult<()> {
        match done {
            Ok(()) => Ok(()),
            Err(CatchUpError::Redis(e)) => Err(e),
            Err(CatchUpError::WentBack(room)) => {
                self.force_new_era = true;
                Err(RedisError::from(std::io::Error::other(format!(
                    "Redis went back in time: room {room:?} is behind what this node saw"
                ))))
            }
        }
    }

    /// Serves one connection until it fails (returns why) or `stop`.
    async fn serve(
        &mut self,
        mut session: Session,
        node: &Host,
        stop: &CancellationToken,
    ) -> String {
        let stop_publisher = CancellationToken::new();
        let queues = self
            .queues
            .take()
            .expect("returned by the previous publisher");
        let mut publisher = tokio::spawn(publish_loop(
            session.commands.clone(),
            session.scripts.clone(),
            queues,
            node.clone(),
            self.clock.clone(),
            stop_publisher.clone(),
        ));
        let mut probe = tokio::time::interval(PROBE_INTERVAL);
        let mut grace = tokio::time::interval(GRACE_TICK);
        let mut publisher_done = None;
        // The restore may have taken a while, with no probe out.
        session.last_probe = Instant::now();
        let reason = loop {
            tokio::select! {
                _ = stop.cancelled() => break "stopping".to_owned(),
                message = session.messages.next() => match message {
                    Some(message) => self.on_message(&mut session, node, &message),
                    None => break "the subscription connection closed".to_owned(),
                },
                Some(command) = self.commands.recv() => {
                    if let Err(e) = self.on_command(&mut session, node, command).await {
                        break e.to_string();
                    }
                }
                _ = probe.tick() => {
                    if session.last_probe.elapsed() > PROBE_TIMEOUT {
                        node.shared.counters.broker_probe_failures.fetch_add(1, Ordering::Relaxed);
                        break "no probe came back: the subscription is not delivering".to_owned();
                    }
                    let mut commands = session.commands.clone();
                    let channel = session.probe_channel.clone();
                    let sent = self.probe.now_micros();
                    // A failure shows as a probe that does not come back.
                    tokio::spawn(async move {
                        let _: RedisResult<i64> = ::redis::cmd("PUBLISH")
                            .arg(channel)
                            .arg(sent)
                            .query_async(&mut commands)
                            .await;
                    });
                }
                beat = session.beats.recv() => match beat {
                    Some(Ok(beat)) => {
                        if let Some(trouble) = beat.era_trouble() {
                            break trouble.to_owned();
                        }
                        if self.on_beat(node, beat, Some(&mut session)) {
                            warn!("this node had lapsed in Redis: writing its presence and sessions again");
                            if let Err(e) = self.rewrite_presence(&mut session, node).await {
                                break e.to_string();
                            }
                            node.events.sessions_lost();
                        }
                    }
                    Some(Err(e)) => break format!("beating: {e}"),
                    None => break "the beats stopped".to_owned(),
                },
                _ = grace.tick() => {
                    if let Err(e) = self.unfollow_due(&mut session).await {
                        break e.to_string();
                    }
                }
                Some(done) = session.catch_ups.join_next() => {
                    if let Ok(done) = done
                        && let Err(e) = self.caught_up(done)
                    {
                        break format!("catching a room up: {e}");
                    }
                }
                done = &mut publisher => {
                    let (queues, failed) = done.expect("the publisher does not panic");
                    publisher_done = Some(queues);
                    let reason = match failed {
                        Some(failed) => {
                            self.rewrite.extend(failed.rooms);
                            failed.error.to_string()
                        }
                        None => "stopped".into(),
                    };
                    break format!("publishing: {reason}");
                }
            }
        };
        self.ready.store(false, Ordering::Release);
        self.lookup.set(None);
        // Stopping: the publisher sends what is queued (see `publish_loop`) and then ends.
        stop_publisher.cancel();
        let queues = match publisher_done {
            Some(queues) => queues,
            None if stop.is_cancelled() => {
                self.finish_publishing(&mut session, node, publisher).await
            }
            None => publisher.await.expect("the publisher does not panic").0,
        };
        self.queues = Some(queues);
        // Abandoned catch-ups give their rooms back (see `sync::catch_up`).
        session.catch_ups.shutdown().await;
        if stop.is_cancelled() {
            // Answered before the goodbye (which may take its time): the shards close
            // connections once the broker has settled.
            self.refuse_queued(node);
            self.settled.cancel();
            self.goodbye(&mut session, node).await;
        }
        reason
    }

    /// While stopping: waits for the publisher to send what was queued, delivering what comes
    /// back meanwhile, and then for a fence published after it to come back through the
    /// subscription: every message published before it has come back too, so its sender and
    /// this node's members have it before their connections close. Bounded by `STOP_FENCE`.
    async fn finish_publishing(
        &mut self,
        session: &mut Session,
        node: &Host,
        mut publisher: tokio::task::JoinHandle<(Queues, Option<publisher::Failed>)>,
    ) -> Queues {
        let (queues, failed) = loop {
            tokio::select! {
                done = &mut publisher => break done.expect("the publisher does not panic"),
                Some(message) = session.messages.next() => self.on_message(session, node, &message),
            }
        };
        if failed.is_some() {
            // Redis is not answering: nothing more will come back.
            return queues;
        }
        let mut fence = ::redis::cmd("PUBLISH");
        fence.arg(&session.probe_channel).arg(FENCE);
        let deadline = tokio::time::sleep(STOP_FENCE);
        tokio::pin!(deadline);
        let sent =
            tokio::time::timeout(STOP_FENCE, fence.query_async::<i64>(&mut session.commands));
        // Its own subscription counts as one: none means nothing will come back.
        if matches!(sent.await, Ok(Ok(subscribers)) if subscribers > 0) {
            session.fenced = false;
            while !session.fenced {
                tokio::select! {
                    _ = &mut deadline => break,
                    message = session.messages.next() => match message {
                        Some(message) => self.on_message(session, node, &message),
                        None => break,
                    },
                }
            }
        }
        queues
    }

    /// Refuses the room messages still queued for Redis (not sent: the senders may retry).
    fn refuse_queued(&mut self, node: &Host) {
        if let Some(queues) = self.queues.as_mut() {
            queues.outgoing.close();
            while let Ok(out) = queues.outgoing.try_recv() {
                refuse(node, out, ErrorReply::Unavailable);
            }
        }
    }

    /// A stopping node leaves every room's presence (the others tell their members at once,
    /// rather than after the node's time-to-live), and its sessions and liveness go.
    async fn goodbye(&self, session: &mut Session, node: &Host) {
        let farewell = async {
            // Not alive first (the others then forget this node's presence everywhere), then its
            // presence out of each room it follows, in one pipeline (the others tell their
            // members at once).
            ::redis::cmd("EVALSHA")
                .arg(&session.scripts.goodbye)
                .arg(3)
                .arg(NODES_KEY)
                .arg(sessions_key(&self.node_id))
                .arg(NODE_STATUS_KEY)
                .arg(&*self.node_id)
                .query_async::<i64>(&mut session.commands)
                .await?;
            let mut pipe = ::redis::pipe();
            for room in self.followed.values() {
                let seq = room.presence().next_seq(&self.node_id);
                self.add_presence_write(&mut pipe, &session.scripts, &room.name, seq, &[]);
            }
            // Who leaves rooms with this node is reported (once: by this node).
            let answers: Vec<Value> = pipe.query_async(&mut session.commands).await?;
            for answer in &answers {
                publisher::presence_answer(node, answer);
            }
            RedisResult::Ok(())
        };
        match tokio::time::timeout(GOODBYE_TIMEOUT, farewell).await {
            Ok(Ok(_)) => debug!("said goodbye to the cluster"),
            _ => warn!(
                "could not say goodbye to the cluster: its nodes will notice within {NODE_TTL:?}"
            ),
        }
    }

    fn on_message(&self, session: &mut Session, node: &Host, message: &Msg) {
        let channel = message.get_channel_name();
        let payload = message.get_payload_bytes();
        if channel == session.probe_channel {
            session.last_probe = Instant::now();
            if payload == FENCE.as_bytes() {
                session.fenced = true;
            } else {
                self.probe.came_back(payload);
            }
            return;
        }
        let delivered = if channel == BROADCAST_CHANNEL {
            self.on_notice(node, Target::All, payload)
        } else if channel == USERS_CHANNEL {
            self.on_user_notice(node, payload)
        } else if channel == CONTROL_CHANNEL {
            self.on_control(session, node, payload)
        } else if channel == self.answers_channel {
            self.answers.received(payload)
        } else {
            room_of(channel).is_some_and(|room| match payload.split_first() {
                Some((b's', rest)) => on_room_message(session, node, room, rest),
                Some((b'u', rest)) => self.on_presence(session, node, room, rest, false),
                Some((b'U', rest)) => self.on_presence(session, node, room, rest, true),
                Some((b'p', rest)) => self.on_notice(node, Target::Room(Arc::from(room)), rest),
                _ => false,
            })
        };
        if !delivered {
            node.shared
                .counters
                .broker_malformed
                .fetch_add(1, Ordering::Relaxed);
            debug!(channel, "malformed publication from Redis ignored");
        }
    }

    /// A notice from a node: `<origin node>\n<JSON text>`. Returns false when malformed.
    fn on_notice(&self, node: &Host, target: Target, envelope: &[u8]) -> bool {
        let Some((origin, json)) = envelope::notice(envelope) else {
            return false;
        };
        // Its own were delivered by this node when sent.
        if origin != self.node_id.as_bytes() {
            node.events.publication(target, json);
        }
        true
    }

    /// A publication for one user's connections: `<origin node>\n<user>\n<JSON text>`. Returns
    /// false when malformed.
    fn on_user_notice(&self, node: &Host, envelope: &[u8]) -> bool {
        let Some((origin, user, json)) = envelope::user_notice(envelope) else {
            return false;
        };
        if origin != self.node_id.as_bytes() {
            node.events.publication(Target::User(Arc::from(user)), json);
        }
        true
    }

    /// An order from a node: `<origin node>\n<JSON>`, answered with how many connections it
    /// closed here when the order asks. Returns false when malformed.
    fn on_control(&self, session: &Session, node: &Host, envelope: &[u8]) -> bool {
        let Some((origin, disconnect, answer_id)) = envelope::control(envelope) else {
            return false;
        };
        // Its own were carried out by this node when given.
        if origin == self.node_id.as_bytes() {
            return true;
        }
        let (count_tx, count_rx) = oneshot::channel();
        node.events.disconnect(Arc::new(disconnect), count_tx);
        if let (Some(id), Ok(origin)) = (answer_id, std::str::from_utf8(origin)) {
            let channel = answers_channel(origin);
            let mut commands = session.commands.clone();
            let node_id = self.node_id.clone();
            tokio::spawn(async move {
                // The asker stops waiting after that long: a later count is of no use.
                let Ok(Ok(connections)) = tokio::time::timeout(CONTROL_ANSWER_WAIT, count_rx).await
                else {
                    return;
                };
                let _: RedisResult<i64> = ::redis::cmd("PUBLISH")
                    .arg(channel)
                    .arg(answers::answer(id, connections, &node_id))
                    .query_async(&mut commands)
                    .await;
            });
        }
        true
    }

    /// A presence change of another node: `<node> <seq>\n<entry>` (`whole`: `[<entry>, …]`, all
    /// of the node's entries). Returns false when malformed.
    fn on_presence(
        &self,
        session: &mut Session,
        node: &Host,
        room: &str,
        envelope: &[u8],
        whole: bool,
    ) -> bool {
        let Some((from, seq, entries)) = envelope::presence_change(envelope, whole) else {
            return false;
        };
        // Its own (delivered when made), or of a node found dead (late: it left every room).
        if from == self.node_id || self.nodes.dead.contains(&from) {
            return true;
        }
        let Some(room) = node.shared.rooms.get(room) else {
            return true;
        };
        {
            let mut stream = room.stream();
            if !stream.is_synced() {
                // During the room's first sync: read again once it is done.
                if stream.subscribing {
                    stream.presence_stale = true;
                    drop(stream);
                    session.catch_up(node, room);
                }
                return true;
            }
        }
        if whole {
            let (gone, came) = room.presence().replace_node(&from, seq, entries);
            node.events.presence(&room, &gone, &came);
            return true;
        }
        let entry = entries.into_iter().next().expect("one");
        let fit = room.presence().apply(&from, seq, entry.clone());
        match fit {
            Fit::Applied { before, after } => {
                let (gone, came) = match (before, after) {
                    (0, 1..) => (&[][..], std::slice::from_ref(&entry)),
                    (1.., 0) => (std::slice::from_ref(&entry), &[][..]),
                    _ => (&[][..], &[][..]),
                };
                node.events.presence(&room, gone, came);
            }
            Fit::Seen => {}
            Fit::Missed => {
                room.stream().presence_stale = true;
                session.catch_up(node, room);
            }
        }
        true
    }

    /// What a beat says of the other nodes: one that ended (or that Redis forgot since the last
    /// beat) is dead, and its presence leaves every room this node follows; one found dead that
    /// beats again is back, and the rooms are read again for its presence. Returns whether this
    /// node had lapsed itself (then it has to write its presence and sessions again, and nobody
    /// is judged until the others could be heard).
    fn on_beat(&mut self, node: &Host, beat: Beat, session: Option<&mut Session>) -> bool {
        let lapsed = beat.before < beat.now;
        if lapsed && session.is_some() {
            self.judge_after = Instant::now() + NODE_TTL + BEAT_INTERVAL;
        }
        let mut alive = HashSet::new();
        let mut ended = HashSet::new();
        for (other, until) in beat.nodes {
            if *other == *self.node_id {
                continue;
            }
            let other: Arc<str> = Arc::from(other);
            if until >= beat.now {
                alive.insert(other);
            } else {
                ended.insert(other);
            }
        }
        self.answers.alive(&alive);
        if Instant::now() < self.judge_after {
            self.nodes.alive = alive;
            return lapsed && session.is_some();
        }
        // Dead: the nodes listed as ended, those alive at the last beat that Redis forgot, and
        // those known only from the copies (entries in a room this node follows) that two beats
        // in a row did not list: after Redis lost its data a crashed node is listed nowhere, and
        // its members would otherwise stay in the copies for good. Two beats, as a node that just
        // started may be in a copy before a beat read earlier is handled.
        let mut unlisted = HashSet::new();
        for room in self.followed.values() {
            unlisted.extend(room.presence().nodes().cloned());
        }
        unlisted.retain(|n| {
            *n != self.node_id
                && !alive.contains(n)
                && !ended.contains(n)
                && !self.nodes.alive.contains(n)
        });
        let confirmed: Vec<Arc<str>> = unlisted
            .intersection(&self.nodes.unlisted)
            .cloned()
            .collect();
        self.nodes.unlisted = unlisted;
        let forgotten = self
            .nodes
            .alive
            .iter()
            .filter(|n| !alive.contains(*n) && !ended.contains(*n));
        let dead: HashSet<Arc<str>> = ended
            .iter()
            .chain(forgotten)
            .chain(&confirmed)
            .cloned()
            .collect();
        for gone in dead.difference(&self.nodes.dead) {
            warn!(node = %gone, "a node stopped beating: its presence leaves every room");
        }
        // Swept out of Redis's rooms at every beat while dead (one call when done): a sweep cut
        // short by an error is taken up again.
        self.sweeps.retain(|gone, _| dead.contains(gone));
        if let Some(session) = session.as_ref() {
            for gone in &dead {
                if self
                    .sweeps
                    .get(gone)
                    .is_none_or(|sweep| sweep.is_finished())
                {
                    let sweep = tokio::spawn(forget_node(
                        session.commands.clone(),
                        session.scripts.clone(),
                        node.clone(),
                        gone.clone(),
                        self.empty_room_ttl,
                    ));
                    self.sweeps.insert(gone.clone(), sweep);
                }
            }
        }
        // Every beat, not only the first: a read of a room made while a node was alive may
        // have brought it back into a copy since.
        for gone in &dead {
            for room in self.followed.values() {
                let left = room.presence().remove_node(gone);
                node.events.presence(room, &left, &[]);
            }
        }
        let back: Vec<&Arc<str>> = self.nodes.dead.intersection(&alive).collect();
        if !back.is_empty() {
            info!(nodes = ?back, "nodes found dead beat again: reading their presence");
            if let Some(session) = session {
                for room in self.followed.values() {
                    room.stream().presence_stale = true;
                    session.catch_up(node, room.clone());
                }
            }
        }
        // Dead while Redis lists them as ended (or the copies hold them unlisted), unless back.
        self.nodes.dead = dead;
        self.nodes.alive = alive;
        false
    }

    /// A record that will not be sent (Redis away, or a reconnection supersedes it): its room
    /// is written whole at the next connection.
    fn superseded(&mut self, record: Record) {
        if let Record::Presence { room, .. } = record {
            self.rewrite.insert(room);
        }
    }

    /// Writes this node's whole presence in every room it follows, and in the rooms whose
    /// records may have been lost, in pipelines.
    async fn rewrite_presence(&mut self, session: &mut Session, node: &Host) -> RedisResult<()> {
        let mut rooms: Vec<(Arc<str>, u64, Vec<Entry>)> = Vec::new();
        for room in self.followed.values() {
            let mut presence = room.presence();
            let seq = presence.next_seq(&self.node_id);
            rooms.push((room.name.clone(), seq, presence.own(&self.node_id).1));
        }
        for name in self
            .rewrite
            .iter()
            .filter(|r| !self.followed.contains_key(*r))
        {
            // Not followed any more: no member here.
            rooms.push((name.clone(), Presence::fresh_seq(), Vec::new()));
        }
        for batch in rooms.chunks(SUBSCRIBE_BATCH) {
            let mut pipe = ::redis::pipe();
            for (name, seq, entries) in batch {
                self.add_presence_write(&mut pipe, &session.scripts, name, *seq, entries);
            }
            // Each script answers the era's clock, and who came or went with the rewrite.
            let answers: Vec<Value> = pipe.query_async(&mut session.commands).await?;
            for answer in &answers {
                if let Some(written) = publisher::presence_answer(node, answer) {
                    publisher::raise(&self.clock, written);
                }
            }
        }
        self.rewrite.clear();
        Ok(())
    }

    async fn on_command(
        &mut self,
        session: &mut Session,
        node: &Host,
        command: Command,
    ) -> RedisResult<()> {
        // Follows waiting behind this one go in the same SUBSCRIBE.
        let mut follow = Vec::new();
        let mut next = Some(command);
        while let Some(command) = next.take() {
            match command {
                Command::Follow(room) => {
                    self.followed.insert(room.name.clone(), room.clone());
                    follow.push(room);
                }
                Command::LastMemberLeft(room) => {
                    // The grace counts from the last leave.
                    self.leaving.insert(room, Instant::now() + self.grace);
                }
            }
            if follow.len() < SUBSCRIBE_BATCH {
                next = self.commands.try_recv().ok();
            }
        }
        let new: Vec<Arc<str>> = follow
            .iter()
            .filter(|room| !session.subscribed.contains(&room.name))
            .map(|room| room.name.clone())
            .collect();
        subscribe(session, new.iter()).await?;
        for room in follow {
            session.catch_up(node, room);
        }
        Ok(())
    }

    /// Adds the writing of this node's whole presence in `room` (`entries`; none: it leaves),
    /// change `seq`, to `pipe`.
    fn add_presence_write(
        &self,
        pipe: &mut ::redis::Pipeline,
        scripts: &Scripts,
        room: &str,
        seq: u64,
        entries: &[Entry],
    ) {
        let keys = &scripts.keys;
        let written = keys.presence_writes(room, &self.node_id);
        let write = pipe
            .cmd("EVALSHA")
            .arg(&scripts.presence_node)
            .arg(written.len())
            .arg(&written)
            .arg(&*self.node_id)
            .arg(seq)
            .arg(room_channel(room))
            .arg(META_TTL.as_secs())
            .arg(room)
            .arg(keys.generation())
            .arg(self.empty_room_ttl)
            .arg(self.clock.load(Ordering::Relaxed));
        for entry in entries {
            write.arg(&*entry.user_id).arg(entry_json(entry));
        }
    }

    /// Stops following the rooms whose grace has passed with no local member back.
    async fn unfollow_due(&mut self, session: &mut Session) -> RedisResult<()> {
        let now = Instant::now();
        let due: Vec<Arc<str>> = self
            .leaving
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(room, _)| room.clone())
            .collect();
        let mut channels = Vec::new();
        for name in due {
            self.leaving.remove(&name);
            let Some(room) = self.followed.get(&name) else {
                continue;
            };
            {
                // Under the stream's lock, as joins count their member: either a member came back
                // (and the room stays), or the next join finds the room unsynced and asks again.
                let mut stream = room.stream();
                if room.total() > 0 {
                    continue;
                }
                stream.unsync();
                // This node's entries are gone (no member left); others' are read again on a
                // later follow.
                *room.presence() = Presence::default();
            }
            self.followed.remove(&name);
            if session.subscribed.remove(&name) {
                channels.push(room_channel(&name));
            }
        }
        for batch in channels.chunks(SUBSCRIBE_BATCH) {
            within(session.sink.unsubscribe(batch)).await?;
        }
        Ok(())
    }
}

impl Session {
    fn catch_up(&mut self, node: &Host, room: Arc<RoomState>) {
        catch_up(
            &mut self.catch_ups,
            &self.commands,
            &self.scripts,
            node,
            room,
        );
    }
}

/// SUBSCRIBEs to the channels of `rooms`, in batches, waiting for Redis to confirm each.
async fn subscribe<'a>(
    session: &mut Session,
    rooms: impl Iterator<Item = &'a Arc<str>>,
) -> RedisResult<()> {
    let rooms: Vec<&Arc<str>> = rooms.collect();
    for batch in rooms.chunks(SUBSCRIBE_BATCH) {
        let channels: Vec<String> = batch.iter().map(|room| room_channel(room)).collect();
        within(session.sink.subscribe(&channels)).await?;
        session
            .subscribed
            .extend(batch.iter().map(|&room| room.clone()));
    }
    Ok(())
}

/// A room message: `<offset> <epoch>\n<JSON text>`. Returns false when malformed.
fn on_room_message(session: &mut Session, node: &Host, room: &str, envelope: &[u8]) -> bool {
    let Some((offset, epoch, json)) = envelope::room_message(envelope) else {
        return false;
    };
    // Not followed any more (messages still on their way after an UNSUBSCRIBE): nobody here.
    let Some(room) = node.shared.rooms.get(room) else {
        return true;
    };
    let arrival = room.stream().arrival(offset, epoch);
    match arrival {
        Arrival::Next => {
            let frame = Prepared::new(protocol::with_offset(json, offset));
            let mut stream = room.stream();
            // Another path (a catch-up) may have taken it meanwhile.
            if stream.arrival(offset, epoch) == Arrival::Next {
                let limits = node.shared.rooms.history_limits();
                stream.push(offset, frame.clone(), limits, Instant::now());
                node.events.stream_message(&room, offset, frame);
            }
        }
        Arrival::Seen => {}
        Arrival::Missed => session.catch_up(node, room),
    }
    true
}

/// Takes a dead node out of every room it had members in, in Redis, a batch of rooms at a time
/// (see `forget_node.lua`), so that rooms nobody reads again do not keep it; the copies of the
/// rooms this node follows were cleaned by `on_beat`.
async fn forget_node(
    mut conn: MultiplexedConnection,
    scripts: Arc<Scripts>,
    node: Host,
    dead: Arc<str>,
    empty_room_ttl: u64,
) {
    const ROOMS_PER_CALL: usize = 256;
    let keys = &scripts.keys;
    loop {
        // How many of its rooms are left, then who left rooms with it (reported by this node:
        // each room is swept once).
        let answer: RedisResult<Vec<Value>> = ::redis::cmd("EVALSHA")
            .arg(&scripts.forget_node)
            .arg(3)
            .arg(keys.node_rooms(&dead))
            .arg(NODES_KEY)
            .arg(keys.rooms())
            .arg(&*dead)
            .arg(keys.prefix())
            .arg(ROOMS_PER_CALL)
            .arg(META_TTL.as_secs())
            .arg(empty_room_ttl)
            .query_async(&mut conn)
            .await;
        match answer.as_deref() {
            Ok([left, changes @ ..]) => {
                publisher::report_memberships(&node, changes);
                if matches!(left, Value::Int(0)) {
                    return;
                }
            }
            Ok([]) => return,
            Err(e) => {
                return debug!(node = %dead, error = %e, "sweeping a dead node's rooms: again at the next beat");
            }
        }
    }
}

/// Beats every [`BEAT_INTERVAL`] (the first was made at the connection) and hands each result to
/// the engine; stops at the first failure (the engine then reconnects).
async fn beat_forever(
    mut conn: MultiplexedConnection,
    scripts: Arc<Scripts>,
    shared: Arc<Shared>,
    clock: Arc<AtomicU64>,
    beats: Sender<RedisResult<Beat>>,
) {
    let mut ticks = tokio::time::interval(BEAT_INTERVAL);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        match beat(&mut conn, &scripts, &shared, &clock).await {
            // A full channel: the engine is busy, and the next beat says the same.
            Ok(beat) => {
                let _ = beats.try_send(Ok(beat));
            }
            Err(e) => {
                let _ = beats.send(Err(e)).await;
                return;
            }
        }
    }
}

/// Says this node is alive (until `NODE_TTL` from now) and reads until when each node is, and
/// the era against `clock` (the highest this node saw: its writes answered before this beat was
/// sent ran before it, on this one connection).
async fn beat(
    conn: &mut MultiplexedConnection,
    scripts: &Scripts,
    shared: &Shared,
    clock: &AtomicU64,
) -> RedisResult<Beat> {
    let node_id = &*shared.id;
    let seen_clock = clock.load(Ordering::Relaxed);
    let status =
        serde_json::to_string(&NodeStatus::of(shared)).expect("serializing to memory cannot fail");
    let reply: ::redis::Value = ::redis::cmd("EVALSHA")
        .arg(&scripts.beat)
        .arg(4)
        .arg(NODES_KEY)
        .arg(sessions_key(node_id))
        .arg(ERA_KEY)
        .arg(NODE_STATUS_KEY)
        .arg(node_id)
        .arg(NODE_TTL.as_millis() as u64)
        .arg(NODE_FORGOTTEN_AFTER.as_millis() as u64)
        .arg(scripts.keys.generation())
        .arg(status)
        .query_async(conn)
        .await?;
    Beat::parse(reply, seen_clock).ok_or_else(|| {
        RedisError::from(std::io::Error::other(
            "unexpected answer to the beat script",
        ))
    })
}

impl Beat {
    /// `[now, before, [node, until, …], same era, era clock]`; a name that is not UTF-8 is read
    /// lossily (it is only ever compared).
    fn parse(reply: ::redis::Value, seen_clock: u64) -> Option<Self> {
        use ::redis::Value;
        let int = |v: &Value| match v {
            Value::Int(n) => Some(u64::try_from(*n).unwrap_or(0)),
            _ => None,
        };
        let Value::Array(parts) = reply else {
            return None;
        };
        let [now, before, Value::Array(flat), same_era, era_clock] =
            <[Value; 5]>::try_from(parts).ok()?
        else {
            return None;
        };
        let nodes = flat
            .chunks(2)
            .filter_map(|pair| match pair {
                [Value::BulkString(name), until] => {
                    Some((String::from_utf8_lossy(name).into_owned(), int(until)?))
                }
                _ => None,
            })
            .collect();
        Some(Beat {
            now: int(&now)?,
            before: int(&before)?,
            nodes,
            same_era: int(&same_era)? == 1,
            era_clock: int(&era_clock)?,
            seen_clock,
        })
    }
}

/// The broker is not ready, and has settled, once its engine is gone however it ends (a panic
/// included, or never run: shards never wait for an engine that is not there).
impl Drop for Engine {
    fn drop(&mut self) {
        self.ready.store(false, Ordering::Release);
        self.settled.cancel();
    }
}

/// A Redis answer that takes longer than [`REDIS_TIMEOUT`] is an error.
async fn within<T>(request: impl Future<Output = RedisResult<T>>) -> RedisResult<T> {
    tokio::time::timeout(REDIS_TIMEOUT, request)
        .await
        .unwrap_or_else(|_| {
            Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "Redis did not answer in time",
            )))
        })
}

/// `pause` give or take a quarter, so nodes that lost Redis together do not come back together.
fn jittered(pause: Duration) -> Duration {
    let mut byte = [0u8; 1];
    let _ = getrandom::fill(&mut byte);
    let quarter = pause / 4;
    pause - quarter + quarter * 2 * u32::from(byte[0]) / 255
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn back_off_is_jittered_within_a_quarter() {
        for _ in 0..100 {
            let pause = jittered(Duration::from_millis(400));
            assert!((300..=500).contains(&pause.as_millis()), "{pause:?}");
        }
    }
}
