//! Rooms across shards: joins, leaves, chat, typing, disconnect clean-up, exactly-once in-order
//! delivery, join/leave notice limits, and the library-level broadcast API.

mod support;

use serde_json::{Value, json};
use support::{Client, TestGateway, http_get};
use wsgate::base::client_id::ClientId;
use wsgate::fanout::Publication;
use wsgate::rooms::Target;

fn strip_timestamp(mut msg: Value) -> Value {
    assert!(
        msg["timestamp"].as_u64().unwrap() > 1_600_000_000_000,
        "{msg}"
    );
    msg.as_object_mut().unwrap().remove("timestamp");
    msg
}

/// Two clients on different shards (for a 2-shard gateway) in room `r`.
async fn pair_across_shards(gw: &TestGateway) -> (Client, Client) {
    let mut a = gw.client_on_shard(0).await;
    let mut b = gw.client_on_shard(1).await;
    assert_eq!(a.join("r").await, 1);
    assert_eq!(b.join("r").await, 2);
    let notice = strip_timestamp(a.expect("user_joined").await);
    assert_eq!(
        notice,
        json!({"type": "user_joined", "room": "r", "username": "Anonymous", "userId": "anonymous"})
    );
    (a, b)
}

#[tokio::test]
async fn chat_reaches_every_member_across_shards_sender_included() {
    let gw = TestGateway::start(2);
    let (mut a, mut b) = pair_across_shards(&gw).await;
    let mut outsider = gw.client().await;
    b.send("chat_message", json!({"room": "r", "message": "hello"}))
        .await;
    // The room's first message: offset 1 of its stream.
    let expected = json!({
        "type": "chat_message", "room": "r", "username": "Anonymous", "userId": "anonymous",
        "message": "hello", "offset": 1
    });
    assert_eq!(strip_timestamp(a.recv().await), expected);
    assert_eq!(strip_timestamp(b.recv().await), expected);
    outsider.expect_silence().await;
}

#[tokio::test]
async fn typing_reaches_the_others_only() {
    let gw = TestGateway::start(2);
    let (mut a, mut b) = pair_across_shards(&gw).await;
    a.send("typing", json!({"room": "r", "isTyping": true}))
        .await;
    assert_eq!(
        b.recv().await,
        json!({
            "type": "typing", "room": "r", "username": "Anonymous", "userId": "anonymous",
            "isTyping": true
        })
    );
    a.expect_silence().await;
}

#[tokio::test]
async fn leaving_notifies_the_rest_and_stops_delivery() {
    let gw = TestGateway::start(2);
    let (mut a, mut b) = pair_across_shards(&gw).await;
    b.send("leave_room", json!({"room": "r"})).await;
    assert_eq!(
        strip_timestamp(a.recv().await),
        json!({"type": "user_left", "room": "r", "username": "Anonymous", "userId": "anonymous"})
    );
    a.send("chat_message", json!({"room": "r", "message": "anyone?"}))
        .await;
    a.expect("chat_message").await;
    b.expect_silence().await;
    // The room now has one member.
    let mut c = gw.client().await;
    assert_eq!(c.join("r").await, 2);
}

#[tokio::test]
async fn disconnect_removes_the_client_from_every_room() {
    let gw = TestGateway::start(2);
    let (mut a, b) = pair_across_shards(&gw).await;
    let mut b = b;
    b.join("second").await;
    let mut c = gw.client().await;
    c.join("second").await;
    b.expect("user_joined").await;
    drop(b);
    assert_eq!(strip_timestamp(a.recv().await)["type"], "user_left");
    assert_eq!(strip_timestamp(c.recv().await)["type"], "user_left");
    gw.wait_for_connections(2).await;
    drop((a, c));
    gw.wait_for_connections(0).await;
    let (_, _, body) = http_get(gw.addr, "/healthz", "").await;
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["rooms"], 0, "empty rooms are deleted: {health}");
}

#[tokio::test]
async fn join_notices_stop_above_the_configured_room_size() {
    let gw = TestGateway::start_with(|c| c.presence_max_members = 2, 2);
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    let mut c = gw.client().await;
    assert_eq!(a.join("big").await, 1);
    assert_eq!(b.join("big").await, 2);
    a.expect("user_joined").await;
    // The third member makes the room bigger than 2: no notice, but the count is right.
    assert_eq!(c.join("big").await, 3);
    a.expect_silence().await;
    b.expect_silence().await;
    // Leaving a 3-member room: no notice either; leaving a 2-member room: notice.
    c.send("leave_room", json!({"room": "big"})).await;
    a.expect_silence().await;
    b.send("leave_room", json!({"room": "big"})).await;
    assert_eq!(a.expect("user_left").await["room"], "big");
}

#[tokio::test]
async fn every_member_gets_every_message_once_and_in_order() {
    const MESSAGES: usize = 300;
    let gw = TestGateway::start(2);
    let mut sender = gw.client_on_shard(0).await;
    sender.join("order").await;
    let mut receivers = Vec::new();
    for shard in [0, 1, 0, 1] {
        let mut r = gw.client_on_shard(shard).await;
        r.join("order").await;
        receivers.push(r);
    }
    // Drain the join notices.
    for _ in 0..receivers.len() {
        sender.expect("user_joined").await;
    }
    for (i, r) in receivers.iter_mut().enumerate() {
        for _ in i + 1..4 {
            r.expect("user_joined").await;
        }
    }
    for i in 0..MESSAGES {
        sender
            .send(
                "chat_message",
                json!({"room": "order", "message": i.to_string()}),
            )
            .await;
    }
    for r in receivers.iter_mut().chain(std::iter::once(&mut sender)) {
        for i in 0..MESSAGES {
            assert_eq!(r.expect("chat_message").await["message"], i.to_string());
        }
        r.expect_silence().await;
    }
}

/// The client's id on its node: its `clientId` without the node's name.
fn id(client: &Client) -> ClientId {
    client.id.split_once('.').unwrap().1.parse().unwrap()
}

fn frame(text: &str) -> wsgate::ws::deflate::Prepared {
    let frame = wsgate::ws::frame::encode(wsgate::ws::frame::OpCode::Text, text.as_bytes());
    wsgate::ws::deflate::Prepared::new(frame)
}

#[tokio::test]
async fn library_broadcast_to_all_and_rooms_with_include_and_exclude_lists() {
    let gw = TestGateway::start(2);
    let mut a = gw.client_on_shard(0).await;
    let mut b = gw.client_on_shard(1).await;
    let mut c = gw.client_on_shard(1).await;
    a.join("r").await;
    b.join("r").await;
    a.expect("user_joined").await;

    // All, excluding b.
    gw.gateway().publish(Publication {
        target: Target::All,
        frame: frame(r#"{"type":"notice","n":1}"#),
        include: None,
        exclude: vec![id(&b)],
    });
    assert_eq!(a.recv().await["n"], 1);
    assert_eq!(c.recv().await["n"], 1);
    b.expect_silence().await;

    // All, only a and c.
    gw.gateway().publish(Publication {
        target: Target::All,
        frame: frame(r#"{"type":"notice","n":2}"#),
        include: Some(vec![id(&a), id(&c)]),
        exclude: vec![],
    });
    assert_eq!(a.recv().await["n"], 2);
    assert_eq!(c.recv().await["n"], 2);
    b.expect_silence().await;

    // Room r: c is not a member, so an include list naming it does not reach it.
    gw.gateway().publish(Publication {
        target: Target::Room("r".into()),
        frame: frame(r#"{"type":"notice","n":3}"#),
        include: Some(vec![id(&b), id(&c)]),
        exclude: vec![],
    });
    assert_eq!(b.recv().await["n"], 3);
    a.expect_silence().await;
    c.expect_silence().await;
}

#[tokio::test]
async fn a_reused_slot_never_receives_the_old_ids_traffic() {
    let gw = TestGateway::start(1);
    let old = gw.client().await;
    let old_id = id(&old);
    drop(old);
    gw.wait_for_connections(0).await;
    let mut new = gw.client().await;
    assert_eq!(id(&new).key, old_id.key, "the slab slot is reused");
    gw.gateway().publish(Publication {
        target: Target::All,
        frame: frame(r#"{"type":"notice"}"#),
        include: Some(vec![old_id]),
        exclude: vec![],
    });
    new.expect_silence().await;
}

#[tokio::test]
async fn new_rooms_are_refused_past_the_node_cap() {
    let gw = TestGateway::start_with(|c| c.max_rooms = 3, 2);
    let mut a = gw.client().await;
    for room in ["r1", "r2", "r3"] {
        a.join(room).await;
    }
    let mut b = gw.client().await;
    b.send("join_room", json!({"room": "r4"})).await;
    b.expect_error("Room limit reached on this server: try an existing room")
        .await;
    // An existing room is fine; and a place comes back when a room empties.
    assert_eq!(b.join("r1").await, 2);
    a.send("leave_room", json!({"room": "r3"})).await;
    let deadline = tokio::time::Instant::now() + support::PATIENCE;
    loop {
        b.send("join_room", json!({"room": "r4"})).await;
        if b.recv().await["type"] == "room_joined" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline);
    }
    let (_, _, body) = http_get(gw.addr, "/healthz", "").await;
    let health: Value = serde_json::from_str(&body).unwrap();
    assert!(health["refused"]["rooms_refused"].as_u64().unwrap() >= 1);
}
