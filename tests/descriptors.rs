//! File descriptors: plain HTTP connections are admitted from `accept` like any other, and idle
//! ones are the first to go when descriptors run short, so keep-alive clients holding nearly all
//! of them cannot lock out WebSocket clients and health probes from elsewhere.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use support::process::GatewayProcess;
use support::{Client, PATIENCE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio_tungstenite::MaybeTlsStream;

/// A socket to `addr` from the loopback address `source`.
async fn connect_from(source: [u8; 4], addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    socket.connect(addr).await
}

/// A keep-alive client that asks for `/healthz` every second on the same connection until the
/// gateway closes it. Returns how many answers it got.
async fn keep_alive_prober(addr: SocketAddr) -> usize {
    let Ok(mut stream) = connect_from([127, 0, 0, 1], addr).await else {
        return 0;
    };
    let mut answers = 0;
    let mut buf = [0u8; 4096];
    loop {
        let request = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
        if stream.write_all(request.as_bytes()).await.is_err() {
            return answers;
        }
        match tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => answers += 1,
            _ => return answers,
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn healthz_from(source: [u8; 4], addr: SocketAddr) -> Value {
    let mut stream = connect_from(source, addr).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    tokio::time::timeout(PATIENCE, stream.read_to_string(&mut response))
        .await
        .expect("a health answer")
        .unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    serde_json::from_str(body).unwrap()
}

#[tokio::test]
async fn idle_http_connections_cannot_lock_out_websocket_clients() {
    // 300 descriptors: room for ~230 sockets once the reserve is taken.
    let gateway = GatewayProcess::start(
        &["--shards", "1"],
        &[("WSGATE_ALLOW_ANONYMOUS", "true")],
        Some(300),
    );
    let addr = gateway.addr;
    // 290 keep-alive probers from one address: more than the gateway has room for.
    let mut probers = JoinSet::new();
    for _ in 0..290 {
        probers.spawn(keep_alive_prober(addr));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = healthz_from([127, 0, 0, 3], addr).await;
    assert!(
        before["sockets"].as_u64().unwrap() >= 200,
        "the probers hold nearly every descriptor: {before}"
    );

    // A WebSocket client from another address still gets in, within seconds.
    let started = std::time::Instant::now();
    let stream = MaybeTlsStream::Plain(connect_from([127, 0, 0, 2], addr).await.unwrap());
    let (ws, _) = tokio::time::timeout(
        PATIENCE,
        tokio_tungstenite::client_async(format!("ws://{addr}/ws"), stream),
    )
    .await
    .expect("the upgrade is answered within seconds")
    .expect("the upgrade succeeds");
    let mut client = Client::from_stream(ws).await;
    client.send("echo", serde_json::json!("in")).await;
    assert_eq!(client.expect("echo").await["payload"], "in");
    assert!(started.elapsed() < PATIENCE);

    // So does a health probe, and every place given up is counted.
    let after = healthz_from([127, 0, 0, 3], addr).await;
    assert_eq!(after["connections"], 1, "{after}");
    let refused = &after["refused"];
    assert!(refused["http_evicted"].as_u64().unwrap() >= 1, "{after}");
    probers.abort_all();
}
