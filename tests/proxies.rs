//! Real client addresses behind proxies, over real sockets: from `trusted_proxies` only, the
//! address named by `X-Forwarded-For`/`Forwarded` or a PROXY protocol header is the one per-IP
//! limits count; from anyone else those are ignored.

mod support;

use std::net::SocketAddr;

use support::{TestGateway, connect_from, http_get, http_get_from, websocket_from};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The trusted proxy's address; the tests' other clients come from 127.0.0.2.
const PROXY: [u8; 4] = [127, 0, 0, 1];
const OTHER: [u8; 4] = [127, 0, 0, 2];

fn gateway(proxy_protocol: bool) -> TestGateway {
    TestGateway::start_with(
        |c| {
            c.trusted_proxies = vec!["127.0.0.1/32".into()];
            c.proxy_protocol = proxy_protocol;
            c.max_connections_per_ip = 2;
        },
        1,
    )
}

#[tokio::test]
async fn behind_a_trusted_proxy_limits_count_the_forwarded_client() {
    let gw = gateway(false);
    let alice = [("x-forwarded-for", "203.0.113.7")];
    let _held = [
        websocket_from(PROXY, gw.addr, &alice).await.unwrap(),
        websocket_from(PROXY, gw.addr, &alice).await.unwrap(),
    ];
    // Alice is at her cap; the proxy itself is not (it carries everyone).
    assert_eq!(
        websocket_from(PROXY, gw.addr, &alice).await.err(),
        Some(429)
    );
    let bob = [("x-forwarded-for", "2001:db8::9")];
    let _bob = websocket_from(PROXY, gw.addr, &bob).await.unwrap();
    let _idle: Vec<TcpStream> =
        futures_util::future::join_all((0..3).map(|_| connect_from(PROXY, gw.addr))).await;
    let carol = [("x-forwarded-for", "198.51.100.3")];
    let _carol = websocket_from(PROXY, gw.addr, &carol).await.unwrap();
    // A chain a proxy cannot have written is refused.
    let (status, _, body) = http_get_from(
        PROXY,
        gw.addr,
        "/healthz",
        "X-Forwarded-For: 1.2.3.4, nope\r\n",
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("X-Forwarded-For"), "{body}");
    // Every place is given back: once all is closed, alice can connect twice again.
    drop((_held, _bob, _idle, _carol));
    let deadline = tokio::time::Instant::now() + support::PATIENCE;
    loop {
        let (_, _, health) = http_get(gw.addr, "/healthz", "").await;
        let health: serde_json::Value = serde_json::from_str(&health).unwrap();
        if health["sockets"] == 1 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{health}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let _again = [
        websocket_from(PROXY, gw.addr, &alice).await.unwrap(),
        websocket_from(PROXY, gw.addr, &alice).await.unwrap(),
    ];
}

#[tokio::test]
async fn from_anyone_else_forwarding_headers_are_ignored() {
    let gw = gateway(false);
    // Two clients that claim to be two people are two connections from 127.0.0.2.
    let _first = websocket_from(OTHER, gw.addr, &[("x-forwarded-for", "203.0.113.1")])
        .await
        .unwrap();
    let _second = websocket_from(OTHER, gw.addr, &[("x-forwarded-for", "203.0.113.2")])
        .await
        .unwrap();
    assert_eq!(
        websocket_from(OTHER, gw.addr, &[("x-forwarded-for", "203.0.113.3")])
            .await
            .err(),
        Some(429)
    );
    // Nor do they make a remote caller look local to /metrics, or a local one remote.
    let (status, _, _) = http_get_from(
        [127, 0, 0, 3],
        gw.addr,
        "/metrics",
        "X-Forwarded-For: 8.8.8.8\r\n",
    )
    .await;
    assert_eq!(status, 200, "127.0.0.3 is loopback, whatever it says");
}

#[tokio::test]
async fn metrics_see_the_forwarded_client_not_a_local_proxy() {
    let gw = gateway(false);
    let (status, _, _) = http_get(gw.addr, "/metrics", "X-Forwarded-For: 203.0.113.7\r\n").await;
    assert_eq!(
        status, 403,
        "a remote client behind a local proxy is not local"
    );
    let (status, _, _) = http_get(gw.addr, "/metrics", "").await;
    assert_eq!(status, 200, "the proxy's own request");
    let (_, _, health) = http_get(gw.addr, "/healthz", "X-Forwarded-For: 203.0.113.7\r\n").await;
    assert!(
        !health.contains("refused"),
        "no counters for a remote client: {health}"
    );
}

const UPGRADE: &str = "GET /ws HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                       Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// Sends `bytes` from `source`; returns the status line's code and the open stream.
async fn send_first(source: [u8; 4], addr: SocketAddr, bytes: &[u8]) -> (u16, TcpStream) {
    let mut stream = connect_from(source, addr).await;
    stream.write_all(bytes).await.unwrap();
    let mut answer = [0u8; 12];
    stream.read_exact(&mut answer).await.unwrap();
    let status = std::str::from_utf8(&answer[9..12])
        .unwrap()
        .parse()
        .unwrap();
    (status, stream)
}

#[tokio::test]
async fn the_proxy_protocol_names_the_client_in_either_version() {
    let gw = gateway(true);
    let v2 = [
        support::proxy_v2([198, 51, 100, 7]),
        UPGRADE.as_bytes().to_vec(),
    ]
    .concat();
    let (first, _a) = send_first(PROXY, gw.addr, &v2).await;
    let (second, _b) = send_first(PROXY, gw.addr, &v2).await;
    assert_eq!((first, second), (101, 101));
    // That client's cap is reached, whichever version names it.
    let (third, _) = send_first(PROXY, gw.addr, &v2).await;
    assert_eq!(third, 429);
    let v1 = format!("PROXY TCP4 198.51.100.7 10.0.0.1 5000 443\r\n{UPGRADE}");
    assert_eq!(send_first(PROXY, gw.addr, v1.as_bytes()).await.0, 429);
    let v1 = format!("PROXY TCP4 198.51.100.8 10.0.0.1 5000 443\r\n{UPGRADE}");
    let (other_client, _c) = send_first(PROXY, gw.addr, v1.as_bytes()).await;
    assert_eq!(other_client, 101);
    // From the trusted proxy the header is required; from anyone else it is not read.
    let (missing, mut stream) = send_first(PROXY, gw.addr, UPGRADE.as_bytes()).await;
    assert_eq!(missing, 400);
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    assert!(body.contains("PROXY protocol"), "{body}");
    let (direct, _d) = send_first(OTHER, gw.addr, UPGRADE.as_bytes()).await;
    assert_eq!(direct, 101);
    let (status, _, body) = http_get(gw.addr, "/healthz", "").await;
    assert_eq!(status, 400, "{body}");
}
