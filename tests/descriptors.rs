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

/// `GET /healthz` from 127.0.0.3 every 200 ms for `duration`: the statuses (0: no answer).
async fn probe_for(addr: SocketAddr, duration: Duration) -> Vec<u16> {
    let mut statuses = Vec::new();
    let end = tokio::time::Instant::now() + duration;
    while tokio::time::Instant::now() < end {
        let probe = async {
            let mut stream = connect_from([127, 0, 0, 3], addr).await.ok()?;
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .ok()?;
            let mut response = Vec::new();
            stream.read_to_end(&mut response).await.ok()?;
            String::from_utf8_lossy(&response).get(9..12)?.parse().ok()
        };
        let status = tokio::time::timeout(PATIENCE, probe).await.ok().flatten();
        statuses.push(status.unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    statuses
}

/// Opens connections from `source` at `per_second` for `duration`, each held 2 s without a
/// word, then closed.
async fn churn_from(source: [u8; 4], addr: SocketAddr, per_second: u64, duration: Duration) {
    let mut held = JoinSet::new();
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / per_second));
    let end = tokio::time::Instant::now() + duration;
    while tokio::time::Instant::now() < end {
        ticker.tick().await;
        held.spawn(async move {
            if let Ok(stream) = connect_from(source, addr).await {
                tokio::time::sleep(Duration::from_secs(2)).await;
                drop(stream);
            }
        });
    }
    held.abort_all();
}

#[tokio::test]
async fn fresh_connections_cannot_take_the_probes_reserve() {
    let gateway = GatewayProcess::start(
        &["--shards", "1"],
        &[
            ("WSGATE_ALLOW_ANONYMOUS", "true"),
            ("WSGATE_MAX_HANDSHAKES_PER_IP", "100000"),
        ],
        Some(400),
    );
    let addr = gateway.addr;
    // WebSockets up to max_connections: only the probes' reserve is left.
    let mut sockets = Vec::new();
    loop {
        match tokio_tungstenite::connect_async(format!("ws://{addr}/ws")).await {
            Ok((ws, _)) => sockets.push(ws),
            Err(_) => break,
        }
        assert!(sockets.len() < 400);
    }
    // Fresh connections that never send a request, 100 a second, each held 2 s.
    let (_, statuses) = tokio::join!(
        churn_from([127, 0, 0, 5], addr, 100, Duration::from_secs(4)),
        probe_for(addr, Duration::from_secs(4))
    );
    assert!(
        statuses.iter().all(|s| *s == 200),
        "every probe answered: {statuses:?}"
    );
}

#[tokio::test]
async fn refused_connections_cannot_take_the_descriptors() {
    let gateway = GatewayProcess::start(
        &["--shards", "1"],
        &[
            ("WSGATE_ALLOW_ANONYMOUS", "true"),
            ("WSGATE_MAX_CONNECTIONS_PER_IP", "10"),
        ],
        Some(400),
    );
    let addr = gateway.addr;
    // An address at its cap keeps connecting, 1000 a second, each held 2 s: every one refused.
    let (_, statuses) = tokio::join!(
        churn_from([127, 0, 0, 1], addr, 1000, Duration::from_secs(4)),
        probe_for(addr, Duration::from_secs(4))
    );
    assert!(
        statuses.iter().all(|s| *s == 200),
        "every probe answered: {statuses:?}"
    );
    let health = healthz_from([127, 0, 0, 3], addr).await;
    assert!(
        health["refused"]["ip_connections_refused"]
            .as_u64()
            .unwrap()
            > 100,
        "{health}"
    );
    // The refusals never used up the descriptors (each refused socket lingering a moment for its
    // answer to be read would have, at this rate).
    assert_eq!(health["refused"]["accept_errors"], 0, "{health}");
}
