//! One simulated client: TCP from a chosen source address, the WebSocket handshake (fastwebsockets'
//! client), and the gateway's `connected` greeting.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use fastwebsockets::{FragmentCollector, OpCode};
use http_body_util::Empty;
use hyper::Request;
use hyper::header::{CONNECTION, HOST, UPGRADE};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::net::TcpSocket;

pub type Ws = FragmentCollector<TokioIo<Upgraded>>;

/// Why a connection attempt failed, coarse enough to count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
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

/// Connects to `target` from `source` and completes the upgrade on `path`.
pub async fn connect(source: IpAddr, target: SocketAddr, path: &str) -> Result<Ws, Failure> {
    let socket = match target {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|_| Failure::Connect)?;
    socket
        .bind(SocketAddr::new(source, 0))
        .map_err(|_| Failure::Connect)?;
    let stream = socket.connect(target).await.map_err(|_| Failure::Connect)?;
    stream.set_nodelay(true).map_err(|_| Failure::Connect)?;
    let request = Request::builder()
        .method("GET")
        .uri(path)
        .header(HOST, target.to_string())
        .header(UPGRADE, "websocket")
        .header(CONNECTION, "upgrade")
        .header(
            "Sec-WebSocket-Key",
            fastwebsockets::handshake::generate_key(),
        )
        .header("Sec-WebSocket-Version", "13")
        .body(Empty::<Bytes>::new())
        .map_err(|_| Failure::Handshake)?;
    let (ws, _) = fastwebsockets::handshake::client(&SpawnExecutor, request, stream)
        .await
        .map_err(|_| Failure::Handshake)?;
    Ok(FragmentCollector::new(ws))
}

/// Reads the `connected` greeting a chat endpoint sends first.
pub async fn read_greeting(ws: &mut Ws) -> Result<(), Failure> {
    let frame = ws.read_frame().await.map_err(|_| Failure::Greeting)?;
    let ok = frame.opcode == OpCode::Text
        && serde_json::from_slice::<serde_json::Value>(&frame.payload)
            .is_ok_and(|v| v["type"] == "connected");
    if ok { Ok(()) } else { Err(Failure::Greeting) }
}
