//! A connection's bytes in: decoded in place out of the shard's read buffer, each frame charged
//! to the connection's rate limits, each message handed to its app. Synchronous: the driver reads
//! into [`Shard::read_buf`] and calls [`Input::take_read`].
//!
//! Only the bytes of a frame cut off at the end of a read (or what a paused decoding left) are
//! kept, in the connection's own `leftover`: an idle connection holds no read buffer.

use tracing::debug;

use crate::conn::limits::{Charge, Verdict};
use crate::ws::close::{CloseCode, CloseFrame, FrameError};
use crate::ws::deflate::{self, Deflate};
use crate::ws::frame::{self, Decoded, Decoder, Event, OpCode};

use super::AppId;
use super::shard::Shard;

/// Frames handled per turn before the connection yields: with tiny frames, even one read holds
/// thousands (a 64 KiB read of empty frames is ~10,000).
pub const FRAMES_PER_TURN: u32 = 512;

/// How the open phase of a connection ended.
pub enum End {
    /// The peer's close frame arrived and our answer is queued: send it, then hang up.
    PeerClosed,
    /// Our close frame went first (bad frames, slow consumer): send it, then wait for the peer's.
    ServerClosed,
    /// The socket hit EOF or an error: nothing more can be sent.
    Gone,
}

/// What a connection has read and not yet handled, and its frame decoder.
pub struct Input {
    /// Which app its messages go to.
    pub app: AppId,
    decoder: Decoder,
    /// Bytes read but not yet decoded: an incomplete frame left at the end of a read, or the rest
    /// of a read whose decoding paused (empty, unallocated, when idle).
    leftover: Vec<u8>,
    /// `leftover` may hold whole frames: decoding paused before its end.
    paused: bool,
    /// Frames this turn may still handle.
    turn_frames: u32,
}

impl Input {
    /// The input of a connection speaking `app`; `preread` is what was read past its handshake
    /// (the start of its first frames). With `deflate` on, its messages may come compressed.
    pub fn new(app: AppId, max_message_size: usize, deflate: Deflate, preread: Vec<u8>) -> Self {
        let decoder = if deflate.is_on() {
            Decoder::compressed(max_message_size)
        } else {
            Decoder::new(max_message_size)
        };
        Input {
            app,
            decoder,
            leftover: preread,
            paused: false,
            turn_frames: FRAMES_PER_TURN,
        }
    }

    /// A new turn: a fresh frame budget.
    pub fn start_turn(&mut self) {
        self.turn_frames = FRAMES_PER_TURN;
    }

    /// Whether this turn's frame budget is spent.
    pub fn turn_spent(&self) -> bool {
        self.turn_frames == 0
    }

    /// Whether decoding paused with whole frames still in `leftover` (to handle before reading).
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// What is left undecoded, given up (the connection is closing: only a frame header of it
    /// still matters).
    pub fn take_leftover(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.leftover)
    }

    /// Handles the `n` bytes a read put at the start of the shard's read buffer.
    pub fn take_read(&mut self, shard: &Shard, key: usize, n: usize) -> Result<(), End> {
        shard.metrics().bytes_received.add(n as u64);
        let mut buf = shard.read_buf();
        if self.leftover.is_empty() {
            // The common case: frames are decoded straight out of the shared buffer, and only
            // an incomplete frame (or what a paused decoding left) is kept.
            let consumed = self.decode_frames(shard, key, &mut buf[..n])?;
            self.keep_undecoded(&buf[consumed..n]);
            Ok(())
        } else {
            self.keep_undecoded(&buf[..n]);
            drop(buf);
            self.process_leftover(shard, key)
        }
    }

    /// Appends to `leftover`, growing it to what the incomplete frame at its front needs (its
    /// header says how much) rather than by doubling: a frame trickled in byte by byte costs its
    /// own size, not twice that.
    fn keep_undecoded(&mut self, bytes: &[u8]) {
        let needed = self.leftover.len() + bytes.len();
        if needed > self.leftover.capacity() {
            let mut head = [0u8; frame::MAX_CLIENT_HEADER_LEN];
            let known = self.leftover.len().min(head.len());
            head[..known].copy_from_slice(&self.leftover[..known]);
            let more = (head.len() - known).min(bytes.len());
            head[known..known + more].copy_from_slice(&bytes[..more]);
            // What the frame's header declares, if the decoder would take it: a header that
            // claims more than the message size limit earns no reservation (the decoder refuses
            // it as soon as it is whole).
            let frame = self
                .decoder
                .incomplete_frame_len(&head[..known + more])
                .unwrap_or(0);
            self.leftover
                .reserve_exact(needed.max(frame) - self.leftover.len());
        }
        self.leftover.extend_from_slice(bytes);
    }

    /// Decodes what has collected in `leftover`, keeping what is left undecoded.
    pub fn process_leftover(&mut self, shard: &Shard, key: usize) -> Result<(), End> {
        self.paused = false;
        if self.leftover.is_empty() {
            return Ok(());
        }
        let mut pending = std::mem::take(&mut self.leftover);
        let consumed = self.decode_frames(shard, key, &mut pending)?;
        let rest = pending.len() - consumed;
        if rest > 0 && pending.capacity() > 4 * rest + 4096 {
            // A small rest in a big buffer (a large frame just completed): a buffer of its own
            // size, so an idle connection does not keep the big one.
            self.keep_undecoded(&pending[consumed..]);
        } else if rest > 0 {
            // Otherwise the same buffer: a frame arriving over many reads is not copied anew
            // each time.
            pending.drain(..consumed);
            self.leftover = pending;
        }
        Ok(())
    }

    /// Decodes and handles the whole frames at the front of `buf`; returns the bytes consumed.
    /// Stops early (setting `paused`) when the turn's frame budget is spent or the connection's
    /// queue is past its bound: the rest waits in `leftover`.
    fn decode_frames(&mut self, shard: &Shard, key: usize, buf: &mut [u8]) -> Result<usize, End> {
        let mut pos = 0;
        let mut heard = false;
        loop {
            if self.turn_frames == 0 || shard.backlogged(key) {
                self.paused = pos < buf.len();
                return Ok(pos);
            }
            let (consumed, event) = match self.decoder.decode(&mut buf[pos..]) {
                Ok(Decoded::Incomplete) => return Ok(pos),
                Ok(Decoded::Frame { consumed, event }) => (consumed, event),
                Err(error) => return Err(fail(shard, key, error)),
            };
            pos += consumed;
            self.turn_frames -= 1;
            if !heard {
                // A whole frame is what answers a ping: bytes of one that never ends are not.
                shard.seen(key);
                heard = true;
            }
            // Every frame costs: a flood of empty pings, pongs or fragments is a flood.
            let within_rate = match shard.charge(key, Charge::Frame) {
                Verdict::Allow => true,
                Verdict::Refuse => false,
                Verdict::Close => return Err(flooded(shard, key)),
            };
            match event {
                Event::Message {
                    text,
                    compressed,
                    mut payload,
                } => {
                    shard.metrics().messages_received.add(1);
                    if !within_rate {
                        // Over the frame rate: refused as over the message rate.
                        let counters = &shard.shared.counters;
                        counters
                            .rate_limited
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        shard.app(self.app).refused(shard, key);
                    } else if compressed {
                        self.on_compressed(shard, key, text, payload.as_slice())?;
                    } else {
                        self.on_message(shard, key, text, payload.as_mut_slice())?;
                    }
                }
                // Over the frame rate, a ping goes unanswered.
                Event::Ping(data) if within_rate => {
                    shard.send_pong(key, frame::encode(OpCode::Pong, data));
                }
                Event::Ping(_) | Event::Pong | Event::Fragment => {}
                Event::Close(frame) => {
                    // Answer with the peer's code, as RFC 6455 §5.5.1 suggests.
                    let code = frame.map_or(CloseCode::NORMAL, |CloseFrame { code, .. }| code);
                    shard.close(key, code, "");
                    return Err(End::PeerClosed);
                }
            }
        }
    }

    /// Inflates a compressed message, then handles it as any other: the message size limit,
    /// the UTF-8 check and the byte rate apply to what it inflates to.
    fn on_compressed(
        &mut self,
        shard: &Shard,
        key: usize,
        text: bool,
        compressed: &[u8],
    ) -> Result<(), End> {
        shard.metrics().inflated.add(1);
        let max = self.decoder.max_message_size();
        let handled = deflate::inflate(compressed, max, |message| {
            if text && std::str::from_utf8(message).is_err() {
                return Err(fail(shard, key, frame::BAD_UTF8));
            }
            self.on_message(shard, key, text, message)
        });
        handled.unwrap_or_else(|error| Err(fail(shard, key, error)))
    }

    /// Hands a complete message to the app, within the connection's byte rate.
    fn on_message(
        &mut self,
        shard: &Shard,
        key: usize,
        text: bool,
        payload: &mut [u8],
    ) -> Result<(), End> {
        let app = shard.app(self.app);
        match shard.charge(key, Charge::Bytes(payload.len())) {
            Verdict::Allow => app.message(shard, key, text, payload),
            Verdict::Refuse => {
                app.refused(shard, key);
                return Ok(());
            }
            Verdict::Close => return Err(flooded(shard, key)),
        }
        if shard.is_closing(key) {
            // The app closed the connection (a flood of refused messages): read no further.
            return Err(End::ServerClosed);
        }
        Ok(())
    }
}

fn flooded(shard: &Shard, key: usize) -> End {
    shard.close_flooder(key);
    End::ServerClosed
}

fn fail(shard: &Shard, key: usize, error: FrameError) -> End {
    debug!(
        code = error.code.0,
        reason = error.reason,
        "closing a connection for bad frames"
    );
    shard.shared.counters.frame_error(error.code);
    shard.close(key, error.code, error.reason);
    End::ServerClosed
}

#[cfg(test)]
mod tests {
    //! The runtime without a driver or the chat app: a connection adopted by a shard, fed bytes,
    //! its queue taken and released, through the synchronous calls a driver makes, with an app
    //! of the test's own.

    use std::cell::RefCell;
    use std::net::IpAddr;
    use std::rc::Rc;
    use std::sync::Arc;

    use super::*;
    use crate::base::identity::Identity;
    use crate::config::Config;
    use crate::rooms::RoomDirectory;
    use crate::rooms::stream::HistoryLimits;
    use crate::runtime::entry::ConnEntry;
    use crate::runtime::{App, Newcomer, Shared};
    use crate::ws::frame::client_frame::client_frame;

    /// Answers each message in capitals, and notes what the runtime told it.
    struct Shout(Rc<RefCell<Vec<String>>>);

    impl App for Shout {
        fn addressable(&self) -> bool {
            false
        }

        fn opened(&self, shard: &Shard, key: usize, _: Option<&serde_json::value::RawValue>) {
            self.0.borrow_mut().push("opened".into());
            shard.send(key, frame::encode(OpCode::Text, b"hello"));
        }

        fn message(&self, shard: &Shard, key: usize, _text: bool, payload: &mut [u8]) {
            payload.make_ascii_uppercase();
            shard.send(key, frame::encode(OpCode::Text, payload));
        }

        fn refused(&self, _: &Shard, _: usize) {
            self.0.borrow_mut().push("refused".into());
        }

        fn closing(&self, _: &Shard, _: usize) {
            self.0.borrow_mut().push("closing".into());
        }

        fn closed(&self, _: &Shard, conn: &ConnEntry) {
            self.0.borrow_mut().push(format!("closed {}", conn.id));
        }
    }

    /// Puts `bytes` in the shard's read buffer, as a read would, and hands them over.
    fn feed(input: &mut Input, shard: &Shard, key: usize, bytes: &[u8]) -> Result<(), End> {
        shard.read_buf()[..bytes.len()].copy_from_slice(bytes);
        input.take_read(shard, key, bytes.len())
    }

    #[test]
    fn a_shard_serves_an_app_of_its_own_through_its_synchronous_calls() {
        let config = Arc::new(Config {
            shards: 1,
            max_connections: 10,
            ..Config::default()
        });
        let history = HistoryLimits {
            size: 10,
            ttl: std::time::Duration::from_secs(60),
        };
        let rooms = RoomDirectory::new(1, false, history, 10);
        let (shared, _inboxes) = Shared::new("node".into(), config, rooms, 100);
        let log = Rc::new(RefCell::new(Vec::new()));
        let shard = Shard::new(0, Arc::new(shared), vec![Box::new(Shout(log.clone()))]);
        let peer = IpAddr::from([127, 0, 0, 1]);
        shard.shared.admission.admit_socket(Some(peer)).unwrap();
        shard.shared.admission.admit_upgrade(peer).unwrap();

        let key = shard.register(Newcomer::plain(
            AppId(0),
            Arc::new(Identity::anonymous()),
            peer,
        ));
        assert_eq!(shard.take_written(key), [(0x1, b"hello".to_vec())]);
        let mut input = Input::new(AppId(0), 1 << 16, Deflate::OFF, Vec::new());
        shard.start_turn();

        // A message cut in two reads: handled once whole.
        let message = client_frame(true, 0x1, b"quiet please", Some([7, 7, 7, 7]));
        assert!(feed(&mut input, &shard, key, &message[..5]).is_ok());
        assert!(shard.take_written(key).is_empty());
        assert!(feed(&mut input, &shard, key, &message[5..]).is_ok());
        assert_eq!(shard.take_written(key), [(0x1, b"QUIET PLEASE".to_vec())]);
        // A ping is the runtime's to answer.
        let ping = client_frame(true, 0x9, b"p", Some([1, 2, 3, 4]));
        assert!(feed(&mut input, &shard, key, &ping).is_ok());
        assert_eq!(shard.take_written(key), [(0xA, b"p".to_vec())]);
        // The peer's close is answered with its code, and ends the open phase.
        let close = client_frame(true, 0x8, &1000u16.to_be_bytes(), Some([1, 2, 3, 4]));
        assert!(matches!(
            feed(&mut input, &shard, key, &close),
            Err(End::PeerClosed)
        ));
        assert_eq!(shard.take_written(key)[0].0, 0x8);
        shard.app(input.app).closing(&shard, key);
        shard.unregister(key);
        assert_eq!(shard.connection_count(), 0);
        assert_eq!(*log.borrow(), ["opened", "closing", "closed 0.0.0"]);
    }
}
