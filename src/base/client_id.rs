//! Compact client ids: (shard, slab key, generation), sent to clients as a string like `1.2f.a0`.
//!
//! The slab key makes lookup O(1); the generation (a per-shard serial number) makes a reused slab
//! slot never receive traffic addressed to the connection that held it before.

use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientId {
    pub shard: u16,
    pub key: u32,
    pub generation: u32,
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}.{:x}.{:x}", self.shard, self.key, self.generation)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid client id (expected shard.key.generation in hex)")]
pub struct InvalidClientId;

impl FromStr for ClientId {
    type Err = InvalidClientId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split('.');
        let mut next = || parts.next().ok_or(InvalidClientId);
        let shard = u16::from_str_radix(next()?, 16).map_err(|_| InvalidClientId)?;
        let key = u32::from_str_radix(next()?, 16).map_err(|_| InvalidClientId)?;
        let generation = u32::from_str_radix(next()?, 16).map_err(|_| InvalidClientId)?;
        if parts.next().is_some() {
            return Err(InvalidClientId);
        }
        Ok(ClientId {
            shard,
            key,
            generation,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_its_string_form() {
        let id = ClientId {
            shard: 3,
            key: 0x2f,
            generation: u32::MAX,
        };
        assert_eq!(id.to_string(), "3.2f.ffffffff");
        assert_eq!(id.to_string().parse::<ClientId>().unwrap(), id);
        for bad in ["", "1.2", "1.2.3.4", "x.1.2", "10000.1.1"] {
            assert!(bad.parse::<ClientId>().is_err(), "{bad}");
        }
    }
}
