//! The HTTP side: routes, the test page, health, and upgrade refusals.

mod support;

use serde_json::Value;
use support::{Client, RawClient, TestGateway, http_get};

#[tokio::test]
async fn test_page_is_served_at_the_root() {
    let gw = TestGateway::start(1);
    let (status, head, body) = http_get(gw.addr, "/", "").await;
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/html"),
        "{head}"
    );
    assert!(body.contains("<title>wsgate test client</title>"));
    assert!(
        body.contains(
            r#"import { WsgateClient, tokenClaims, tokenExpiry } from "/wsgate-client.js""#
        )
    );
    // The SDK it imports, as one module speaking the protocol.
    let (status, head, sdk) = http_get(gw.addr, "/wsgate-client.js", "").await;
    assert_eq!(status, 200);
    let head = head.to_ascii_lowercase();
    assert!(head.contains("content-type: text/javascript"), "{head}");
    assert!(head.contains("cache-control: no-cache"), "{head}");
    assert!(sdk.contains("export {") && sdk.contains("WsgateClient"));
    assert!(sdk.contains("join_room") && sdk.contains("chat_message") && sdk.contains("typing"));
}

#[tokio::test]
async fn healthz_reports_gauges() {
    let gw = TestGateway::start(2);
    let _client = gw.client().await;
    let (status, _, body) = http_get(gw.addr, "/healthz", "").await;
    assert_eq!(status, 200);
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["connections"], 1);
    assert_eq!(health["shards"], 2);
}

#[tokio::test]
async fn unknown_paths_are_404_with_a_json_error() {
    let gw = TestGateway::start(1);
    let (status, _, body) = http_get(gw.addr, "/nope", "").await;
    assert_eq!(status, 404);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"],
        "not found"
    );
}

#[tokio::test]
async fn plain_get_on_a_websocket_endpoint_is_426() {
    let gw = TestGateway::start(1);
    for path in ["/ws", "/echo"] {
        let (status, _, body) = http_get(gw.addr, path, "").await;
        assert_eq!(status, 426, "{path}");
        assert!(serde_json::from_str::<Value>(&body).unwrap()["error"].is_string());
    }
}

#[tokio::test]
async fn unsupported_websocket_version_is_426_naming_13() {
    let gw = TestGateway::start(1);
    let headers = "Upgrade: websocket\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n";
    let (status, head, _) = http_get(gw.addr, "/ws", headers).await;
    assert_eq!(status, 426);
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-version: 13"),
        "{head}"
    );
}

#[tokio::test]
async fn missing_key_is_400() {
    let gw = TestGateway::start(1);
    let headers = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n";
    let (status, _, body) = http_get(gw.addr, "/ws", headers).await;
    assert_eq!(status, 400);
    assert!(serde_json::from_str::<Value>(&body).unwrap()["error"].is_string());
}

#[tokio::test]
async fn chat_protocol_is_served_on_ws_and_on_the_root() {
    let gw = TestGateway::start(1);
    for path in ["/ws", "/"] {
        let mut client = Client::connect(&gw.url(path)).await;
        client.send("echo", serde_json::json!({"n": 1})).await;
        assert_eq!(client.expect("echo").await["payload"]["n"], 1);
    }
}

#[tokio::test]
async fn client_ids_are_unique_even_when_slots_are_reused() {
    let gw = TestGateway::start(1);
    let first = gw.client().await;
    let first_id = first.id.clone();
    drop(first);
    gw.wait_for_connections(0).await;
    let second = gw.client().await;
    // Same node, shard and slab slot; another generation.
    let (a, b): (Vec<&str>, Vec<&str>) = (
        first_id.split('.').collect(),
        second.id.split('.').collect(),
    );
    assert_eq!(a.len(), 4, "node.shard.slot.generation: {first_id}");
    assert_eq!(a[..3], b[..3], "{first_id} vs {}", second.id);
    assert_ne!(a[3], b[3]);
    // Another node names its clients otherwise.
    let other = TestGateway::start(1);
    let elsewhere = other.client().await;
    assert_ne!(elsewhere.id.split('.').next(), a.first().copied());
}

#[tokio::test]
async fn frames_pipelined_behind_the_handshake_are_not_lost() {
    // The client's first frame arrives in the same packet as its upgrade request; hyper reads it
    // and the gateway must replay it.
    let gw = TestGateway::start(1);
    let mut request = format!(
        "GET /echo HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        gw.addr
    )
    .into_bytes();
    request.extend(support::raw_frame(true, 0x1, b"early bird", true));
    let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stream, &request)
        .await
        .unwrap();
    let mut raw = RawClient::from_stream_after_handshake(stream).await;
    assert_eq!(raw.read_frame().await, (true, 0x1, b"early bird".to_vec()));
}

const UPGRADE: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n";
const KEY: &str = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

/// Sends `request` as is and returns the status and the `error` of the JSON body.
async fn raw_request(gw: &TestGateway, request: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes())
        .await
        .unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(
        support::PATIENCE,
        tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut response),
    )
    .await
    .expect("an answer, then the connection closed")
    .unwrap();
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").expect("a whole response");
    let status = head[9..12].parse().unwrap();
    let body: Value =
        serde_json::from_str(body).unwrap_or_else(|_| panic!("JSON body: {response}"));
    (
        status,
        body["error"].as_str().expect("an error message").to_owned(),
    )
}

#[tokio::test]
async fn upgrades_that_break_rfc_6455_are_400() {
    let gw = TestGateway::start(1);
    let cases = [
        (
            "a key that is not 16 bytes",
            format!("{UPGRADE}Sec-WebSocket-Key: c2hvcnQ=\r\n"),
        ),
        (
            "a key that is not base64",
            format!("{UPGRADE}Sec-WebSocket-Key: !!!!!!!!!!!!!!!!!!!!!!==\r\n"),
        ),
        ("two keys", format!("{UPGRADE}{KEY}{KEY}")),
        (
            "two versions",
            format!("{UPGRADE}{KEY}Sec-WebSocket-Version: 13\r\n"),
        ),
        (
            "two origins",
            format!("{UPGRADE}{KEY}Origin: https://a.example\r\nOrigin: https://b.example\r\n"),
        ),
    ];
    for (what, headers) in &cases {
        let (status, _, body) = http_get(gw.addr, "/ws", headers).await;
        assert_eq!(status, 400, "{what}: {body}");
        assert!(serde_json::from_str::<Value>(&body).unwrap()["error"].is_string());
    }
    // HTTP/1.0 cannot upgrade.
    let request = format!("GET /ws HTTP/1.0\r\nHost: x\r\n{UPGRADE}{KEY}\r\n");
    let (status, error) = raw_request(&gw, &request).await;
    assert_eq!(
        (status, error.as_str()),
        (400, "WebSocket upgrades need HTTP/1.1")
    );
    let (_, _, body) = http_get(gw.addr, "/healthz", "").await;
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["refused"]["bad_requests"], cases.len() + 1);
}

#[tokio::test]
async fn malformed_and_oversized_request_heads_get_json_answers() {
    let gw = TestGateway::start(1);
    let (status, error) = raw_request(&gw, "\x16\x03\x01 not http at all\r\n\r\n").await;
    assert_eq!((status, error.as_str()), (400, "malformed HTTP request"));
    let (status, error) = raw_request(&gw, "GET / HTTP/1.1\r\nBroken header line\r\n\r\n").await;
    assert_eq!((status, error.as_str()), (400, "malformed HTTP request"));
    let huge = format!("GET / HTTP/1.1\r\nX-Filler: {}\r\n\r\n", "a".repeat(40_000));
    let (status, error) = raw_request(&gw, &huge).await;
    assert_eq!(status, 431, "{error}");
    let many: String = (0..150).map(|i| format!("X-{i}: y\r\n")).collect();
    let (status, _) = raw_request(&gw, &format!("GET / HTTP/1.1\r\n{many}\r\n")).await;
    assert_eq!(status, 431);
}

#[tokio::test]
async fn the_echo_endpoint_can_be_turned_off() {
    let gw = TestGateway::start_with(|c| c.echo_endpoint = false, 1);
    let (status, _, body) = http_get(gw.addr, "/echo", &format!("{UPGRADE}{KEY}")).await;
    assert_eq!(status, 404, "{body}");
}

#[tokio::test]
async fn healthz_counters_can_be_kept_private() {
    let gw = TestGateway::start_with(|c| c.healthz_detail = false, 1);
    let (status, _, body) = http_get(gw.addr, "/healthz", "").await;
    assert_eq!(status, 200);
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "ok");
    assert!(health.get("refused").is_none(), "{health}");
}

#[tokio::test]
async fn ambiguous_body_framing_is_a_json_400_and_bare_line_feeds_are_fine() {
    let gw = TestGateway::start(1);
    for framing in [
        "Content-Length: abc",
        "Content-Length: 1, 2",
        "Content-Length: 1\r\nContent-Length: 2",
        "Transfer-Encoding: gzip",
        "Transfer-Encoding: chunked\r\nContent-Length: 3",
    ] {
        let request = format!("POST /healthz HTTP/1.1\r\nHost: x\r\n{framing}\r\n\r\n");
        let (status, error) = raw_request(&gw, &request).await;
        assert_eq!(
            (status, error.as_str()),
            (400, "malformed HTTP request"),
            "{framing}"
        );
    }
    let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let bare = "GET /healthz HTTP/1.1\nHost: x\nConnection: close\n\n";
    tokio::io::AsyncWriteExt::write_all(&mut stream, bare.as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(
        support::PATIENCE,
        tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut answer),
    )
    .await
    .expect("an answer")
    .unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "bare line feeds, as hyper reads them"
    );
    let (_, _, body) = http_get(gw.addr, "/healthz", "").await;
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["refused"]["bad_requests"], 5);
}

#[tokio::test]
async fn an_upgrade_needs_exactly_one_host_and_a_wrong_version_is_counted() {
    let gw = TestGateway::start(1);
    let no_host =
        "Upgrade: websocket\r\nConnection: Upgrade, close\r\nSec-WebSocket-Version: 13\r\n";
    let request = format!("GET /ws HTTP/1.1\r\n{no_host}{KEY}\r\n");
    let (status, error) = raw_request(&gw, &request).await;
    assert_eq!(
        (status, error.as_str()),
        (400, "an upgrade needs exactly one Host header")
    );
    let (status, _, _) = http_get(gw.addr, "/ws", &format!("Host: other\r\n{UPGRADE}{KEY}")).await;
    assert_eq!(status, 400, "two Host headers");
    let wrong = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 8\r\n";
    let (status, _, _) = http_get(gw.addr, "/ws", &format!("{wrong}{KEY}")).await;
    assert_eq!(status, 426);
    let (_, _, body) = http_get(gw.addr, "/healthz", "").await;
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["refused"]["bad_requests"], 3);
}

#[tokio::test]
async fn a_plain_http_connection_has_a_bounded_life_and_a_bounded_number_of_requests() {
    let gw = TestGateway::start_with(
        |c| c.http_max_lifetime = std::time::Duration::from_secs(1),
        1,
    );
    // 100 requests answered, the last with `Connection: close`, then the connection ends.
    let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let requests = "GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n".repeat(101);
    tokio::io::AsyncWriteExt::write_all(&mut stream, requests.as_bytes())
        .await
        .unwrap();
    let mut answers = Vec::new();
    tokio::time::timeout(
        support::PATIENCE,
        tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut answers),
    )
    .await
    .expect("the connection ends")
    .ok();
    let answers = String::from_utf8_lossy(&answers);
    assert_eq!(answers.matches("HTTP/1.1 200").count(), 100);
    assert_eq!(
        answers
            .to_ascii_lowercase()
            .matches("connection: close")
            .count(),
        1
    );

    // A client that sends requests and never reads the answers is closed at the lifetime.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stuck = socket.connect(gw.addr).await.unwrap();
    let page = "GET / HTTP/1.1\r\nHost: x\r\n\r\n".repeat(90);
    let started = std::time::Instant::now();
    let _ = tokio::time::timeout(
        support::PATIENCE,
        tokio::io::AsyncWriteExt::write_all(&mut stuck, page.as_bytes()),
    )
    .await;
    let deadline = tokio::time::Instant::now() + support::PATIENCE;
    loop {
        let (_, _, body) = http_get(gw.addr, "/healthz", "").await;
        let health: Value = serde_json::from_str(&body).unwrap();
        if health["refused"]["http_expired"] == 1 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{health}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(started.elapsed() >= std::time::Duration::from_millis(900));
}
