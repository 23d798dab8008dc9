//! What wsgate keeps in Redis, by name, and the Lua scripts that change it.
//!
//! Per room `R` (a room's keys and channel share the `{R}` hash tag):
//! - `wsgate:meta:{R}`: a hash with the room's last `offset` and its `epoch`;
//! - `wsgate:history:{R}`: a stream of its recent messages, entry ids `<offset>-0`;
//! - `wsgate:presence:{R}`: per node and user, the user's connections there (`<node>\x1f<user>` →
//!   an entry as JSON), and each node's last change number (`#<node>`);
//! - `wsgate:members:{R}`: per node, its connections in the room (what the server API counts);
//! - `wsgate:room:{R}`: the channel its messages, presence changes and notices are published on.
//!
//! Per cluster: `wsgate:nodes` (node → alive until, in ms of Redis's clock), `wsgate:rooms` (the
//! rooms with members, a sorted set read in name order), `wsgate:broadcast`
//! (notices for every chat client), and per node `wsgate:sessions:<node>` (client id → its
//! session) and `wsgate:probe:<node>` (the node's probe channel).

use ::redis::aio::MultiplexedConnection;
use ::redis::{RedisError, RedisResult};

pub const BROADCAST_CHANNEL: &str = "wsgate:broadcast";
/// Orders for every node (`<node>\n<JSON>`): disconnect a user everywhere.
pub const CONTROL_CHANNEL: &str = "wsgate:control";
pub const NODES_KEY: &str = "wsgate:nodes";
pub const ROOMS_KEY: &str = "wsgate:rooms";

pub fn room_channel(room: &str) -> String {
    format!("wsgate:room:{{{room}}}")
}

pub fn meta_key(room: &str) -> String {
    format!("wsgate:meta:{{{room}}}")
}

pub fn history_key(room: &str) -> String {
    format!("wsgate:history:{{{room}}}")
}

pub fn presence_key(room: &str) -> String {
    format!("wsgate:presence:{{{room}}}")
}

/// Also spelled out in rooms_page.lua, which names it from the rooms index.
pub fn members_key(room: &str) -> String {
    format!("wsgate:members:{{{room}}}")
}

/// A node's sessions: client id → `{"user","node","connectedAt"}`, expiring with the node's
/// beats.
pub fn sessions_key(node: &str) -> String {
    format!("wsgate:sessions:{node}")
}

pub fn probe_channel(node: &str) -> String {
    format!("wsgate:probe:{node}")
}

/// The room a channel is for.
pub fn room_of(channel: &str) -> Option<&str> {
    channel.strip_prefix("wsgate:room:{")?.strip_suffix('}')
}

/// Functions the scripts share, loaded in front of each.
const LIB_LUA: &str = include_str!("../lua/lib.lua");

/// The scripts, as loaded into Redis (by SHA1, after `SCRIPT LOAD`).
pub struct Scripts {
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
    /// Reads a page of the rooms with members (server API).
    pub rooms_page: String,
    /// Reads a room's presence on live nodes (server API).
    pub presence_read: String,
}

impl Scripts {
    pub async fn load(conn: &mut MultiplexedConnection) -> RedisResult<Self> {
        check_version(conn).await?;
        let mut load = async |script: &str| -> RedisResult<String> {
            ::redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(format!("{LIB_LUA}\n{script}"))
                .query_async(conn)
                .await
        };
        Ok(Scripts {
            publish: load(include_str!("../lua/publish.lua")).await?,
            sync: load(include_str!("../lua/sync.lua")).await?,
            presence: load(include_str!("../lua/presence.lua")).await?,
            presence_node: load(include_str!("../lua/presence_node.lua")).await?,
            beat: load(include_str!("../lua/beat.lua")).await?,
            goodbye: load(include_str!("../lua/goodbye.lua")).await?,
            rooms_page: load(include_str!("../lua/rooms_page.lua")).await?,
            presence_read: load(include_str!("../lua/presence_read.lua")).await?,
        })
    }
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
        let spelled = r#""wsgate:members:{" .. room .. "}""#;
        assert!(script.contains(spelled));
        assert_eq!(members_key("r"), "wsgate:members:{r}");
    }
}
