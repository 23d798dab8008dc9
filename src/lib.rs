//! wsgate: a WebSocket gateway built for massive connection counts.
//!
//! # Layout
//!
//! A connection's life, top to bottom:
//!
//! - [`server`] binds one SO_REUSEPORT socket per shard and starts one thread with a
//!   current-thread tokio runtime per shard ([`server::start`] returns a [`Gateway`]).
//! - [`http`] serves HTTP/1.1 (hyper): the test page, `/healthz`, and the WebSocket upgrade
//!   (authenticated by [`auth`]), after which it hands the raw `TcpStream` to [`conn`].
//! - [`conn`] is one connection's task: reads into its [`shard`]'s shared buffer, decodes frames
//!   in place ([`frame`]), charges each to the connection's rate limits ([`limits`]), passes
//!   messages to the endpoint, and writes its [`outbound`] queue with vectored writes.
//! - [`chat`] is the application: each [`protocol`] message's effect on [`rooms`].
//! - [`shard`] owns the connections (a `slab`, ids in [`client_id`]); [`routing`] delivers
//!   publications to them and hands them over the [`bus`] to the other shards; [`node`] is what
//!   the shards share.
//! - [`heartbeat`] finds dead peers with one [`wheel`] per shard.
//! - [`close`] is the table of close codes, [`protocol::ErrorReply`] that of error replies;
//!   [`config`] documents every setting.

pub mod auth;
pub mod base;
pub mod broker;
pub mod bus;
pub mod chat;
pub mod config;
pub mod conn;
pub mod heartbeat;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod node;
pub mod outbound;
pub mod presence;
pub mod probe;
pub mod protocol;
pub mod rooms;
pub mod routing;
pub mod server;
pub mod shard;
pub mod stream;
pub mod tls;
pub mod transport;
pub mod wheel;
pub mod ws;

pub use config::Config;
pub use server::{Gateway, start};
