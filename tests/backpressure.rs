//! Backpressure: a client that does not read can cost the gateway only a bounded queue. Replies
//! to its own messages pause reading from it (TCP pushes back); broadcasts past the bound close it
//! with 1008 "slow consumer", after what is queued, while fast readers get every message.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{RawClient, TestGateway, http_get};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use wsgate::fanout::Publication;

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

fn bulk(n: usize) -> Publication {
    let filler = "x".repeat(60 * 1024);
    let text = format!(r#"{{"type":"bulk","n":{n},"filler":"{filler}"}}"#);
    Publication::to_room(
        "room".into(),
        wsgate::ws::frame::encode(wsgate::ws::frame::OpCode::Text, text.as_bytes()),
    )
}

/// Publishes `count` numbered `bulk` messages to "room" from the library API, each once `fast`
/// has received the one before: the fast reader is never the one behind, however fast or slow
/// the machine. Returns the fast reader and how many `user_left` notices it saw meanwhile.
async fn publish_to(
    gw: &TestGateway,
    mut fast: support::Client,
    count: usize,
) -> (support::Client, usize) {
    let (ack, mut acks) = mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        let (mut next, mut departures) = (0, 0);
        while next < count {
            let msg = fast.recv().await;
            match msg["type"].as_str() {
                Some("bulk") => {
                    assert_eq!(msg["n"], next, "in order, none lost");
                    ack.send(next).unwrap();
                    next += 1;
                }
                // A slow consumer, once closed, leaves the room.
                Some("user_left") => departures += 1,
                _ => panic!("unexpected {msg}"),
            }
        }
        (fast, departures)
    });
    for n in 0..count {
        gw.gateway().publish(bulk(n));
        assert_eq!(
            acks.recv().await,
            Some(n),
            "the fast reader acknowledges in order"
        );
    }
    tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("the fast reader gets all messages in time")
        .unwrap()
}

#[tokio::test]
async fn a_reader_that_never_reads_is_closed_and_the_others_get_everything() {
    let gw = TestGateway::start_with(|c| c.max_queued_bytes = QUEUE_LIMIT, 2);
    let (fast, mut slow) = fast_and_slow(&gw).await;
    let (mut fast, departures) = publish_to(&gw, fast, MESSAGES).await;
    assert!(departures <= 1);

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
    let (fast, mut slow) = fast_and_slow(&gw).await;
    // Kept connected: its leaving would be news to the slow reader.
    let (_fast, departures) = publish_to(&gw, fast, MESSAGES).await;
    assert_eq!(departures, 0, "nobody was closed");

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

#[tokio::test]
async fn a_burst_through_a_full_inbox_is_dropped_and_counted_exactly_and_readers_are_not_blamed() {
    // An inbox with room for one of the burst's publications, and the burst published faster
    // than the shard wakes up to take them (12 MB: the reader's queue bound is raised to match,
    // this is about the inbox).
    let gw = TestGateway::start_with(
        |c| {
            c.max_shard_inbox_bytes = 64 * 1024;
            c.max_queued_bytes = 16 << 20;
        },
        1,
    );
    let mut reader = gw.client().await;
    reader.join("room").await;
    const BURST: usize = 200;
    // A busy machine may let the shard keep up with one burst: up to ten, until one overflows.
    let mut published = 0;
    let mut received = Vec::new();
    for _ in 0..10 {
        // Built first, then published back to back: far faster than the shard takes them.
        let burst: Vec<Publication> = (published..published + BURST).map(bulk).collect();
        published += BURST;
        for publication in burst {
            gw.gateway().publish(publication);
        }
        // The marker goes last, once the inbox has room again.
        let mut marker = Publication::to_room(
            "room".into(),
            wsgate::ws::frame::encode(wsgate::ws::frame::OpCode::Text, br#"{"type":"marker"}"#),
        );
        loop {
            let dropped_before = dropped(&gw).await;
            gw.gateway().publish(marker.clone());
            if dropped(&gw).await == dropped_before {
                break;
            }
            marker = marker.clone();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        loop {
            let msg = reader.recv().await;
            match msg["type"].as_str() {
                Some("bulk") => received.push(msg["n"].as_u64().unwrap() as usize),
                Some("marker") => break,
                _ => panic!("unexpected {msg}"),
            }
        }
        if dropped(&gw).await > 0 {
            break;
        }
    }
    let dropped = dropped(&gw).await as usize;
    assert!(dropped > 0, "a burst overflowed the inbox");
    assert_eq!(
        received.len() + dropped,
        published,
        "every publication delivered or counted"
    );
    assert!(received.windows(2).all(|w| w[0] < w[1]), "in order");
    let (_, _, body) = http_get(gw.addr, "/healthz", "").await;
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        health["refused"]["slow_consumers_closed"], 0,
        "a reader that keeps up is not blamed for the gateway's backlog"
    );
}

async fn dropped(gw: &TestGateway) -> u64 {
    let (_, _, body) = http_get(gw.addr, "/healthz", "").await;
    let health: Value = serde_json::from_str(&body).unwrap();
    health["refused"]["inbox_dropped"].as_u64().unwrap()
}

#[tokio::test]
async fn past_the_memory_budget_readers_with_a_backlog_are_slow_consumers() {
    // Three readers that never read, and a budget of 16 MiB for all queues together, as much as
    // one connection's bound: the three reach the budget together long before any of them
    // reaches its own bound, and the budget decides.
    let gw = TestGateway::start_with(
        |c| {
            c.max_queued_bytes = 16 << 20;
            c.max_total_queued_bytes = 16 << 20;
        },
        1,
    );
    let mut fast = gw.client().await;
    fast.join("room").await;
    let mut stalled = Vec::new();
    for _ in 0..3 {
        let mut slow = RawClient::connect_with_small_window(gw.addr, "/ws").await;
        let join = br#"{"type":"join_room","payload":{"room":"room"}}"#;
        slow.send_frame(true, 0x1, join, true).await;
        fast.expect("user_joined").await;
        stalled.push(slow);
    }
    publish_to(&gw, fast, MESSAGES).await;
    let (_, _, body) = http_get(gw.addr, "/healthz", "").await;
    let health: Value = serde_json::from_str(&body).unwrap();
    let refused = &health["refused"];
    assert!(
        refused["memory_pressure"].as_u64().unwrap() >= 1,
        "{health}"
    );
    assert!(
        refused["slow_consumers_closed"].as_u64().unwrap() >= 1,
        "{health}"
    );
    let mut closed = 0;
    for mut slow in stalled {
        if slow.read_close_code().await == 1008 {
            closed += 1;
        }
    }
    assert_eq!(refused["slow_consumers_closed"], closed);
}
