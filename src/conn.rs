//! One WebSocket connection's task: read into the shard's buffer, decode frames in place, hand
//! messages to the endpoint, and write whatever is queued for the connection in vectored writes.
//!
//! The task owns only the socket, the frame decoder and the bytes of a frame cut off at the end
//! of a read; everything other connections may touch lives in the shard's slab entry.

use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::net::IpAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tracing::debug;

use crate::base::identity::Identity;
use crate::chat;
use crate::limits::{Charge, Verdict};
use crate::protocol::ErrorReply;
use crate::shard::{Endpoint, Shard};
use crate::transport::Stream;
use crate::ws::close::{CloseCode, CloseFrame, FrameError};
use crate::ws::frame::{self, Decoded, Decoder, Event, OpCode};

/// Reads handled per turn before the task yields, so one busy client cannot hog the shard.
const READS_PER_POLL: usize = 16;
/// Frames handled per turn before the task yields: with tiny frames, even one read holds
/// thousands (a 64 KiB read of empty frames is ~10,000).
const FRAMES_PER_TURN: u32 = 512;
/// Bytes a connection we are closing may still send while we wait for its close frame; a peer
/// that keeps streaming past them is hung up on.
const CLOSE_DRAIN_LIMIT: usize = 256 * 1024;
/// Frames gathered into one vectored write.
const SLICES_PER_WRITE: usize = 64;

/// How the open phase of a connection ended.
enum End {
    /// The peer's close frame arrived and our answer is queued: send it, then hang up.
    PeerClosed,
    /// Our close frame went first (bad frames, slow consumer): send it, then wait for the peer's.
    ServerClosed,
    /// The socket hit EOF or an error: nothing more can be sent.
    Gone,
}

struct Connection {
    shard: Rc<Shard>,
    key: usize,
    endpoint: Endpoint,
    stream: Stream,
    decoder: Decoder,
    /// Bytes read but not yet decoded: an incomplete frame left at the end of a read, or the rest
    /// of a read whose decoding paused (empty, unallocated, when idle).
    leftover: Vec<u8>,
    /// `leftover` may hold whole frames: decoding paused before its end.
    paused: bool,
    /// Frames this turn may still handle.
    turn_frames: u32,
}

/// Runs a freshly upgraded connection to the end. `preread` is what the HTTP layer read past the
/// handshake: it belongs to the first frames.
///
/// Set-up is synchronous so the returned future holds only the `Connection`: its size is part of
/// every idle connection's memory.
pub fn serve(
    shard: Rc<Shard>,
    stream: Stream,
    preread: Bytes,
    endpoint: Endpoint,
    identity: Arc<Identity>,
    peer: IpAddr,
) -> impl Future<Output = ()> {
    let key = shard.register(endpoint, identity, peer);
    Connection {
        decoder: Decoder::new(shard.node.config.max_message_size),
        shard,
        key,
        endpoint,
        stream,
        // `preread` is a view into hyper's 8 KiB read buffer: copy out the few bytes it holds so
        // that buffer is freed now, not when the connection ends.
        leftover: preread.to_vec(),
        paused: false,
        turn_frames: FRAMES_PER_TURN,
    }
    .run()
}

impl Connection {
    /// A plain `fn` returning an `async move` block, not an `async fn`: an `async fn` taking
    /// `mut self` stores the connection twice in its future (rustc #62958).
    #[expect(
        clippy::manual_async_fn,
        reason = "see above: halves every connection's task"
    )]
    fn run(mut self) -> impl Future<Output = ()> {
        async move {
            self.shard.start_turn();
            let end = match self.process_leftover() {
                Ok(()) => poll_fn(|cx| self.poll_open(cx)).await,
                Err(end) => end,
            };
            // Rooms first, so members hear of the departure without waiting for the handshake.
            self.leave_rooms();
            if !matches!(end, End::Gone) {
                // Boxed: the close handshake's timers would otherwise double the size of every
                // idle connection's task, though only closing connections need them.
                Box::pin(self.close(end)).await;
            }
            // `Drop` unregisters the connection.
        }
    }

    fn leave_rooms(&self) {
        if self.endpoint == Endpoint::Chat {
            chat::leave_all_rooms(&self.shard, self.key);
        }
    }

    fn poll_open(&mut self, cx: &mut Context<'_>) -> Poll<End> {
        self.shard.state().conns[self.key].outbound.clear_waker();
        self.shard.start_turn();
        self.turn_frames = FRAMES_PER_TURN;
        for _ in 0..READS_PER_POLL {
            let backlogged = match self.poll_flush(cx) {
                Poll::Ready(Ok(())) => false,
                Poll::Ready(Err(e)) => {
                    debug!(error = %e, "write failed");
                    return Poll::Ready(End::Gone);
                }
                Poll::Pending => self.shard.backlogged(self.key),
            };
            if self.shard.is_closing(self.key) {
                return Poll::Ready(End::ServerClosed);
            }
            if backlogged {
                // The client is not reading what it causes us to send: stop reading from it
                // until its queue drains, so TCP pushes back on it instead of our memory. The
                // socket's write readiness wakes the task.
                return self.park(cx);
            }
            if self.turn_frames == 0 {
                break;
            }
            if self.paused {
                if let Err(end) = self.process_leftover() {
                    return Poll::Ready(end);
                }
                continue;
            }
            match self.read(cx) {
                Poll::Pending => return self.park(cx),
                Poll::Ready(Err(end)) => return Poll::Ready(end),
                Poll::Ready(Ok(())) => {}
            }
        }
        // Out of budget: write what the reads produced, then let the other connections run.
        if let Poll::Ready(Err(_)) = self.poll_flush(cx) {
            return Poll::Ready(End::Gone);
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Sleeps until the socket or a frame queued by someone else wakes the task.
    fn park(&self, cx: &mut Context<'_>) -> Poll<End> {
        self.shard.state().conns[self.key]
            .outbound
            .set_waker(cx.waker());
        Poll::Pending
    }

    /// Writes queued frames until the queue is empty or the socket is full.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut guard = self.shard.state();
        let state = &mut *guard;
        let outbound = &mut state.conns[self.key].outbound;
        while !outbound.is_empty() {
            let mut slices = [IoSlice::new(&[]); SLICES_PER_WRITE];
            let n = outbound.slices(&mut slices);
            let written = match Pin::new(&mut self.stream).poll_write_vectored(cx, &slices[..n]) {
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
            let frames = outbound.advance(written, &mut state.queued);
            let metrics = self.shard.metrics();
            metrics.frames_sent.add(frames);
            metrics.bytes_sent.add(written as u64);
        }
        // TLS may hold records the socket did not take yet (a no-op on plain TCP).
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    /// One read from the socket, and the frames it completes.
    fn read(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), End>> {
        let shard = self.shard.clone();
        let mut buf = shard.read_buf();
        let n = match self.stream.poll_read_into(cx, &mut buf) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(Err(End::Gone)),
            Poll::Ready(Ok(n)) => n,
        };
        shard.metrics().bytes_received.add(n as u64);
        Poll::Ready(if self.leftover.is_empty() {
            // The common case: frames are decoded straight out of the shared buffer, and only
            // an incomplete frame (or what a paused decoding left) is kept.
            self.decode_frames(&mut buf[..n]).map(|consumed| {
                self.keep_undecoded(&buf[consumed..n]);
            })
        } else {
            drop(buf);
            self.keep_undecoded(&shard.read_buf()[..n]);
            self.process_leftover()
        })
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
    fn process_leftover(&mut self) -> Result<(), End> {
        self.paused = false;
        if self.leftover.is_empty() {
            return Ok(());
        }
        let mut pending = std::mem::take(&mut self.leftover);
        let consumed = self.decode_frames(&mut pending)?;
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
    fn decode_frames(&mut self, buf: &mut [u8]) -> Result<usize, End> {
        let mut pos = 0;
        let mut heard = false;
        loop {
            if self.turn_frames == 0 || self.shard.backlogged(self.key) {
                self.paused = pos < buf.len();
                return Ok(pos);
            }
            let (consumed, event) = match self.decoder.decode(&mut buf[pos..]) {
                Ok(Decoded::Incomplete) => return Ok(pos),
                Ok(Decoded::Frame { consumed, event }) => (consumed, event),
                Err(error) => return Err(self.fail(error)),
            };
            pos += consumed;
            self.turn_frames -= 1;
            if !heard {
                // A whole frame is what answers a ping: bytes of one that never ends are not.
                self.shard.seen(self.key);
                heard = true;
            }
            // Every frame costs: a flood of empty pings, pongs or fragments is a flood.
            let within_rate = match self.shard.charge(self.key, Charge::Frame) {
                Verdict::Allow => true,
                Verdict::Refuse => false,
                Verdict::Close => return Err(self.flooded()),
            };
            match event {
                Event::Message { text, mut payload } => {
                    self.shard.metrics().messages_received.add(1);
                    let handled = if within_rate {
                        self.on_message(text, payload.as_mut_slice())
                    } else {
                        self.refuse_message()
                    };
                    handled?;
                }
                // Over the frame rate, a ping goes unanswered.
                Event::Ping(data) if within_rate => self
                    .shard
                    .send_pong(self.key, frame::encode(OpCode::Pong, data)),
                Event::Ping(_) | Event::Pong | Event::Fragment => {}
                Event::Close(frame) => {
                    // Answer with the peer's code, as RFC 6455 §5.5.1 suggests.
                    let code = frame.map_or(CloseCode::NORMAL, |CloseFrame { code, .. }| code);
                    self.shard.close(self.key, code, "");
                    return Err(End::PeerClosed);
                }
            }
        }
    }

    /// Hands a complete message to the endpoint, within the connection's byte and message rates.
    fn on_message(&mut self, text: bool, payload: &mut [u8]) -> Result<(), End> {
        match self.shard.charge(self.key, Charge::Bytes(payload.len())) {
            Verdict::Allow => {}
            Verdict::Refuse => return self.refused(),
            Verdict::Close => return Err(self.flooded()),
        }
        match self.endpoint {
            Endpoint::Chat if text => chat::on_text(&self.shard, self.key, payload),
            Endpoint::Chat => {
                self.shard
                    .send_error(self.key, ErrorReply::BinaryNotSupported);
            }
            Endpoint::Echo => match self.shard.charge(self.key, Charge::Message) {
                Verdict::Allow => {
                    let opcode = if text { OpCode::Text } else { OpCode::Binary };
                    self.shard.send(self.key, frame::encode(opcode, payload));
                }
                Verdict::Refuse => return self.refused(),
                Verdict::Close => return Err(self.flooded()),
            },
        }
        if self.shard.is_closing(self.key) {
            // The handler closed the connection (a flood of refused messages): read no further.
            return Err(End::ServerClosed);
        }
        Ok(())
    }

    /// A data message over the frame rate: refused like one over the message rate.
    fn refuse_message(&mut self) -> Result<(), End> {
        self.shard
            .node
            .counters
            .rate_limited
            .fetch_add(1, Ordering::Relaxed);
        self.refused()
    }

    /// Answers a refused message: an error on the chat protocol; echo has no way to say it, so
    /// the message is not echoed (and counted).
    fn refused(&mut self) -> Result<(), End> {
        if self.endpoint == Endpoint::Chat {
            self.shard.send_error(self.key, ErrorReply::RateLimited);
        }
        Ok(())
    }

    fn flooded(&mut self) -> End {
        self.shard.close_flooder(self.key);
        End::ServerClosed
    }

    fn fail(&mut self, error: FrameError) -> End {
        debug!(
            code = error.code.0,
            reason = error.reason,
            "closing a connection for bad frames"
        );
        self.shard.node.counters.frame_error(error.code);
        self.shard.close(self.key, error.code, error.reason);
        End::ServerClosed
    }

    /// Finishes the close handshake within `close_timeout`: send what is queued (our close frame
    /// last) and close our side; if our close went first, wait for the peer's answer (or its
    /// hang-up) before dropping the socket, since closing a socket with unread input sends a
    /// reset that can destroy our close frame before the peer reads it.
    async fn close(&mut self, end: End) {
        let deadline = tokio::time::Instant::now() + self.shard.node.config.close_timeout;
        let flushed = tokio::time::timeout_at(deadline, poll_fn(|cx| self.poll_flush(cx))).await;
        if !matches!(flushed, Ok(Ok(()))) {
            return;
        }
        let _ = self.stream.shutdown().await;
        if let End::ServerClosed = end {
            let _ = tokio::time::timeout_at(deadline, self.await_peer_close()).await;
        }
    }

    /// Reads, skipping other frames, until the peer's close frame, a bad frame header or EOF;
    /// gives up on a peer that keeps streaming instead of closing. Holds at most a frame header
    /// meanwhile: payloads are counted off as they pass, never kept.
    async fn await_peer_close(&mut self) {
        let mut drain = CloseDrain {
            header: std::mem::take(&mut self.leftover),
            to_skip: 0,
            drained: 0,
        };
        loop {
            let read = poll_fn(|cx| {
                let shard = self.shard.clone();
                let mut buf = shard.read_buf();
                self.stream.poll_read_into(cx, &mut buf)
            })
            .await;
            let n = match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if drain.pass(&self.shard.read_buf()[..n]) {
                return;
            }
            // A peer streaming at us gets one read per turn: the others keep theirs, and the
            // close's deadline can fire.
            tokio::task::yield_now().await;
        }
    }
}

/// Frames passing by while a connection waits for the peer's close frame.
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

/// However the task ends (normally, by a panic in a handler, or dropped at shutdown), the
/// connection leaves its rooms and its slab slot.
impl Drop for Connection {
    fn drop(&mut self) {
        self.leave_rooms();
        self.shard.unregister(self.key);
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
            let mut drain = CloseDrain {
                header: Vec::new(),
                to_skip: 0,
                drained: 0,
            };
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
        let mut drain = CloseDrain {
            header: Vec::new(),
            to_skip: 0,
            drained: 0,
        };
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
}
