//! The applications: what a connection's messages mean. Each implements [`crate::runtime::App`];
//! the runtime calls it and knows nothing else of it. Adding one is a file here and a route in
//! the HTTP edge.
//!
//! - [`chat`]: the JSON chat protocol ([`crate::protocol`]) over rooms (`/ws`, `/`).
//! - [`echo`]: raw echo (`/echo`), the RFC 6455 conformance target.

pub mod chat;
pub mod echo;
