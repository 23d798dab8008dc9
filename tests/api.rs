//! The server API over real HTTP: publishing to a room and to everyone, disconnecting a user,
//! listing rooms and their users, and every refusal (key, body, size, route, method).

mod support;

use serde_json::{Value, json};
use support::{API_KEY, Client, TestGateway, api, history_texts, http_get, http_request};

fn gateway(shards: usize) -> TestGateway {
    TestGateway::start_with(|c| c.api_key = Some(API_KEY.into()), shards)
}

async fn call(gw: &TestGateway, method: &str, path: &str, body: Value) -> (u16, Value) {
    api(gw.addr, method, path, body).await
}

/// The next publication, past presence notices.
async fn next_publication(client: &mut Client) -> Value {
    let msg = client.next_not_presence().await;
    assert_eq!(msg["type"], "publication", "{msg}");
    msg
}

#[tokio::test]
async fn without_a_key_configured_the_api_is_not_there() {
    let gw = TestGateway::start(1);
    let auth = format!("Authorization: Bearer {API_KEY}\r\n");
    let (status, _, body) = http_get(gw.addr, "/api/stats", &auth).await;
    assert_eq!(status, 404, "{body}");
}

#[tokio::test]
async fn a_missing_or_wrong_key_is_refused_with_401() {
    let gw = gateway(1);
    for auth in [
        String::new(),
        "Authorization: Bearer wrong-key-0123456789xx\r\n".to_owned(),
        format!("Authorization: Bearer {API_KEY}x\r\n"),
        format!("Authorization: Basic {API_KEY}\r\n"),
    ] {
        let (status, head, body) = http_get(gw.addr, "/api/stats", &auth).await;
        assert_eq!(status, 401, "{auth}: {body}");
        assert!(head.contains("www-authenticate: Bearer"), "{head}");
        let error: Value = serde_json::from_str(&body).unwrap();
        assert!(
            error["error"].as_str().unwrap().contains("api_key"),
            "{body}"
        );
    }
}

#[tokio::test]
async fn a_publication_reaches_every_member_in_order_and_is_kept_for_recovery() {
    let gw = gateway(2);
    let mut members = vec![gw.client_on_shard(0).await, gw.client_on_shard(1).await];
    let epoch = members[0].join_room_epoch("news").await;
    members[1].join("news").await;
    let mut outsider = gw.client().await;
    for n in 1..=3 {
        let (status, answer) = call(
            &gw,
            "POST",
            "/api/publish",
            json!({"room": "news", "data": {"n": n, "text": "héllo"}}),
        )
        .await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["room"], "news");
        assert_eq!(answer["offset"], n);
        // With the epoch that goes with the offset: a client can recover from it with `since`.
        assert_eq!(answer["epoch"], epoch.as_str(), "{answer}");
    }
    for member in &mut members {
        for n in 1..=3 {
            let publication = next_publication(member).await;
            assert_eq!(publication["room"], "news");
            assert_eq!(publication["data"], json!({"n": n, "text": "héllo"}));
            assert_eq!(publication["offset"], n);
            assert!(publication["timestamp"].is_u64(), "{publication}");
        }
    }
    outsider.expect_silence().await;

    // A member coming back with `since` gets what was published meanwhile.
    let mut back = gw.client().await;
    let joined = back.join_since("news", Some((1, &epoch))).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    for n in 2..=3 {
        assert_eq!(back.expect("publication").await["data"]["n"], n);
    }
}

#[tokio::test]
async fn a_publication_to_a_room_without_members_is_kept_for_those_who_join_with_since() {
    let gw = gateway(1);
    let (status, answer) = call(
        &gw,
        "POST",
        "/api/publish",
        json!({"room": "empty", "data": [1, 2]}),
    )
    .await;
    assert_eq!(
        (status, answer["offset"].as_u64()),
        (200, Some(1)),
        "{answer}"
    );
    let mut first = gw.client().await;
    let epoch = first.join_room_epoch("empty").await;
    let mut late = gw.client().await;
    let joined = late.join_since("empty", Some((0, &epoch))).await;
    assert_eq!(joined["recovered"], true);
    assert_eq!(late.expect("publication").await["data"], json!([1, 2]));
}

#[tokio::test]
async fn a_broadcast_reaches_every_chat_client_on_every_shard() {
    let gw = gateway(2);
    let mut clients = vec![gw.client_on_shard(0).await, gw.client_on_shard(1).await];
    let (status, answer) = call(
        &gw,
        "POST",
        "/api/broadcast",
        json!({"data": {"alert": "maintenance at 5"}}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    for client in &mut clients {
        let publication = client.expect("publication").await;
        assert_eq!(publication["data"]["alert"], "maintenance at 5");
        assert!(publication.get("room").is_none(), "{publication}");
    }
}

/// Three connections of `user`: two with its token (on whichever shards they land) and one
/// anonymous until it refreshes to its token — the user's from then on.
async fn connections_of(gw: &TestGateway, user: &str) -> Vec<Client> {
    let mut connections = vec![gw.client_as(user).await, gw.client_as(user).await];
    let mut became = gw.client().await;
    became
        .send("refresh", json!({"token": support::token_for(user)}))
        .await;
    became.expect("token_refreshed").await;
    connections.push(became);
    connections
}

#[tokio::test]
async fn disconnecting_a_user_closes_only_its_connections_with_the_code_and_reason() {
    let gw = gateway(2);
    let mut bobs = connections_of(&gw, "bob").await;
    let mut carol = gw.client_as("carol").await;
    let mut anonymous = gw.client().await;
    let (status, answer) = call(
        &gw,
        "POST",
        "/api/disconnect",
        json!({"user": "bob", "code": 4003, "reason": "banned"}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer,
        json!({"disconnected": "bob", "connections": 3, "nodes": 1, "unanswered": 0})
    );
    for bob in &mut bobs {
        let close = bob.expect_close().await.expect("a close frame");
        assert_eq!((u16::from(close.code), &*close.reason), (4003, "banned"));
    }
    carol.expect_silence().await;
    anonymous.expect_silence().await;
    let (_, stats) = call(&gw, "GET", "/api/stats", Value::Null).await;
    assert_eq!(stats["refused"]["users_disconnected"], 3, "{stats}");
    // Gone connections are gone from the index: once bob's have ended, new connections take
    // their slab slots, and disconnecting bob again closes none of them.
    gw.wait_for_connections(2).await;
    let mut newcomers = Vec::new();
    for _ in 0..4 {
        newcomers.push(gw.client().await);
    }
    let (status, answer) = call(&gw, "POST", "/api/disconnect", json!({"user": "bob"})).await;
    assert_eq!(
        (status, &answer["connections"]),
        (200, &json!(0)),
        "{answer}"
    );
    for client in [&mut carol, &mut anonymous]
        .into_iter()
        .chain(&mut newcomers)
    {
        client.expect_silence().await;
    }
    let (_, stats) = call(&gw, "GET", "/api/stats", Value::Null).await;
    assert_eq!(stats["refused"]["users_disconnected"], 3, "{stats}");
}

#[tokio::test]
async fn bad_requests_get_a_status_and_a_json_error() {
    let gw = TestGateway::start_with(
        |c| {
            c.api_key = Some(API_KEY.into());
            c.max_message_size = 1024;
        },
        1,
    );
    let cases: Vec<(&str, &str, Value, u16, &str)> = vec![
        (
            "POST",
            "/api/publish",
            json!({"room": "r"}),
            400,
            "missing field `data`",
        ),
        (
            "POST",
            "/api/publish",
            json!({"room": "no spaces", "data": 1}),
            400,
            "room",
        ),
        (
            "POST",
            "/api/publish",
            json!({"room": "r", "data": "x".repeat(2000)}),
            413,
            "max_message_size",
        ),
        (
            "POST",
            "/api/disconnect",
            json!({"user": "bob", "code": 1000}),
            400,
            "4000-4999",
        ),
        (
            "POST",
            "/api/disconnect",
            json!({"user": "bob", "reason": "x".repeat(124)}),
            400,
            "reason",
        ),
        ("GET", "/api/publish", Value::Null, 405, "method"),
        ("GET", "/api/nothing", Value::Null, 404, "no such"),
        ("POST", "/api/rooms/r", Value::Null, 405, "method"),
        ("GET", "/api/rooms?limit=0", Value::Null, 400, "limit"),
        ("GET", "/api/rooms?colour=red", Value::Null, 400, "colour"),
    ];
    for (method, path, body, status, says) in cases {
        let (got, answer) = call(&gw, method, path, body).await;
        assert_eq!(got, status, "{method} {path}: {answer}");
        let error = answer["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{answer}"));
        assert!(error.contains(says), "{method} {path}: {error}");
    }
    // Not JSON at all.
    let auth = format!("Authorization: Bearer {API_KEY}\r\n");
    let (status, _, body) = http_request(gw.addr, "POST", "/api/broadcast", &auth, b"{oops").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("invalid body"), "{body}");
}

#[tokio::test]
async fn rooms_and_their_users_are_listed_a_page_at_a_time() {
    let gw = gateway(2);
    let mut clients: Vec<Client> = Vec::new();
    for (user, rooms) in [
        ("ann", &["a", "b", "c"][..]),
        ("bob", &["b"]),
        ("cid", &["b"]),
    ] {
        let mut client = gw.client_as(user).await;
        for room in rooms {
            client.join(room).await;
        }
        clients.push(client);
    }
    let (status, first) = call(&gw, "GET", "/api/rooms?limit=2", Value::Null).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(
        first,
        json!({"rooms": [{"room": "a", "members": 1}, {"room": "b", "members": 3}], "next": "b"})
    );
    let (_, rest) = call(&gw, "GET", "/api/rooms?limit=2&after=b", Value::Null).await;
    assert_eq!(
        rest,
        json!({"rooms": [{"room": "c", "members": 1}], "next": null})
    );

    let (_, page) = call(&gw, "GET", "/api/rooms/b?limit=2", Value::Null).await;
    assert_eq!(page["members"], 3);
    assert_eq!(page["next"], "bob");
    let users = support::user_ids(&page);
    assert_eq!(users, ["ann", "bob"]);
    let (_, last) = call(&gw, "GET", "/api/rooms/b?after=bob", Value::Null).await;
    assert_eq!(last["users"], json!([{"userId": "cid", "username": "cid"}]));
    assert_eq!(last["next"], Value::Null);

    let (status, nobody) = call(&gw, "GET", "/api/rooms/nobody-here", Value::Null).await;
    assert_eq!(status, 200);
    assert_eq!(nobody["members"], 0);
}

#[tokio::test]
async fn a_publication_to_a_user_reaches_each_of_its_connections_on_every_shard_and_no_one_else() {
    let gw = gateway(2);
    // Alice's three connections, and others that must hear nothing.
    let mut alices = connections_of(&gw, "alice").await;
    let mut bob = gw.client_as("bob").await;
    let mut anonymous = gw.client().await;
    let (status, answer) = call(
        &gw,
        "POST",
        "/api/publish",
        json!({"user": "alice", "data": {"invoice": 42}}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer, json!({"user": "alice", "published": true}));
    for alice in &mut alices {
        let got = alice.expect("user").await;
        assert_eq!(got["data"], json!({"invoice": 42}), "{got}");
        assert!(got["timestamp"].as_u64().unwrap() > 1_600_000_000_000);
    }
    bob.expect_silence().await;
    anonymous.expect_silence().await;
    // A user with no connection: published, to no one.
    let (status, _) = call(
        &gw,
        "POST",
        "/api/publish",
        json!({"user": "nobody", "data": 1}),
    )
    .await;
    assert_eq!(status, 200);
    // Room or user, one of them, and a user id of a bounded size.
    for body in [
        json!({"data": 1}),
        json!({"room": "r", "user": "alice", "data": 1}),
        json!({"user": "", "data": 1}),
        json!({"user": "u".repeat(257), "data": 1}),
    ] {
        let (status, answer) = call(&gw, "POST", "/api/publish", body.clone()).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(answer["error"].is_string(), "{answer}");
    }
}

#[tokio::test]
async fn a_rooms_history_is_read_with_offsets_and_epoch_oldest_or_newest_first() {
    let gw = gateway(2);
    let mut member = gw.client().await;
    let epoch = member.join_room_epoch("h").await;
    for text in ["one", "two", "three"] {
        member.chat("h", text).await;
    }
    assert_eq!(member.chats(3).await.len(), 3);
    let (status, answer) = call(&gw, "GET", "/api/history/h", Value::Null).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        (answer["room"].as_str(), answer["offset"].as_u64()),
        (Some("h"), Some(3))
    );
    assert_eq!(answer["epoch"], epoch.as_str());
    assert_eq!(
        history_texts(&answer),
        [(1, "one"), (2, "two"), (3, "three")]
    );
    // Each as members got it.
    assert_eq!(answer["messages"][0]["type"], "chat_message");
    let (_, answer) = call(&gw, "GET", "/api/history/h?since=1", Value::Null).await;
    assert_eq!(history_texts(&answer), [(2, "two"), (3, "three")]);
    let (_, answer) = call(
        &gw,
        "GET",
        "/api/history/h?order=newest&limit=2",
        Value::Null,
    )
    .await;
    assert_eq!(history_texts(&answer), [(3, "three"), (2, "two")]);
    let (_, answer) = call(&gw, "GET", "/api/history/h?since=3", Value::Null).await;
    assert!(history_texts(&answer).is_empty(), "{answer}");
    // A room nothing is kept of.
    let (status, answer) = call(&gw, "GET", "/api/history/never", Value::Null).await;
    assert_eq!(status, 200);
    assert_eq!(
        answer,
        json!({"room": "never", "offset": 0, "epoch": null, "messages": []})
    );
    for bad in [
        "/api/history/h?since=-1",
        "/api/history/h?limit=0",
        "/api/history/h?order=sideways",
        "/api/history/h?after=1",
        "/api/history/bad%20room",
    ] {
        let (status, answer) = call(&gw, "GET", bad, Value::Null).await;
        assert_eq!(status, 400, "{bad}: {answer}");
    }
    let (status, _) = call(&gw, "POST", "/api/history/h", json!({})).await;
    assert_eq!(status, 405);
}

#[tokio::test]
async fn a_publication_in_the_chat_shape_arrives_as_a_chat_message() {
    let gw = TestGateway::start_with(
        |c| {
            c.api_key = Some(API_KEY.into());
            c.max_chat_message_chars = 20;
        },
        1,
    );
    let mut member = gw.client().await;
    member.join("news").await;
    let body = json!({"room": "news", "as": "chat", "username": "Deploy bot", "data": "v2 is out"});
    let (status, answer) = call(&gw, "POST", "/api/publish", body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["offset"], 1);
    let got = member.next_not_presence().await;
    assert_eq!(
        (
            got["type"].as_str(),
            got["username"].as_str(),
            got["userId"].as_str(),
            got["message"].as_str(),
            got["offset"].as_u64()
        ),
        (
            Some("chat_message"),
            Some("Deploy bot"),
            Some("server"),
            Some("v2 is out"),
            Some(1)
        ),
        "{got}"
    );
    assert!(got["timestamp"].is_u64());
    // As a user of the backend's choosing.
    let body =
        json!({"room": "news", "as": "chat", "username": "Ops", "userId": "ops-1", "data": "ok"});
    assert_eq!(call(&gw, "POST", "/api/publish", body).await.0, 200);
    assert_eq!(member.next_not_presence().await["userId"], "ops-1");
    for bad in [
        json!({"room": "news", "as": "chat", "data": "no sender"}),
        json!({"room": "news", "as": "chat", "username": "", "data": "x"}),
        json!({"room": "news", "as": "chat", "username": "b", "data": {"not": "text"}}),
        json!({"room": "news", "as": "chat", "username": "b", "data": "x".repeat(21)}),
        json!({"room": "news", "as": "chat", "username": "b", "userId": "", "data": "x"}),
        json!({"room": "news", "as": "poem", "username": "b", "data": "x"}),
        json!({"user": "alice", "as": "chat", "username": "b", "data": "x"}),
    ] {
        let (status, answer) = call(&gw, "POST", "/api/publish", bad.clone()).await;
        assert_eq!(status, 400, "{bad}: {answer}");
    }
    member.expect_silence().await;
}

#[tokio::test]
async fn nodes_lists_this_node_with_its_gauges_and_totals() {
    let gw = gateway(2);
    let mut alice = gw.client_as("alice").await;
    let _bob = gw.client_as("bob").await;
    alice.join("general").await;
    alice.chat("general", "hi").await;
    let (status, answer) = call(&gw, "GET", "/api/nodes", Value::Null).await;
    assert_eq!(status, 200, "{answer}");
    let nodes = answer["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 1, "{answer}");
    let node = &nodes[0];
    assert_eq!(
        (&node["connections"], &node["rooms"], &node["shards"]),
        (&json!(2), &json!(1), &json!(2)),
        "{node}"
    );
    assert_eq!(node["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(node["connectionsOpened"], 2);
    // The join and the chat message.
    assert!(node["messagesReceived"].as_u64().unwrap() >= 2, "{node}");
    assert!(node["deliveries"].as_u64().unwrap() >= 1, "{node}");
    assert!(node["at"].as_u64().unwrap() > 1_700_000_000_000, "{node}");
    let (status, _) = call(&gw, "POST", "/api/nodes", Value::Null).await;
    assert_eq!(status, 405);
}

#[tokio::test]
async fn the_admin_page_is_served_only_with_an_api_key_and_never_framed() {
    let without = TestGateway::start(1);
    let (status, _, _) = http_get(without.addr, "/admin", "").await;
    assert_eq!(status, 404);
    let gw = gateway(1);
    let (status, head, body) = http_get(gw.addr, "/admin", "").await;
    assert_eq!(status, 200);
    let head = head.to_ascii_lowercase();
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(head.contains("x-frame-options: deny"), "{head}");
    assert!(head.contains("referrer-policy: no-referrer"), "{head}");
    assert!(head.contains("x-content-type-options: nosniff"), "{head}");
    assert!(
        head.contains("content-security-policy: default-src 'none'; script-src 'self';"),
        "{head}"
    );
    assert!(body.contains("<title>wsgate admin</title>"));
    // No inline script (the policy allows none): the page's code is a file of its own.
    assert!(!body.contains("<script>") && body.contains(r#"<script src="/admin.js">"#));
    let (status, head, script) = http_get(gw.addr, "/admin.js", "").await;
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/javascript")
    );
    // It holds no secret: it asks for the key, and reads the API with it.
    assert!(!script.contains(API_KEY) && script.contains("sessionStorage"));
    assert!(
        !script.contains("innerHTML"),
        "names are shown as text, never as markup"
    );
    assert_eq!(http_get(without.addr, "/admin.js", "").await.0, 404);
}
