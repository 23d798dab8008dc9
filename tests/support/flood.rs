//! Flooding clients: raw sockets that upgrade, then write the same frame over and over and never
//! read.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use super::{PATIENCE, raw_frame};

/// The gateway's read size: what a flooder writes at a time.
pub const READ_BUFFER: usize = 64 * 1024;

pub fn empty_ping() -> Vec<u8> {
    raw_frame(true, 0x9, b"", true)
}

/// Upgrades a blocking socket on `path` (no token: the gateways here allow anonymous clients).
/// Its receive buffer is small, so the kernel soaks up little of what the gateway sends: what a
/// client does not read piles up in the gateway, as it would behind a slow network.
pub fn upgrade(addr: SocketAddr, path: &str) -> TcpStream {
    upgrade_with(addr, path, "")
}

/// [`upgrade`] with `extra_headers` (each ending in CRLF) in the request.
pub fn upgrade_with(addr: SocketAddr, path: &str, extra_headers: &str) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&addr.into()).unwrap();
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         {extra_headers}\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{:?}",
        String::from_utf8_lossy(&head)
    );
    stream
}

/// Flooding clients on threads of their own, stopped and joined when dropped (also when an
/// assertion fails).
#[derive(Default)]
pub struct Floods {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<u64>>,
}

impl Floods {
    /// A client that writes `frame` (a 64 KiB batch of it, over and over) and never reads, until
    /// stopped or hung up on.
    pub fn start(&mut self, stream: TcpStream, frame: &[u8]) {
        self.threads.push(flooder(stream, frame, self.stop.clone()));
    }

    /// Stops the floods; returns the bytes they wrote in all.
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.threads.drain(..).map(|t| t.join().unwrap()).sum()
    }
}

impl Drop for Floods {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// A client that writes `frames` (one 64 KiB batch of them, over and over) and never reads, until
/// `stop` is set or the gateway hangs up. Returns the bytes it managed to write.
fn flooder(mut stream: TcpStream, frame: &[u8], stop: Arc<AtomicBool>) -> JoinHandle<u64> {
    let batch: Vec<u8> = frame.repeat(READ_BUFFER / frame.len());
    stream
        .set_write_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    std::thread::spawn(move || {
        let (mut written, mut at) = (0, 0);
        while !stop.load(Ordering::Relaxed) {
            // Frames stay whole across partial writes: the batch is written round and round.
            match stream.write(&batch[at..]) {
                Ok(n) => {
                    written += n as u64;
                    at = (at + n) % batch.len();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => break,
            }
        }
        written
    })
}
