//! Limits: per-connection message and byte rates, per-IP connection and handshake caps, the
//! global connection cap, the handshake timeout and the header size limit.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{Client, TestGateway, http_get};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const UPGRADE: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\n\
                       Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";

/// The refusal counters, asked from another address than the clients' (whose per-address limits
/// may be spent).
async fn refused(gw: &TestGateway) -> Value {
    let (_, _, body) = support::http_get_from([127, 0, 0, 9], gw.addr, "/healthz", "").await;
    serde_json::from_str::<Value>(&body).unwrap()["refused"].clone()
}

#[tokio::test]
async fn a_burst_over_the_message_rate_gets_errors_and_a_flood_gets_1008() {
    let gw = TestGateway::start_with(
        |c| {
            c.rate_limit_messages = 5.0;
            c.rate_limit_burst = 10;
            c.rate_limit_strikes = 5;
        },
        1,
    );
    let mut c = gw.client().await;
    for i in 0..13 {
        c.send("echo", json!(i)).await;
    }
    // The burst passes; past it, messages are refused with an error, not processed.
    for i in 0..10 {
        assert_eq!(c.expect("echo").await["payload"], i);
    }
    for _ in 0..3 {
        c.expect_error("Rate limit exceeded: slow down").await;
    }
    // After a pause the bucket has refilled (5/s).
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.send("echo", json!("again")).await;
    assert_eq!(c.expect("echo").await["payload"], "again");
    // Keep flooding: out of strikes, the connection is closed with 1008.
    for i in 0..40 {
        c.send("echo", json!(i)).await;
    }
    let close = c.expect_close().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1008);
    assert_eq!(close.reason.as_str(), "rate limit exceeded");
    let counters = refused(&gw).await;
    assert_eq!(counters["flood_closed"], 1);
    // 3 refused in the burst, then the flood: the strikes left, and the one that closed it.
    assert!(counters["rate_limited_messages"].as_u64().unwrap() >= 6);
}

#[tokio::test]
async fn the_byte_rate_limits_big_messages() {
    let gw = TestGateway::start_with(
        |c| {
            c.max_message_size = 4096;
            c.rate_limit_bytes = 1000;
            c.rate_limit_burst_bytes = Some(8192);
        },
        1,
    );
    let mut c = gw.client().await;
    let big = "x".repeat(3000);
    c.send("echo", json!(big)).await;
    c.send("echo", json!(big)).await;
    c.send("echo", json!(big)).await; // 9 KB in all: over the 8 KiB burst
    c.expect("echo").await;
    c.expect("echo").await;
    c.expect_error("Rate limit exceeded: slow down").await;
}

#[tokio::test]
async fn per_ip_connection_and_handshake_caps_answer_429() {
    let gw = TestGateway::start_with(|c| c.max_connections_per_ip = 2, 1);
    let _a = gw.client().await;
    let _b = gw.client().await;
    // A third connection of any kind from the address is refused from `accept` on.
    for path in ["/ws", "/healthz"] {
        let (status, _, body) = http_get(gw.addr, path, UPGRADE).await;
        assert_eq!(status, 429, "{body}");
        assert!(body.contains("too many connections"), "{body}");
    }
    assert_eq!(refused(&gw).await["ip_connections_refused"], 2);

    let gw = TestGateway::start_with(|c| c.max_handshakes_per_ip = 3.0, 1);
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(http_get(gw.addr, "/ws", UPGRADE).await.0);
    }
    assert_eq!(statuses, vec![101, 101, 101, 429, 429]);
    assert_eq!(refused(&gw).await["ip_handshakes_refused"], 2);
}

#[tokio::test]
async fn a_full_server_answers_503_and_frees_places_as_clients_leave() {
    let gw = TestGateway::start_with(|c| c.max_connections = 2, 2);
    let a = gw.client().await;
    let _b = gw.client().await;
    let (status, _, body) = http_get(gw.addr, "/ws", UPGRADE).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("server full"), "{body}");
    drop(a);
    gw.wait_for_connections(1).await;
    let _c = Client::connect(&gw.url("/ws")).await;
    assert_eq!(refused(&gw).await["server_full"], 1);
}

#[tokio::test]
async fn refused_upgrades_give_their_place_back() {
    // Failed authentication must not leak the per-IP count.
    let gw = TestGateway::start_with(
        |c| {
            c.allow_anonymous = false;
            c.max_connections_per_ip = 1;
        },
        1,
    );
    for _ in 0..3 {
        assert_eq!(http_get(gw.addr, "/ws", UPGRADE).await.0, 401);
    }
    let token = support::token_for("zoe");
    let _zoe = Client::connect(&gw.url(&format!("/ws?token={token}"))).await;
}

#[tokio::test]
async fn slow_headers_are_cut_off_and_huge_headers_refused() {
    let gw = TestGateway::start_with(|c| c.handshake_timeout = Duration::from_millis(300), 1);
    // Slow-loris: a request head that never ends.
    let mut slow = TcpStream::connect(gw.addr).await.unwrap();
    slow.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(3), slow.read_to_end(&mut buf)).await;
    assert!(ended.is_ok(), "the gateway hangs up on a slow request head");

    let huge = format!("X-Filler: {}\r\n", "a".repeat(40_000));
    let (status, _, _) = http_get(gw.addr, "/healthz", &huge).await;
    assert_eq!(status, 431);
}

#[tokio::test]
async fn a_reconnecting_client_rejoins_all_its_rooms_at_once() {
    // Real limits: 20 messages/s with a burst of 40; 100 rooms per connection.
    let gw = TestGateway::start_with(
        |c| {
            c.rate_limit_messages = 20.0;
            c.rate_limit_burst = 40;
            c.rate_limit_strikes = 20;
        },
        1,
    );
    let rooms: Vec<String> = (0..100).map(|i| format!("room-{i}")).collect();
    for _ in 0..2 {
        // A (re)connecting client sends all its joins back to back.
        let mut c = gw.client().await;
        for room in &rooms {
            c.send("join_room", json!({"room": room})).await;
        }
        for room in &rooms {
            assert_eq!(c.expect("room_joined").await["room"], *room);
        }
        // Leaving them all at once passes too (no error comes before the echo), and messages
        // still have their own budget.
        for room in &rooms {
            c.send("leave_room", json!({"room": room})).await;
        }
        c.send("echo", json!("chat budget intact")).await;
        assert_eq!(
            c.recv().await,
            json!({"type": "echo", "payload": "chat budget intact"})
        );
    }
    assert_eq!(refused(&gw).await["rate_limited_messages"], 0);
}

/// A chat client on `gw` from the loopback address `source`, as `user` (`None`: anonymous).
async fn client_from(gw: &TestGateway, source: [u8; 4], user: Option<&str>) -> Client {
    let token = user.map(|u| format!("Bearer {}", support::token_for(u)));
    let headers: Vec<(&'static str, &str)> = token
        .iter()
        .map(|t| ("authorization", t.as_str()))
        .collect();
    let ws = support::websocket_from(source, gw.addr, &headers)
        .await
        .expect("upgraded");
    Client::from_stream(ws).await
}

async fn try_join(client: &mut Client, room: &str) -> Value {
    client.send("join_room", json!({"room": room})).await;
    client.recv().await
}

#[tokio::test]
async fn new_rooms_are_budgeted_per_user_and_per_address() {
    let gw = TestGateway::start_with(
        |c| {
            c.room_creation_burst = 3;
            c.room_creation_rate = 0.001;
        },
        1,
    );
    const FULL: &str = "Too many new rooms: join an existing room or retry later";
    // One user, cycling connections through fresh room names, from 127.0.0.2.
    for round in 0..3 {
        let mut mallory = client_from(&gw, [127, 0, 0, 2], Some("mallory")).await;
        let joined = try_join(&mut mallory, &format!("fresh-{round}")).await;
        assert_eq!(joined["type"], "room_joined", "{joined}");
    }
    let mut mallory = client_from(&gw, [127, 0, 0, 2], Some("mallory")).await;
    let refused = try_join(&mut mallory, "fresh-3").await;
    assert_eq!(refused, json!({"type": "error", "error": FULL}));
    // The same user from another address: its budget is spent there too.
    let mut elsewhere = client_from(&gw, [127, 0, 0, 3], Some("mallory")).await;
    assert_eq!(try_join(&mut elsewhere, "fresh-4").await["error"], FULL);
    // Another user at mallory's address has a budget of its own (many users share a NAT).
    let mut neighbour = client_from(&gw, [127, 0, 0, 2], Some("nina")).await;
    assert_eq!(
        try_join(&mut neighbour, "ninas").await["type"],
        "room_joined"
    );
    // Anonymous connections are budgeted by their address, whatever the connection.
    for round in 0..3 {
        let mut anonymous = client_from(&gw, [127, 0, 0, 2], None).await;
        let joined = try_join(&mut anonymous, &format!("anon-{round}")).await;
        assert_eq!(joined["type"], "room_joined", "{joined}");
    }
    let mut anonymous = client_from(&gw, [127, 0, 0, 2], None).await;
    assert_eq!(try_join(&mut anonymous, "anon-3").await["error"], FULL);
    // Rooms the node holds cost nothing: mallory still joins one.
    assert_eq!(try_join(&mut mallory, "ninas").await["type"], "room_joined");
    assert_eq!(refused_rooms(&gw).await, 3);
}

async fn refused_rooms(gw: &TestGateway) -> u64 {
    refused(gw).await["rooms_refused"].as_u64().unwrap()
}

#[tokio::test]
async fn replayed_history_is_charged_to_a_replay_budget() {
    let gw = TestGateway::start_with(
        |c| {
            c.max_queued_bytes = 8192;
            c.rate_limit_bytes = 4096;
        },
        1,
    );
    let mut writer = gw.client().await;
    let epoch = writer.join_room_epoch("h").await;
    let text = "x".repeat(200);
    for _ in 0..20 {
        writer.chat("h", &text).await;
    }
    writer.chats(20).await;
    // ~5 KB of history: the first replay fits the budget (one outbound queue's worth).
    let mut reader = gw.client().await;
    let joined = reader.join_since("h", Some((0, &epoch))).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(reader.chats(20).await.len(), 20);
    // Leaving and rejoining from the start at once would replay it again: refused, told.
    reader.send("leave_room", json!({"room": "h"})).await;
    let joined = reader.join_since("h", Some((0, &epoch))).await;
    assert_eq!(joined["recovered"], false, "{joined}");
    reader.expect_silence().await;
    assert_eq!(refused(&gw).await["replays_refused"], 1);
    // It refills at the byte rate: later, the same replay is given.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    reader.send("leave_room", json!({"room": "h"})).await;
    let joined = reader.join_since("h", Some((0, &epoch))).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(reader.chats(20).await.len(), 20);
}
