//! The JSON protocol's replies, including every error, and that errors never close the connection.

mod support;

use serde_json::json;
use support::TestGateway;

#[tokio::test]
async fn connected_greeting_has_the_seed_shape() {
    let gw = TestGateway::start(1);
    let (mut ws, _) = tokio_tungstenite::connect_async(gw.url("/ws"))
        .await
        .unwrap();
    let msg = futures_util::StreamExt::next(&mut ws)
        .await
        .unwrap()
        .unwrap();
    let hello: serde_json::Value = serde_json::from_str(msg.to_text().unwrap()).unwrap();
    let keys: Vec<&str> = hello
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    assert_eq!(keys.len(), 3, "{hello}");
    assert_eq!(hello["type"], "connected");
    assert!(hello["clientId"].is_string());
    assert!(hello["timestamp"].is_u64());
}

#[tokio::test]
async fn echo_returns_the_payload() {
    let gw = TestGateway::start(1);
    let mut c = gw.client().await;
    let payload = json!({"text": "hé\"llo", "list": [1, 2.5, null, true], "nested": {"a": {}}});
    c.send("echo", payload.clone()).await;
    assert_eq!(c.recv().await, json!({"type": "echo", "payload": payload}));
    c.send_text(r#"{"type":"echo"}"#).await;
    assert_eq!(c.recv().await, json!({"type": "echo", "payload": null}));
}

#[tokio::test]
async fn malformed_messages_get_error_replies_and_the_connection_stays_open() {
    let gw = TestGateway::start(1);
    let mut c = gw.client().await;
    for bad in [
        "not json",
        "",
        "[]",
        "42",
        r#"{"payload":{}}"#,
        r#"{"type":7}"#,
        r#"{"type":"x""#,
    ] {
        c.send_text(bad).await;
        c.expect_error("Invalid message format").await;
    }
    c.send("dance", json!({})).await;
    c.expect_error("Unknown message type: dance").await;
    c.send("join_room", json!({})).await;
    c.expect_error("Invalid payload: 'room' must be a string")
        .await;
    c.send("join_room", json!({"room": 5})).await;
    c.expect_error("Invalid payload: 'room' must be a string")
        .await;
    c.send_text(r#"{"type":"chat_message","payload":"x"}"#)
        .await;
    c.expect_error("Invalid payload: 'room' must be a string")
        .await;
    c.send("typing", json!({"room": "r", "isTyping": 1})).await;
    c.expect_error("Invalid payload: 'isTyping' must be a boolean")
        .await;
    // Binary frames are not part of the JSON protocol.
    futures_util::SinkExt::send(
        &mut c.ws,
        tokio_tungstenite::tungstenite::Message::binary(vec![1, 2]),
    )
    .await
    .unwrap();
    c.expect_error("Binary messages are not supported: send JSON text")
        .await;
    // Still open and working.
    assert_eq!(c.join("still-here").await, 1);
}

#[tokio::test]
async fn room_rules_are_enforced_with_errors() {
    let gw = TestGateway::start_with(|c| c.max_rooms_per_connection = 2, 1);
    let mut c = gw.client().await;
    let bad_room = "Invalid room name (1-64 characters of A-Z, a-z, 0-9, '_', '.', ':', '-')";
    for room in ["", "with space", "ünicode", &"x".repeat(65)] {
        c.send("join_room", json!({"room": room})).await;
        c.expect_error(bad_room).await;
    }
    c.send(
        "chat_message",
        json!({"room": "elsewhere", "message": "hi"}),
    )
    .await;
    c.expect_error("Not a member of room: elsewhere").await;
    c.send("typing", json!({"room": "elsewhere", "isTyping": true}))
        .await;
    c.expect_error("Not a member of room: elsewhere").await;
    c.send("leave_room", json!({"room": "elsewhere"})).await;
    c.expect_error("Not a member of room: elsewhere").await;
    c.join("a").await;
    c.join("b").await;
    c.send("join_room", json!({"room": "c"})).await;
    c.expect_error("Room limit reached (max 2 rooms per connection)")
        .await;
    // Re-joining a room one is already in is not a new room.
    assert_eq!(c.join("a").await, 1);
}

#[tokio::test]
async fn chat_messages_over_1000_characters_are_refused() {
    let gw = TestGateway::start(1);
    let mut c = gw.client().await;
    c.join("r").await;
    c.send(
        "chat_message",
        json!({"room": "r", "message": "x".repeat(1001)}),
    )
    .await;
    c.expect_error("Message too long (max 1000 characters)")
        .await;
    // 1000 characters of 2-byte UTF-8 is 2000 bytes, and allowed: the limit counts characters.
    let max = "é".repeat(1000);
    c.send("chat_message", json!({"room": "r", "message": max}))
        .await;
    let msg = c.expect("chat_message").await;
    assert_eq!(msg["message"], max);
}

#[tokio::test]
async fn an_echo_never_answers_with_more_than_a_client_may_send() {
    let gw = TestGateway::start(1);
    let mut c = gw.client().await;
    // `9e15` is written out in full when re-serialized: 4 bytes become 16.
    let numbers = vec!["9e15"; 12_000].join(",");
    c.send_text(format!(r#"{{"type":"echo","payload":[{numbers}]}}"#))
        .await;
    c.expect_error("Reply too large (max 65536 bytes)").await;
    c.send("echo", json!([9e15])).await;
    c.expect("echo").await;
}

/// Sends `{"type", "payload", "id"}`.
async fn send_with_id(
    c: &mut support::Client,
    kind: &str,
    payload: serde_json::Value,
    id: serde_json::Value,
) {
    c.send_text(json!({"type": kind, "payload": payload, "id": id}).to_string())
        .await;
}

#[tokio::test]
async fn a_message_with_an_id_gets_it_back_on_its_answer_or_error() {
    let gw = TestGateway::start(1);
    let mut c = gw.client().await;
    // Answers of their own carry the id, numbers and strings as they came.
    send_with_id(&mut c, "join_room", json!({"room": "r"}), json!(7)).await;
    let joined = c.expect("room_joined").await;
    assert_eq!(
        (joined["id"].clone(), joined["room"].clone()),
        (json!(7), json!("r"))
    );
    send_with_id(&mut c, "echo", json!({"x": 1}), json!("e-1")).await;
    assert_eq!(
        c.recv().await,
        json!({"type": "echo", "payload": {"x": 1}, "id": "e-1"})
    );
    send_with_id(&mut c, "presence", json!({"room": "r"}), json!(8)).await;
    assert_eq!(c.expect("presence").await["id"], 8);
    // A chat message is acknowledged once published, with its offset; it arrives too.
    send_with_id(
        &mut c,
        "chat_message",
        json!({"room": "r", "message": "hi"}),
        json!("m-1"),
    )
    .await;
    let (ack, message) = c.ack_and_chat().await;
    assert_eq!(
        ack,
        json!({"type": "ack", "id": "m-1", "offset": message["offset"]})
    );
    assert!(
        message.get("id").is_none(),
        "the message members get is not the sender's answer"
    );
    // Messages without an answer of their own get a bare ack.
    send_with_id(
        &mut c,
        "typing",
        json!({"room": "r", "isTyping": true}),
        json!(9),
    )
    .await;
    assert_eq!(c.recv().await, json!({"type": "ack", "id": 9}));
    send_with_id(&mut c, "leave_room", json!({"room": "r"}), json!(10)).await;
    assert_eq!(c.recv().await, json!({"type": "ack", "id": 10}));
    // Errors too.
    send_with_id(&mut c, "leave_room", json!({"room": "r"}), json!(11)).await;
    let error = c.expect("error").await;
    assert_eq!(error["id"], 11, "{error}");
    send_with_id(&mut c, "dance", json!({}), json!("d")).await;
    assert_eq!(c.expect("error").await["id"], "d");
    // An id that is neither is refused, and named.
    for bad in [
        json!(-1),
        json!(1.5),
        json!(""),
        json!("x".repeat(65)),
        json!({"a": 1}),
    ] {
        send_with_id(&mut c, "echo", json!({}), bad.clone()).await;
        let error = c.expect("error").await;
        assert!(error.get("id").is_none(), "{bad}: {error}");
        assert_eq!(
            error["error"],
            "Invalid payload: 'id' must be a non-negative integer or a string of 1-64 bytes",
            "{bad}"
        );
    }
    // `null` is no id.
    send_with_id(&mut c, "echo", json!(2), json!(null)).await;
    assert_eq!(c.recv().await, json!({"type": "echo", "payload": 2}));
    // Without an id nothing changes: no ack.
    c.send("typing", json!({"room": "r", "isTyping": false}))
        .await;
    c.expect_error("Not a member of room: r").await;
    c.send("pong", json!({})).await;
    c.send("echo", json!(1)).await;
    assert_eq!(c.recv().await, json!({"type": "echo", "payload": 1}));
}

#[tokio::test]
async fn a_retried_chat_message_with_a_message_id_is_published_once_within_the_window() {
    let gw = TestGateway::start_with(
        |c| c.dedup_window = std::time::Duration::from_millis(500),
        2,
    );
    let mut first = gw.client_as("alice").await;
    let mut retry = gw.client_as("alice").await;
    let mut other = gw.client_as("bob").await;
    for c in [&mut first, &mut retry, &mut other] {
        c.join("r").await;
    }
    let message = json!({"room": "r", "message": "once", "messageId": "m-1"});
    first.send("chat_message", message.clone()).await;
    assert_eq!(other.chats(1).await, vec![(1, "once".to_owned())]);
    // The same message id again, from another connection of the same user: not published again,
    // answered (it asked, with an id) with the first one's offset.
    let with_id = json!({"type": "chat_message", "payload": message, "id": 2});
    retry.send_text(with_id.to_string()).await;
    assert_eq!(retry.chats(1).await, vec![(1, "once".to_owned())]);
    assert_eq!(
        retry.next_not_presence().await,
        json!({"type": "ack", "id": 2, "offset": 1})
    );
    other.expect_silence().await;
    // Another user's message id is its own.
    other.send("chat_message", message.clone()).await;
    assert_eq!(
        first.chats(2).await,
        vec![(1, "once".to_owned()), (2, "once".to_owned())]
    );
    // Past the window the id is free again.
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    retry.send("chat_message", message.clone()).await;
    assert_eq!(
        other.chats(2).await,
        vec![(2, "once".to_owned()), (3, "once".to_owned())]
    );
    assert_eq!(first.chats(1).await, vec![(3, "once".to_owned())]);
    // A message id must be a short string.
    for bad in [json!(5), json!(""), json!("x".repeat(65))] {
        first
            .send(
                "chat_message",
                json!({"room": "r", "message": "m", "messageId": bad}),
            )
            .await;
        first
            .expect_error("Invalid payload: 'messageId' must be a string of 1-64 bytes")
            .await;
    }
}
