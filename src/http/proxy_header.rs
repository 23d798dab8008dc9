//! The PROXY protocol header (HAProxy's spec, versions 1 and 2) that a load balancer sends
//! before the client's bytes, saying whose connection it is. Read only from `trusted_proxies`
//! when `proxy_protocol` is on.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The version 2 header starts with these 12 bytes.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// A version 1 header is one text line of at most 107 bytes, `\r\n` included.
const V1_MAX: usize = 107;

/// What the front of a connection's bytes holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole header yet.
    Incomplete,
    /// A header of `len` bytes; `source` is the client's address, or `None` when the proxy
    /// speaks for itself (a health check: `LOCAL`, `UNKNOWN`, or an address family other than
    /// TCP over IPv4/IPv6).
    Complete { len: usize, source: Option<IpAddr> },
}

/// Not a PROXY header (or a broken one).
#[derive(Debug, PartialEq, Eq)]
pub struct Invalid;

/// Parses the PROXY header at the front of `buf`.
pub fn parse(buf: &[u8]) -> Result<Parsed, Invalid> {
    if buf.first() == Some(&b'\r') {
        parse_v2(buf)
    } else {
        parse_v1(buf)
    }
}

/// Why [`read_exactly`] found no header.
#[derive(Debug)]
pub enum ReadError {
    /// Not a PROXY header, a broken one, or one over the size allowed.
    Invalid,
    /// The socket closed or failed first.
    Io(io::Error),
}

/// Reads the PROXY header at the front of `tcp` and not one byte more, for what follows is read
/// by someone else (rustls, from the socket): peeks, and consumes only bytes the header is known
/// to own — all of an incomplete header (every prefix of one is incomplete, never complete),
/// and of a complete one its length. Returns the client it names.
pub async fn read_exactly(
    tcp: &mut TcpStream,
    max_bytes: usize,
) -> Result<Option<IpAddr>, ReadError> {
    let mut header = Vec::new();
    let mut peeked = vec![0u8; 256];
    loop {
        let n = tcp.peek(&mut peeked).await.map_err(ReadError::Io)?;
        if n == 0 {
            return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        let before = header.len();
        header.extend_from_slice(&peeked[..n]);
        let (own, done) = match parse(&header) {
            Ok(Parsed::Complete { len, source }) => (len - before, Some(source)),
            Ok(Parsed::Incomplete) if header.len() < max_bytes => (n, None),
            Ok(Parsed::Incomplete) | Err(Invalid) => return Err(ReadError::Invalid),
        };
        tcp.read_exact(&mut peeked[..own])
            .await
            .map_err(ReadError::Io)?;
        if let Some(source) = done {
            return Ok(source);
        }
    }
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, Invalid> {
    let known = buf.len().min(V2_SIGNATURE.len());
    if buf[..known] != V2_SIGNATURE[..known] {
        return Err(Invalid);
    }
    let Some(&[version_command, family, hi, lo]) = buf.get(12..16) else {
        return Ok(Parsed::Incomplete);
    };
    let len = 16 + usize::from(u16::from_be_bytes([hi, lo]));
    if version_command >> 4 != 2 {
        return Err(Invalid);
    }
    let Some(body) = buf.get(16..len) else {
        return Ok(Parsed::Incomplete);
    };
    let source = match (version_command & 0x0F, family) {
        // LOCAL: the proxy's own connection.
        (0, _) => None,
        // PROXY, TCP over IPv4 or IPv6: source and destination addresses, then ports.
        (1, 0x11) if body.len() >= 12 => Some(IpAddr::from(
            <[u8; 4]>::try_from(&body[..4]).expect("4 bytes"),
        )),
        (1, 0x21) if body.len() >= 36 => Some(IpAddr::from(
            <[u8; 16]>::try_from(&body[..16]).expect("16 bytes"),
        )),
        (1, 0x11 | 0x21) => return Err(Invalid),
        // UDP, Unix sockets, unspecified: no client address to use.
        (1, 0x00 | 0x12 | 0x22 | 0x31 | 0x32) => None,
        _ => return Err(Invalid),
    };
    Ok(Parsed::Complete {
        len,
        source: source.map(|ip| ip.to_canonical()),
    })
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, Invalid> {
    const PREFIX: &[u8] = b"PROXY ";
    let known = buf.len().min(PREFIX.len());
    if buf[..known] != PREFIX[..known] {
        return Err(Invalid);
    }
    let Some(end) = buf.iter().take(V1_MAX).position(|&b| b == b'\n') else {
        return if buf.len() >= V1_MAX {
            Err(Invalid)
        } else {
            Ok(Parsed::Incomplete)
        };
    };
    let line = buf[..end].strip_suffix(b"\r").ok_or(Invalid)?;
    let line = std::str::from_utf8(line).map_err(|_| Invalid)?;
    let mut fields = line.split(' ').skip(1);
    let source = match fields.next() {
        Some("UNKNOWN") => None,
        Some(family @ ("TCP4" | "TCP6")) => {
            let (source, destination, source_port, destination_port) =
                match (fields.next(), fields.next(), fields.next(), fields.next()) {
                    (Some(s), Some(d), Some(sp), Some(dp)) => (s, d, sp, dp),
                    _ => return Err(Invalid),
                };
            let port = |digits: &str| {
                digits.bytes().all(|b| b.is_ascii_digit()) && digits.parse::<u16>().is_ok()
            };
            if fields.next().is_some() || !port(source_port) || !port(destination_port) {
                return Err(Invalid);
            }
            let parse = |addr: &str| -> Result<IpAddr, Invalid> {
                match family {
                    "TCP4" => addr.parse::<Ipv4Addr>().map(IpAddr::V4),
                    _ => addr.parse::<Ipv6Addr>().map(IpAddr::V6),
                }
                .map_err(|_| Invalid)
            };
            parse(destination)?;
            Some(parse(source)?)
        }
        _ => return Err(Invalid),
    };
    Ok(Parsed::Complete {
        len: end + 1,
        source: source.map(|ip| ip.to_canonical()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, addresses: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut header = V2_SIGNATURE.to_vec();
        header.push(0x20 | command);
        header.push(family);
        let len = (addresses.len() + tlvs.len()) as u16;
        header.extend_from_slice(&len.to_be_bytes());
        header.extend_from_slice(addresses);
        header.extend_from_slice(tlvs);
        header
    }

    #[test]
    fn version_2_gives_the_source_address_past_any_tlvs() {
        let ipv4 = [198, 51, 100, 7, 10, 0, 0, 1, 0x30, 0x39, 0x1F, 0x90];
        let mut bytes = v2(1, 0x11, &ipv4, &[0x04, 0x00, 0x01, 0xAA]);
        let len = bytes.len();
        bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let source = Some(IpAddr::from([198, 51, 100, 7]));
        assert_eq!(parse(&bytes), Ok(Parsed::Complete { len, source }));
        // Every shorter prefix is incomplete, not invalid.
        for cut in 0..len {
            assert_eq!(parse(&bytes[..cut]), Ok(Parsed::Incomplete), "{cut}");
        }
        let mut ipv6 = [0u8; 36];
        ipv6[..16].copy_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        let source = Some("2001:db8::1".parse().unwrap());
        assert_eq!(
            parse(&v2(1, 0x21, &ipv6, &[])),
            Ok(Parsed::Complete { len: 52, source })
        );
        // A health check of the proxy's own: LOCAL, no address.
        assert_eq!(
            parse(&v2(0, 0x00, &[], &[])),
            Ok(Parsed::Complete {
                len: 16,
                source: None
            })
        );
    }

    #[test]
    fn version_1_gives_the_source_address() {
        let line = b"PROXY TCP4 203.0.113.9 10.0.0.1 56324 443\r\nGET /";
        let source = Some(IpAddr::from([203, 0, 113, 9]));
        assert_eq!(parse(line), Ok(Parsed::Complete { len: 43, source }));
        let line = b"PROXY TCP6 2001:db8::2 2001:db8::1 1 2\r\n";
        let source = Some("2001:db8::2".parse().unwrap());
        assert_eq!(parse(line), Ok(Parsed::Complete { len: 40, source }));
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n"),
            Ok(Parsed::Complete {
                len: 15,
                source: None
            })
        );
        assert_eq!(parse(b"PROXY TCP4 203.0"), Ok(Parsed::Incomplete));
        assert_eq!(parse(b"PRO"), Ok(Parsed::Incomplete));
    }

    #[test]
    fn anything_else_is_invalid() {
        for bad in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"PROXY TCP4 203.0.113.9 10.0.0.1 56324\r\n",
            b"PROXY TCP4 2001:db8::2 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 203.0.113.9 10.0.0.1 1 99999\r\n",
            b"PROXY TCP4 203.0.113.9 10.0.0.1 1 2\n",
            b"PROXY TCP9 203.0.113.9 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 203.0.113.9 10.0.0.1 +1 2\r\n",
            b"\r\n\r\n\0\r\nQUIX\n",
        ] {
            assert_eq!(
                parse(bad),
                Err(Invalid),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(parse(&[b'P'; 200][..]), Err(Invalid));
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat();
        assert_eq!(parse(&long), Err(Invalid));
        // Version 1 of the binary header does not exist; a short address block is broken.
        let mut wrong_version = v2(1, 0x11, &[0; 12], &[]);
        wrong_version[12] = 0x11;
        assert_eq!(parse(&wrong_version), Err(Invalid));
        assert_eq!(parse(&v2(1, 0x11, &[1, 2, 3], &[])), Err(Invalid));
        // Families the specification does not define.
        for family in [0x13, 0x41, 0x01, 0x10] {
            assert_eq!(
                parse(&v2(1, family, &[0; 12], &[])),
                Err(Invalid),
                "{family:#x}"
            );
        }
    }
}
