//! permessage-deflate (RFC 7692): a client's offers at its upgrade, agreed or declined; data
//! frames compressed for the connections that agreed — a publication once for all of them —
//! and their compressed messages inflated within the message size limit.
//!
//! The gateway always answers with `server_no_context_takeover` and `client_no_context_takeover`:
//! every message is compressed on its own, so one compressed publication is valid on every
//! connection, and no connection keeps a compression window. Each thread has its compressors
//! (one per level and window size in use) and one inflater, used by all its connections in turn:
//! a connection that agreed to compression costs no memory of its own for it.

use std::cell::RefCell;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::close::{CloseCode, FrameError};
use super::frame::{FrameBuilder, OpCode, RSV1, server_payload};

/// Payloads shorter than these go out uncompressed. A compression clears the compressor's hash
/// table, ~2.5 µs however short the message; what it saves on chat JSON (BENCHMARKS.md,
/// `benches/deflate.rs`): a publication (the tighter level, paid once for all its recipients)
/// of 130 bytes shrinks by 16%, of 190 by 22%, of 260 by 31%; a reply (the faster level, paid
/// per message) of 130–190 bytes not at all, of 260 by 15%, of 510 by 27%.
pub const MIN_SHARED_PAYLOAD: usize = 128;
pub const MIN_OWN_PAYLOAD: usize = 256;

/// The largest window (bits) either side may use: the DEFLATE maximum, 32 KiB.
const MAX_WINDOW_BITS: u8 = 15;

/// What RFC 7692 §7.2.1 has the sender strip from the end of each compressed message (the end
/// of a sync flush), and the receiver put back.
const SYNC_TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The inflater's output buffer and the compressors' are given back past this size once a
/// message is handled (a message at the default 64 KiB limit keeps using the same buffer).
const KEEP_BUFFER: usize = 128 * 1024;

/// How hard a message is compressed. zlib-rs' level 1 uses fixed Huffman codes only (chat JSON
/// of 430 bytes: 76% of its size in ~3.5 µs); level 2 builds the message's own codes (59% in
/// ~10 µs; levels up to 9 shrink it no further here). See BENCHMARKS.md.
#[derive(Clone, Copy)]
enum Level {
    /// A frame for many connections: compressed once, its saving paid out to every recipient.
    Shared = 2,
    /// A frame for one connection: the cost is paid per message.
    Own = 1,
}

/// Whether a connection compresses, and the largest window its server-to-client messages may
/// use. One byte: it sits in every connection's outbound queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Deflate {
    /// `0`: not negotiated; else 8 to 15.
    window_bits: u8,
}

impl Deflate {
    pub const OFF: Deflate = Deflate { window_bits: 0 };

    pub fn is_on(self) -> bool {
        self.window_bits != 0
    }

    /// Whether a message of `len` bytes compressed with the largest window (the shared
    /// compression of a publication) is valid for this connection: no back-reference can reach
    /// further than the message is long.
    fn takes_shared(self, len: usize) -> bool {
        self.window_bits == MAX_WINDOW_BITS || len <= 1 << self.window_bits
    }

    /// The window to compress with for this connection alone. zlib cannot compress with 8 bits;
    /// with 9 it never refers back more than 250 bytes (its window less its 262-byte lookahead),
    /// which a 256-byte window decodes.
    fn own_window_bits(self) -> u8 {
        self.window_bits.max(9)
    }
}

/// An accepted offer: what the connection agreed to, and the `Sec-WebSocket-Extensions` value
/// of the answer.
#[derive(Debug, PartialEq, Eq)]
pub struct Agreement {
    pub deflate: Deflate,
    pub response: String,
}

/// Takes the first `permessage-deflate` offer in the client's `Sec-WebSocket-Extensions` header
/// values that the gateway can honour; `None` declines them all (the connection goes on
/// uncompressed). An offer with an unknown parameter, a repeated one, or a value out of range is
/// declined, never accepted in part (RFC 7692 §5.1); so is one that does not parse.
pub fn negotiate<'a>(headers: impl IntoIterator<Item = &'a [u8]>) -> Option<Agreement> {
    for header in headers {
        let Ok(header) = std::str::from_utf8(header) else {
            continue;
        };
        for offer in split_unquoted(header, b',') {
            if let Some(agreement) = accept(offer) {
                return Some(agreement);
            }
        }
    }
    None
}

/// The answer to one offer (one element of the extension list), if it is a valid
/// `permessage-deflate` offer.
fn accept(offer: &str) -> Option<Agreement> {
    let mut parts = split_unquoted(offer, b';');
    let name = parts.next()?.trim();
    if !name.eq_ignore_ascii_case("permessage-deflate") {
        return None;
    }
    let mut seen = [false; 4];
    let mut server_window = None;
    for param in parts {
        let (key, value) = match param.split_once('=') {
            Some((key, value)) => (key.trim(), Some(unquote(value.trim())?)),
            None => (param.trim(), None),
        };
        let index = [
            "server_no_context_takeover",
            "client_no_context_takeover",
            "server_max_window_bits",
            "client_max_window_bits",
        ]
        .iter()
        .position(|known| *known == key)?;
        if std::mem::replace(&mut seen[index], true) {
            return None;
        }
        match (index, value) {
            (0 | 1, None) => {}
            (2, Some(value)) => server_window = Some(window_bits(value)?),
            // A hint that the client can limit its window: the gateway's inflater takes any.
            (3, None) => {}
            (3, Some(value)) => {
                window_bits(value)?;
            }
            _ => return None,
        }
    }
    let window_bits = server_window.unwrap_or(MAX_WINDOW_BITS);
    let mut response =
        String::from("permessage-deflate; server_no_context_takeover; client_no_context_takeover");
    if let Some(bits) = server_window {
        response.push_str(&format!("; server_max_window_bits={bits}"));
    }
    Some(Agreement {
        deflate: Deflate { window_bits },
        response,
    })
}

/// A window size parameter: 8 to 15, in decimal without leading zeros (RFC 7692 §7.1.2).
fn window_bits(value: &str) -> Option<u8> {
    let bits: u8 = value.parse().ok()?;
    let canonical = value.bytes().all(|b| b.is_ascii_digit()) && !value.starts_with('0');
    (canonical && (8..=15).contains(&bits)).then_some(bits)
}

/// A parameter value: a token, or a quoted string (RFC 7230's, with backslash escapes) whose
/// content is a token. `None` for anything else.
fn unquote(value: &str) -> Option<&str> {
    let inner = match value.strip_prefix('"') {
        Some(rest) => rest.strip_suffix('"')?,
        None => value,
    };
    // A window size is all a value here can be: digits, which need no escapes.
    (!inner.is_empty() && inner.bytes().all(is_tchar)).then_some(inner)
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Splits at `separator` outside quoted strings (an unterminated quote runs to the end).
fn split_unquoted(s: &str, separator: u8) -> impl Iterator<Item = &str> {
    let mut rest = Some(s);
    std::iter::from_fn(move || {
        let s = rest?;
        let (mut quoted, mut escaped) = (false, false);
        for (i, b) in s.bytes().enumerate() {
            match b {
                _ if escaped => escaped = false,
                b'\\' if quoted => escaped = true,
                b'"' => quoted = !quoted,
                _ if b == separator && !quoted => {
                    rest = Some(&s[i + 1..]);
                    return Some(&s[..i]);
                }
                _ => {}
            }
        }
        rest = None;
        Some(s)
    })
}

/// A data frame for many connections (a publication, a room message, kept in the room's history
/// for replays): its plain frame, and its compressed twin, made once, by the first connection
/// that needs it, on whichever shard. A handle: clones share both.
#[derive(Clone, Debug)]
pub struct Prepared(Arc<PreparedFrame>);

#[derive(Debug)]
struct PreparedFrame {
    plain: Bytes,
    /// Compressed with the largest window: valid for every connection whose window the message
    /// fits in. `None` inside: not worth compressing (too short, or it did not shrink).
    deflated: OnceLock<Option<Bytes>>,
    /// Compressed with a smaller window (9 to 14 bits; 8 takes 9's), for the connections that
    /// asked for one the message does not fit in: made for the first of them, so a room's
    /// members cannot make the gateway compress a publication more than seven times.
    smaller: OnceLock<Box<[OnceLock<Option<Bytes>>; 6]>>,
}

/// The same frame, compressed yet or not.
impl PartialEq for Prepared {
    fn eq(&self, other: &Self) -> bool {
        self.plain() == other.plain()
    }
}

impl Eq for Prepared {}

impl Prepared {
    pub fn new(plain: Bytes) -> Self {
        Prepared(Arc::new(PreparedFrame {
            plain,
            deflated: OnceLock::new(),
            smaller: OnceLock::new(),
        }))
    }

    pub fn plain(&self) -> &Bytes {
        &self.0.plain
    }

    /// The frame as `deflate` takes it: compressed with the largest window, or with the smaller
    /// one it asked for when the message does not fit in that, or plain. `compressing` is called
    /// for each compression made (for the metrics).
    pub fn for_connection(&self, deflate: Deflate, compressing: impl FnOnce()) -> Bytes {
        let frame = &*self.0;
        let Some((opcode, payload)) = worth_compressing(&frame.plain, deflate, MIN_SHARED_PAYLOAD)
        else {
            return frame.plain.clone();
        };
        let window_bits = match deflate.takes_shared(payload.len()) {
            true => MAX_WINDOW_BITS,
            false => deflate.own_window_bits(),
        };
        let slot = match window_bits {
            MAX_WINDOW_BITS => &frame.deflated,
            smaller => &frame.smaller.get_or_init(Box::default)[usize::from(smaller - 9)],
        };
        let compressed = slot.get_or_init(|| {
            compressing();
            compress(opcode, &payload, window_bits, Level::Shared)
        });
        compressed.clone().unwrap_or_else(|| frame.plain.clone())
    }
}

/// A frame for one connection: compressed if it agreed to compression and the frame is a data
/// frame worth compressing, else the frame itself.
pub fn for_connection(frame: Bytes, deflate: Deflate) -> Bytes {
    match worth_compressing(&frame, deflate, MIN_OWN_PAYLOAD) {
        Some((opcode, payload)) => {
            compress(opcode, &payload, deflate.own_window_bits(), Level::Own).unwrap_or(frame)
        }
        None => frame,
    }
}

/// The opcode and payload of a plain, unfragmented server frame worth compressing for a
/// connection that agreed to `deflate`: a data frame of at least `min` bytes, not compressed
/// already.
fn worth_compressing(frame: &Bytes, deflate: Deflate, min: usize) -> Option<(OpCode, Bytes)> {
    let first = *frame.first()?;
    if !deflate.is_on() || first & RSV1 != 0 {
        return None;
    }
    let opcode = OpCode::from_bits(first & 0x0f)
        .filter(|opcode| matches!(opcode, OpCode::Text | OpCode::Binary))?;
    let payload = server_payload(frame);
    (payload.len() >= min).then_some((opcode, payload))
}

thread_local! {
    /// This thread's compressors, made on first use.
    static COMPRESSORS: RefCell<Compressors> = const {
        RefCell::new(Compressors {
            by_level: [const { [const { None }; 7] }; 2],
            scratch: Vec::new(),
        })
    };
    /// This thread's inflater (largest window: it takes whatever window a client used).
    static INFLATER: RefCell<Inflater> = RefCell::new(Inflater::new());
}

/// A thread's compressors: by level (own, shared) and window bits (9 to 15), usually two
/// (~300 KiB each), and the buffer they compress into.
struct Compressors {
    by_level: [[Option<Compress>; 7]; 2],
    /// Compressed output, copied from here into a frame of its exact size (a frame keeps its
    /// whole allocation, and queues charge frames by their length).
    scratch: Vec<u8>,
}

/// A compressed data frame (RSV1 set) of `payload`, or `None` if it would be no smaller.
fn compress(opcode: OpCode, payload: &[u8], window_bits: u8, level: Level) -> Option<Bytes> {
    COMPRESSORS.with_borrow_mut(|compressors| {
        let Compressors { by_level, scratch } = compressors;
        let by_window = &mut by_level[matches!(level, Level::Shared) as usize];
        let slot = &mut by_window[usize::from(window_bits - 9)];
        let compressor = slot.get_or_insert_with(|| {
            Compress::new_with_window_bits(Compression::new(level as u32), false, window_bits)
        });
        compressor.reset();
        scratch.clear();
        // Worth it only if it shrinks: the output may not pass the payload's size and the tail.
        let limit = payload.len() + SYNC_TAIL.len();
        scratch.reserve(limit);
        let mut input = payload;
        let compressed = loop {
            let before = (compressor.total_in(), compressor.total_out());
            let status = compressor.compress_vec(input, scratch, FlushCompress::Sync);
            let taken = (compressor.total_in() - before.0) as usize;
            let progress = taken > 0 || compressor.total_out() > before.1;
            input = &input[taken..];
            match status {
                _ if scratch.len() >= limit => break None,
                // Room was left: the sync flush is complete.
                Ok(_) if input.is_empty() && scratch.len() < scratch.capacity() => {
                    break scratch.strip_suffix(&SYNC_TAIL);
                }
                Ok(_) if progress => {}
                _ => break None,
            }
        };
        let frame = compressed
            .filter(|compressed| compressed.len() < payload.len())
            .map(|compressed| {
                let mut builder = FrameBuilder::with_capacity(compressed.len());
                builder.payload().extend_from_slice(compressed);
                builder.finish_compressed(opcode)
            });
        if scratch.capacity() > KEEP_BUFFER {
            *scratch = Vec::new();
        }
        frame
    })
}

const BAD_DATA: FrameError = FrameError {
    code: CloseCode::INVALID_PAYLOAD,
    reason: "invalid compressed data",
};
const TOO_BIG: FrameError = FrameError {
    code: CloseCode::MESSAGE_TOO_BIG,
    reason: "message too big",
};

/// Inflates a compressed message (its payload, without the sync tail) with this thread's
/// inflater, and hands the result to `handle`. More than `max` bytes inflated fails with 1009
/// as soon as the inflater has produced `max + 1` of them: a decompression bomb costs at most
/// the message size limit.
pub fn inflate<R>(
    compressed: &[u8],
    max: usize,
    handle: impl FnOnce(&mut [u8]) -> R,
) -> Result<R, FrameError> {
    INFLATER.with_borrow_mut(|inflater| {
        let result = inflater.inflate(compressed, max).map(handle);
        if inflater.out.capacity() > KEEP_BUFFER {
            inflater.out = Vec::new();
        }
        result
    })
}

struct Inflater {
    inflate: Decompress,
    out: Vec<u8>,
}

impl Inflater {
    fn new() -> Self {
        Inflater {
            inflate: Decompress::new_with_window_bits(false, MAX_WINDOW_BITS),
            out: Vec::new(),
        }
    }

    fn inflate(&mut self, compressed: &[u8], max: usize) -> Result<&mut [u8], FrameError> {
        self.inflate.reset(false);
        self.out.clear();
        for mut input in [compressed, &SYNC_TAIL] {
            loop {
                if self.out.len() == self.out.capacity() {
                    if self.out.len() > max {
                        return Err(TOO_BIG);
                    }
                    // Doubling, but never past one byte over the limit.
                    let grow = self.out.capacity().max(4096).min(max + 1 - self.out.len());
                    self.out.reserve_exact(grow);
                }
                let (before_in, before_len) = (self.inflate.total_in(), self.out.len());
                let status = self
                    .inflate
                    .decompress_vec(input, &mut self.out, FlushDecompress::Sync)
                    .map_err(|_| BAD_DATA)?;
                let taken = (self.inflate.total_in() - before_in) as usize;
                input = &input[taken..];
                if self.out.len() > max {
                    return Err(TOO_BIG);
                }
                let full = self.out.len() == self.out.capacity();
                let stuck = taken == 0 && self.out.len() == before_len;
                match status {
                    // A final block: whatever follows it is not part of the message.
                    Status::StreamEnd => break,
                    // More output may be waiting.
                    _ if full => {}
                    _ if input.is_empty() || stuck => break,
                    _ => {}
                }
            }
        }
        Ok(&mut self.out)
    }
}

#[cfg(test)]
#[path = "../../tests/support/inflate.rs"]
mod inflate_support;

#[cfg(test)]
mod tests {
    use super::inflate_support::inflate_in_window;
    use super::*;
    use crate::ws::frame::encode;

    fn agreed(header: &str) -> Option<String> {
        negotiate([header.as_bytes()]).map(|a| a.response)
    }

    const BOTH: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

    #[test]
    fn the_first_offer_the_gateway_can_honour_is_taken_without_context_takeover() {
        // What browsers send.
        assert_eq!(
            agreed("permessage-deflate; client_max_window_bits").as_deref(),
            Some(BOTH)
        );
        assert_eq!(agreed("permessage-deflate").as_deref(), Some(BOTH));
        assert_eq!(
            agreed("permessage-deflate; server_max_window_bits=10").unwrap(),
            format!("{BOTH}; server_max_window_bits=10")
        );
        // Quoted values; a fallback offer after one with an unknown parameter; other extensions.
        assert_eq!(
            agreed("x-webkit-deflate-frame, permessage-deflate; foo, permessage-deflate; server_max_window_bits=\"9\"")
                .unwrap(),
            format!("{BOTH}; server_max_window_bits=9")
        );
        // Offers split over several header lines.
        let lines: [&[u8]; 2] = [b"permessage-deflate; bar", b"permessage-deflate"];
        assert_eq!(negotiate(lines).unwrap().response, BOTH);
    }

    #[test]
    fn offers_the_gateway_cannot_honour_exactly_are_declined() {
        for offer in [
            "",
            "x-webkit-deflate-frame",
            "permessage-deflate; unknown",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=010",
            "permessage-deflate; server_max_window_bits=+9",
            "permessage-deflate; client_max_window_bits=1x",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
            "permessage-deflate; server_max_window_bits=\"10",
            "permessage-deflate; server_max_window_bits=\"1,0\"",
        ] {
            assert_eq!(agreed(offer), None, "{offer:?}");
        }
    }

    fn compressible(len: usize) -> Vec<u8> {
        let line = br#"{"type":"message","room":"lobby","user":"alice","text":"hello"} "#;
        line.iter().copied().cycle().take(len).collect()
    }

    fn inflated(frame: &Bytes) -> Vec<u8> {
        assert_eq!(frame[0] & 0x40, 0x40, "RSV1 marks a compressed frame");
        let payload = server_payload(frame);
        inflate(&payload, 1 << 20, |m| m.to_vec()).unwrap()
    }

    #[test]
    fn data_frames_worth_it_are_compressed_and_inflate_back() {
        let on = Deflate { window_bits: 15 };
        let text = compressible(1000);
        let frame = for_connection(encode(OpCode::Text, &text), on);
        assert!(frame.len() < 200, "{} bytes", frame.len());
        assert_eq!(frame[0], 0x80 | 0x40 | 0x1);
        assert_eq!(inflated(&frame), text);
        // Too short, a control frame, or a connection that did not agree: as it was.
        let short = encode(OpCode::Text, &text[..MIN_OWN_PAYLOAD - 1]);
        assert_eq!(for_connection(short.clone(), on), short);
        // The same as a publication: worth it, paid once for all its recipients.
        let published = Prepared::new(short.clone()).for_connection(on, || {});
        assert_eq!(published[0] & 0x40, 0x40);
        assert_eq!(inflated(&published), &text[..MIN_OWN_PAYLOAD - 1]);
        let shorter = encode(OpCode::Text, &text[..MIN_SHARED_PAYLOAD - 1]);
        assert_eq!(
            Prepared::new(shorter.clone()).for_connection(on, || {}),
            shorter
        );
        let ping = encode(OpCode::Ping, &text[..125]);
        assert_eq!(for_connection(ping.clone(), on), ping);
        let plain = encode(OpCode::Binary, &text);
        assert_eq!(for_connection(plain.clone(), Deflate::OFF), plain);
        // A compressed frame holds no more than its bytes (queues charge frames by length).
        let zeros = for_connection(encode(OpCode::Binary, &[0; 64 * 1024]), on);
        let (len, held) = (zeros.len(), zeros.try_into_mut().unwrap().capacity());
        assert!(
            held <= len + crate::ws::frame::MAX_HEADER_LEN,
            "{held} held for {len}"
        );
        // Incompressible: no smaller, so sent as it is.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..4000)
            .map(|_| {
                // xorshift64: bytes with nothing for DEFLATE to find.
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 32) as u8
            })
            .collect();
        let noisy = encode(OpCode::Binary, &noise);
        assert_eq!(for_connection(noisy.clone(), on), noisy);
    }

    #[test]
    fn a_publication_is_compressed_once_unless_a_connection_needs_a_smaller_window() {
        let text = compressible(3000);
        let prepared = Prepared::new(encode(OpCode::Text, &text));
        let full = Deflate { window_bits: 15 };
        let first = prepared.for_connection(full, || {});
        let second = prepared.for_connection(full, || {});
        assert_eq!(
            first.as_ptr(),
            second.as_ptr(),
            "the same compressed buffer"
        );
        assert_eq!(
            prepared.for_connection(Deflate::OFF, || {}).as_ptr(),
            prepared.plain().as_ptr()
        );
        // A 512-byte window cannot take the shared frame of a 3000-byte message: its own.
        let small = prepared.for_connection(Deflate { window_bits: 9 }, || {});
        assert_ne!(small.as_ptr(), first.as_ptr());
        assert_eq!(inflated(&small), text);
        // A message no longer than the window can use the shared frame.
        let short = Prepared::new(encode(OpCode::Text, &text[..500]));
        let shared = short.for_connection(full, || {});
        assert_eq!(
            short
                .for_connection(Deflate { window_bits: 9 }, || {})
                .as_ptr(),
            shared.as_ptr()
        );
    }

    #[test]
    fn a_connection_that_asked_for_a_smaller_window_gets_frames_it_can_inflate() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for window_bits in 9..=14u8 {
            let window = 1usize << window_bits;
            // Random letters (compressible: 16 of them), in a block repeated just under a window
            // apart: the longest references there are, for a compressor that may use them.
            let block: Vec<u8> = (0..window - 40)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    b'a' + (state >> 40) as u8 % 16
                })
                .collect();
            let deflate = Deflate { window_bits };
            for len in [window - 1, window, window + 1, 3 * window] {
                let message: Vec<u8> = block.iter().copied().cycle().take(len).collect();
                let prepared = Prepared::new(encode(OpCode::Binary, &message));
                let mut compressed = 0;
                for frame in [
                    prepared.for_connection(deflate, || {}),
                    for_connection(encode(OpCode::Binary, &message), deflate),
                ] {
                    if frame[0] & 0x40 != 0 {
                        compressed += 1;
                        let payload = server_payload(&frame);
                        let inflated = inflate_in_window(&payload, window_bits);
                        assert!(inflated == message, "window {window_bits}, {len} bytes");
                    }
                }
                // The publication at least (its level finds the letters' entropy).
                assert!(
                    compressed >= 1,
                    "window {window_bits}, {len} bytes compress"
                );
            }
        }
    }

    fn compress_raw(data: &[u8], flush: FlushCompress) -> Vec<u8> {
        let mut c = Compress::new_with_window_bits(Compression::new(6), false, 15);
        let mut out = Vec::with_capacity(data.len() + 64);
        c.compress_vec(data, &mut out, flush).unwrap();
        if let Some(stripped) = out.strip_suffix(&SYNC_TAIL) {
            out.truncate(stripped.len());
        }
        out
    }

    #[test]
    fn inflating_stops_one_byte_past_the_limit_and_rejects_garbage() {
        let bomb = compress_raw(&vec![0u8; 10 << 20], FlushCompress::Finish);
        assert!(bomb.len() < 20_000);
        let err = inflate(&bomb, 64 * 1024, |m| m.len()).unwrap_err();
        assert_eq!(err.code, CloseCode::MESSAGE_TOO_BIG);
        // Exactly at the limit is fine, with a final block or a stripped sync flush alike.
        for flush in [FlushCompress::Finish, FlushCompress::Sync] {
            let at_limit = compress_raw(&vec![7u8; 64 * 1024], flush);
            assert_eq!(inflate(&at_limit, 64 * 1024, |m| m.len()), Ok(64 * 1024));
            let over = compress_raw(&vec![7u8; 64 * 1024 + 1], flush);
            let err = inflate(&over, 64 * 1024, |m| m.len()).unwrap_err();
            assert_eq!(err.code, CloseCode::MESSAGE_TOO_BIG);
        }
        let err = inflate(&[0xff, 0xff, 0xff, 0xff], 1024, |m| m.len()).unwrap_err();
        assert_eq!(err.code, CloseCode::INVALID_PAYLOAD);
        // The inflater is reset per message: the next message starts afresh.
        let frame = for_connection(
            encode(OpCode::Text, &compressible(300)),
            Deflate { window_bits: 15 },
        );
        assert_eq!(inflated(&frame), compressible(300));
        // An empty message compresses to a single empty stored block, stripped to nothing.
        assert_eq!(inflate(&[0x00], 10, |m| m.len()), Ok(0));
        assert_eq!(inflate(&[], 10, |m| m.len()), Ok(0));
    }
}
