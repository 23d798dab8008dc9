//! A connection's first request head, read by wsgate before hyper sees it: bounded in size
//! (`max_header_bytes`) and time (`handshake_timeout`), and checked to parse, so that a
//! slow-loris, an oversized head or garbage get an answer in wsgate's own JSON (hyper's own
//! error answers have no body). What was read is then replayed to hyper through [`Prefixed`].

use std::cell::RefCell;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use super::proxy_header::{self, Parsed};
use crate::transport::Stream;
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Headers a request may have (as hyper's default).
pub const MAX_HEADERS: usize = 100;

/// Why a first request head was not handed to hyper.
#[derive(Debug, PartialEq, Eq)]
pub enum HeadError {
    /// Over `max_header_bytes`, or too many headers: 431.
    TooLarge,
    /// Not an HTTP/1.x request head: 400.
    Malformed,
    /// Not complete within `handshake_timeout`: the connection is dropped.
    TimedOut,
    /// The client hung up, or the socket failed.
    Closed,
    /// A PROXY protocol header was expected (`proxy_protocol`) and is missing or broken: 400.
    BadProxyHeader,
}

/// A connection's first bytes, as read by [`read_first`].
pub struct First {
    /// The first request head and whatever followed it (past any PROXY header).
    pub bytes: Bytes,
    /// The client a PROXY header named, if one was read and named one.
    pub source: Option<IpAddr>,
}

/// Reads from `stream` up to the end of the first request head (after a PROXY protocol header,
/// when `proxy_header`), by `deadline`; returns what was read (the head, and any bytes the client
/// sent after it). Reads go through `scratch` (the shard's shared read buffer) and only what arrived is
/// kept, in an allocation of its size: thousands of handshakes in flight do not each hold a
/// buffer sized for the largest head.
pub async fn read_first(
    stream: &mut Stream,
    scratch: &RefCell<Box<[u8]>>,
    max_bytes: usize,
    deadline: tokio::time::Instant,
    proxy_header: bool,
) -> Result<First, HeadError> {
    let mut head = BytesMut::new();
    // Where the request starts (past the PROXY header), once that header is read.
    let mut start = (!proxy_header).then_some(0);
    let mut source = None;
    let reading = async {
        loop {
            let read = std::future::poll_fn(|cx| {
                let mut scratch = scratch.borrow_mut();
                let room = scratch.len().min(max_bytes + 1 - head.len().min(max_bytes));
                let n = std::task::ready!(stream.poll_read_into(cx, &mut scratch[..room]))?;
                head.extend_from_slice(&scratch[..n]);
                Poll::Ready(io::Result::Ok(n))
            })
            .await;
            match read {
                Ok(0) | Err(_) => return Err(HeadError::Closed),
                Ok(_) => {}
            }
            let skip = match start {
                Some(skip) => skip,
                None => match proxy_header::parse(&head) {
                    Ok(Parsed::Complete { len, source: named }) => {
                        source = named;
                        *start.insert(len)
                    }
                    Ok(Parsed::Incomplete) if head.len() > max_bytes => {
                        return Err(HeadError::BadProxyHeader);
                    }
                    Ok(Parsed::Incomplete) => continue,
                    Err(_) => return Err(HeadError::BadProxyHeader),
                },
            };
            match check(&head[skip..]) {
                Ok(Some(_)) => return Ok(skip),
                Ok(None) if head.len() > max_bytes => return Err(HeadError::TooLarge),
                Ok(None) => {}
                Err(e) => return Err(e),
            }
        }
    };
    match tokio::time::timeout_at(deadline, reading).await {
        Ok(Ok(skip)) => Ok(First {
            bytes: head.freeze().slice(skip..),
            source,
        }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(HeadError::TimedOut),
    }
}

/// Checks the request head at the front of `buf` the way hyper will take it: `Ok(Some(len))`
/// once it is complete (`len` bytes), `Ok(None)` while it is not. Beyond the syntax, the body's
/// framing must be unambiguous: one `Content-Length` value, `Transfer-Encoding` only over
/// HTTP/1.1 and ending in `chunked`, never both (hyper refuses the rest with an empty 400, and
/// proxies that read such requests differently are how requests get smuggled).
pub fn check(buf: &[u8]) -> Result<Option<usize>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) => return Err(HeadError::Malformed),
    };
    let (mut length, mut chunked) = (None, false);
    for header in request.headers.iter() {
        if header.name.eq_ignore_ascii_case("content-length") {
            let value = std::str::from_utf8(header.value).map_err(|_| HeadError::Malformed)?;
            for part in value.split(',') {
                let n: u64 = part.trim().parse().map_err(|_| HeadError::Malformed)?;
                if length.is_some_and(|known| known != n) {
                    return Err(HeadError::Malformed);
                }
                length = Some(n);
            }
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            let last = header
                .value
                .rsplit(|&b| b == b',')
                .next()
                .unwrap_or_default();
            if request.version != Some(1) || !last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Err(HeadError::Malformed);
            }
            chunked = true;
        }
    }
    if length.is_some() && chunked {
        return Err(HeadError::Malformed);
    }
    Ok(Some(len))
}

/// A complete HTTP/1.1 response with a JSON error body that closes the connection: for answers
/// given outside hyper.
pub fn error_response(status: u16, reason: &str, message: &str) -> Vec<u8> {
    let body = serde_json::json!({ "error": message }).to_string();
    format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Writes `response` and closes the connection, reading (and discarding) what the client still
/// sends for a moment first: closing a socket with unread input resets it, which can destroy the
/// answer before the client reads it. Bounded in time and bytes: a client gets no more of ours.
pub async fn answer_and_close(mut stream: Stream, response: &[u8]) {
    let linger = async {
        stream.write_all(response).await?;
        stream.shutdown().await?;
        // On the heap: this future is part of every HTTP connection's task, and an array here
        // would make each 4 KiB bigger.
        let mut discard = vec![0u8; 4096];
        let mut left = LINGER_BYTES;
        while left > 0 {
            match stream.read(&mut discard).await? {
                0 => break,
                n => left = left.saturating_sub(n),
            }
        }
        io::Result::Ok(())
    };
    let _ = tokio::time::timeout(LINGER_TIME, linger).await;
}

/// How long, and how much, [`answer_and_close`] reads after its answer.
const LINGER_TIME: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 * 1024;

/// A stream with bytes already read from it put back in front.
pub struct Prefixed {
    prefix: Bytes,
    stream: Stream,
}

impl Prefixed {
    pub fn new(prefix: Bytes, stream: Stream) -> Self {
        Prefixed { prefix, stream }
    }

    /// The stream, and what of the prefix has not been read.
    pub fn into_parts(self) -> (Stream, Bytes) {
        (self.stream, self.prefix)
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_checked_as_hyper_would_take_them() {
        let ok = |head: &str| assert_eq!(check(head.as_bytes()), Ok(Some(head.len())), "{head:?}");
        let bad = |head: &str| {
            assert_eq!(
                check(head.as_bytes()),
                Err(HeadError::Malformed),
                "{head:?}"
            )
        };
        ok("GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        ok("GET / HTTP/1.0\r\n\r\n");
        ok("GET /healthz HTTP/1.1\nHost: x\n\n"); // bare line feeds
        assert_eq!(
            check(b"GET / HTTP/1.1\r\nHost: x\r\n"),
            Ok(None),
            "not yet complete"
        );
        bad("\x16\x03\x01 garbage\r\n\r\n");
        bad("GET / HTTP/1.1\r\nBad Header\r\n\r\n");
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: y\r\n")).collect();
        let head = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(check(head.as_bytes()), Err(HeadError::TooLarge));
        // The body's framing must be unambiguous.
        ok("POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n");
        ok("POST / HTTP/1.1\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\r\n");
        ok("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        for cl in ["abc", "-1", "1, 2", "99999999999999999999999"] {
            bad(&format!("POST / HTTP/1.1\r\nContent-Length: {cl}\r\n\r\n"));
        }
        bad("POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n");
        bad("POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n");
        bad("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n");
        bad("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n");
    }

    #[test]
    fn error_responses_are_complete_json_answers() {
        let response = String::from_utf8(error_response(
            431,
            "Request Header Fields Too Large",
            "too big",
        ))
        .unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 431 "));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        assert_eq!(body, r#"{"error":"too big"}"#);
    }
}
