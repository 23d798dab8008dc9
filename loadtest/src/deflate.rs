//! A client connection, compressed or not. fastwebsockets' client refuses any frame with RSV1,
//! so a connection the server agreed permessage-deflate with (`--compression`) is read by a small
//! reader of our own instead: frames parsed from the socket, compressed messages inflated (no
//! context takeover: the gateway always asks for it), pings answered. What the load generator
//! sends is never compressed, which permessage-deflate allows.

use bytes::{Buf, BytesMut};
use fastwebsockets::{FragmentCollector, Frame, OpCode, Payload, WebSocketError};
use flate2::{Decompress, FlushDecompress, Status};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Io = TokioIo<Upgraded>;

/// What permessage-deflate takes off the end of every compressed message.
const SYNC_TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];
/// The largest message inflated (the gateway's own limit is far below).
const MAX_MESSAGE: usize = 64 << 20;

pub enum Ws {
    Plain(FragmentCollector<Io>),
    Compressed(Box<Inflating>),
}

impl Ws {
    /// The next whole message or control frame, inflated if it came compressed.
    pub async fn read_frame(&mut self) -> Result<Frame<'static>, WebSocketError> {
        match self {
            Ws::Plain(ws) => ws.read_frame().await,
            Ws::Compressed(ws) => ws.read_frame().await,
        }
    }

    pub async fn write_frame(&mut self, frame: Frame<'_>) -> Result<(), WebSocketError> {
        match self {
            Ws::Plain(ws) => ws.write_frame(frame).await,
            Ws::Compressed(ws) => ws.write_frame(frame).await,
        }
    }
}

/// A connection that agreed to permessage-deflate.
pub struct Inflating {
    io: Io,
    buf: BytesMut,
    inflater: Decompress,
    out: Vec<u8>,
}

impl Inflating {
    pub fn new(io: Io) -> Self {
        Inflating {
            io,
            buf: BytesMut::with_capacity(4096),
            inflater: Decompress::new(false),
            out: Vec::new(),
        }
    }

    async fn read_frame(&mut self) -> Result<Frame<'static>, WebSocketError> {
        loop {
            while let Some((first, payload)) = self.take_frame()? {
                let opcode = OpCode::try_from(first & 0x0f)?;
                if opcode == OpCode::Ping {
                    let pong = Frame::new(true, OpCode::Pong, None, Payload::Owned(payload));
                    self.write_frame(pong).await?;
                    continue;
                }
                let payload = if first & 0x40 != 0 {
                    self.inflate(&payload)?
                } else {
                    payload
                };
                return Ok(Frame::new(true, opcode, None, Payload::Owned(payload)));
            }
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return Err(WebSocketError::ConnectionClosed);
            }
        }
    }

    /// The first whole frame in the buffer: its first header byte and payload. The gateway
    /// never fragments what it sends, so a frame is a message.
    fn take_frame(&mut self) -> Result<Option<(u8, Vec<u8>)>, WebSocketError> {
        let buf = &self.buf[..];
        if buf.len() < 2 {
            return Ok(None);
        }
        if buf[0] & 0x80 == 0 {
            return Err(WebSocketError::InvalidFragment);
        }
        let (len, header) = match buf[1] & 0x7f {
            126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
            127 if buf.len() >= 10 => {
                let len = u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes"));
                (usize::try_from(len).unwrap_or(usize::MAX), 10)
            }
            126 | 127 => return Ok(None),
            n => (usize::from(n), 2),
        };
        if len > MAX_MESSAGE {
            return Err(WebSocketError::FrameTooLarge);
        }
        if buf.len() < header + len {
            return Ok(None);
        }
        let first = buf[0];
        self.buf.advance(header);
        let payload = self.buf.split_to(len).to_vec();
        Ok(Some((first, payload)))
    }

    fn inflate(&mut self, compressed: &[u8]) -> Result<Vec<u8>, WebSocketError> {
        self.inflater.reset(false);
        self.out.clear();
        for input in [compressed, &SYNC_TAIL] {
            let mut input = input;
            loop {
                if self.out.capacity() - self.out.len() < 4096 {
                    self.out.reserve(self.out.capacity().max(4096));
                }
                let before = self.inflater.total_in();
                let status = self
                    .inflater
                    .decompress_vec(input, &mut self.out, FlushDecompress::Sync)
                    .map_err(|_| WebSocketError::InvalidValue)?;
                input = &input[(self.inflater.total_in() - before) as usize..];
                let room_left = self.out.len() < self.out.capacity();
                if self.out.len() > MAX_MESSAGE {
                    return Err(WebSocketError::FrameTooLarge);
                }
                // A final block ends the message (RFC 7692 §7.2.3.3): the rest is not data.
                if status == Status::StreamEnd || (input.is_empty() && room_left) {
                    break;
                }
            }
        }
        Ok(self.out.clone())
    }

    async fn write_frame(&mut self, mut frame: Frame<'_>) -> Result<(), WebSocketError> {
        frame.mask();
        let mut wire = Vec::new();
        let bytes = frame.write(&mut wire);
        self.io.write_all(bytes).await?;
        Ok(())
    }
}
