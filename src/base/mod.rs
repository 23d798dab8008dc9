//! What every layer uses and that imports nothing from the crate: who is connected, client ids,
//! the clock, the allocator's upkeep.

pub mod alloc;
pub mod client_id;
pub mod identity;
pub mod time;
