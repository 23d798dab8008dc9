//! wsgate: a WebSocket gateway built for massive connection counts.
//!
//! # Layers
//!
//! Each layer imports only from the layers below it (`tests/layers.rs` checks this map against
//! every `crate::` path in `src/`, and that no two files import each other through any chain):
//!
//! 1. base: `config`, `base` — settings as plain data with their range checks; who is connected,
//!    client ids, the clock.
//! 2. auth: `auth` — JWT verification and minting.
//! 3. wire: `ws`, `protocol` — RFC 6455 frames and close codes; the typed JSON protocol. No I/O.
//! 4. transport: `transport` — plain TCP and TLS streams, certificates.
//! 5. state: `conn`, `rooms` — one connection's outbound queue and limits; rooms, their streams
//!    (offsets, history) and presence. Data only.
//! 6. runtime: `runtime` — the shard (connections in a slab, timer wheel, heartbeats), the bus
//!    between shards, counters, the [`runtime::App`] trait, and the I/O [`runtime::driver`].
//! 7. fanout: `fanout` — publications and stream messages to their recipients, in order, with
//!    catch-up and the slow-consumer policy.
//! 8. broker: `broker` — the [`broker::Broker`] trait and its engines (memory, Redis); it reports
//!    up through [`broker::BrokerEvents`].
//! 9. backend: `backend` — the application's backend, over HTTP: proxies (asked before an
//!    event) and webhooks (told after).
//! 10. cluster: `cluster` — the publish path and the broker's events, tying broker to fan-out
//!     (and to the webhooks).
//! 11. app: `app` — the applications (chat, echo), each an [`runtime::App`].
//! 12. edge: `http` — HTTP, admission, the upgrade, the server API, `/metrics`.
//! 13. process: `node`, `server`, `probe` — composition, start-up and shutdown, the probe.
//!
//! Where the cut is not the obvious one, and why:
//! - The JSON protocol (`protocol`) is wire, below the runtime: fan-out writes the protocol's
//!   room notices itself (`room_joined` for a join that waited for its room's sync, `resync`,
//!   presence notices from other nodes), and a room message the broker could not publish is
//!   answered with the protocol's error reply. The runtime itself never names it: greetings,
//!   pings and notices are the app's.
//! - `/metrics` is rendered by the edge that serves it (`http::metrics`), from counters the
//!   runtime keeps.
//! - Session records (a broker's, for connections the shards hold) live in `cluster`, where the
//!   broker and the shards meet.
//!
//! # A message's path
//!
//! A chat message read by a shard's [`runtime::driver`] is decoded by its
//! [`runtime::input::Input`] and handed to its app ([`app::chat`]), which publishes it through
//! [`cluster`] to the [`broker::Broker`]. The broker gives it its offset (this node's stream, or
//! Redis) and reports it back — on every node following the room — through
//! [`broker::BrokerEvents`]; [`cluster::Cluster`] hands it to [`fanout`], which sends it over the
//! [`runtime::bus`] to each shard with members, where it is queued, as one shared `Bytes`, to
//! each member's outbound queue, and the driver writes it.

pub mod app;
pub mod auth;
pub mod backend;
pub mod base;
pub mod broker;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod fanout;
pub mod http;
pub mod node;
pub mod probe;
pub mod protocol;
pub mod rooms;
pub mod runtime;
pub mod server;
pub mod transport;
pub mod ws;

pub use config::Config;
pub use server::{Gateway, start};
