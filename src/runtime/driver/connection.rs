//! One WebSocket connection on its shard's event loop: a state machine the loop polls when the
//! socket has an event or something was queued for it. It reads into the shard's buffer, hands
//! the bytes to its [`Input`], and writes whatever is queued for it in vectored writes.
//!
//! A connection owns only its stream, its input and its phase; everything other connections may
//! touch lives in the shard's slab entry under the same key.

use std::io::{self, IoSlice};
use std::task::{Context, Poll};

use tracing::debug;

use crate::runtime::input::{End, Input};
use crate::runtime::shard::Shard;
use crate::transport::Stream;
use crate::ws::frame;

use super::socket::LoopSocket;

/// Reads handled per turn before the connection yields, so one busy client cannot hog the shard.
const READS_PER_POLL: usize = 16;
/// Bytes a connection we are closing may still send while we wait for its close frame; a peer
/// that keeps streaming past them is hung up on.
const CLOSE_DRAIN_LIMIT: usize = 256 * 1024;
/// Frames gathered into one vectored write.
const SLICES_PER_WRITE: usize = 64;

pub struct Connection {
    pub stream: Stream<LoopSocket>,
    input: Input,
    phase: Phase,
    /// The loop's round that last polled it: a connection woken twice in a round runs once.
    /// (64 bits: rounds never wrap back to a new connection's 0.)
    pub round: u64,
}

enum Phase {
    /// Adopted: what was read past the handshake is handled first.
    New,
    Open,
    /// Sending what is queued (our close frame last), then closing our side.
    Closing(End),
    /// Our close went first: waiting for the peer's answer, or its hang-up, before dropping the
    /// socket (closing a socket with unread input sends a reset that can destroy our close frame
    /// before the peer reads it). Boxed: only closing connections need it, and this enum is in
    /// every connection.
    AwaitingClose(Box<CloseDrain>),
}

impl Connection {
    /// A freshly upgraded connection; `preread` is what the HTTP layer read past the handshake.
    pub fn new(stream: Stream<LoopSocket>, input: Input) -> Self {
        Connection {
            stream,
            input,
            phase: Phase::New,
            round: 0,
        }
    }

    /// Whether it is past its open phase (its close handshake is timed).
    pub fn is_closing(&self) -> bool {
        matches!(self.phase, Phase::Closing(_) | Phase::AwaitingClose(_))
    }

    /// Its turn: `Ready` once it is over and may be dropped (after [`Connection::release`]).
    pub fn poll(&mut self, shard: &Shard, key: usize, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            match &mut self.phase {
                Phase::New => {
                    self.phase = Phase::Open;
                    if let Err(end) = self.input.process_leftover(shard, key)
                        && self.begin_close(shard, key, end)
                    {
                        return Poll::Ready(());
                    }
                }
                Phase::Open => match self.poll_open(shard, key, cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(end) => {
                        if self.begin_close(shard, key, end) {
                            return Poll::Ready(());
                        }
                    }
                },
                Phase::Closing(end) => {
                    let awaits_peer = matches!(end, End::ServerClosed);
                    match self.poll_flush(shard, key, cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Err(_)) => return Poll::Ready(()),
                        Poll::Ready(Ok(())) => {}
                    }
                    match self.stream.poll_end(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Ok(())) if awaits_peer => {
                            // What was read and not handled (part of a frame, or whole frames)
                            // passes first, as if it were read now.
                            let mut drain = Box::<CloseDrain>::default();
                            if drain.pass(&self.input.take_leftover()) {
                                return Poll::Ready(());
                            }
                            self.phase = Phase::AwaitingClose(drain);
                        }
                        Poll::Ready(_) => return Poll::Ready(()),
                    }
                }
                Phase::AwaitingClose(drain) => {
                    let mut buf = shard.read_buf();
                    let n = match self.stream.poll_read_into(cx, &mut buf) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(()),
                        Poll::Ready(Ok(n)) => n,
                    };
                    if drain.pass(&buf[..n]) {
                        return Poll::Ready(());
                    }
                    // A peer streaming at us gets one read per turn: the others keep theirs.
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
            }
        }
    }

    /// The open phase is over: what it takes part in ends first, so rooms' members hear of the
    /// departure without waiting for the handshake. True when nothing more can be sent.
    fn begin_close(&mut self, shard: &Shard, key: usize, end: End) -> bool {
        self.release(shard, key);
        if let End::Gone = end {
            return true;
        }
        self.stream.socket().read_only_as_needed();
        self.phase = Phase::Closing(end);
        false
    }

    /// Tells its app it is closing (again is harmless): before the connection is dropped, however
    /// it ends.
    pub fn release(&self, shard: &Shard, key: usize) {
        shard.app(self.input.app).closing(shard, key);
    }

    fn poll_open(&mut self, shard: &Shard, key: usize, cx: &mut Context<'_>) -> Poll<End> {
        shard.state().conns[key].outbound.unpark();
        self.input.start_turn();
        for _ in 0..READS_PER_POLL {
            let backlogged = match self.poll_flush(shard, key, cx) {
                // Everything written: only its app can hold it (waiting for a backend).
                Poll::Ready(Ok(())) => shard.is_held(key),
                Poll::Ready(Err(e)) => {
                    debug!(error = %e, "write failed");
                    return Poll::Ready(End::Gone);
                }
                Poll::Pending => shard.backlogged(key),
            };
            if shard.is_closing(key) {
                return Poll::Ready(End::ServerClosed);
            }
            if backlogged {
                // The client is not reading what it causes us to send: stop reading from it
                // until its queue drains, so TCP pushes back on it instead of our memory. The
                // socket's write readiness gives it its next turn (or, held by its app, the
                // answer it waits for).
                return park(shard, key);
            }
            if self.input.turn_spent() {
                break;
            }
            if self.input.is_paused() {
                if let Err(end) = self.input.process_leftover(shard, key) {
                    return Poll::Ready(end);
                }
                continue;
            }
            match self.read(shard, key, cx) {
                Poll::Pending => return park(shard, key),
                Poll::Ready(Err(end)) => return Poll::Ready(end),
                Poll::Ready(Ok(())) => {}
            }
        }
        // Out of budget: write what the reads produced, then let the other connections run.
        if let Poll::Ready(Err(_)) = self.poll_flush(shard, key, cx) {
            return Poll::Ready(End::Gone);
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Writes queued frames until the queue is empty or the socket is full.
    fn poll_flush(
        &mut self,
        shard: &Shard,
        key: usize,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        let mut guard = shard.state();
        let state = &mut *guard;
        let outbound = &mut state.conns[key].outbound;
        while !outbound.is_empty() {
            let mut slices = [IoSlice::new(&[]); SLICES_PER_WRITE];
            let n = outbound.slices(&mut slices);
            let written = match self.stream.poll_write_from(cx, &slices[..n]) {
                Poll::Ready(result) => result?,
                Poll::Pending => {
                    // The reader has had its chance: what is queued now is its backlog.
                    outbound.mark_stale();
                    return Poll::Pending;
                }
            };
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let advanced = outbound.advance(written, &mut state.queued);
            if advanced.dropped > 0 {
                // Caught up after broadcasts were dropped for it: its app says so, if it can.
                if let Some(notice) = shard.app(self.input.app).dropped(advanced.dropped) {
                    outbound.push(notice, &mut state.queued);
                }
            }
            let metrics = shard.metrics();
            metrics.frames_sent.add(advanced.frames);
            metrics.bytes_sent.add(written as u64);
        }
        // TLS may hold records the socket did not take yet (a no-op on plain TCP).
        self.stream.poll_flush_held(cx)
    }

    /// One read from the socket, and the frames it completes.
    fn read(&mut self, shard: &Shard, key: usize, cx: &mut Context<'_>) -> Poll<Result<(), End>> {
        let read = self.stream.poll_read_into(cx, &mut shard.read_buf());
        let n = match read {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(Err(End::Gone)),
            Poll::Ready(Ok(n)) => n,
        };
        Poll::Ready(self.input.take_read(shard, key, n))
    }
}

/// Waits for the socket or a frame queued by someone else.
fn park(shard: &Shard, key: usize) -> Poll<End> {
    shard.state().conns[key].outbound.park(key);
    Poll::Pending
}

/// Frames passing by while a connection waits for the peer's close frame.
#[derive(Default)]
struct CloseDrain {
    /// The bytes of a frame header cut off at the end of a read (at most 14).
    header: Vec<u8>,
    /// Payload bytes of the current frame still to pass.
    to_skip: u64,
    drained: usize,
}

impl CloseDrain {
    /// Takes a read; returns true when the wait is over: the close frame came, a frame header is
    /// bad, or the peer sent more than `CLOSE_DRAIN_LIMIT`.
    fn pass(&mut self, mut data: &[u8]) -> bool {
        self.drained += data.len();
        while !data.is_empty() {
            if self.to_skip > 0 {
                let passed = self.to_skip.min(data.len() as u64);
                self.to_skip -= passed;
                data = &data[passed as usize..];
                continue;
            }
            let had = self.header.len();
            let take = (frame::MAX_CLIENT_HEADER_LEN - had).min(data.len());
            self.header.extend_from_slice(&data[..take]);
            match frame::peek(&self.header) {
                Ok(Some(peeked)) if peeked.close => return true,
                Ok(Some(peeked)) => {
                    data = &data[peeked.header_len - had..];
                    self.to_skip = peeked.payload_len;
                    self.header.clear();
                }
                Ok(None) => data = &data[take..],
                Err(_) => return true,
            }
        }
        self.drained > CLOSE_DRAIN_LIMIT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        crate::ws::frame::client_frame::client_frame(fin, opcode, payload, Some([1, 2, 3, 4]))
    }

    #[test]
    fn a_close_drain_finds_the_close_frame_through_any_split_and_keeps_only_a_header() {
        let mut wire = masked(true, 0x2, &[9; 3000]);
        wire.extend(masked(false, 0x1, b"part"));
        wire.extend(masked(true, 0x8, &[0x03, 0xe8]));
        for split in [1, 3, 7, 13, 500, 4096] {
            let mut drain = CloseDrain::default();
            // Found once the close frame's header is in: its last read is the one holding it.
            let close_header_ends = wire.len() - 2;
            let found_at = wire
                .chunks(split)
                .scan(0, |read, chunk| {
                    *read += chunk.len();
                    Some((*read, drain.pass(chunk)))
                })
                .find(|(_, found)| *found)
                .map(|(read, _)| read);
            let found_at = found_at.unwrap_or_else(|| panic!("split {split}: no close"));
            assert!(found_at >= close_header_ends, "split {split}: too early");
            assert!(
                found_at < close_header_ends + split,
                "split {split}: too late"
            );
        }
    }

    #[test]
    fn a_close_drain_gives_up_on_a_peer_that_streams() {
        let mut drain = CloseDrain::default();
        let mut huge = vec![0x82, 0xFF];
        huge.extend_from_slice(&(1u64 << 40).to_be_bytes());
        huge.extend_from_slice(&[1, 2, 3, 4]);
        assert!(!drain.pass(&huge));
        let chunk = vec![0u8; 64 * 1024];
        let mut reads = 0;
        while !drain.pass(&chunk) {
            reads += 1;
            assert!(reads < 10, "gave up past the limit");
        }
        assert!(drain.header.is_empty());
    }

    #[test]
    fn a_close_drain_takes_what_was_left_unread_whatever_it_holds() {
        // 10 bytes of a 100-byte frame were read before we closed; the rest, then the close.
        let frame = masked(true, 0x2, &[5; 94]);
        let close = masked(true, 0x8, &[0x03, 0xe8]);
        let mut drain = CloseDrain::default();
        assert!(!drain.pass(&frame[..10]));
        assert!(!drain.pass(&frame[10..]));
        assert!(drain.pass(&close));
        // Whole frames and the start of the close frame left unread: the close is found.
        let mut leftover = masked(true, 0x1, b"hello");
        leftover.extend_from_slice(&masked(true, 0x1, &[b'x'; 300]));
        leftover.extend_from_slice(&close[..3]);
        let mut drain = CloseDrain::default();
        assert!(!drain.pass(&leftover));
        assert!(drain.pass(&close[3..]));
    }
}
