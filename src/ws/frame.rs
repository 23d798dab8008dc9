//! RFC 6455 framing, free of I/O: decode client frames out of a byte buffer, encode server frames
//! into `Bytes` once so the same buffer can be queued to any number of connections.
//!
//! The decoder never copies a single-frame message: the payload is unmasked in place and handed out
//! as `&mut [u8]` of the caller's buffer (so simd-json can parse it in place too). Only fragmented
//! messages are collected into a buffer of their own, and only while they are incomplete.

use bytes::{BufMut, Bytes, BytesMut};

use super::close::{CloseCode, CloseFrame, FrameError};

/// The largest server frame header: 2 bytes + 8-byte extended length (server frames are unmasked).
pub const MAX_HEADER_LEN: usize = 10;
/// Control frames carry at most 125 payload bytes (RFC 6455 §5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;
/// The first header bit of a message compressed with permessage-deflate (RFC 7692 §6).
pub(crate) const RSV1: u8 = 0x40;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpCode {
    Continuation = 0x0,
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

impl OpCode {
    pub(crate) fn from_bits(bits: u8) -> Option<OpCode> {
        Some(match bits {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

const TOO_BIG: FrameError = FrameError {
    code: CloseCode::MESSAGE_TOO_BIG,
    reason: "message too big",
};
pub const BAD_UTF8: FrameError = FrameError {
    code: CloseCode::INVALID_PAYLOAD,
    reason: "invalid UTF-8 in text message",
};

/// A complete message's payload: borrowed from the read buffer when it came in one frame,
/// owned when it was reassembled from fragments.
pub enum Payload<'a> {
    Borrowed(&'a mut [u8]),
    Owned(Vec<u8>),
}

impl Payload<'_> {
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match self {
            Payload::Borrowed(b) => b,
            Payload::Owned(v) => v,
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        match self {
            Payload::Borrowed(b) => b,
            Payload::Owned(v) => v,
        }
    }
}

/// What one decoded frame amounts to.
pub enum Event<'a> {
    /// A complete data message. Text is already checked to be UTF-8, unless `compressed`: then
    /// the payload is its permessage-deflate compression, to inflate (and check) first.
    Message {
        text: bool,
        compressed: bool,
        payload: Payload<'a>,
    },
    Ping(&'a [u8]),
    Pong,
    /// The peer started (or answered) the close handshake.
    Close(Option<CloseFrame<'a>>),
    /// A non-final fragment was absorbed; nothing to hand out yet.
    Fragment,
}

/// The result of trying to decode one frame from the front of a buffer.
pub enum Decoded<'a> {
    /// The buffer does not hold a whole frame yet; keep its bytes and read more.
    Incomplete,
    /// One frame was decoded out of the first `consumed` bytes.
    Frame { consumed: usize, event: Event<'a> },
}

/// The largest client frame header: 2 bytes, an 8-byte extended length, a 4-byte mask.
pub const MAX_CLIENT_HEADER_LEN: usize = 14;

/// A client frame's header, as [`peek`] reads it without touching the payload.
#[derive(Debug, PartialEq, Eq)]
pub struct Peeked {
    pub close: bool,
    pub header_len: usize,
    pub payload_len: u64,
}

/// Reads the header at the front of `buf` (`None`: not all of it yet), for a connection that
/// skips frames: one that is closing and only waits for the peer's close frame.
pub fn peek(buf: &[u8]) -> Result<Option<Peeked>, FrameError> {
    Ok(parse_header(buf)?.map(|header| Peeked {
        close: header.opcode == OpCode::Close,
        header_len: header.header_len,
        payload_len: header.payload_len as u64,
    }))
}

/// A fragmented message being collected.
struct Partial {
    text: bool,
    /// Its first frame had RSV1: `data` is compressed (and checked for UTF-8 once inflated).
    compressed: bool,
    data: Vec<u8>,
    /// Prefix of `data` known to be valid UTF-8 (text only), so each fragment is checked once
    /// and invalid text fails as soon as it arrives.
    utf8_checked: usize,
}

/// Per-connection decoding state. Small on purpose: an idle connection holds only this.
pub struct Decoder {
    /// u32 (the configured limit is at most 1 GiB), so that with the flag below the decoder
    /// stays 16 bytes: it is in every connection.
    max_message_size: u32,
    /// The connection agreed to permessage-deflate: a message's first frame may have RSV1.
    compression: bool,
    partial: Option<Box<Partial>>,
}

impl Decoder {
    pub fn new(max_message_size: usize) -> Self {
        Decoder {
            max_message_size: u32::try_from(max_message_size).unwrap_or(u32::MAX),
            compression: false,
            partial: None,
        }
    }

    /// A decoder for a connection that agreed to permessage-deflate. The message size limit
    /// applies to what arrives compressed too (and, once inflated, to the message).
    pub fn compressed(max_message_size: usize) -> Self {
        Decoder {
            compression: true,
            ..Decoder::new(max_message_size)
        }
    }

    pub fn max_message_size(&self) -> usize {
        self.max_message_size as usize
    }

    /// The whole length of the incomplete frame whose header starts `buf` (once the header is
    /// there), if this decoder would take it: how much it will need. `None` for a frame over the
    /// message size limit (refused as soon as its header is whole) or a header not yet whole.
    pub fn incomplete_frame_len(&self, buf: &[u8]) -> Option<usize> {
        let header = parse_header(buf).ok()??;
        let already = self.partial.as_ref().map_or(0, |p| p.data.len());
        let message = already.saturating_add(header.payload_len);
        if !header.opcode.is_control() && message > self.max_message_size() {
            return None;
        }
        Some(header.header_len + header.payload_len)
    }

    /// Decodes the frame at the front of `buf`, unmasking its payload in place.
    pub fn decode<'a>(&mut self, buf: &'a mut [u8]) -> Result<Decoded<'a>, FrameError> {
        let Some(header) = parse_header(buf)? else {
            return Ok(Decoded::Incomplete);
        };
        // Refused as soon as the header is whole, before any of the payload is waited for.
        if header.rsv1 {
            if !self.compression {
                return Err(FrameError::protocol("reserved bits set"));
            }
            // RFC 7692 §6.1: only a message's first frame says it is compressed.
            if header.opcode.is_control() {
                return Err(FrameError::protocol("compressed control frame"));
            }
            if header.opcode == OpCode::Continuation {
                return Err(FrameError::protocol("RSV1 set on a continuation frame"));
            }
        }
        let already = self.partial.as_ref().map_or(0, |p| p.data.len());
        if !header.opcode.is_control()
            && already.saturating_add(header.payload_len) > self.max_message_size()
        {
            return Err(TOO_BIG);
        }
        let consumed = header.header_len + header.payload_len;
        if buf.len() < consumed {
            return Ok(Decoded::Incomplete);
        }
        let payload = &mut buf[header.header_len..consumed];
        fastwebsockets::unmask(payload, header.mask);
        let event = self.on_frame(header.fin, header.opcode, header.rsv1, payload)?;
        Ok(Decoded::Frame { consumed, event })
    }

    fn on_frame<'a>(
        &mut self,
        fin: bool,
        opcode: OpCode,
        compressed: bool,
        payload: &'a mut [u8],
    ) -> Result<Event<'a>, FrameError> {
        match opcode {
            OpCode::Ping => Ok(Event::Ping(payload)),
            OpCode::Pong => Ok(Event::Pong),
            OpCode::Close => CloseFrame::parse(payload).map(Event::Close),
            OpCode::Text | OpCode::Binary => {
                if self.partial.is_some() {
                    return Err(FrameError::protocol("new message inside a fragmented one"));
                }
                let text = opcode == OpCode::Text;
                if fin {
                    if text && !compressed && std::str::from_utf8(payload).is_err() {
                        return Err(BAD_UTF8);
                    }
                    return Ok(Event::Message {
                        text,
                        compressed,
                        payload: Payload::Borrowed(payload),
                    });
                }
                let mut partial = Box::new(Partial {
                    text,
                    compressed,
                    data: Vec::new(),
                    utf8_checked: 0,
                });
                partial.append(payload, self.max_message_size())?;
                self.partial = Some(partial);
                Ok(Event::Fragment)
            }
            OpCode::Continuation => {
                let max = self.max_message_size();
                let Some(partial) = self.partial.as_mut() else {
                    return Err(FrameError::protocol("continuation frame without a message"));
                };
                partial.append(payload, max)?;
                if !fin {
                    return Ok(Event::Fragment);
                }
                let partial = self.partial.take().expect("checked above");
                if partial.text && !partial.compressed && partial.utf8_checked != partial.data.len()
                {
                    // A multi-byte character was cut off at the end of the message.
                    return Err(BAD_UTF8);
                }
                Ok(Event::Message {
                    text: partial.text,
                    compressed: partial.compressed,
                    payload: Payload::Owned(partial.data),
                })
            }
        }
    }
}

impl Partial {
    /// Adds a fragment; the buffer doubles as it grows, but never past `max` (the message size
    /// limit, already checked against the fragment's length).
    fn append(&mut self, fragment: &[u8], max: usize) -> Result<(), FrameError> {
        let needed = self.data.len() + fragment.len();
        if needed > self.data.capacity() {
            let grown = needed.max(2 * self.data.capacity()).min(max.max(needed));
            self.data.reserve_exact(grown - self.data.len());
        }
        self.data.extend_from_slice(fragment);
        if self.text && !self.compressed {
            match std::str::from_utf8(&self.data[self.utf8_checked..]) {
                Ok(_) => self.utf8_checked = self.data.len(),
                // Incomplete character at the end: valid so far, finish it with the next fragment.
                Err(e) if e.error_len().is_none() => self.utf8_checked += e.valid_up_to(),
                Err(_) => return Err(BAD_UTF8),
            }
        }
        Ok(())
    }
}

struct Header {
    fin: bool,
    /// RSV1: a compressed message's first frame (if the connection agreed to compression).
    rsv1: bool,
    opcode: OpCode,
    mask: [u8; 4],
    header_len: usize,
    payload_len: usize,
}

/// Parses a client frame header. `Ok(None)` means more bytes are needed.
fn parse_header(buf: &[u8]) -> Result<Option<Header>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x30 != 0 {
        // No extension uses RSV2 or RSV3 (RSV1 is permessage-deflate's: the decoder checks it).
        return Err(FrameError::protocol("reserved bits set"));
    }
    let fin = b0 & 0x80 != 0;
    let opcode = OpCode::from_bits(b0 & 0x0F).ok_or(FrameError::protocol("reserved opcode"))?;
    if b1 & 0x80 == 0 {
        return Err(FrameError::protocol("client frames must be masked"));
    }
    let (payload_len, len_bytes) = match b1 & 0x7F {
        126 => {
            let Some(b) = buf.get(2..4) else {
                return Ok(None);
            };
            (u16::from_be_bytes([b[0], b[1]]) as u64, 2)
        }
        127 => {
            let Some(b) = buf.get(2..10) else {
                return Ok(None);
            };
            let len = u64::from_be_bytes(b.try_into().expect("8 bytes"));
            if len >> 63 != 0 {
                return Err(FrameError::protocol("payload length has its top bit set"));
            }
            (len, 8)
        }
        n => (n as u64, 0),
    };
    if opcode.is_control() {
        if !fin {
            return Err(FrameError::protocol("fragmented control frame"));
        }
        if payload_len > MAX_CONTROL_PAYLOAD as u64 {
            return Err(FrameError::protocol("control frame payload over 125 bytes"));
        }
    }
    let mask_at = 2 + len_bytes;
    let Some(mask) = buf.get(mask_at..mask_at + 4) else {
        return Ok(None);
    };
    Ok(Some(Header {
        fin,
        rsv1: b0 & RSV1 != 0,
        opcode,
        mask: mask.try_into().expect("4 bytes"),
        header_len: mask_at + 4,
        // Saturate on 32-bit targets: anything that large is over the size limit anyway.
        payload_len: usize::try_from(payload_len).unwrap_or(usize::MAX),
    }))
}

/// Writes an unmasked, final frame header for `payload_len` bytes into `out`; returns its length.
pub fn write_header(out: &mut [u8; MAX_HEADER_LEN], opcode: OpCode, payload_len: usize) -> usize {
    out[0] = 0x80 | opcode as u8;
    if payload_len < 126 {
        out[1] = payload_len as u8;
        2
    } else if payload_len <= u16::MAX as usize {
        out[1] = 126;
        out[2..4].copy_from_slice(&(payload_len as u16).to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(payload_len as u64).to_be_bytes());
        10
    }
}

/// Builds one server frame in place: the payload is written after room reserved for the largest
/// header, then the real header is put right in front of it. No copy of the payload is made.
pub struct FrameBuilder {
    buf: BytesMut,
}

impl FrameBuilder {
    pub fn with_capacity(payload_capacity: usize) -> Self {
        let mut buf = BytesMut::with_capacity(MAX_HEADER_LEN + payload_capacity);
        buf.put_bytes(0, MAX_HEADER_LEN);
        FrameBuilder { buf }
    }

    /// Where the payload goes.
    pub fn payload(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    pub fn finish(self, opcode: OpCode) -> Bytes {
        self.finish_with(opcode, 0)
    }

    /// Finishes a frame whose payload is compressed (permessage-deflate): RSV1 set.
    pub fn finish_compressed(self, opcode: OpCode) -> Bytes {
        self.finish_with(opcode, RSV1)
    }

    fn finish_with(self, opcode: OpCode, flags: u8) -> Bytes {
        let mut buf = self.buf;
        let payload_len = buf.len() - MAX_HEADER_LEN;
        let mut head = [0u8; MAX_HEADER_LEN];
        let head_len = write_header(&mut head, opcode, payload_len);
        head[0] |= flags;
        let start = MAX_HEADER_LEN - head_len;
        buf[start..MAX_HEADER_LEN].copy_from_slice(&head[..head_len]);
        let mut frame = buf.freeze();
        bytes::Buf::advance(&mut frame, start);
        frame
    }
}

/// The payload of a frame made by this server (unmasked, whole), without copying it.
pub fn server_payload(frame: &Bytes) -> Bytes {
    let header = match frame[1] & 0x7f {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    frame.slice(header..)
}

/// Encodes a whole server frame from a payload slice (one copy of the payload).
pub fn encode(opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut builder = FrameBuilder::with_capacity(payload.len());
    builder.payload().extend_from_slice(payload);
    builder.finish(opcode)
}

/// Encodes a close frame with a status code and a reason (truncated to fit a control frame).
/// The longest close reason, in bytes: a control frame's payload less the code.
pub const MAX_CLOSE_REASON: usize = MAX_CONTROL_PAYLOAD - 2;

pub fn encode_close(code: CloseCode, reason: &str) -> Bytes {
    let reason = &reason[..reason.floor_char_boundary(MAX_CLOSE_REASON)];
    let mut builder = FrameBuilder::with_capacity(2 + reason.len());
    builder.payload().put_u16(code.0);
    builder.payload().extend_from_slice(reason.as_bytes());
    builder.finish(OpCode::Close)
}

#[cfg(test)]
#[path = "../../tests/support/client_frame.rs"]
pub(crate) mod client_frame;

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame, as a browser would send it.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        super::client_frame::client_frame(fin, opcode, payload, Some([0x37, 0xfa, 0x21, 0x3d]))
    }

    #[test]
    fn server_payloads_come_out_of_frames_of_every_length_form() {
        for len in [0, 125, 126, 65_535, 65_536] {
            let payload = vec![b'x'; len];
            assert_eq!(
                &server_payload(&encode(OpCode::Text, &payload))[..],
                &payload[..]
            );
        }
    }

    fn decode_all(
        decoder: &mut Decoder,
        mut buf: Vec<u8>,
    ) -> Result<Vec<(bool, Vec<u8>)>, FrameError> {
        let mut messages = Vec::new();
        let mut pos = 0;
        while pos < buf.len() {
            match decoder.decode(&mut buf[pos..])? {
                Decoded::Incomplete => break,
                Decoded::Frame { consumed, event } => {
                    if let Event::Message { text, payload, .. } = event {
                        messages.push((text, payload.as_slice().to_vec()));
                    }
                    pos += consumed;
                }
            }
        }
        Ok(messages)
    }

    #[test]
    fn peek_reads_headers_without_the_payload() {
        let frame = client_frame(false, 1, b"part");
        assert_eq!(peek(&frame[..1]), Ok(None));
        assert_eq!(
            peek(&frame[..6]),
            Ok(Some(Peeked {
                close: false,
                header_len: 6,
                payload_len: 4,
            }))
        );
        let decoder = Decoder::new(100);
        assert_eq!(decoder.incomplete_frame_len(&frame[..6]), Some(10));
        assert_eq!(
            decoder.incomplete_frame_len(&frame[..1]),
            None,
            "no whole header yet"
        );
        // A header declaring 1 TiB earns no reservation: the decoder will refuse it.
        let mut huge = vec![0x82, 0xFF];
        huge.extend_from_slice(&(1u64 << 40).to_be_bytes());
        huge.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(decoder.incomplete_frame_len(&huge), None);
        let close = client_frame(true, 8, &[0x03, 0xe8]);
        assert!(peek(&close).unwrap().unwrap().close);
        assert!(peek(&[0xf1, 0x80, 0, 0, 0, 0]).is_err(), "reserved bits");
    }

    /// `frame` with RSV1 set.
    fn rsv1(mut frame: Vec<u8>) -> Vec<u8> {
        frame[0] |= RSV1;
        frame
    }

    fn first_error(decoder: &mut Decoder, wire: Vec<u8>) -> &'static str {
        decode_all(decoder, wire).expect_err("refused").reason
    }

    #[test]
    fn rsv1_marks_the_first_frame_of_a_compressed_message_only_where_agreed() {
        // Not agreed: RSV1 is a reserved bit like the others.
        let compressed = rsv1(client_frame(true, 1, b"\xf2H"));
        assert_eq!(
            first_error(&mut Decoder::new(100), compressed.clone()),
            "reserved bits set"
        );
        // Agreed: handed out compressed, UTF-8 unchecked until inflated.
        let mut d = Decoder::compressed(100);
        let mut wire = compressed;
        let fragmented = [
            rsv1(client_frame(false, 2, b"ab")),
            client_frame(true, 0, b"c"),
        ];
        wire.extend(fragmented.concat());
        let mut messages = Vec::new();
        let mut pos = 0;
        while pos < wire.len() {
            let Decoded::Frame { consumed, event } = d.decode(&mut wire[pos..]).unwrap() else {
                panic!("whole frames");
            };
            if let Event::Message {
                compressed,
                payload,
                ..
            } = event
            {
                messages.push((compressed, payload.as_slice().to_vec()));
            }
            pos += consumed;
        }
        assert_eq!(
            messages,
            [(true, b"\xf2H".to_vec()), (true, b"abc".to_vec())]
        );
        // Never on a control frame, a continuation, or with RSV2/RSV3.
        let ping = rsv1(client_frame(true, 9, b""));
        assert_eq!(
            first_error(&mut Decoder::compressed(100), ping),
            "compressed control frame"
        );
        let mut wire = client_frame(false, 1, b"a");
        wire.extend(rsv1(client_frame(true, 0, b"b")));
        assert_eq!(
            first_error(&mut Decoder::compressed(100), wire),
            "RSV1 set on a continuation frame"
        );
        let mut rsv2 = client_frame(true, 1, b"a");
        rsv2[0] |= 0x20;
        assert_eq!(
            first_error(&mut Decoder::compressed(100), rsv2),
            "reserved bits set"
        );
    }

    #[test]
    fn a_decoder_costs_an_idle_connection_16_bytes() {
        assert_eq!(std::mem::size_of::<Decoder>(), 16);
    }

    #[test]
    fn a_fragmented_message_never_holds_more_than_the_limit() {
        let mut d = Decoder::new(1000);
        let mut wire = client_frame(false, 2, &[0; 400]);
        wire.extend(client_frame(false, 0, &[0; 400]));
        wire.extend(client_frame(false, 0, &[0; 199]));
        decode_all(&mut d, wire).unwrap();
        let partial = d.partial.as_ref().unwrap();
        assert_eq!(partial.data.len(), 999);
        assert!(
            partial.data.capacity() <= 1000,
            "{}",
            partial.data.capacity()
        );
    }

    #[test]
    fn single_text_frame_is_unmasked_in_place() {
        let mut d = Decoder::new(1024);
        let got = decode_all(&mut d, client_frame(true, 1, b"hello")).unwrap();
        assert_eq!(got, vec![(true, b"hello".to_vec())]);
    }

    #[test]
    fn every_length_encoding_round_trips() {
        for len in [0, 125, 126, 65535, 65536, 70000] {
            let payload = vec![b'a'; len];
            let mut d = Decoder::new(1 << 20);
            let got = decode_all(&mut d, client_frame(true, 2, &payload)).unwrap();
            assert_eq!(got, vec![(false, payload.clone())], "len {len}");
            let server = encode(OpCode::Binary, &payload);
            assert_eq!(&server[server.len() - len..], &payload[..]);
            let expected_head = if len < 126 {
                2
            } else if len <= 65535 {
                4
            } else {
                10
            };
            assert_eq!(server.len(), expected_head + len);
        }
    }

    #[test]
    fn partial_input_asks_for_more_at_every_cut() {
        let frame = client_frame(true, 1, &[b'x'; 300]);
        for cut in 0..frame.len() {
            let mut d = Decoder::new(1024);
            let mut part = frame[..cut].to_vec();
            assert!(
                matches!(d.decode(&mut part), Ok(Decoded::Incomplete)),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn fragments_are_reassembled_with_control_frames_between() {
        let mut input = client_frame(false, 1, "héllo ".as_bytes());
        input.extend(client_frame(true, 9, b"ping"));
        input.extend(client_frame(true, 0, "wörld".as_bytes()));
        let mut d = Decoder::new(1024);
        let got = decode_all(&mut d, input).unwrap();
        assert_eq!(got, vec![(true, "héllo wörld".as_bytes().to_vec())]);
    }

    #[test]
    fn fragmented_binary_is_not_checked_as_text() {
        let mut input = client_frame(false, 2, &[0xff, 0xfe]);
        input.extend(client_frame(true, 0, &[0xc3]));
        let got = decode_all(&mut Decoder::new(64), input).unwrap();
        assert_eq!(got, vec![(false, vec![0xff, 0xfe, 0xc3])]);
    }

    #[test]
    fn utf8_split_across_fragments_is_accepted() {
        let bytes = "€".as_bytes();
        let mut input = client_frame(false, 1, &bytes[..1]);
        input.extend(client_frame(true, 0, &bytes[1..]));
        let got = decode_all(&mut Decoder::new(64), input).unwrap();
        assert_eq!(got[0].1, bytes);
    }

    #[test]
    fn invalid_utf8_fails_fast_with_1007() {
        let mut input = client_frame(false, 1, &[0xce, 0xba, 0xed, 0xa0, 0x80]);
        input.extend(client_frame(true, 0, b"never reached"));
        let err = decode_all(&mut Decoder::new(64), input).unwrap_err();
        assert_eq!(err.code, CloseCode::INVALID_PAYLOAD);
        let err = decode_all(&mut Decoder::new(64), client_frame(true, 1, &[0xff])).unwrap_err();
        assert_eq!(err.code, CloseCode::INVALID_PAYLOAD);
        // A character cut off at the very end of the message.
        let err = decode_all(&mut Decoder::new(64), {
            let mut v = client_frame(false, 1, b"a");
            v.extend(client_frame(true, 0, &"€".as_bytes()[..2]));
            v
        })
        .unwrap_err();
        assert_eq!(err.code, CloseCode::INVALID_PAYLOAD);
    }

    #[test]
    fn protocol_violations_are_1002() {
        let cases: Vec<Vec<u8>> = vec![
            {
                let mut f = client_frame(true, 1, b"x");
                f[1] &= 0x7F; // unmasked
                f
            },
            client_frame(true, 1 | 0x40, b"x"), // RSV1
            client_frame(true, 3, b"x"),        // reserved opcode
            client_frame(false, 9, b"x"),       // fragmented ping
            client_frame(true, 9, &[0; 126]),   // oversized ping
            client_frame(true, 0, b"x"),        // continuation without a start
            {
                let mut f = client_frame(false, 1, b"a");
                f.extend(client_frame(true, 1, b"b")); // new message mid-fragment
                f
            },
            client_frame(true, 8, &[0x03]), // 1-byte close payload
            client_frame(true, 8, &[0x03, 0xEC]), // close code 1004
        ];
        for (i, input) in cases.into_iter().enumerate() {
            let err = decode_all(&mut Decoder::new(1024), input).err();
            assert_eq!(
                err.map(|e| e.code),
                Some(CloseCode::PROTOCOL_ERROR),
                "case {i}"
            );
        }
    }

    #[test]
    fn oversized_messages_are_1009_before_buffering() {
        let mut d = Decoder::new(100);
        // Only the header (with its mask) has arrived; the declared size is enough to refuse it.
        let mut head = client_frame(true, 2, &[0; 101])[..6].to_vec();
        assert_eq!(d.decode(&mut head).err(), Some(TOO_BIG));
        let mut input = client_frame(false, 2, &[0; 60]);
        input.extend(client_frame(true, 0, &[0; 41]));
        assert_eq!(
            decode_all(&mut Decoder::new(100), input).unwrap_err(),
            TOO_BIG
        );
    }

    #[test]
    fn close_frame_reason_is_truncated_on_a_char_boundary() {
        let reason = "é".repeat(100);
        let frame = encode_close(CloseCode::NORMAL, &reason);
        assert!(frame.len() <= 2 + MAX_CONTROL_PAYLOAD);
        assert!(std::str::from_utf8(&frame[4..]).is_ok());
    }
}
