//! What wsgate keeps in Redis, by name, and the Lua scripts that change it.
//!
//! Room state is named under the cluster's generation `G` (see [`Keys`] and `era.lua`), so that
//! a new generation, started when Redis lost data or went back in time, starts every room over at
//! once. Per room `R` (a room's keys and channel share the `{R}` hash tag):
//! - `wsgate:G:meta:{R}`: a hash with the room's last `offset` and its `epoch`;
//! - `wsgate:G:history:{R}`: a stream of its recent messages, entry ids `<offset>-0`;
//! - `wsgate:G:presence:{R}`: per node and user, the user's connections there
//!   (`<node>\x1f<user>` → an entry as JSON), and each node's last change number (`#<node>`);
//! - `wsgate:G:members:{R}`: per node, its connections in the room (what the server API counts);
//! - `wsgate:room:{R}`: the channel its messages, presence changes and notices are published on.
//!
//! Per cluster: `wsgate:era` (the generation `gen` and its `clock`, a count of its room writes),
//! `wsgate:G:rooms` (the rooms with members, a sorted set read in name order), `wsgate:nodes`
//! (node → alive until, in ms of Redis's clock), `wsgate:node-status` (node → what it said of
//! itself at its last beat), `wsgate:broadcast` (notices for every chat
//! client), and per node `wsgate:sessions:<node>` (client id → its session),
//! `wsgate:G:node-rooms:<node>` (the rooms it has members in, swept when it dies),
//! `wsgate:probe:<node>` (the node's probe channel) and `wsgate:answers:<node>` (the other nodes'
//! answers to its disconnects).

use std::sync::Arc;

use ::redis::aio::MultiplexedConnection;
use ::redis::{RedisError, RedisResult};

pub const BROADCAST_CHANNEL: &str = "wsgate:broadcast";
/// Orders for every node (`<node>\n<JSON>`): disconnect a user everywhere.
pub const CONTROL_CHANNEL: &str = "wsgate:control";
/// Publications for one user's connections on every node (`<node>\n<user as a JSON string>\n<JSON>`).
pub const USERS_CHANNEL: &str = "wsgate:users";
pub const NODES_KEY: &str = "wsgate:nodes";
/// What each node said of itself at its last beat (node → its status as JSON).
pub const NODE_STATUS_KEY: &str = "wsgate:node-status";
/// The cluster's generation and its clock (see `era.lua`).
pub const ERA_KEY: &str = "wsgate:era";
/// The error code of a script run under a generation that is not the cluster's (nothing was
/// written): the node reconnects and reads the new one.
pub const ERA_CHANGED: &str = "WSGATE_ERA";

pub fn room_channel(room: &str) -> String {
    format!("wsgate:room:{{{room}}}")
}

/// The names of the keys of one generation's room state.
#[derive(Clone, Debug)]
pub struct Keys {
    generation: Arc<str>,
    /// `wsgate:<generation>:`
    prefix: String,
}

impl Keys {
    pub fn new(generation: Arc<str>) -> Self {
        let prefix = format!("wsgate:{generation}:");
        Keys { generation, prefix }
    }

    pub fn generation(&self) -> &str {
        &self.generation
    }

    /// What every key of the generation starts with (rooms_page.lua names members hashes with
    /// it; a replaced generation's keys are found by it).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn room(&self, kind: &str, room: &str) -> String {
        format!("{}{kind}:{{{room}}}", self.prefix)
    }

    pub fn meta(&self, room: &str) -> String {
        self.room("meta", room)
    }

    /// What a message published with dedup `key` in `room` got (its offset), for `dedup_window`.
    pub fn dedup(&self, room: &str, key: &str) -> String {
        format!("{}:{key}", self.room("dedup", room))
    }

    pub fn history(&self, room: &str) -> String {
        self.room("history", room)
    }

    pub fn presence(&self, room: &str) -> String {
        self.room("presence", room)
    }

    /// Also spelled out in rooms_page.lua, which names it from the rooms index.
    pub fn members(&self, room: &str) -> String {
        self.room("members", room)
    }

    /// The rooms with members.
    pub fn rooms(&self) -> String {
        format!("{}rooms", self.prefix)
    }

    /// The keys the presence scripts (presence.lua, presence_node.lua) are given, in their
    /// order, for `node`'s presence in `room`.
    pub fn presence_writes(&self, room: &str, node: &str) -> [String; 6] {
        [
            self.presence(room),
            self.members(room),
            self.rooms(),
            ERA_KEY.to_owned(),
            self.meta(room),
            self.node_rooms(node),
        ]
    }

    /// The rooms where `node` has members (swept when it dies: forget_node.lua).
    pub fn node_rooms(&self, node: &str) -> String {
        format!("{}node-rooms:{node}", self.prefix)
    }
}

/// A node's sessions: client id → `{"user","node","connectedAt"}`, expiring with the node's
/// beats.
pub fn sessions_key(node: &str) -> String {
    format!("wsgate:sessions:{node}")
}

pub fn probe_channel(node: &str) -> String {
    format!("wsgate:probe:{node}")
}

/// Where the other nodes answer a node's disconnects (see [`super::answers`]).
pub fn answers_channel(node: &str) -> String {
    format!("wsgate:answers:{node}")
}

/// The room a channel is for.
pub fn room_of(channel: &str) -> Option<&str> {
    channel.strip_prefix("wsgate:room:{")?.strip_suffix('}')
}

/// Functions the scripts share, loaded in front of each.
const LIB_LUA: &str = include_str!("../lua/lib.lua");

/// The scripts, as loaded into Redis (by SHA1, after `SCRIPT LOAD`), and the names of the keys
/// they write in the generation the node has.
pub struct Scripts {
    pub keys: Keys,
    /// Publishes a room message: offset, history, PUBLISH in one step.
    pub publish: String,
    /// Reads a room's position, history and presence.
    pub sync: String,
    /// Records one presence change of this node.
    pub presence: String,
    /// Replaces this node's presence in a room.
    pub presence_node: String,
    /// Says this node is alive and reads which are.
    pub beat: String,
    /// Takes a stopping node out.
    pub goodbye: String,
    /// Takes a dead node out of its rooms.
    pub forget_node: String,
    /// Reads a page of the rooms with members (server API).
    pub rooms_page: String,
    /// Reads a room's presence on live nodes (server API).
    pub presence_read: String,
    /// Reads a room's recent messages (server API).
    pub history: String,
}

impl Scripts {
    /// Loads the scripts, naming keys under generation `generation`.
    pub async fn load(conn: &mut MultiplexedConnection, generation: Arc<str>) -> RedisResult<Self> {
        let mut load = async |script: &str| -> RedisResult<String> {
            ::redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(format!("{LIB_LUA}\n{script}"))
                .query_async(conn)
                .await
        };
        Ok(Scripts {
            keys: Keys::new(generation),
            publish: load(include_str!("../lua/publish.lua")).await?,
            sync: load(include_str!("../lua/sync.lua")).await?,
            presence: load(include_str!("../lua/presence.lua")).await?,
            presence_node: load(include_str!("../lua/presence_node.lua")).await?,
            beat: load(include_str!("../lua/beat.lua")).await?,
            goodbye: load(include_str!("../lua/goodbye.lua")).await?,
            forget_node: load(include_str!("../lua/forget_node.lua")).await?,
            rooms_page: load(include_str!("../lua/rooms_page.lua")).await?,
            presence_read: load(include_str!("../lua/presence_read.lua")).await?,
            history: load(include_str!("../lua/history.lua")).await?,
        })
    }
}

/// The cluster's generation as a node (re)connecting reads it.
#[derive(Debug, PartialEq, Eq)]
pub struct Era {
    pub generation: Arc<str>,
    /// Writes made in it so far.
    pub clock: u64,
    /// Whether this read started a new generation.
    pub started: bool,
    /// Whether the record Redis had was not wsgate's (replaced by a new generation).
    pub malformed: bool,
}

/// Reads the cluster's generation, starting a new one where Redis has none, or has the node's
/// (`known`) with fewer writes than the node saw in it (`seen`), or where `force`d (see
/// `era.lua`). Run once per connection, before the scripts are loaded under it.
pub async fn read_era(
    conn: &mut MultiplexedConnection,
    known: Option<&str>,
    seen: u64,
    force: bool,
) -> RedisResult<Era> {
    check_version(conn).await?;
    let (generation, clock, started, malformed): (String, u64, u8, u8) = ::redis::cmd("EVAL")
        .arg(format!("{LIB_LUA}\n{}", include_str!("../lua/era.lua")))
        .arg(1)
        .arg(ERA_KEY)
        .arg(known.unwrap_or(""))
        .arg(seen)
        // The random part of a new generation's name.
        .arg(&*crate::rooms::stream::new_epoch())
        .arg(if force { "1" } else { "0" })
        .query_async(conn)
        .await?;
    Ok(Era {
        generation: Arc::from(generation),
        clock,
        started: started == 1,
        malformed: malformed == 1,
    })
}

/// Deletes the keys of every generation but `current` (nobody reads or writes them any more: the
/// scripts refuse to), a batch at a time; what a failure leaves expires with its TTL.
pub async fn delete_stale_generations(mut conn: MultiplexedConnection, current: Arc<str>) {
    // `wsgate:<seq>-<hex>:...`; no other key of wsgate's has a digit there.
    let stale = |key: &Vec<u8>| {
        let name = key
            .strip_prefix(b"wsgate:")
            .and_then(|rest| rest.split(|&b| b == b':').next());
        name.is_some_and(|name| name != current.as_bytes() && is_generation(name))
    };
    let (mut cursor, mut deleted) = (0u64, 0usize);
    loop {
        let scanned: RedisResult<(u64, Vec<Vec<u8>>)> = ::redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg("wsgate:[0-9]*")
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await;
        let Ok((next, mut keys)) = scanned else { break };
        keys.retain(stale);
        if !keys.is_empty() {
            deleted += keys.len();
            let unlinked: RedisResult<i64> = ::redis::cmd("UNLINK")
                .arg(&keys)
                .query_async(&mut conn)
                .await;
            if unlinked.is_err() {
                break;
            }
        }
        if next == 0 {
            return tracing::info!(generation = %current, deleted, "deleted earlier generations' keys");
        }
        cursor = next;
    }
    tracing::warn!(generation = %current, deleted, "stopped deleting earlier generations' keys");
}

/// Whether `name` is a generation's name as era.lua writes them (`<seq>-<hex>`).
fn is_generation(name: &[u8]) -> bool {
    let Some(dash) = name.iter().position(|&b| b == b'-') else {
        return false;
    };
    let (seq, hex) = (&name[..dash], &name[dash + 1..]);
    !seq.is_empty()
        && seq.iter().all(u8::is_ascii_digit)
        && !hex.is_empty()
        && hex.iter().all(u8::is_ascii_hexdigit)
}

/// The oldest Redis the scripts run on (`XADD` with an explicit id and `MAXLEN`, `TIME` in
/// scripts that write, `HSET`'s and `PEXPIRE`'s forms used).
const MIN_REDIS: (u32, u32) = (6, 0);

async fn check_version(conn: &mut MultiplexedConnection) -> RedisResult<()> {
    let info: String = ::redis::cmd("INFO").arg("server").query_async(conn).await?;
    let version = info
        .lines()
        .find_map(|line| line.strip_prefix("redis_version:"))
        .unwrap_or("0")
        .trim()
        .to_owned();
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if found < MIN_REDIS {
        return Err(RedisError::from(std::io::Error::other(format!(
            "Redis {version} is too old: wsgate needs {}.{} or later",
            MIN_REDIS.0, MIN_REDIS.1
        ))));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_name_their_room() {
        assert_eq!(room_of(&room_channel("a:b")), Some("a:b"));
        assert_eq!(room_of(BROADCAST_CHANNEL), None);
    }

    #[test]
    fn the_rooms_page_script_names_members_hashes_as_rust_does() {
        let script = include_str!("../lua/rooms_page.lua");
        let spelled = r#"ARGV[4] .. "members:{" .. room .. "}""#;
        assert!(script.contains(spelled));
        let keys = Keys::new(Arc::from("0a1b2c3d"));
        assert_eq!(keys.members("r"), format!("{}members:{{r}}", keys.prefix()));
        assert_eq!(keys.members("r"), "wsgate:0a1b2c3d:members:{r}");
    }

    #[test]
    fn scripts_name_the_era_error_as_rust_does() {
        let lib = include_str!("../lua/lib.lua");
        assert!(lib.contains(&format!(r#"local ERA_CHANGED = "{ERA_CHANGED} "#)));
    }
}
