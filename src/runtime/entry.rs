//! One connection's entry in its shard's slab: what other connections' handlers may touch. The
//! socket and what the driver needs to read it stay with the driver.

use std::net::IpAddr;
use std::sync::Arc;

use crate::base::client_id::ClientId;
use crate::base::identity::Identity;
use crate::conn::limits::RateLimiter;
use crate::conn::outbound::Outbound;

use super::AppId;

pub struct ConnEntry {
    pub id: ClientId,
    /// Which of the shard's apps the connection speaks.
    pub app: AppId,
    /// Its app holds it: it is not read until an answer it waits for came (see
    /// [`super::shard::Shard::hold_while`]).
    pub held: bool,
    /// Who is connected, from the token (shared: no copy per connection).
    pub identity: Arc<Identity>,
    /// The address admitted (per-IP limits), given back when the connection ends.
    pub peer: IpAddr,
    pub limiter: RateLimiter,
    /// Rooms this connection is in (the other half of the room index). A boxed slice, not a
    /// `Vec`: it changes only on join and leave, and is in every slab slot.
    pub rooms: Box<[Arc<str>]>,
    pub outbound: Outbound,
    pub liveness: Liveness,
    /// When it connected (Unix seconds), for its session record.
    pub connected_at: u32,
}

/// A connection's liveness, in (truncated) ticks of its shard's wheel.
#[derive(Default)]
pub struct Liveness {
    /// The tick of the last read from the peer.
    pub last_seen: u32,
    /// The tick a ping went out and is still unanswered; 0 when none is.
    pub(super) pinged_at: u32,
    /// The tick of the connection's live wheel entry; an entry filed for another tick is stale.
    pub(super) due: u32,
}
