//! One simulated client: TCP from a chosen source address, the WebSocket handshake (fastwebsockets'
//! client), and the gateway's `connected` greeting.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, OnceLock};

use crate::deflate::Inflating;
pub use crate::deflate::Ws;
use bytes::Bytes;
use fastwebsockets::{FragmentCollector, Frame, OpCode, Payload};
use http_body_util::Empty;
use hyper::Request;
use hyper::header::{CONNECTION, HOST, SEC_WEBSOCKET_EXTENSIONS, UPGRADE};
use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject;
use serde_json::{Value, json};
use tokio::net::TcpSocket;
use tokio_rustls::TlsConnector;

/// Why a connection attempt failed, coarse enough to count.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Failure {
    /// TCP connect failed (refused, no route, out of ports or files).
    Connect,
    /// The server refused or broke the HTTP upgrade.
    Handshake,
    /// No `connected` greeting.
    Greeting,
    /// The whole attempt took longer than the handshake timeout.
    Timeout,
    /// Joining a room (`join_room` → `room_joined`) failed.
    Join,
    /// Opened, then closed while waiting for the run to start.
    ClosedWhileWaiting,
}

/// Runs hyper's client connection task on the current runtime.
struct SpawnExecutor;

impl<F> hyper::rt::Executor<F> for SpawnExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(fut);
    }
}

/// The TLS client every connection of this process uses (`--tls-ca`), if any.
static TLS: OnceLock<Option<TlsConnector>> = OnceLock::new();

/// Sets up TLS for this process's connections: with `ca`, every connection speaks TLS and trusts
/// that CA. Call once, before connecting.
pub fn init_tls(ca: Option<&Path>) -> Result<(), String> {
    let connector = match ca {
        None => None,
        Some(path) => {
            let pem =
                std::fs::read(path).map_err(|e| format!("--tls-ca {}: {e}", path.display()))?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| format!("--tls-ca {}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("--tls-ca {}: {e}", path.display()))?;
            }
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Some(TlsConnector::from(Arc::new(config)))
        }
    };
    TLS.set(connector)
        .map_err(|_| "TLS set up twice".to_owned())
}

/// The offer browsers make (`--compression`).
const DEFLATE_OFFER: &str = "permessage-deflate; client_max_window_bits";

/// Connects to `target` from `source` and completes the upgrade on `path` (over TLS with
/// `--tls-ca`), offering permessage-deflate with `compression`.
pub async fn connect(
    source: IpAddr,
    target: SocketAddr,
    path: &str,
    compression: bool,
) -> Result<Ws, Failure> {
    let socket = match target {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|_| Failure::Connect)?;
    // Pick the local port at connect time, by the whole 4-tuple: without this, bind() searches
    // for a port free for every destination, which gets slow (system CPU) with tens of
    // thousands of sockets per source address.
    let no_port: libc::c_int = 1;
    // SAFETY: a valid socket fd and a c_int option value of the size given.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&no_port as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    socket
        .bind(SocketAddr::new(source, 0))
        .map_err(|_| Failure::Connect)?;
    let stream = socket.connect(target).await.map_err(|_| Failure::Connect)?;
    stream.set_nodelay(true).map_err(|_| Failure::Connect)?;
    let mut request = Request::builder()
        .method("GET")
        .uri(path)
        .header(HOST, target.to_string())
        .header(UPGRADE, "websocket")
        .header(CONNECTION, "upgrade")
        .header(
            "Sec-WebSocket-Key",
            fastwebsockets::handshake::generate_key(),
        )
        .header("Sec-WebSocket-Version", "13");
    if compression {
        request = request.header(SEC_WEBSOCKET_EXTENSIONS, DEFLATE_OFFER);
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|_| Failure::Handshake)?;
    let (ws, response) = match TLS.get().and_then(Option::as_ref) {
        Some(tls) => {
            let name = ServerName::try_from("localhost").expect("a valid name");
            let stream = tls
                .connect(name, stream)
                .await
                .map_err(|_| Failure::Handshake)?;
            fastwebsockets::handshake::client(&SpawnExecutor, request, stream).await
        }
        None => fastwebsockets::handshake::client(&SpawnExecutor, request, stream).await,
    }
    .map_err(|_| Failure::Handshake)?;
    let agreed = response
        .headers()
        .get(SEC_WEBSOCKET_EXTENSIONS)
        .is_some_and(|v| v.as_bytes().starts_with(b"permessage-deflate"));
    if agreed && !compression {
        return Err(Failure::Handshake);
    }
    Ok(if agreed {
        Ws::Compressed(Box::new(Inflating::new(ws.into_inner())))
    } else {
        Ws::Plain(FragmentCollector::new(ws))
    })
}

/// Reads the `connected` greeting a chat endpoint sends first.
pub async fn read_greeting(ws: &mut Ws) -> Result<(), Failure> {
    let frame = ws.read_frame().await.map_err(|_| Failure::Greeting)?;
    let ok = frame.opcode == OpCode::Text
        && serde_json::from_slice::<serde_json::Value>(&frame.payload)
            .is_ok_and(|v| v["type"] == "connected");
    if ok { Ok(()) } else { Err(Failure::Greeting) }
}

pub async fn send_json(ws: &mut Ws, value: &Value) -> bool {
    let text = value.to_string();
    ws.write_frame(Frame::text(Payload::Borrowed(text.as_bytes())))
        .await
        .is_ok()
}

/// The next chat-protocol message, skipping control frames; `None` once the connection ends.
pub async fn next_json(ws: &mut Ws) -> Option<Value> {
    loop {
        let frame = ws.read_frame().await.ok()?;
        match frame.opcode {
            OpCode::Text => return serde_json::from_slice(&frame.payload).ok(),
            OpCode::Close => return None,
            _ => {}
        }
    }
}

/// Joins `room` and waits for the confirmation (skipping notices that arrive first).
pub async fn join(ws: &mut Ws, room: &str) -> Result<(), Failure> {
    if !send_json(ws, &json!({"type": "join_room", "payload": {"room": room}})).await {
        return Err(Failure::Join);
    }
    while let Some(msg) = next_json(ws).await {
        if msg["type"] == "room_joined" {
            return Ok(());
        }
        if msg["type"] == "error" {
            return Err(Failure::Join);
        }
    }
    Err(Failure::Join)
}

/// Closes cleanly: sends a close frame and reads until the server's close comes back.
/// False if the connection ended any other way.
pub async fn close(mut ws: Ws) -> bool {
    if ws.write_frame(Frame::close(1000, b"")).await.is_err() {
        return false;
    }
    loop {
        match ws.read_frame().await {
            Ok(frame) if frame.opcode == OpCode::Close => return true,
            // A data frame that was on its way when we closed (fastwebsockets reports it so).
            Ok(_) | Err(fastwebsockets::WebSocketError::ConnectionClosed) => {}
            Err(_) => return false,
        }
    }
}
