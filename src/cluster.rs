//! The cluster: what ties the broker to the fan-out. The publish path (a room message to the
//! broker, a notice shared with the other nodes and delivered here) and [`Cluster`], the
//! [`BrokerEvents`] the broker reports to, which hands what reaches this node to its shards.
//! Connections' session records live here too: a broker keeps them, the shards hold them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use tokio::sync::oneshot;

use crate::backend::webhook::Webhooks;
use crate::base::client_id::ClientId;
use crate::broker::{
    Broker, BrokerEvents, CONTROL_ANSWER_WAIT, Disconnect, Disconnected, Membership, PublishError,
    Publisher, RoomRef, Unavailable,
};
use crate::config::WebhookEvent;
use crate::fanout::{self, Publication};
use crate::protocol::{ErrorReply, RequestId, ServerMessage};
use crate::rooms::presence::{Entry, NodesPresence};
use crate::rooms::stream::Position;
use crate::rooms::{RoomState, Target};
use crate::runtime::Shared;
use crate::runtime::bus::Work;
use crate::runtime::entry::ConnEntry;
use crate::runtime::shard::Shard;
use crate::ws::close::CloseCode;
use crate::ws::deflate::Prepared;
use crate::ws::frame;

/// Hands a publication to the other nodes (with a shared broker); what cannot be is counted.
/// Lists of clients are this node's: a publication with an `include` list stays here. False when
/// the other nodes could not be reached.
pub fn share(broker: &dyn Broker, shared: &Shared, publication: &Publication) -> bool {
    let shared_ok = publication.include.is_some()
        || broker.share(
            &publication.target,
            frame::server_payload(publication.frame.plain()),
        );
    if !shared_ok {
        shared
            .counters
            .broker_notices_dropped
            .fetch_add(1, Ordering::Relaxed);
    }
    shared_ok
}

/// Publishes from outside the shards (the server API, embedding applications): every shard
/// delivers to its own recipients, and every other node to its own (see [`share`]). False, and
/// delivered nowhere, when the other nodes could not be reached: a retry does not duplicate it.
pub fn publish_from_outside(
    broker: &dyn Broker,
    shared: &Shared,
    publication: Publication,
) -> bool {
    if !share(broker, shared, &publication) {
        return false;
    }
    let all: Vec<usize> = (0..shared.shards()).collect();
    shared.forward(&all, Arc::new(publication));
    true
}

/// Publishes `message` (a JSON object) from `from` on `room`'s stream: it gets the room's next
/// offset from the broker (this node's stream with the memory broker, under its lock; Redis
/// with Redis), is kept in its history, and comes back to every shard with members — this one
/// included, over its own inbox — in offset order. So every member sees the room's messages in
/// one order, whichever shards (and nodes) they come from. Refusals are counted.
pub fn publish_to_stream(
    broker: &dyn Broker,
    shared: &Shared,
    room: RoomRef<'_>,
    message: Vec<u8>,
    from: Publisher,
    dedup: Option<&str>,
) -> Result<(), PublishError> {
    let published = broker.publish(room, message, from, dedup);
    if published == Err(PublishError::Unavailable) {
        shared
            .counters
            .broker_unavailable
            .fetch_add(1, Ordering::Relaxed);
    }
    published
}

/// A disconnect carried out on this node only: the other nodes could not be told, or may not
/// have been (the broker away or behind; counted). Repeating it is harmless.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OthersNotTold {
    /// The connections closed here (none: this node's shards did not count in time).
    pub closed_here: Option<u64>,
}

impl std::fmt::Display for OthersNotTold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.closed_here {
            Some(closed) => write!(f, "closed {closed} connections on this node only")?,
            None => f.write_str("disconnected on this node only")?,
        }
        f.write_str(": the other nodes could not be told, or may not have been (retry)")
    }
}

impl std::error::Error for OthersNotTold {}

/// Closes every connection of `disconnect.user` on this node and every other, and counts them.
/// Takes at most [`CONTROL_ANSWER_WAIT`] once the other nodes were told (with Redis, telling
/// them may take up to 5 s more when it is behind).
pub async fn disconnect_everywhere(
    broker: &dyn Broker,
    shared: &Shared,
    disconnect: Arc<Disconnect>,
) -> Result<Disconnected, OthersNotTold> {
    let others = broker.control(&disconnect);
    let (count_tx, count_rx) = oneshot::channel();
    disconnect_here(shared, disconnect, count_tx);
    // Every shard counts within a turn of its loop (a stopping one answers as its delivery is
    // dropped); one that does not in time leaves this node unanswered, as a silent node would.
    let here = async {
        let counted = tokio::time::timeout(CONTROL_ANSWER_WAIT, count_rx).await;
        counted.ok().and_then(Result::ok)
    };
    let (here, others) = tokio::join!(here, others);
    match others {
        Ok(others) => Ok(Disconnected {
            connections: others.connections.saturating_add(here.unwrap_or(0)),
            nodes: others.nodes + u32::from(here.is_some()),
            unanswered: others.unanswered + u32::from(here.is_none()),
        }),
        Err(Unavailable) => {
            shared
                .counters
                .broker_notices_dropped
                .fetch_add(1, Ordering::Relaxed);
            Err(OthersNotTold { closed_here: here })
        }
    }
}

/// Closes every connection of `disconnect.user` on this node's shards; `count_tx` is told how
/// many, once every shard is done with it.
fn disconnect_here(shared: &Shared, disconnect: Arc<Disconnect>, count_tx: oneshot::Sender<u64>) {
    shared.to_every_shard(Arc::new(DisconnectUser {
        disconnect,
        closed: AtomicU64::new(0),
        count_tx: Some(count_tx),
    }));
}

/// Close every connection of a user on a shard. One delivery reaches every shard: the last to
/// let go of it tells the total.
struct DisconnectUser {
    disconnect: Arc<Disconnect>,
    closed: AtomicU64,
    count_tx: Option<oneshot::Sender<u64>>,
}

impl Work for DisconnectUser {
    fn run(&self, shard: &Shard) {
        let Disconnect { user, code, reason } = &*self.disconnect;
        let closed = shard.disconnect_user(user, CloseCode(*code), reason);
        self.closed.fetch_add(closed, Ordering::Relaxed);
    }
}

impl Drop for DisconnectUser {
    fn drop(&mut self) {
        if let Some(count_tx) = self.count_tx.take() {
            let _ = count_tx.send(*self.closed.get_mut());
        }
    }
}

/// Records a connection's session with the broker.
pub fn session_opened(broker: &dyn Broker, conn: &ConnEntry) {
    let connected_at = u64::from(conn.connected_at) * 1000;
    broker.session_opened(conn.id, &conn.identity.user_id, connected_at);
}

pub fn session_closed(broker: &dyn Broker, conn: &ConnEntry) {
    broker.session_closed(conn.id);
}

/// The broker lost (or never had) this node's sessions: each shard records its addressable
/// connections again.
struct ResendSessions(Weak<dyn Broker>);

impl Work for ResendSessions {
    fn run(&self, shard: &Shard) {
        let Some(broker) = self.0.upgrade() else {
            return;
        };
        let state = shard.state_ref();
        for (_, conn) in state.conns.iter() {
            if shard.addressable(conn.app) {
                session_opened(&*broker, conn);
            }
        }
    }
}

/// What the broker reports, handed to this node's shards.
pub struct Cluster {
    shared: Arc<Shared>,
    /// The broker reporting here (it is built with its events: set right after).
    broker: OnceLock<Weak<dyn Broker>>,
    /// Where changes of who is in rooms (and published chat messages) are told, if anywhere.
    webhooks: Option<Arc<Webhooks>>,
}

impl Cluster {
    pub fn new(shared: Arc<Shared>, webhooks: Option<Arc<Webhooks>>) -> Self {
        Cluster {
            shared,
            broker: OnceLock::new(),
            webhooks,
        }
    }

    /// Names the broker that reports here (once built).
    pub fn reported_by(&self, broker: &Arc<dyn Broker>) {
        let _ = self.broker.set(Arc::downgrade(broker));
    }
}

impl BrokerEvents for Cluster {
    fn publication(&self, target: Target, json: &[u8]) {
        fanout::publish_from_broker(&self.shared, target, json);
    }

    fn stream_message(&self, room: &Arc<RoomState>, offset: u64, frame: Prepared) {
        fanout::forward_stream(&self.shared, room, offset, frame);
    }

    fn caught_up(
        &self,
        room: &Arc<RoomState>,
        position: Position,
        kept: Vec<(u64, Vec<u8>)>,
        presence: Option<NodesPresence>,
    ) {
        fanout::catch_up_stream(&self.shared, room, position, kept, presence);
    }

    fn presence(&self, room: &Arc<RoomState>, gone: &[Entry], came: &[Entry]) {
        fanout::tell_presence(&self.shared, room, gone, came);
    }

    fn disconnect(&self, disconnect: Arc<Disconnect>, count_tx: oneshot::Sender<u64>) {
        disconnect_here(&self.shared, disconnect, count_tx);
    }

    fn refused(&self, client: ClientId, request: Option<RequestId>, error: ErrorReply<'static>) {
        let reply = ServerMessage::Error { error, code: None }.encode_for(request.as_ref());
        fanout::reply(&self.shared, client, reply);
    }

    fn published(&self, client: ClientId, request: RequestId, offset: u64) {
        let ack = ServerMessage::Ack {
            id: &request,
            offset: Some(offset),
        };
        fanout::reply(&self.shared, client, ack.encode());
    }

    fn sessions_lost(&self) {
        if let Some(broker) = self.broker.get() {
            self.shared
                .to_every_shard(Arc::new(ResendSessions(broker.clone())));
        }
    }

    fn membership(&self, change: Membership) {
        let Some(webhooks) = &self.webhooks else {
            return;
        };
        match change {
            Membership::Room { room, occupied } => {
                let kind = if occupied {
                    WebhookEvent::RoomOccupied
                } else {
                    WebhookEvent::RoomVacated
                };
                webhooks.emit(kind, &room, None);
            }
            Membership::User { room, user, added } => {
                let kind = if added {
                    WebhookEvent::MemberAdded
                } else {
                    WebhookEvent::MemberRemoved
                };
                webhooks.emit(kind, &room, Some((&user.user_id, &user.username)));
            }
        }
    }

    fn client_published(&self, room: &Arc<str>, json: &[u8], offset: u64) {
        if let Some(webhooks) = &self.webhooks {
            webhooks.chat_message(room, json, offset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disconnects_count_is_told_once_the_last_shard_let_go_of_it() {
        let (count_tx, mut count_rx) = oneshot::channel();
        let delivery = Arc::new(DisconnectUser {
            disconnect: Arc::new(Disconnect::new("bob", 4000, "").unwrap()),
            closed: AtomicU64::new(0),
            count_tx: Some(count_tx),
        });
        // As three shards' inboxes hold it: each counts what it closed, then lets go.
        let shards: Vec<Arc<DisconnectUser>> = (0..3).map(|_| delivery.clone()).collect();
        drop(delivery);
        for (closed, shard) in [2, 0, 1].into_iter().zip(shards) {
            assert!(
                count_rx.try_recv().is_err(),
                "told before every shard counted"
            );
            shard.closed.fetch_add(closed, Ordering::Relaxed);
            drop(shard);
        }
        assert_eq!(count_rx.try_recv(), Ok(3));
    }
}
