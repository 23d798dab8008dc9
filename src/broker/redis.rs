//! The Redis broker: nodes joined through one Redis.
//!
//! Data, per room `R` (the `{R}` hash tag keeps a room's keys and channel together, so Redis
//! Cluster could follow):
//! - `wsgate:meta:{R}`: a hash with the room's last `offset` and its `epoch`;
//! - `wsgate:history:{R}`: a stream of its recent messages, entry ids `<offset>-0`;
//! - `wsgate:room:{R}`: the channel its messages and notices are published on.
//!
//! A room message is published by one Lua script ([`PUBLISH_LUA`]): next offset, history,
//! PUBLISH — so every node receives a room's messages in one order, gap-free. Each node
//! SUBSCRIBEs to the rooms it has members in (batched, once per node, not per client) and
//! UNSUBSCRIBEs `redis_unsubscribe_grace` after its last member left.
//!
//! A node keeps each followed room's position and recent history in its own [`Stream`]. A message
//! that is not the next one (lost on the way, or during a reconnect) makes the node catch the room
//! up from the history ([`SYNC_LUA`]); when the history no longer has what was missed, or the
//! epoch changed (the room's data expired or Redis lost it), members are told to `resync`.
//!
//! Outages: sockets stay open. Publishing is refused at once ("Service unavailable: retry") and
//! `/readyz` answers 503 until the node has reconnected (with a jittered back-off), resubscribed
//! every room it follows and caught each up. A probe published to the node's own channel every
//! second finds a subscription that stopped delivering while the connection looks alive.
//!
//! Everything here runs on the broker's own thread ([`Engine::run`]); shards reach it through
//! queues and never wait for it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ::redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};
use ::redis::{AsyncConnectionConfig, Client, Msg, RedisError, RedisResult, Value};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc::{self, Receiver, Sender, UnboundedReceiver, UnboundedSender};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Unavailable;
use crate::client_id::ClientId;
use crate::config::Config;
use crate::node::Node;
use crate::presence::{Entry, Fit, Presence};
use crate::protocol::{self, ErrorReply, ServerMessage};
use crate::rooms::RoomState;
use crate::routing::{self, Delivery, Target};
use crate::stream::{Arrival, Position, new_epoch};

/// Publishes a room message: offset, history, PUBLISH in one step.
pub const PUBLISH_LUA: &str = include_str!("publish.lua");
/// Reads a room's position, history and presence.
pub const SYNC_LUA: &str = include_str!("sync.lua");
/// Records one presence change of this node.
pub const PRESENCE_LUA: &str = include_str!("presence.lua");
/// Replaces this node's presence in a room.
pub const PRESENCE_NODE_LUA: &str = include_str!("presence_node.lua");
/// Says this node is alive and reads which are.
pub const BEAT_LUA: &str = include_str!("beat.lua");

/// Channels per SUBSCRIBE or UNSUBSCRIBE command, at most.
const SUBSCRIBE_BATCH: usize = 512;
/// Publications per pipeline sent to Redis, at most.
const PUBLISH_BATCH: usize = 512;
/// How often the probe is published, and how long without one before the subscription is
/// considered wedged and the connection restarted.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Connecting, and any answer from Redis, may take this long.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// Reconnection back-off: from the first to the second, doubling, with jitter.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));
/// How long a room's offset and epoch stay in Redis after its last message or sync: past it,
/// a room starts over under a new epoch (its clients are told they cannot recover).
const META_TTL: Duration = Duration::from_secs(24 * 3600);
/// How often rooms past their unsubscribe grace are looked at.
const GRACE_TICK: Duration = Duration::from_millis(250);
/// How often a node says it is alive, and how long after its last word it counts as dead (its
/// presence then leaves every room): a node killed without a goodbye stops counting within
/// `NODE_TTL + BEAT_INTERVAL`.
const BEAT_INTERVAL: Duration = Duration::from_secs(2);
const NODE_TTL: Duration = Duration::from_secs(8);

const BROADCAST_CHANNEL: &str = "wsgate:broadcast";
const NODES_KEY: &str = "wsgate:nodes";

fn room_channel(room: &str) -> String {
    format!("wsgate:room:{{{room}}}")
}

fn meta_key(room: &str) -> String {
    format!("wsgate:meta:{{{room}}}")
}

fn history_key(room: &str) -> String {
    format!("wsgate:history:{{{room}}}")
}

fn presence_key(room: &str) -> String {
    format!("wsgate:presence:{{{room}}}")
}

/// A node's sessions: client id → `{"user","node","connectedAt"}`, expiring `NODE_TTL` after
/// the node's last beat.
fn sessions_key(node: &str) -> String {
    format!("wsgate:sessions:{node}")
}

/// The room a channel is for.
fn room_of(channel: &str) -> Option<&str> {
    channel.strip_prefix("wsgate:room:{")?.strip_suffix('}')
}

/// What the shards ask of the engine.
enum Command {
    /// Follow a room (its first local member joined).
    Follow(Arc<RoomState>),
    /// Its last local member left.
    LastMemberLeft(Arc<str>),
}

/// What goes to Redis, in the order it was sent.
enum Outgoing {
    /// A room message (JSON text), from a client.
    Message {
        room: Arc<str>,
        message: Vec<u8>,
        from: ClientId,
    },
    /// A publication for the other nodes (JSON text): a room's, or every chat client's.
    Notice {
        room: Option<Arc<str>>,
        payload: Bytes,
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

/// The shards' handle on the Redis broker.
pub struct RedisBroker {
    /// This node's name in its publications (it ignores its own notices).
    node_id: Arc<str>,
    commands: UnboundedSender<Command>,
    outgoing: Sender<Outgoing>,
    records: UnboundedSender<Record>,
    ready: Arc<AtomicBool>,
}

impl RedisBroker {
    pub fn new(config: &Config, node_id: Arc<str>) -> (Self, Engine) {
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (outgoing, outgoing_rx) = mpsc::channel(config.redis_publish_queue);
        let (records, records_rx) = mpsc::unbounded_channel();
        let ready = Arc::new(AtomicBool::new(false));
        let broker = RedisBroker {
            node_id: node_id.clone(),
            commands,
            outgoing,
            records,
            ready: ready.clone(),
        };
        let engine = Engine {
            url: config.redis_url.clone(),
            grace: config.redis_unsubscribe_grace,
            node_id,
            ready,
            commands: command_rx,
            queues: Some(Queues {
                outgoing: outgoing_rx,
                records: records_rx,
            }),
            dead: HashSet::new(),
            followed: HashMap::new(),
            leaving: VecDeque::new(),
        };
        (broker, engine)
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub(super) fn follow(&self, room: Arc<RoomState>) {
        // Fails only once the engine has stopped (shutdown), when nothing is followed any more.
        let _ = self.commands.send(Command::Follow(room));
    }

    pub(super) fn last_member_left(&self, room: Arc<str>) {
        let _ = self.commands.send(Command::LastMemberLeft(room));
    }

    /// Queues a change of this node's presence in `room` for Redis (see [`Presence::change`]).
    pub fn presence_changed(&self, room: Arc<str>, entry: Entry, seq: u64) {
        let _ = self.records.send(Record::Presence { room, entry, seq });
    }

    /// Records a session in Redis: `client_id` (as clients see it), its user and when it
    /// connected (Unix ms). Sessions are kept in one hash per node, which lives while the node
    /// beats.
    pub fn session_opened(&self, client_id: String, user_id: &str, connected_at: u64) {
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

    pub fn session_closed(&self, client_id: String) {
        let _ = self.records.send(Record::SessionClosed { client_id });
    }

    /// Queues a room message for Redis; refused while Redis is away or the queue is full.
    pub fn publish(
        &self,
        room: Arc<str>,
        message: Vec<u8>,
        from: ClientId,
    ) -> Result<(), Unavailable> {
        if !self.is_ready() {
            return Err(Unavailable);
        }
        self.outgoing
            .try_send(Outgoing::Message {
                room,
                message,
                from,
            })
            .map_err(|_| Unavailable)
    }

    /// Queues a publication for the other nodes. Returns false when it could not be (counted by
    /// the caller): notices are not retried.
    pub fn share(&self, target: &Target, payload: Bytes) -> bool {
        let room = match target {
            Target::All => None,
            Target::Room(room) => Some(room.clone()),
        };
        self.is_ready()
            && self
                .outgoing
                .try_send(Outgoing::Notice { room, payload })
                .is_ok()
    }
}

/// The broker's side: one Redis connection for commands, one for subscriptions.
pub struct Engine {
    url: String,
    grace: Duration,
    node_id: Arc<str>,
    ready: Arc<AtomicBool>,
    commands: UnboundedReceiver<Command>,
    /// Lent to the publisher while connected.
    queues: Option<Queues>,
    /// Nodes found dead (their presence was taken out of every room).
    dead: HashSet<Arc<str>>,
    /// Rooms the node follows (has members in, or had within the grace), by name.
    followed: HashMap<Arc<str>, Arc<RoomState>>,
    /// Rooms whose last local member left, with when to stop following them.
    leaving: VecDeque<(Instant, Arc<str>)>,
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
    catch_ups: JoinSet<RedisResult<()>>,
    last_probe: Instant,
    probe_channel: String,
}

/// The SHA1s of the loaded Lua scripts.
struct Scripts {
    publish: String,
    sync: String,
    presence: String,
    presence_node: String,
    beat: String,
}

impl Engine {
    /// Runs until `stop`: connects, serves, and reconnects after any failure.
    pub async fn run(mut self, node: Arc<Node>, stop: CancellationToken) {
        let client = match Client::open(self.url.as_str()) {
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
                    info!(url = %redacted(&self.url), rooms = self.followed.len(), "connected to Redis");
                    backoff = BACKOFF.0;
                    failures = 0;
                    let reason = tokio::select! {
                        _ = stop.cancelled() => return,
                        reason = self.serve(session, &node) => reason,
                    };
                    warn!(%reason, "Redis connection lost: room messages are refused until it is back");
                }
                Err(e) => {
                    failures += 1;
                    // The first failure, then one line in ten while Redis stays away.
                    if failures % 10 == 1 {
                        warn!(error = %e, url = %redacted(&self.url), failures, "cannot reach Redis");
                    }
                }
            }
            self.ready.store(false, Ordering::Release);
            node.counters
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
    async fn offline(&mut self, node: &Node, pause: Duration) {
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
                        self.leaving.push_back((Instant::now() + self.grace, room));
                    }
                },
                Some(out) = queues.outgoing.recv() => refuse(node, out),
                // Written again, whole, once Redis is back.
                Some(_) = queues.records.recv() => {}
            }
        }
    }

    async fn connect(&mut self, client: &Client, node: &Arc<Node>) -> RedisResult<Session> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT));
        let mut commands = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let load = |script: &str| ::redis::cmd("SCRIPT").arg("LOAD").arg(script).to_owned();
        let scripts = Arc::new(Scripts {
            publish: load(PUBLISH_LUA).query_async(&mut commands).await?,
            sync: load(SYNC_LUA).query_async(&mut commands).await?,
            presence: load(PRESENCE_LUA).query_async(&mut commands).await?,
            presence_node: load(PRESENCE_NODE_LUA).query_async(&mut commands).await?,
            beat: load(BEAT_LUA).query_async(&mut commands).await?,
        });
        // Alive before anything of this node's is read by others; its sessions are written anew
        // once it is ready.
        beat(&mut commands, &scripts, &self.node_id).await?;
        ::redis::cmd("DEL")
            .arg(sessions_key(&self.node_id))
            .query_async::<i64>(&mut commands)
            .await?;
        let pubsub = within(client.get_async_pubsub()).await?;
        let (mut sink, messages) = pubsub.split();
        let probe_channel = format!("wsgate:probe:{}", self.node_id);
        within(sink.subscribe(&[probe_channel.as_str(), BROADCAST_CHANNEL])).await?;
        let mut session = Session {
            commands,
            scripts,
            sink,
            messages,
            subscribed: HashSet::new(),
            catch_ups: JoinSet::new(),
            last_probe: Instant::now(),
            probe_channel,
        };
        let rooms: Vec<Arc<RoomState>> = self.followed.values().cloned().collect();
        subscribe(&mut session, rooms.iter().map(|r| &r.name)).await?;
        // What this node's presence became while Redis was away (or lost it) is written whole.
        for room in &rooms {
            let (seq, entries) = {
                let mut presence = room.presence();
                let seq = presence.next_seq(&self.node_id);
                (seq, presence.own(&self.node_id).1)
            };
            let mut write = ::redis::cmd("EVALSHA");
            write
                .arg(&session.scripts.presence_node)
                .arg(1)
                .arg(presence_key(&room.name))
                .arg(&*self.node_id)
                .arg(seq)
                .arg(room_channel(&room.name))
                .arg(META_TTL.as_secs());
            for entry in entries {
                write.arg(&*entry.user_id).arg(entry_json(&entry));
            }
            write.query_async::<i64>(&mut session.commands).await?;
        }
        // Every room caught up before serving: what arrives meanwhile waits in the subscription.
        for room in rooms {
            catch_up(&mut session, node, room);
        }
        while let Some(done) = session.catch_ups.join_next().await {
            done.map_err(|e| RedisError::from(std::io::Error::other(e)))??;
        }
        self.ready.store(true, Ordering::Release);
        let all: Vec<usize> = (0..node.shards()).collect();
        node.bus.send_always(&all, Delivery::ResendSessions);
        Ok(session)
    }

    /// Serves one connection until it fails; returns why.
    async fn serve(&mut self, mut session: Session, node: &Arc<Node>) -> String {
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
            self.node_id.clone(),
            stop_publisher.clone(),
        ));
        let mut probe = tokio::time::interval(PROBE_INTERVAL);
        let mut grace = tokio::time::interval(GRACE_TICK);
        let mut beats = tokio::time::interval(BEAT_INTERVAL);
        let mut publisher_done = None;
        let reason = loop {
            tokio::select! {
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
                        node.counters.broker_probe_failures.fetch_add(1, Ordering::Relaxed);
                        break "no probe came back: the subscription is not delivering".to_owned();
                    }
                    let mut commands = session.commands.clone();
                    let channel = session.probe_channel.clone();
                    // A failure shows as a probe that does not come back.
                    tokio::spawn(async move {
                        let _: RedisResult<i64> = ::redis::cmd("PUBLISH")
                            .arg(channel)
                            .arg("probe")
                            .query_async(&mut commands)
                            .await;
                    });
                }
                _ = beats.tick() => {
                    if let Err(e) = self.beat(&mut session, node).await {
                        break e.to_string();
                    }
                }
                _ = grace.tick() => {
                    if let Err(e) = self.unfollow_due(&mut session).await {
                        break e.to_string();
                    }
                }
                Some(done) = session.catch_ups.join_next() => {
                    if let Ok(Err(e)) = done {
                        break format!("catching a room up: {e}");
                    }
                }
                done = &mut publisher => {
                    let (queues, error) = done.expect("the publisher does not panic");
                    publisher_done = Some(queues);
                    break format!("publishing: {}", error.map_or("stopped".into(), |e| e.to_string()));
                }
            }
        };
        self.ready.store(false, Ordering::Release);
        stop_publisher.cancel();
        let queues = match publisher_done {
            Some(queues) => queues,
            None => publisher.await.expect("the publisher does not panic").0,
        };
        self.queues = Some(queues);
        // Abandoned catch-ups give their rooms back (see `CatchingUp`) before the next session.
        session.catch_ups.shutdown().await;
        reason
    }

    fn on_message(&self, session: &mut Session, node: &Arc<Node>, message: &Msg) {
        let channel = message.get_channel_name();
        let payload = message.get_payload_bytes();
        if channel == session.probe_channel {
            session.last_probe = Instant::now();
            return;
        }
        let delivered = if channel == BROADCAST_CHANNEL {
            self.on_notice(node, Target::All, payload)
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
            node.counters
                .broker_malformed
                .fetch_add(1, Ordering::Relaxed);
            debug!(channel, "malformed publication from Redis ignored");
        }
    }

    /// A notice from a node: `<origin node>\n<JSON text>`. Returns false when malformed.
    fn on_notice(&self, node: &Node, target: Target, envelope: &[u8]) -> bool {
        let Some((origin, json)) = split_line(envelope) else {
            return false;
        };
        if origin == self.node_id.as_bytes() {
            // Delivered by this node when it was sent.
            return true;
        }
        if !protocol::looks_like_object(json) {
            return false;
        }
        routing::publish_from_broker(node, target, json);
        true
    }

    /// A presence change of another node: `<node> <seq>\n<entry>` (`whole`: `[<entry>, …]`, all
    /// of the node's entries). Returns false when malformed.
    fn on_presence(
        &self,
        session: &mut Session,
        node: &Arc<Node>,
        room: &str,
        envelope: &[u8],
        whole: bool,
    ) -> bool {
        let Some((header, json)) = split_line(envelope) else {
            return false;
        };
        let Some((from, seq)) = std::str::from_utf8(header)
            .ok()
            .and_then(|h| h.split_once(' '))
        else {
            return false;
        };
        let Some(seq) = parse_u64(seq.as_bytes()) else {
            return false;
        };
        if from == &*self.node_id {
            return true;
        }
        let Some(room) = node.rooms.get(room) else {
            return true;
        };
        let from: Arc<str> = Arc::from(from);
        let synced = room.stream().is_synced();
        if !synced {
            // The room's first sync reads the presence whole.
            return true;
        }
        if whole {
            let Ok(entries) = serde_json::from_slice::<Vec<Entry>>(json) else {
                return false;
            };
            let (gone, came) = room.presence().replace_node(&from, seq, entries);
            routing::tell_presence(node, &room, &gone, &came);
            return true;
        }
        let Ok(entry) = serde_json::from_slice::<Entry>(json) else {
            return false;
        };
        let fit = room.presence().apply(&from, seq, entry.clone());
        match fit {
            Fit::Applied { before, after } => {
                let (gone, came) = match (before, after) {
                    (0, 1..) => (&[][..], std::slice::from_ref(&entry)),
                    (1.., 0) => (std::slice::from_ref(&entry), &[][..]),
                    _ => (&[][..], &[][..]),
                };
                routing::tell_presence(node, &room, gone, came);
            }
            Fit::Seen => {}
            Fit::Missed => catch_up(session, node, room),
        }
        true
    }

    /// Says this node is alive, and takes the presence of the nodes found dead out of every room
    /// this node follows (their entries in Redis are skipped by every read from now on).
    async fn beat(&mut self, session: &mut Session, node: &Node) -> RedisResult<()> {
        let alive = beat(&mut session.commands, &session.scripts, &self.node_id).await?;
        for room in self.followed.values() {
            let gone_nodes: Vec<Arc<str>> = room
                .presence()
                .nodes()
                .filter(|n| **n != self.node_id && !alive.contains(&***n))
                .cloned()
                .collect();
            for gone in gone_nodes {
                if self.dead.insert(gone.clone()) {
                    warn!(node = %gone, "a node stopped answering: its presence leaves every room");
                }
                let left = room.presence().remove_node(&gone);
                routing::tell_presence(node, room, &left, &[]);
            }
        }
        Ok(())
    }

    async fn on_command(
        &mut self,
        session: &mut Session,
        node: &Arc<Node>,
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
                    self.leaving.push_back((Instant::now() + self.grace, room));
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
            catch_up(session, node, room);
        }
        Ok(())
    }

    /// Stops following the rooms whose grace has passed with no local member back.
    async fn unfollow_due(&mut self, session: &mut Session) -> RedisResult<()> {
        let now = Instant::now();
        let mut channels = Vec::new();
        while let Some((at, _)) = self.leaving.front()
            && *at <= now
        {
            let (_, name) = self.leaving.pop_front().expect("looked at");
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

/// A room message: `<offset> <epoch> <origin node>\n<JSON text>`. Returns false when malformed.
fn on_room_message(session: &mut Session, node: &Arc<Node>, room: &str, envelope: &[u8]) -> bool {
    let Some((header, json)) = split_line(envelope) else {
        return false;
    };
    let mut fields = header.split(|&b| b == b' ');
    let (Some(offset), Some(epoch)) = (fields.next(), fields.next()) else {
        return false;
    };
    let (Some(offset), Ok(epoch)) = (parse_u64(offset), std::str::from_utf8(epoch)) else {
        return false;
    };
    if !protocol::looks_like_object(json) {
        return false;
    }
    // Not followed any more (messages still on their way after an UNSUBSCRIBE): nobody here.
    let Some(room) = node.rooms.get(room) else {
        return true;
    };
    let arrival = room.stream().arrival(offset, epoch);
    match arrival {
        Arrival::Next => {
            let frame = protocol::with_offset(json, offset);
            let mut stream = room.stream();
            // Another path (a catch-up) may have taken it meanwhile.
            if stream.arrival(offset, epoch) == Arrival::Next {
                stream.push(
                    offset,
                    frame.clone(),
                    node.rooms.history_limits(),
                    Instant::now(),
                );
                routing::forward_stream(node, &room, offset, frame);
            }
        }
        Arrival::Seen => {}
        Arrival::Missed => catch_up(session, node, room),
    }
    true
}

/// Starts catching `room` up from Redis, unless a catch-up is running (then it runs once more).
fn catch_up(session: &mut Session, node: &Arc<Node>, room: Arc<RoomState>) {
    if !room.stream().begin_catch_up() {
        return;
    }
    node.counters
        .broker_catch_ups
        .fetch_add(1, Ordering::Relaxed);
    let commands = session.commands.clone();
    let scripts = session.scripts.clone();
    let node = node.clone();
    session.catch_ups.spawn(async move {
        let mut guard = CatchingUp(Some(room.clone()));
        let mut commands = commands;
        loop {
            let from = {
                let stream = room.stream();
                stream.is_synced().then(|| stream.position().offset + 1)
            };
            let limits = node.rooms.history_limits();
            let reply: Value = ::redis::cmd("EVALSHA")
                .arg(&scripts.sync)
                .arg(4)
                .arg(meta_key(&room.name))
                .arg(history_key(&room.name))
                .arg(presence_key(&room.name))
                .arg(NODES_KEY)
                .arg(&*new_epoch())
                .arg(META_TTL.as_secs())
                .arg(from.unwrap_or(0))
                .arg(limits.size.max(1))
                .query_async(&mut commands)
                .await?;
            let Some((position, kept, presence)) = parse_sync(reply, from.is_none()) else {
                return Err(RedisError::from(std::io::Error::other(
                    "unexpected answer to the sync script",
                )));
            };
            routing::catch_up_stream(&node, &room, position, kept, presence);
            if !room.stream().end_catch_up() {
                guard.0 = None;
                return Ok(());
            }
        }
    });
}

/// A room's messages from Redis: (offset, JSON text), oldest first.
type History = Vec<(u64, Vec<u8>)>;
/// A room's presence from Redis: per live node, its last change number and its entries.
pub type NodesPresence = Vec<(Arc<str>, u64, Vec<Entry>)>;

/// Gives a room back (no catch-up running) when its catch-up ends without completing.
struct CatchingUp(Option<Arc<RoomState>>);

impl Drop for CatchingUp {
    fn drop(&mut self) {
        if let Some(room) = self.0.take() {
            let mut stream = room.stream();
            while stream.end_catch_up() {}
        }
    }
}

/// The sync script's answer: the room's position, and its history as (offset, JSON text), oldest
/// first (`newest_first`: as the script read them for a tail).
fn parse_sync(reply: Value, newest_first: bool) -> Option<(Position, History, NodesPresence)> {
    let Value::Array(mut parts) = reply else {
        return None;
    };
    if parts.len() != 4 {
        return None;
    }
    let presence = parse_presence(parts.pop()?)?;
    let entries = parts.pop()?;
    let epoch = match parts.pop()? {
        Value::BulkString(epoch) => String::from_utf8(epoch).ok()?,
        _ => return None,
    };
    let Value::Int(top) = parts.pop()? else {
        return None;
    };
    let Value::Array(entries) = entries else {
        return None;
    };
    let mut kept = Vec::with_capacity(entries.len());
    for entry in entries {
        let Value::Array(mut entry) = entry else {
            return None;
        };
        let (Some(Value::Array(mut fields)), Some(Value::BulkString(id))) =
            (entry.pop(), entry.pop())
        else {
            return None;
        };
        let offset = parse_u64(id.strip_suffix(b"-0")?)?;
        let Some(Value::BulkString(json)) = fields.pop() else {
            return None;
        };
        kept.push((offset, json));
    }
    if newest_first {
        kept.reverse();
    }
    let position = Position {
        offset: u64::try_from(top).ok()?,
        epoch: Arc::from(epoch),
    };
    Some((position, kept, presence))
}

/// Each node's presence in a room, as the sync script reads it: the flat fields of the presence
/// hash (`#<node>` → its last change number, `<node>\x1f<user>` → an entry).
fn parse_presence(fields: Value) -> Option<NodesPresence> {
    let Value::Array(fields) = fields else {
        return None;
    };
    let mut nodes: HashMap<Arc<str>, (u64, Vec<Entry>)> = HashMap::new();
    let mut fields = fields.into_iter();
    while let (Some(Value::BulkString(field)), Some(Value::BulkString(value))) =
        (fields.next(), fields.next())
    {
        if let Some(node) = field.strip_prefix(b"#") {
            let node = Arc::from(std::str::from_utf8(node).ok()?);
            nodes.entry(node).or_default().0 = parse_u64(&value)?;
        } else {
            let at = field.iter().position(|&b| b == 0x1f)?;
            let node = Arc::from(std::str::from_utf8(&field[..at]).ok()?);
            let entry: Entry = serde_json::from_slice(&value).ok()?;
            nodes.entry(node).or_default().1.push(entry);
        }
    }
    Some(
        nodes
            .into_iter()
            .map(|(node, (seq, entries))| (node, seq, entries))
            .collect(),
    )
}

/// Says this node is alive (until `NODE_TTL` from now) and returns the nodes that are.
async fn beat(
    commands: &mut MultiplexedConnection,
    scripts: &Scripts,
    node_id: &str,
) -> RedisResult<HashSet<String>> {
    let (now, nodes): (u64, Vec<(String, u64)>) = ::redis::cmd("EVALSHA")
        .arg(&scripts.beat)
        .arg(2)
        .arg(NODES_KEY)
        .arg(sessions_key(node_id))
        .arg(node_id)
        .arg(NODE_TTL.as_millis() as u64)
        .query_async(commands)
        .await?;
    Ok(nodes
        .into_iter()
        .filter(|(_, until)| *until >= now)
        .map(|(node, _)| node)
        .collect())
}

/// A presence entry as stored and published.
fn entry_json(entry: &Entry) -> Vec<u8> {
    serde_json::to_vec(entry).expect("serializing to memory cannot fail")
}

/// Sends what is queued for Redis in pipelines, in order; returns the queue when stopped, with the
/// error that stopped it. A pipeline that fails is refused to its senders.
async fn publish_loop(
    mut commands: MultiplexedConnection,
    scripts: Arc<Scripts>,
    mut queues: Queues,
    node: Arc<Node>,
    node_id: Arc<str>,
    stop: CancellationToken,
) -> (Queues, Option<RedisError>) {
    let limits = node.rooms.history_limits();
    let mut batch = Vec::with_capacity(PUBLISH_BATCH);
    let mut changes = Vec::with_capacity(PUBLISH_BATCH);
    loop {
        let taken = tokio::select! {
            _ = stop.cancelled() => return (queues, None),
            taken = queues.records.recv_many(&mut changes, PUBLISH_BATCH) => taken,
            taken = queues.outgoing.recv_many(&mut batch, PUBLISH_BATCH) => taken,
        };
        if taken == 0 {
            // Every sender is gone: the node is stopping.
            return (queues, None);
        }
        while changes.len() < PUBLISH_BATCH
            && let Ok(change) = queues.records.try_recv()
        {
            changes.push(change);
        }
        while batch.len() < PUBLISH_BATCH
            && let Ok(out) = queues.outgoing.try_recv()
        {
            batch.push(out);
        }
        let mut pipe = ::redis::pipe();
        let sessions = sessions_key(&node_id);
        for change in &changes {
            match change {
                Record::Presence { room, entry, seq } => {
                    pipe.cmd("EVALSHA")
                        .arg(&scripts.presence)
                        .arg(1)
                        .arg(presence_key(room))
                        .arg(&*node_id)
                        .arg(&*entry.user_id)
                        .arg(entry_json(entry))
                        .arg(entry.conns)
                        .arg(seq)
                        .arg(room_channel(room))
                        .arg(META_TTL.as_secs());
                }
                Record::SessionOpened { client_id, record } => {
                    pipe.cmd("HSET").arg(&sessions).arg(client_id).arg(record);
                    // A hash made here lives until the node's next beat, and no longer.
                    pipe.cmd("PEXPIRE")
                        .arg(&sessions)
                        .arg(NODE_TTL.as_millis() as u64)
                        .arg("NX");
                }
                Record::SessionClosed { client_id } => {
                    pipe.cmd("HDEL").arg(&sessions).arg(client_id);
                }
            }
        }
        for out in &batch {
            match out {
                Outgoing::Message { room, message, .. } => {
                    pipe.cmd("EVALSHA")
                        .arg(&scripts.publish)
                        .arg(2)
                        .arg(meta_key(room))
                        .arg(history_key(room))
                        .arg(message.as_slice())
                        .arg(limits.size)
                        .arg(limits.ttl.as_secs().max(1))
                        .arg(META_TTL.as_secs())
                        .arg(room_channel(room))
                        .arg(&*new_epoch())
                        .arg(&*node_id);
                }
                Outgoing::Notice { room, payload } => {
                    let channel = room
                        .as_deref()
                        .map_or(BROADCAST_CHANNEL.to_owned(), room_channel);
                    let prefix: &[u8] = if room.is_some() { b"p" } else { b"" };
                    let envelope = [prefix, node_id.as_bytes(), b"\n", payload].concat();
                    pipe.cmd("PUBLISH").arg(channel).arg(envelope);
                }
            }
        }
        let sent: RedisResult<Vec<Value>> = pipe.query_async(&mut commands).await;
        if let Err(e) = sent {
            for out in batch.drain(..) {
                refuse(&node, out);
            }
            // The node's presence is written whole after the reconnection.
            changes.clear();
            return (queues, Some(e));
        }
        batch.clear();
        changes.clear();
    }
}

/// Tells the sender of a room message that it was not published; counts a notice not shared.
fn refuse(node: &Node, out: Outgoing) {
    match out {
        Outgoing::Message { from, .. } => {
            node.counters
                .broker_unavailable
                .fetch_add(1, Ordering::Relaxed);
            let error = ServerMessage::Error {
                error: ErrorReply::Unavailable,
            };
            routing::reply(node, from, error.encode());
        }
        Outgoing::Notice { .. } => {
            node.counters
                .broker_notices_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// `head\nrest` split at the first line feed.
fn split_line(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let at = bytes.iter().position(|&b| b == b'\n')?;
    Some((&bytes[..at], &bytes[at + 1..]))
}

fn parse_u64(digits: &[u8]) -> Option<u64> {
    std::str::from_utf8(digits).ok()?.parse().ok()
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

/// The URL without its password, for logs.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_name_their_room() {
        assert_eq!(room_of(&room_channel("a:b")), Some("a:b"));
        assert_eq!(room_of("wsgate:broadcast"), None);
        assert_eq!(redacted("redis://:secret@h:1/"), "redis://***@h:1/");
        assert_eq!(redacted("redis://h:1/"), "redis://h:1/");
    }

    #[test]
    fn sync_answers_are_parsed_oldest_first() {
        let entry = |offset: &str, json: &str| {
            Value::Array(vec![
                Value::BulkString(format!("{offset}-0").into_bytes()),
                Value::Array(vec![
                    Value::BulkString(b"m".to_vec()),
                    Value::BulkString(json.as_bytes().to_vec()),
                ]),
            ])
        };
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let reply = Value::Array(vec![
            Value::Int(7),
            Value::BulkString(b"abc".to_vec()),
            Value::Array(vec![entry("7", "{}"), entry("6", "{\"a\":1}")]),
            Value::Array(vec![
                bulk("#n1"),
                bulk("3"),
                bulk("n1\x1fbob"),
                bulk(r#"{"user":"bob","name":"Bob","conns":2}"#),
            ]),
        ]);
        let (position, kept, presence) = parse_sync(reply, true).unwrap();
        assert_eq!(presence.len(), 1);
        let (node, seq, entries) = &presence[0];
        assert_eq!((&**node, *seq, entries[0].conns), ("n1", 3, 2));
        assert_eq!(position.offset, 7);
        assert_eq!(&*position.epoch, "abc");
        assert_eq!(kept, vec![(6, b"{\"a\":1}".to_vec()), (7, b"{}".to_vec())]);
        assert!(parse_sync(Value::Int(1), false).is_none());
    }
}
