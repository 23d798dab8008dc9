//! The echo application (`/echo`): every message back as it came, within the message rate. The
//! RFC 6455 conformance target.

use crate::conn::limits::{Charge, Verdict};
use crate::runtime::App;
use crate::runtime::entry::ConnEntry;
use crate::runtime::shard::Shard;
use crate::ws::frame::{self, OpCode};

pub struct EchoApp;

impl App for EchoApp {
    /// Echo connections hear only themselves: no broadcasts, no disconnect by user.
    fn addressable(&self) -> bool {
        false
    }

    fn opened(&self, _: &Shard, _: usize, _: Option<&serde_json::value::RawValue>) {}

    fn message(&self, shard: &Shard, key: usize, text: bool, payload: &mut [u8]) {
        match shard.charge(key, Charge::Message) {
            Verdict::Allow => {
                let opcode = if text { OpCode::Text } else { OpCode::Binary };
                shard.send(key, frame::encode(opcode, payload));
            }
            // Echo has no way to say it: the message is not echoed (and counted).
            Verdict::Refuse => {}
            Verdict::Close => shard.close_flooder(key),
        }
    }

    fn refused(&self, _: &Shard, _: usize) {}

    fn closing(&self, _: &Shard, _: usize) {}

    fn closed(&self, _: &Shard, _: &ConnEntry) {}
}
