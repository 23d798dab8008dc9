//! The WebSocket wire (RFC 6455): frames and close codes. No I/O.

pub mod close;
pub mod deflate;
pub mod frame;
