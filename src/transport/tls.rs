//! TLS over a connection's socket with rustls's unbuffered API: the session holds only its
//! cryptographic state, and the buffers are wsgate's. Records are read into the shard thread's
//! scratch buffer and decrypted there; a connection keeps bytes only while it must — what rustls
//! has not released of what was received (the start of a record, or the records of a handshake
//! message being joined: at most one record's worth), ciphertext the socket has not taken yet,
//! plaintext its reader had no room for — and gives them back once used. An idle TLS connection
//! holds no buffer (rustls's buffered connection keeps at least 4 KiB for reading).
//!
//! rustls keeps positions in the received bytes while it joins a handshake message, so it is
//! always driven over exactly what it has not discarded, and never again once it has failed.

use std::cell::RefCell;
use std::io::{self, IoSlice};
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::BufMut;
use rustls::ServerConfig;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, WriteTraffic,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Socket;

/// The largest TLS record on the wire: header, 16 KiB of plaintext, and what the cipher adds.
const MAX_RECORD: usize = 5 + (1 << 14) + 256;
/// Plaintext gathered from a vectored write into one record: many small frames (a fan-out's)
/// cost one encryption and 22 bytes of record overhead, not one each.
const RECORD_PLAINTEXT: usize = 1 << 14;
/// The largest handshake flight a client may send before the handshake completes.
const MAX_HANDSHAKE_BYTES: usize = 64 * 1024;
/// What one read takes from the socket: a record's worth. It bounds the decryptions of one read
/// whatever the records' sizes (at most ~750 records of one byte, or key updates), as the
/// connection's turn bounds its reads.
const READ_WINDOW: usize = MAX_RECORD;
/// Bytes a connection may hold of what is not yet a whole message: the start of one record, or
/// the records of a post-handshake message being joined (a key update fits in one).
const MAX_HELD: usize = MAX_RECORD;
/// Socket reads one poll makes while they yield no application data (half records, key
/// updates), before giving the other connections of the shard their turn. (Records that carry
/// nothing are rustls's to refuse: a few dozen in a row end the session.)
const READS_PER_POLL: u32 = 4;
/// Ciphertext a connection processes before it gives the other connections of its shard their
/// turn. Decryption costs per record as much as per byte: a turn of one-byte records (~1,500)
/// costs ~0.3 ms, where the connection's own turn (16 reads) would let it take ~2 ms, and the
/// shard's runtime only looks at other sockets every 61 turns.
const TURN_BYTES: usize = 2 * READ_WINDOW;

/// A TLS session on a socket, after its handshake.
pub struct TlsStream<S = TcpStream> {
    tcp: S,
    session: UnbufferedServerConnection,
    /// What rustls has not discarded of what was received (see the module's documentation).
    /// After the handshake it may also hold complete records the client sent with its end.
    incoming: Vec<u8>,
    /// Ciphertext waiting for the socket.
    outgoing: Vec<u8>,
    /// Decrypted bytes no reader has taken yet, from `plaintext_at`.
    plaintext: Vec<u8>,
    plaintext_at: usize,
    /// The peer sent close_notify (or the socket ended): reads return 0 from now on.
    read_closed: bool,
    /// The session failed (its alert, if any, is in `outgoing`): it is not driven again.
    failed: bool,
    close_notify_sent: bool,
    /// Ciphertext processed since a read last returned `Pending` (see [`TURN_BYTES`]).
    turn_bytes: usize,
}

/// Per thread (each shard is one), the buffers TLS works in, lent to one connection at a time.
struct Scratch {
    /// Ciphertext being read: what a connection holds, then what the socket had.
    read: Box<[u8]>,
    /// Plaintext gathered from a vectored write.
    plain: Vec<u8>,
    /// Ciphertext being written.
    cipher: Vec<u8>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch {
        read: vec![0; MAX_HELD + READ_WINDOW].into_boxed_slice(),
        plain: Vec::with_capacity(RECORD_PLAINTEXT),
        cipher: Vec::with_capacity(MAX_RECORD),
    });
}

fn too_much_held() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "TLS: more than a record held without a message completing",
    )
}

fn failed_before() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the TLS session failed")
}

fn tls_error(e: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Runs `encode` into `out`'s end, growing it to what it asks for (first trying the room its
/// allocation has: the thread's cipher buffer is sized for a whole record).
fn encode_into<E>(
    out: &mut Vec<u8>,
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, E>,
    too_small: impl Fn(&E) -> Option<usize>,
) -> io::Result<()>
where
    E: std::error::Error + Send + Sync + 'static,
{
    let start = out.len();
    let mut room = (out.capacity() - start).max(256);
    loop {
        out.resize(start + room, 0);
        match encode(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(e) => match too_small(&e) {
                Some(needed) if needed > room => room = needed,
                _ => {
                    out.truncate(start);
                    return Err(tls_error(e));
                }
            },
        }
    }
}

fn encode_too_small(e: &EncodeError) -> Option<usize> {
    match e {
        EncodeError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Some(*required_size)
        }
        _ => None,
    }
}

fn encrypt_too_small(e: &EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Some(*required_size)
        }
        _ => None,
    }
}

/// Where [`process`] stopped.
#[derive(PartialEq, Eq)]
enum Stop {
    /// Every complete record was processed; application data may be written.
    Writable,
    /// The handshake needs more from the peer.
    Blocked,
    /// The peer closed its side.
    Closed,
}

/// Where decrypted application data goes: the reader's buffer, then (what does not fit) the
/// connection's own.
struct PlainSink<'a> {
    out: &'a mut [u8],
    filled: usize,
}

/// Runs the session over `input` until it has processed every complete record in it: handshake
/// records answered (into `outgoing`), application data given to `sink` (overflow, or all
/// without a sink, into `plaintext`). Returns how much of `input` rustls discarded and why it
/// stopped. On an error the session's alert is put in `outgoing`; the session must not be
/// driven again. A free function over the stream's fields, so that `input` may be the thread's
/// scratch buffer while the stream's own buffers are written.
fn process(
    session: &mut UnbufferedServerConnection,
    outgoing: &mut Vec<u8>,
    plaintext: &mut Vec<u8>,
    input: &mut [u8],
    mut sink: Option<&mut PlainSink<'_>>,
) -> io::Result<(usize, Stop)> {
    let mut consumed = 0;
    loop {
        let status = session.process_tls_records(&mut input[consumed..]);
        let mut discard = status.discard;
        let state = match status.state {
            Ok(state) => state,
            Err(e) => {
                consumed += discard;
                take_alert(session, outgoing, &mut input[consumed..]);
                return Err(tls_error(e));
            }
        };
        let stop = match state {
            ConnectionState::ReadTraffic(mut traffic) => {
                while let Some(record) = traffic.next_record() {
                    let record = record.map_err(tls_error)?;
                    discard += record.discard;
                    let payload = record.payload;
                    match sink.as_deref_mut() {
                        Some(sink) => {
                            let fits = payload.len().min(sink.out.len() - sink.filled);
                            sink.out[sink.filled..sink.filled + fits]
                                .copy_from_slice(&payload[..fits]);
                            sink.filled += fits;
                            plaintext.extend_from_slice(&payload[fits..]);
                        }
                        None => plaintext.extend_from_slice(payload),
                    }
                }
                None
            }
            ConnectionState::EncodeTlsData(mut encode) => {
                encode_into(outgoing, |buf| encode.encode(buf), encode_too_small)?;
                None
            }
            // Sent by whoever flushes `outgoing` next, before anything else is written.
            ConnectionState::TransmitTlsData(transmit) => {
                transmit.done();
                None
            }
            ConnectionState::WriteTraffic(_) => Some(Stop::Writable),
            ConnectionState::BlockedHandshake => Some(Stop::Blocked),
            ConnectionState::PeerClosed | ConnectionState::Closed => Some(Stop::Closed),
            // Early data is not enabled; anything else is a state this code does not know.
            _ => return Err(io::Error::other("unexpected TLS state")),
        };
        consumed += discard;
        if let Some(stop) = stop {
            return Ok((consumed, stop));
        }
    }
}

/// After an error: the fatal alert rustls queued, into `outgoing` (the session hands out what
/// it has to send before it looks at `input` again).
fn take_alert(session: &mut UnbufferedServerConnection, outgoing: &mut Vec<u8>, input: &mut [u8]) {
    if let Ok(ConnectionState::EncodeTlsData(mut alert)) = session.process_tls_records(input).state
    {
        let _ = encode_into(outgoing, |buf| alert.encode(buf), encode_too_small);
    }
}

/// Handshakes with the client on `tcp`.
pub async fn accept(mut tcp: TcpStream, config: Arc<ServerConfig>) -> io::Result<TlsStream> {
    let mut session = UnbufferedServerConnection::new(config).map_err(tls_error)?;
    let mut incoming = Vec::new();
    let mut outgoing = Vec::new();
    let mut plaintext = Vec::new();
    loop {
        let processed = process(
            &mut session,
            &mut outgoing,
            &mut plaintext,
            &mut incoming,
            None,
        );
        let stop = match processed {
            Ok((consumed, stop)) => {
                incoming.drain(..consumed);
                stop
            }
            Err(e) => {
                // The alert, so the client learns why (no shared version or cipher suite).
                let _ = tcp.write_all(&outgoing).await;
                return Err(e);
            }
        };
        if !outgoing.is_empty() {
            tcp.write_all(&outgoing).await?;
            outgoing.clear();
        }
        match stop {
            Stop::Writable => break,
            Stop::Closed => return Err(io::ErrorKind::UnexpectedEof.into()),
            Stop::Blocked if incoming.len() >= MAX_HANDSHAKE_BYTES => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "TLS handshake too large",
                ));
            }
            Stop::Blocked => {
                if tcp.read_buf(&mut (&mut incoming).limit(4096)).await? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
        }
    }
    // The handshake's buffers go; what the client sent after it (its request) stays.
    Ok(TlsStream {
        tcp,
        session,
        incoming: shrunk(incoming),
        outgoing: Vec::new(),
        plaintext: shrunk(plaintext),
        plaintext_at: 0,
        read_closed: false,
        failed: false,
        close_notify_sent: false,
        turn_bytes: 0,
    })
}

/// `bytes` in an allocation of their size (none when empty).
fn shrunk(mut bytes: Vec<u8>) -> Vec<u8> {
    bytes.shrink_to_fit();
    bytes
}

impl<S> TlsStream<S> {
    pub fn socket(&self) -> &S {
        &self.tcp
    }

    /// The same session over another socket (the handshake's, handed to an event loop).
    pub fn map_socket<T>(
        self,
        move_to: impl FnOnce(S) -> io::Result<T>,
    ) -> io::Result<TlsStream<T>> {
        Ok(TlsStream {
            tcp: move_to(self.tcp)?,
            session: self.session,
            incoming: self.incoming,
            outgoing: self.outgoing,
            plaintext: self.plaintext,
            plaintext_at: self.plaintext_at,
            read_closed: self.read_closed,
            failed: self.failed,
            close_notify_sent: self.close_notify_sent,
            turn_bytes: self.turn_bytes,
        })
    }
}

impl<S: Socket> TlsStream<S> {
    /// Reads decrypted bytes into `out`: `Ready(Ok(0))` once the peer closed, `Pending` (the
    /// task woken by the socket) while nothing is available.
    pub fn poll_read_plain(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        if self.plaintext_at < self.plaintext.len() {
            let pending = &self.plaintext[self.plaintext_at..];
            let n = pending.len().min(out.len());
            out[..n].copy_from_slice(&pending[..n]);
            self.plaintext_at += n;
            if self.plaintext_at == self.plaintext.len() {
                self.plaintext = Vec::new();
                self.plaintext_at = 0;
            }
            return Poll::Ready(Ok(n));
        }
        if self.failed {
            return Poll::Ready(Err(failed_before()));
        }
        if self.read_closed || out.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if self.turn_bytes >= TURN_BYTES {
            self.turn_bytes = 0;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let read = SCRATCH.with_borrow_mut(|scratch| self.read_into(cx, &mut scratch.read, out));
        if read.is_pending() {
            self.turn_bytes = 0;
        }
        if let Poll::Ready(Err(_)) = &read {
            self.failed = true;
            // The alert, if there is one, now (best effort: the connection is ending).
            let _ = self.poll_send_outgoing(cx);
        }
        read
    }

    fn read_into(
        &mut self,
        cx: &mut Context<'_>,
        work: &mut [u8],
        out: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let mut sink = PlainSink { out, filled: 0 };
        // What is held first, where it is: records the client sent with the handshake's end
        // (its request), or the start of one.
        if !self.incoming.is_empty() {
            let (consumed, stop) = process(
                &mut self.session,
                &mut self.outgoing,
                &mut self.plaintext,
                &mut self.incoming,
                Some(&mut sink),
            )?;
            self.incoming.drain(..consumed);
            if let Some(done) = self.after_processing(cx, stop, &sink) {
                if self.incoming.is_empty() {
                    self.incoming = Vec::new();
                }
                return done;
            }
            if self.incoming.len() > MAX_HELD {
                return Poll::Ready(Err(too_much_held()));
            }
        }
        // Then the socket, a record's worth at a time, after what is held.
        let mut filled = self.incoming.len();
        work[..filled].copy_from_slice(&self.incoming);
        let mut reads = 0;
        let result = loop {
            if reads == READS_PER_POLL {
                cx.waker().wake_by_ref();
                break Poll::Pending;
            }
            reads += 1;
            let window = filled..filled + READ_WINDOW;
            match self.tcp.poll_recv(cx, &mut work[window]) {
                Poll::Pending => break Poll::Pending,
                Poll::Ready(Err(e)) => break Poll::Ready(Err(e)),
                // The socket ended without close_notify: an end all the same (what was received
                // was authenticated record by record). What is held stays: the session may keep
                // positions in it, and is still asked to write (close_notify).
                Poll::Ready(Ok(0)) => {
                    self.read_closed = true;
                    break Poll::Ready(Ok(0));
                }
                Poll::Ready(Ok(n)) => filled += n,
            }
            let processed = process(
                &mut self.session,
                &mut self.outgoing,
                &mut self.plaintext,
                &mut work[..filled],
                Some(&mut sink),
            );
            let (consumed, stop) = match processed {
                Ok(done) => done,
                Err(e) => break Poll::Ready(Err(e)),
            };
            self.turn_bytes += consumed;
            work.copy_within(consumed..filled, 0);
            filled -= consumed;
            if filled > MAX_HELD {
                break Poll::Ready(Err(too_much_held()));
            }
            if let Some(done) = self.after_processing(cx, stop, &sink) {
                break done;
            }
        };
        if filled == 0 {
            self.incoming = Vec::new();
        } else {
            self.incoming.clear();
            self.incoming.extend_from_slice(&work[..filled]);
        }
        result
    }

    /// After records were processed: sends what they made the session send (an alert; a key
    /// update's answer goes with the next record written), and says what the read returns, if
    /// it is done.
    fn after_processing(
        &mut self,
        cx: &mut Context<'_>,
        stop: Stop,
        sink: &PlainSink<'_>,
    ) -> Option<Poll<io::Result<usize>>> {
        if stop == Stop::Closed {
            self.read_closed = true;
        }
        // Tried now, else at the next flush.
        if let Poll::Ready(Err(e)) = self.poll_send_outgoing(cx) {
            return Some(Poll::Ready(Err(e)));
        }
        (sink.filled > 0 || self.read_closed).then_some(Poll::Ready(Ok(sink.filled)))
    }

    /// Writes what waits in `outgoing`; `Ready(Ok)` once all of it is sent.
    fn poll_send_outgoing(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut sent = 0;
        let result = loop {
            if sent == self.outgoing.len() {
                break Poll::Ready(Ok(()));
            }
            match self
                .tcp
                .poll_send(cx, &[IoSlice::new(&self.outgoing[sent..])])
            {
                Poll::Pending => break Poll::Pending,
                Poll::Ready(Ok(0)) => break Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => sent += n,
                Poll::Ready(Err(e)) => break Poll::Ready(Err(e)),
            }
        };
        if sent == self.outgoing.len() {
            self.outgoing = Vec::new();
        } else {
            self.outgoing.drain(..sent);
        }
        result
    }

    /// Encrypts what `bufs` hold (as much as one record takes, gathered) and sends it; what the
    /// socket does not take waits in `outgoing`, written before anything else. Returns the
    /// plaintext bytes taken.
    pub fn poll_write_plain(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_send_outgoing(cx))?;
        let taken = SCRATCH.with_borrow_mut(|scratch| -> io::Result<usize> {
            let Scratch { plain, cipher, .. } = scratch;
            plain.clear();
            for buf in bufs {
                let room = RECORD_PLAINTEXT - plain.len();
                if room == 0 {
                    break;
                }
                plain.extend_from_slice(&buf[..buf.len().min(room)]);
            }
            if plain.is_empty() {
                return Ok(0);
            }
            cipher.clear();
            self.write_with(cipher, |traffic, cipher| {
                encode_into(cipher, |buf| traffic.encrypt(plain, buf), encrypt_too_small)
            })?;
            // What the socket does not take now waits in `outgoing` (and the socket's readiness
            // calls the writer back for it).
            let sent = match self.tcp.poll_send(cx, &[IoSlice::new(cipher)]) {
                Poll::Ready(Ok(n)) => n,
                Poll::Pending => 0,
                Poll::Ready(Err(e)) => return Err(e),
            };
            self.outgoing.extend_from_slice(&cipher[sent..]);
            Ok(plain.len())
        })?;
        Poll::Ready(Ok(taken))
    }

    /// Gets the session to where it may write, then writes with `write` into `out`: anything the
    /// session must send first goes into `out` before. Driven over the bytes the connection
    /// holds (see the module's documentation); their data, if any, is kept for the reader.
    fn write_with(
        &mut self,
        out: &mut Vec<u8>,
        mut write: impl FnMut(
            &mut WriteTraffic<'_, ServerConnectionData>,
            &mut Vec<u8>,
        ) -> io::Result<()>,
    ) -> io::Result<()> {
        if self.failed {
            return Err(failed_before());
        }
        loop {
            let status = self.session.process_tls_records(&mut self.incoming);
            let mut discard = status.discard;
            let Ok(state) = status.state else {
                self.failed = true;
                return Err(failed_before());
            };
            let done = match state {
                ConnectionState::WriteTraffic(mut traffic) => Some(write(&mut traffic, out)),
                ConnectionState::EncodeTlsData(mut encode) => {
                    encode_into(out, |buf| encode.encode(buf), encode_too_small)?;
                    None
                }
                ConnectionState::TransmitTlsData(transmit) => {
                    transmit.done();
                    None
                }
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let record = record.map_err(tls_error)?;
                        discard += record.discard;
                        self.plaintext.extend_from_slice(record.payload);
                    }
                    None
                }
                // Said once: the reader learns it from `read_closed`.
                ConnectionState::PeerClosed => {
                    self.read_closed = true;
                    None
                }
                _ => Some(Err(io::ErrorKind::BrokenPipe.into())),
            };
            self.incoming.drain(..discard);
            if let Some(done) = done {
                return done;
            }
        }
    }

    /// Sends whatever waits for the socket.
    pub fn poll_flush_plain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_send_outgoing(cx)
    }

    /// Sends close_notify (once, unless the session failed), then ends the socket's sending side.
    pub fn poll_shutdown_plain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.close_notify_sent && !self.failed {
            self.close_notify_sent = true;
            let mut outgoing = std::mem::take(&mut self.outgoing);
            // A session that cannot say it (it failed meanwhile) is closed without it.
            let _ = self.write_with(&mut outgoing, |traffic, out| {
                encode_into(
                    out,
                    |buf| traffic.queue_close_notify(buf),
                    encrypt_too_small,
                )
            });
            self.outgoing = outgoing;
        }
        ready!(self.poll_send_outgoing(cx))?;
        self.tcp.poll_shutdown_send(cx)
    }
}

impl<S> std::fmt::Debug for TlsStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream").finish_non_exhaustive()
    }
}
