//! Heartbeats over real sockets: idle connections are pinged, any inbound frame counts as an
//! answer, and a peer that stays silent is closed and cleaned up. (The policy itself, tick by
//! tick, is tested on a fake clock in `src/runtime/heartbeat.rs`; the windows here are wide, so a loaded
//! machine's delays cannot pass for silence.)

mod support;

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use support::{RawClient, TestGateway, http_get};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;
use wsgate::config::HeartbeatMode;

fn fast_heartbeats(mode: HeartbeatMode) -> impl FnOnce(&mut wsgate::Config) {
    move |c| {
        c.heartbeat_interval = Duration::from_millis(150);
        c.heartbeat_timeout = Duration::from_secs(1);
        c.heartbeat_mode = mode;
        c.close_timeout = Duration::from_millis(300);
    }
}

async fn health(gw: &TestGateway) -> Value {
    let (_, _, body) = http_get(gw.addr, "/healthz", "").await;
    serde_json::from_str(&body).unwrap()
}

#[tokio::test]
async fn a_client_that_answers_pings_stays_connected() {
    let gw = TestGateway::start_with(fast_heartbeats(HeartbeatMode::Frame), 2);
    let mut client = gw.client().await;
    // tokio-tungstenite answers pings by itself while it is polled.
    let mut pings = 0;
    // A ping every interval, checked for an answer after the timeout: about one a second here.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(2500);
    while let Ok(msg) = tokio::time::timeout_at(deadline, client.ws.next()).await {
        match msg.expect("open").expect("no error") {
            Message::Ping(_) => pings += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        pings >= 2,
        "an idle connection is pinged again and again ({pings} pings)"
    );
    client.send("echo", json!(1)).await;
    assert_eq!(client.expect("echo").await["payload"], 1);
    assert_eq!(health(&gw).await["refused"]["heartbeat_timeouts"], 0);
}

#[tokio::test]
async fn any_inbound_frame_counts_as_alive() {
    let gw = TestGateway::start_with(fast_heartbeats(HeartbeatMode::Frame), 1);
    let mut raw = RawClient::connect(gw.addr, "/echo").await;
    // Never a pong: only data, more often than the interval.
    for i in 0..15u8 {
        raw.send_frame(true, 0x2, &[i], true).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Everything was echoed, interleaved with at most a few pings, and no close.
    let mut echoed = Vec::new();
    while echoed.len() < 15 {
        match raw.read_frame().await {
            (_, 0x2, payload) => echoed.extend(payload),
            (_, 0x9, _) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(echoed, (0..15).collect::<Vec<u8>>());
    assert_eq!(health(&gw).await["refused"]["heartbeat_timeouts"], 0);
}

#[tokio::test]
async fn a_silent_peer_is_closed_and_leaves_its_rooms() {
    let gw = TestGateway::start_with(fast_heartbeats(HeartbeatMode::Frame), 2);
    let mut alive = gw.client().await;
    alive.join("room").await;
    let mut silent = RawClient::connect(gw.addr, "/ws").await;
    silent
        .send_frame(
            true,
            0x1,
            br#"{"type":"join_room","payload":{"room":"room"}}"#,
            true,
        )
        .await;
    // The live client keeps reading (so answering pings) in the background.
    let (left_tx, left_rx) = tokio::sync::oneshot::channel();
    let reader = tokio::spawn(async move {
        let mut left_tx = Some(left_tx);
        while let Some(Ok(msg)) = alive.ws.next().await {
            if let Message::Text(text) = msg {
                let msg: Value = serde_json::from_str(&text).unwrap();
                if msg["type"] == "user_left" {
                    let _ = left_tx.take().map(|tx| tx.send(msg));
                }
            }
        }
    });
    let left = tokio::time::timeout(Duration::from_secs(5), left_rx)
        .await
        .expect("the silent peer is dropped from the room")
        .unwrap();
    assert_eq!(left["room"], "room");
    gw.wait_for_connections(1).await;
    assert_eq!(health(&gw).await["refused"]["heartbeat_timeouts"], 1);
    // What the silent peer would have read: pings, then the close.
    let mut code = None;
    while code.is_none() {
        match silent.read_frame().await {
            (_, 0x8, payload) => {
                code = Some(u16::from_be_bytes([payload[0], payload[1]]));
                assert_eq!(&payload[2..], b"heartbeat timeout");
            }
            (_, 0x9 | 0x1, _) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(code, Some(1000));
    reader.abort();
}

#[tokio::test]
async fn json_mode_uses_the_seed_ping_and_pong() {
    let gw = TestGateway::start_with(fast_heartbeats(HeartbeatMode::Json), 1);
    let mut client = gw.client().await;
    for _ in 0..4 {
        let ping = client.expect("ping").await;
        assert!(ping["timestamp"].as_u64().unwrap() > 1_600_000_000_000);
        client.send_text(r#"{"type":"pong"}"#).await;
    }
    // Stop answering: closed with 1000 "heartbeat timeout".
    let close = client.expect_close().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1000);
    assert_eq!(close.reason.as_str(), "heartbeat timeout");
}

#[tokio::test]
async fn a_frame_trickled_in_without_end_does_not_keep_a_connection_alive() {
    let gw = TestGateway::start_with(fast_heartbeats(HeartbeatMode::Frame), 1);
    let mut raw = RawClient::connect(gw.addr, "/echo").await;
    // The first bytes of a 1000-byte frame, then one more every 100 ms: bytes, never a frame.
    let frame = support::raw_frame(true, 0x2, &[7; 1000], true);
    raw.stream.write_all(&frame[..20]).await.unwrap();
    let trickle = async {
        for byte in &frame[20..] {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if raw.stream.write_all(&[*byte]).await.is_err() {
                return;
            }
        }
    };
    // Pinged after the interval, closed a timeout later (a few seconds, at most).
    let _ = tokio::time::timeout(Duration::from_secs(5), trickle).await;
    gw.wait_for_connections(0).await;
    assert_eq!(health(&gw).await["refused"]["heartbeat_timeouts"], 1);
}
