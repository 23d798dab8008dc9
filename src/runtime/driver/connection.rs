//! One WebSocket connection's task: read into the shard's buffer, hand the bytes to the
//! connection's [`Input`], and write whatever is queued for the connection in vectored writes.
//!
//! The task owns only the socket and the connection's input; everything other connections may
//! touch lives in the shard's slab entry.

use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::net::IpAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tracing::debug;

use crate::base::identity::Identity;
use crate::transport::Stream;
use crate::ws::frame;

use crate::runtime::AppId;
use crate::runtime::input::{End, Input};
use crate::runtime::shard::Shard;

/// Reads handled per turn before the task yields, so one busy client cannot hog the shard.
const READS_PER_POLL: usize = 16;
/// Bytes a connection we are closing may still send while we wait for its close frame; a peer
/// that keeps streaming past them is hung up on.
const CLOSE_DRAIN_LIMIT: usize = 256 * 1024;
/// Frames gathered into one vectored write.
const SLICES_PER_WRITE: usize = 64;

struct Connection {
    shard: Rc<Shard>,
    key: usize,
    stream: Stream,
    input: Input,
}

/// Runs a freshly upgraded connection that speaks `app` to the end. `preread` is what the HTTP
/// layer read past the handshake: it belongs to the first frames.
///
/// Set-up is synchronous so the returned future holds only the `Connection`: its size is part of
/// every idle connection's memory.
pub fn serve(
    shard: Rc<Shard>,
    stream: Stream,
    preread: Bytes,
    app: AppId,
    identity: Arc<Identity>,
    peer: IpAddr,
) -> impl Future<Output = ()> {
    let key = shard.register(app, identity, peer);
    // `preread` is a view into hyper's 8 KiB read buffer: copy out the few bytes it holds so
    // that buffer is freed now, not when the connection ends.
    let input = Input::new(app, shard.shared.config.max_message_size, preread.to_vec());
    Connection {
        shard,
        key,
        stream,
        input,
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
            let end = match self.input.process_leftover(&self.shard, self.key) {
                Ok(()) => poll_fn(|cx| self.poll_open(cx)).await,
                Err(end) => end,
            };
            // What it takes part in ends first, so rooms' members hear of the departure without
            // waiting for the handshake.
            self.closing();
            if !matches!(end, End::Gone) {
                // Boxed: the close handshake's timers would otherwise double the size of every
                // idle connection's task, though only closing connections need them.
                Box::pin(self.close(end)).await;
            }
            // `Drop` unregisters the connection.
        }
    }

    fn closing(&self) {
        self.shard
            .app(self.input.app)
            .closing(&self.shard, self.key);
    }

    fn poll_open(&mut self, cx: &mut Context<'_>) -> Poll<End> {
        self.shard.state().conns[self.key].outbound.clear_waker();
        self.shard.start_turn();
        self.input.start_turn();
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
            if self.input.turn_spent() {
                break;
            }
            if self.input.is_paused() {
                if let Err(end) = self.input.process_leftover(&self.shard, self.key) {
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
            let advanced = outbound.advance(written, &mut state.queued);
            if advanced.dropped > 0 {
                // Caught up after broadcasts were dropped for it: its app says so, if it can.
                let notice = self.shard.app(self.input.app).dropped(advanced.dropped);
                if let Some(notice) = notice {
                    outbound.push(notice, &mut state.queued);
                }
            }
            let metrics = self.shard.metrics();
            metrics.frames_sent.add(advanced.frames);
            metrics.bytes_sent.add(written as u64);
        }
        // TLS may hold records the socket did not take yet (a no-op on plain TCP).
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    /// One read from the socket, and the frames it completes.
    fn read(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), End>> {
        let shard = self.shard.clone();
        let read = self.stream.poll_read_into(cx, &mut shard.read_buf());
        let n = match read {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(Err(End::Gone)),
            Poll::Ready(Ok(n)) => n,
        };
        Poll::Ready(self.input.take_read(&shard, self.key, n))
    }

    /// Finishes the close handshake within `close_timeout`: send what is queued (our close frame
    /// last) and close our side; if our close went first, wait for the peer's answer (or its
    /// hang-up) before dropping the socket, since closing a socket with unread input sends a
    /// reset that can destroy our close frame before the peer reads it.
    async fn close(&mut self, end: End) {
        let deadline = tokio::time::Instant::now() + self.shard.shared.config.close_timeout;
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
            header: self.input.take_leftover(),
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
/// connection's app is told and the connection leaves its slab slot.
impl Drop for Connection {
    fn drop(&mut self) {
        self.closing();
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
