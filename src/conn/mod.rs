//! One connection's state that is not I/O: its outbound queue, and the limits it is held to.

pub mod limits;
pub mod outbound;
