//! One WebSocket connection's task: read into the shard's buffer, decode frames in place, hand
//! messages to the endpoint, and write whatever is queued for the connection in vectored writes.
//!
//! The task owns only the socket, the frame decoder and the bytes of a frame cut off at the end
//! of a read; everything other connections may touch lives in the shard's slab entry.

use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::debug;

use crate::chat;
use crate::close::{CloseCode, CloseFrame};
use crate::frame::{self, Decoded, Decoder, Event, FrameError, OpCode};
use crate::protocol::ErrorReply;
use crate::shard::{Endpoint, Shard};

/// Reads handled per wake-up before the task yields, so one busy client cannot hog the shard.
const READS_PER_POLL: usize = 16;
/// Frames gathered into one vectored write.
const SLICES_PER_WRITE: usize = 64;

/// How the open phase of a connection ended.
enum End {
    /// The peer sent a close frame; we queued our answer.
    PeerClosed,
    /// We are failing the connection (protocol error, bad data); our close frame is queued.
    Failed,
    /// The socket hit EOF or an error: nothing more can be sent.
    Gone,
}

struct Connection {
    shard: Rc<Shard>,
    key: usize,
    endpoint: Endpoint,
    stream: TcpStream,
    decoder: Decoder,
    /// An incomplete frame left at the end of the last read (empty, unallocated, when idle).
    leftover: Vec<u8>,
}

/// Runs a freshly upgraded connection to the end. `preread` is what the HTTP layer read past the
/// handshake: it belongs to the first frames.
///
/// Set-up is synchronous so the returned future holds only the `Connection`: its size is part of
/// every idle connection's memory.
pub fn serve(
    shard: Rc<Shard>,
    stream: TcpStream,
    preread: Bytes,
    endpoint: Endpoint,
) -> impl Future<Output = ()> {
    let key = shard.register(endpoint);
    Connection {
        decoder: Decoder::new(shard.node.config.max_message_size),
        shard,
        key,
        endpoint,
        stream,
        // `preread` is a view into hyper's 8 KiB read buffer: copy out the few bytes it holds so
        // that buffer is freed now, not when the connection ends.
        leftover: preread.to_vec(),
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
            let end = match self.process_leftover() {
                Ok(()) => poll_fn(|cx| self.poll_open(cx)).await,
                Err(end) => end,
            };
            if self.endpoint == Endpoint::Chat {
                // Before the close handshake, so no broadcast is queued to a closing connection.
                chat::leave_all_rooms(&self.shard, self.key);
            }
            if !matches!(end, End::Gone) {
                // Boxed: the close handshake's timers would otherwise double the size of every
                // idle connection's task, though only closing connections need them.
                Box::pin(self.close(end)).await;
            }
            self.shard.unregister(self.key);
        }
    }

    fn poll_open(&mut self, cx: &mut Context<'_>) -> Poll<End> {
        self.shard.state().conns[self.key]
            .outbound
            .set_waker(cx.waker());
        for _ in 0..READS_PER_POLL {
            if let Poll::Ready(Err(e)) = self.poll_flush(cx) {
                debug!(error = %e, "write failed");
                return Poll::Ready(End::Gone);
            }
            match self.stream.poll_read_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(_)) => return Poll::Ready(End::Gone),
                Poll::Ready(Ok(())) => {
                    if let Err(end) = self.read() {
                        return Poll::Ready(end);
                    }
                }
            }
        }
        // Out of budget: write what the reads produced, then let the other connections run.
        if let Poll::Ready(Err(_)) = self.poll_flush(cx) {
            return Poll::Ready(End::Gone);
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Writes queued frames until the queue is empty or the socket is full.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut state = self.shard.state();
        let outbound = &mut state.conns[self.key].outbound;
        while !outbound.is_empty() {
            let mut slices = [IoSlice::new(&[]); SLICES_PER_WRITE];
            let n = outbound.slices(&mut slices);
            let written = ready!(Pin::new(&mut self.stream).poll_write_vectored(cx, &slices[..n]))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            outbound.advance(written);
        }
        Poll::Ready(Ok(()))
    }

    /// One read from the socket, and the frames it completes.
    fn read(&mut self) -> Result<(), End> {
        let shard = self.shard.clone();
        let mut buf = shard.read_buf();
        let n = match self.stream.try_read(&mut buf) {
            Ok(0) => return Err(End::Gone),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(_) => return Err(End::Gone),
        };
        if self.leftover.is_empty() {
            // The common case: frames are decoded straight out of the shared buffer.
            let consumed = self.decode_frames(&mut buf[..n])?;
            self.leftover.extend_from_slice(&buf[consumed..n]);
            Ok(())
        } else {
            drop(buf);
            self.leftover.extend_from_slice(&shard.read_buf()[..n]);
            self.process_leftover()
        }
    }

    /// Decodes what has collected in `leftover`, keeping only an incomplete tail.
    fn process_leftover(&mut self) -> Result<(), End> {
        if self.leftover.is_empty() {
            return Ok(());
        }
        let mut pending = std::mem::take(&mut self.leftover);
        let consumed = self.decode_frames(&mut pending)?;
        pending.drain(..consumed);
        if !pending.is_empty() {
            self.leftover = pending;
        }
        Ok(())
    }

    /// Decodes and handles every whole frame at the front of `buf`; returns the bytes consumed.
    fn decode_frames(&mut self, buf: &mut [u8]) -> Result<usize, End> {
        let mut pos = 0;
        loop {
            let (consumed, event) = match self.decoder.decode(&mut buf[pos..]) {
                Ok(Decoded::Incomplete) => return Ok(pos),
                Ok(Decoded::Frame { consumed, event }) => (consumed, event),
                Err(error) => return Err(self.fail(error)),
            };
            pos += consumed;
            match event {
                Event::Message { text, mut payload } => match self.endpoint {
                    Endpoint::Chat if text => {
                        chat::on_text(&self.shard, self.key, payload.as_mut_slice())
                    }
                    Endpoint::Chat => self
                        .shard
                        .send_error(self.key, ErrorReply::BinaryNotSupported),
                    Endpoint::Echo => {
                        let opcode = if text { OpCode::Text } else { OpCode::Binary };
                        self.shard
                            .send(self.key, frame::encode(opcode, payload.as_slice()));
                    }
                },
                Event::Ping(data) => self.shard.send(self.key, frame::encode(OpCode::Pong, data)),
                Event::Pong | Event::Fragment => {}
                Event::Close(frame) => {
                    // Answer with the peer's code, as RFC 6455 §5.5.1 suggests.
                    let code = frame.map_or(CloseCode::NORMAL, |CloseFrame { code, .. }| code);
                    self.shard.send(self.key, frame::encode_close(code, ""));
                    return Err(End::PeerClosed);
                }
            }
        }
    }

    fn fail(&mut self, error: FrameError) -> End {
        debug!(
            code = error.code.0,
            reason = error.reason,
            "failing connection"
        );
        self.shard
            .send(self.key, frame::encode_close(error.code, error.reason));
        End::Failed
    }

    /// Finishes the close handshake: send what is queued (our close frame last), close our side,
    /// and for a failed connection wait (bounded) for the peer to hang up too.
    async fn close(&mut self, end: End) {
        let timeout = self.shard.node.config.close_timeout;
        let flushed = tokio::time::timeout(timeout, poll_fn(|cx| self.poll_flush(cx))).await;
        if !matches!(flushed, Ok(Ok(()))) {
            return;
        }
        let _ = self.stream.shutdown().await;
        if let End::Failed = end {
            // Closing a socket with unread input sends a reset, which can destroy our close frame
            // before the peer reads it: drain until the peer closes.
            let _ = tokio::time::timeout(timeout, self.drain()).await;
        }
    }

    async fn drain(&mut self) {
        loop {
            if self.stream.readable().await.is_err() {
                return;
            }
            match self.stream.try_read(&mut self.shard.read_buf()) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    }
}
