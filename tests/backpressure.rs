//! Backpressure: a client that does not read can cost the gateway only a bounded queue. Replies
//! to its own messages pause reading from it (TCP pushes back); broadcasts past the bound close it
//! with 1008 "slow consumer", after what is queued, while fast readers get every message.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{RawClient, TestGateway, http_get};
use tokio::io::AsyncWriteExt;
use wsgate::backplane::{Publication, Target};

const QUEUE_LIMIT: usize = 64 * 1024;

/// 400 × 60 KiB = 24 MB: far more than a reader's socket buffers plus the queue bound.
const MESSAGES: usize = 400;

/// A fast reader (tokio-tungstenite) and a slow one (raw, which never reads until told) in
/// room "room".
async fn fast_and_slow(gw: &TestGateway) -> (support::Client, RawClient) {
    let mut fast = gw.client().await;
    fast.join("room").await;
    let mut slow = RawClient::connect(gw.addr, "/ws").await;
    // Join, then stop reading.
    let join = br#"{"type":"join_room","payload":{"room":"room"}}"#;
    slow.send_frame(true, 0x1, join, true).await;
    fast.expect("user_joined").await;
    (fast, slow)
}

/// Publishes MESSAGES numbered `bulk` messages to "room" from the library API.
async fn publish_bulk(gw: &TestGateway) {
    let filler = "x".repeat(60 * 1024);
    for n in 0..MESSAGES {
        let text = format!(r#"{{"type":"bulk","n":{n},"filler":"{filler}"}}"#);
        gw.gateway().publish(Publication {
            target: Target::Room("room".into()),
            frame: wsgate::frame::encode(wsgate::frame::OpCode::Text, text.as_bytes()),
            include: None,
            exclude: vec![],
        });
        // Pace the producer a little so the fast reader is never the one behind.
        if n % 20 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

#[tokio::test]
async fn a_reader_that_never_reads_is_closed_and_the_others_get_everything() {
    let gw = TestGateway::start_with(|c| c.max_queued_bytes = QUEUE_LIMIT, 2);
    let (mut fast, mut slow) = fast_and_slow(&gw).await;
    let reader = tokio::spawn(async move {
        let (mut next, mut departures) = (0, 0);
        while next < MESSAGES {
            let msg = fast.recv().await;
            match msg["type"].as_str() {
                Some("bulk") => {
                    assert_eq!(msg["n"], next, "in order, none lost");
                    next += 1;
                }
                // The slow consumer, once closed, leaves the room.
                Some("user_left") => departures += 1,
                _ => panic!("unexpected {}", msg["type"]),
            }
        }
        assert!(departures <= 1);
        fast
    });
    publish_bulk(&gw).await;
    let mut fast = tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("the fast reader gets all messages in time")
        .unwrap();

    // The slow client now reads: what was queued, then the close.
    assert_eq!(slow.read_close_code().await, 1008);
    slow.expect_eof().await;
    let (_, _, body) = http_get(gw.addr, "/healthz", "").await;
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["refused"]["slow_consumers_closed"], 1);
    // The fast reader is unaffected and still in the room.
    fast.send(
        "chat_message",
        serde_json::json!({"room": "room", "message": "still fine"}),
    )
    .await;
    assert_eq!(fast.expect("chat_message").await["message"], "still fine");
}

#[tokio::test]
async fn a_client_that_sends_without_reading_is_pushed_back_not_buffered() {
    let gw = TestGateway::start_with(|c| c.max_queued_bytes = QUEUE_LIMIT, 1);
    let mut raw = RawClient::connect(gw.addr, "/echo").await;
    // Write 32 KiB echo requests without reading the replies. Once the gateway's queue for this
    // client passes the bound it stops reading, the kernel buffers fill, and our writes stall.
    let frame = support::raw_frame(true, 0x2, &[7u8; 32 * 1024], true);
    let mut sent = 0usize;
    let limit = 256 * 1024 * 1024;
    // Until a write stalls for 2 s: the gateway pushes back.
    while let Ok(written) =
        tokio::time::timeout(Duration::from_secs(2), raw.stream.write_all(&frame)).await
    {
        written.unwrap();
        sent += 1;
        assert!(
            sent * frame.len() < limit,
            "the gateway kept reading 256 MB unread"
        );
    }
    // Other clients are served meanwhile.
    let mut other = gw.client().await;
    other.send("echo", serde_json::json!({"ok": true})).await;
    other.expect("echo").await;
    // Reading resumes the flow: every echo arrives, in order, and the connection stays open.
    let mut echoed = 0;
    while echoed < sent {
        let (_, opcode, payload) = raw.read_frame().await;
        assert_eq!((opcode, payload.len()), (0x2, 32 * 1024));
        echoed += 1;
    }
}

#[tokio::test]
async fn with_the_drop_policy_a_slow_reader_loses_old_broadcasts_and_is_told_how_many() {
    let gw = TestGateway::start_with(
        |c| {
            c.max_queued_bytes = QUEUE_LIMIT;
            c.slow_consumer_policy = wsgate::config::SlowConsumerPolicy::Drop;
        },
        1,
    );
    let (mut fast, mut slow) = fast_and_slow(&gw).await;
    let reader = tokio::spawn(async move {
        for i in 0..MESSAGES {
            assert_eq!(
                fast.expect("bulk").await["n"],
                i,
                "the fast reader loses nothing"
            );
        }
        fast
    });
    publish_bulk(&gw).await;
    // Kept connected: its leaving would be news to the slow reader.
    let _fast = tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("the fast reader gets all messages in time")
        .unwrap();

    // The slow reader catches up: the messages it got, in order, and a count of the rest.
    let (mut received, mut last, mut dropped) = (0, None, 0);
    while received + dropped < MESSAGES {
        let (_, opcode, payload) = slow.read_frame().await;
        assert_eq!(opcode, 0x1);
        let msg: Value = serde_json::from_slice(&payload).unwrap();
        match msg["type"].as_str() {
            Some("connected" | "room_joined") => {}
            Some("bulk") => {
                let n = msg["n"].as_u64().unwrap();
                assert!(last.is_none_or(|l| n > l), "in order");
                last = Some(n);
                received += 1;
            }
            Some("dropped") => dropped += msg["count"].as_u64().unwrap() as usize,
            _ => panic!("unexpected {msg}"),
        }
    }
    assert_eq!(
        received + dropped,
        MESSAGES,
        "every message delivered or counted"
    );
    assert!(dropped > 0, "this reader was too slow for all of them");
    let (_, _, body) = http_get(gw.addr, "/healthz", "").await;
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["refused"]["dropped_messages"], dropped);
    assert_eq!(health["refused"]["slow_consumers_closed"], 0);
    // Still connected.
    slow.send_frame(true, 0x1, br#"{"type":"echo","payload":7}"#, true)
        .await;
    let (_, _, payload) = slow.read_frame().await;
    assert_eq!(
        serde_json::from_slice::<Value>(&payload).unwrap()["payload"],
        7
    );
}
