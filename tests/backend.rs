//! The proxies to the application's backend (connect, join, publish), against a real HTTP
//! backend started by each test: what the backend is told, and what its answers do — allow,
//! deny, replace, disconnect — and what a slow, down or restarted backend does, on one node and
//! on a three-node cluster with a real redis-server.

mod support;

use std::time::Duration;

use serde_json::json;
use support::backend::{Answer, Backend};
use support::cluster::{node_with, user_on, wait_readiness};
use support::redis_server::RedisServer;
use support::{Client, PATIENCE, QUIET, TestGateway, metric, token_for};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use wsgate::config::{ProxyFailure, ProxySettings};

/// A gateway whose proxies are set by `proxies`.
fn gateway(proxies: impl FnOnce(&mut wsgate::Config), shards: usize) -> TestGateway {
    TestGateway::start_with(proxies, shards)
}

/// A chat client whose greeting is still unread.
async fn greeted(request: impl IntoClientRequest + Unpin) -> Client {
    let (ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("upgrades");
    Client {
        ws,
        id: String::new(),
    }
}

/// The URL of `gw`'s chat endpoint with a token for `user`.
fn as_user(gw: &TestGateway, user: &str) -> String {
    format!("{}?token={}", gw.url("/ws"), token_for(user))
}

/// Connects as `user`; returns the close frame's code and reason when the gateway refuses.
async fn refused_as(gw: &TestGateway, user: &str) -> (u16, String) {
    let mut client = greeted(as_user(gw, user)).await;
    let close = client.expect_close().await.expect("a close frame");
    (u16::from(close.code), close.reason.to_string())
}

#[tokio::test]
async fn the_connect_proxy_is_told_who_connects_and_may_name_the_user_and_greet() {
    let backend = Backend::start(|_| {
        Answer::json(json!({"result": {
            "user": "u-42", "username": "Ada", "data": {"plan": "pro"}
        }}))
    });
    let url = backend.url("/connect");
    let gw = gateway(
        |c| {
            c.connect_proxy = Some(ProxySettings::at(&url));
            c.proxy_headers = vec!["cookie".into(), "x-absent".into()];
        },
        1,
    );
    let mut request = as_user(&gw, "alice").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("cookie", "session=abc".parse().unwrap());
    let mut client = greeted(request).await;
    let hello = client.expect("connected").await;
    assert_eq!(hello["data"], json!({"plan": "pro"}), "{hello}");

    let calls = backend.calls();
    assert_eq!(calls.len(), 1);
    let call = &calls[0];
    assert_eq!(call["event"], "connect");
    assert_eq!(call["user"], "alice");
    assert_eq!(call["username"], "alice");
    assert_eq!(call["address"], "127.0.0.1");
    assert_eq!(call["claims"]["sub"], "alice", "the token's claims: {call}");
    assert!(call["claims"]["exp"].as_u64().is_some());
    assert_eq!(call["headers"], json!({"cookie": "session=abc"}));
    assert!(call["node"].as_str().is_some_and(|n| !n.is_empty()));
    assert!(call.get("client").is_none(), "no client id yet: {call}");

    // The connection is the user the backend named.
    client.join("lobby").await;
    client.chat("lobby", "hi").await;
    let said = client.expect("chat_message").await;
    assert_eq!(
        (said["userId"].as_str(), said["username"].as_str()),
        (Some("u-42"), Some("Ada"))
    );
    // Without a connect proxy, the greeting has no data.
    let plain = TestGateway::start(1);
    let mut client = greeted(plain.url("/ws")).await;
    let hello = client.expect("connected").await;
    assert!(hello.get("data").is_none(), "{hello}");
}

#[tokio::test]
async fn connections_the_backend_refuses_are_closed_with_its_code_and_words() {
    let backend = Backend::start(|call| match call["user"].as_str() {
        Some("banned") => {
            Answer::json(json!({"error": {"message": "you are banned", "code": 4031}}))
        }
        Some("kicked") => Answer::json(json!({"disconnect": {"code": 4100, "reason": "go away"}})),
        Some("odd") => Answer::json(json!({"error": {"message": "no", "code": 1000}})),
        _ => Answer::allow(),
    });
    let url = backend.url("/connect");
    let gw = gateway(|c| c.connect_proxy = Some(ProxySettings::at(&url)), 1);
    assert_eq!(
        refused_as(&gw, "banned").await,
        (4031, "you are banned".into())
    );
    assert_eq!(refused_as(&gw, "kicked").await, (4100, "go away".into()));
    // A code that is not an application's (4000-4999) becomes 4403.
    assert_eq!(refused_as(&gw, "odd").await, (4403, "no".into()));
    gw.wait_for_connections(0).await;
    let allowed = gw.client_as("welcome").await;
    assert!(!allowed.id.is_empty());
    gw.wait_for_connections(1).await;
    let denied = r#"wsgate_proxy_answers_total{proxy="connect",answer="denied"}"#;
    assert_eq!(metric(&gw, denied).await, 2);
    let disconnected = r#"wsgate_proxy_answers_total{proxy="connect",answer="disconnected"}"#;
    assert_eq!(metric(&gw, disconnected).await, 1);
    let allowed = r#"wsgate_proxy_answers_total{proxy="connect",answer="allowed"}"#;
    assert_eq!(metric(&gw, allowed).await, 1);
}

#[tokio::test]
async fn a_backend_that_is_down_refuses_or_allows_as_each_proxy_says() {
    let mut backend = Backend::start(|_| Answer::allow());
    backend.stop();
    let url = backend.url("/connect");
    let refusing = gateway(|c| c.connect_proxy = Some(ProxySettings::at(&url)), 1);
    assert_eq!(
        refused_as(&refusing, "alice").await,
        (1013, "backend unavailable: try again later".into())
    );
    let unreachable = r#"wsgate_proxy_failures_total{proxy="connect",reason="unreachable"}"#;
    assert_eq!(metric(&refusing, unreachable).await, 1);

    let allowing = gateway(
        |c| {
            c.connect_proxy = Some(ProxySettings {
                on_error: ProxyFailure::Allow,
                ..ProxySettings::at(&url)
            })
        },
        1,
    );
    let mut client = allowing.client_as("alice").await;
    client.join("lobby").await;
}

#[tokio::test]
async fn the_join_proxy_allows_or_denies_each_new_room_and_the_answer_carries_the_request_id() {
    let backend = Backend::start(|call| match call["room"].as_str() {
        Some("vip") => Answer::json(json!({"error": {"message": "members only", "code": 403}})),
        _ => Answer::allow(),
    });
    let url = backend.url("/join");
    let gw = gateway(
        |c| {
            c.join_proxy = Some(ProxySettings::at(&url));
            c.max_rooms_per_connection = 2;
        },
        2,
    );
    let mut client = gw.client_as("alice").await;
    client.join("lobby").await;
    client
        .send_text(json!({"type": "join_room", "id": 7, "payload": {"room": "vip"}}).to_string())
        .await;
    assert_eq!(
        client.recv().await,
        json!({"type": "error", "error": "members only", "code": 403, "id": 7})
    );
    // Already a member: joining again is answered without asking.
    client.join("lobby").await;
    // What the gateway refuses itself never reaches the backend: a bad name, a room past the
    // connection's limit.
    client.send("join_room", json!({"room": "bad room!"})).await;
    assert_eq!(client.recv().await["type"], "error");
    client.join("second").await;
    client.send("join_room", json!({"room": "third"})).await;
    assert_eq!(
        client.recv().await["error"],
        "Room limit reached (max 2 rooms per connection)"
    );

    let calls = backend.calls();
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert_eq!(calls[0]["event"], "join");
    assert_eq!(calls[0]["room"], "lobby");
    assert_eq!(calls[0]["client"], client.id.as_str());
    assert_eq!(calls[0]["user"], "alice");
    assert_eq!(calls[0]["claims"]["sub"], "alice");
    assert_eq!(calls[1]["room"], "vip");
    // A member of the room, as the allowed join made it.
    client.chat("lobby", "in").await;
    assert_eq!(client.expect("chat_message").await["message"], "in");
}

#[tokio::test]
async fn the_publish_proxy_allows_replaces_or_denies_before_the_broadcast() {
    let backend = Backend::start(|call| {
        let message = call["message"].as_str().unwrap_or_default();
        if message.contains("darn") {
            Answer::json(json!({"result": {"message": message.replace("darn", "d**n")}}))
        } else if message.contains("spam") {
            Answer::json(json!({"error": {"message": "no spam here"}}))
        } else if message.contains("expand") {
            Answer::json(json!({"result": {"message": "x".repeat(60)}}))
        } else if message.contains("bye") {
            Answer::json(json!({"disconnect": {"code": 4200, "reason": "enough"}}))
        } else {
            Answer::allow()
        }
    });
    let url = backend.url("/publish");
    let gw = gateway(
        |c| {
            c.publish_proxy = Some(ProxySettings::at(&url));
            c.max_chat_message_chars = 40;
        },
        2,
    );
    let mut alice = gw.client_as("alice").await;
    let mut bob = gw.client_as("bob").await;
    alice.join("r").await;
    bob.join("r").await;
    alice.expect("user_joined").await;

    alice.chat("r", "hello").await;
    alice
        .send_text(
            json!({"type": "chat_message", "id": "m2",
                   "payload": {"room": "r", "message": "buy spam", "messageId": "k2"}})
            .to_string(),
        )
        .await;
    alice.chat("r", "darn it").await;
    assert_eq!(
        alice.next_not_presence().await["message"],
        "hello",
        "the sender gets its own message"
    );
    assert_eq!(
        alice.recv().await,
        json!({"type": "error", "error": "no spam here", "id": "m2"})
    );
    assert_eq!(alice.recv().await["message"], "d**n it");
    let got: Vec<String> = bob.chats(2).await.into_iter().map(|(_, m)| m).collect();
    assert_eq!(got, ["hello", "d**n it"]);
    bob.expect_silence().await;

    // The backend's text is published as given, past the clients' length limit.
    alice.chat("r", "expand").await;
    assert_eq!(alice.recv().await["message"], "x".repeat(60));
    assert_eq!(bob.chats(1).await[0].1, "x".repeat(60));

    let calls = backend.calls();
    assert_eq!(calls.len(), 4);
    assert_eq!(calls[1]["event"], "publish");
    assert_eq!(calls[1]["room"], "r");
    assert_eq!(calls[1]["message"], "buy spam");
    assert_eq!(calls[1]["messageId"], "k2");
    assert_eq!(calls[1]["client"], alice.id.as_str());

    // A disconnect answer closes the sender with the backend's code.
    alice.chat("r", "bye now").await;
    let close = alice.expect_close().await.expect("a close frame");
    assert_eq!(
        (u16::from(close.code), close.reason.as_str()),
        (4200, "enough")
    );
}

#[tokio::test]
async fn a_connection_waiting_for_the_backend_keeps_its_order_and_holds_up_no_one_else() {
    let backend = Backend::start(|call| match call["message"].as_str() {
        Some("slow") => Answer::allow().after(Duration::from_millis(1500)),
        _ => Answer::allow(),
    });
    let url = backend.url("/publish");
    // One shard: every connection shares the loop the waiting one is on.
    let settings = ProxySettings {
        timeout: Duration::from_secs(5),
        ..ProxySettings::at(&url)
    };
    let gw = gateway(|c| c.publish_proxy = Some(settings), 1);
    let mut speaker = gw.client().await;
    let mut listener = gw.client().await;
    let mut bystander = gw.client().await;
    speaker.join("r").await;
    listener.join("r").await;
    for message in ["slow", "fast 1", "fast 2"] {
        speaker.chat("r", message).await;
    }
    // Others are served while the speaker waits for its first answer...
    for round in 0..3 {
        bystander.send("echo", json!(round)).await;
        assert_eq!(bystander.recv().await["payload"], round);
    }
    // ...and none of the speaker's messages went ahead of the one that waits.
    assert!(
        tokio::time::timeout(QUIET, listener.next_not_presence())
            .await
            .is_err(),
        "nothing is published before the backend answers"
    );
    let got: Vec<String> = listener
        .chats(3)
        .await
        .into_iter()
        .map(|(_, m)| m)
        .collect();
    assert_eq!(got, ["slow", "fast 1", "fast 2"]);
}

#[tokio::test]
async fn a_slow_backend_times_out_the_breaker_opens_and_a_restarted_backend_is_used_again() {
    let mut backend = Backend::start(|_| Answer::allow().after(Duration::from_secs(2)));
    let url = backend.url("/publish");
    let gw = gateway(
        |c| {
            c.publish_proxy = Some(ProxySettings {
                timeout: Duration::from_millis(200),
                breaker_failures: 2,
                breaker_cooldown: Duration::from_millis(500),
                ..ProxySettings::at(&url)
            })
        },
        1,
    );
    let mut client = gw.client().await;
    client.join("r").await;
    let unavailable = "Service unavailable: the backend did not answer (retry)";
    let send = |id: u64| {
        json!({"type": "chat_message", "id": id, "payload": {"room": "r", "message": "m"}})
            .to_string()
    };
    for id in 1..=3 {
        client.send_text(send(id)).await;
        assert_eq!(
            client.recv().await,
            json!({"type": "error", "error": unavailable, "id": id})
        );
    }
    let failures = |reason: &str| {
        format!(r#"wsgate_proxy_failures_total{{proxy="publish",reason="{reason}"}}"#)
    };
    assert_eq!(metric(&gw, &failures("timeout")).await, 2);
    assert_eq!(metric(&gw, &failures("breaker_open")).await, 1);
    assert_eq!(
        backend.calls().len(),
        2,
        "the open breaker spared the backend"
    );
    let timed = r#"wsgate_proxy_duration_seconds_count{proxy="publish"}"#;
    assert_eq!(metric(&gw, timed).await, 2);

    // Down, then back with quick answers on the same port.
    backend.stop();
    tokio::time::sleep(Duration::from_millis(600)).await;
    client.send_text(send(4)).await;
    assert_eq!(client.recv().await["id"], 4);
    assert_eq!(metric(&gw, &failures("unreachable")).await, 1);
    backend.answer_with(|_| Answer::allow());
    backend.restart();
    tokio::time::sleep(Duration::from_millis(600)).await;
    client.send_text(send(5)).await;
    let (ack, message) = client.ack_and_chat().await;
    assert_eq!(
        (ack["id"].as_u64(), message["message"].as_str()),
        (Some(5), Some("m"))
    );
}

#[tokio::test]
async fn a_backend_refusing_odd_calls_with_4xx_does_not_open_the_breaker_for_everyone() {
    let backend = Backend::start(|_| Answer {
        status: 400,
        body: "{}".into(),
        delay: Duration::ZERO,
    });
    let url = backend.url("/publish");
    let gw = gateway(
        |c| {
            c.publish_proxy = Some(ProxySettings {
                breaker_failures: 2,
                ..ProxySettings::at(&url)
            })
        },
        1,
    );
    let mut client = gw.client().await;
    client.join("r").await;
    for _ in 0..4 {
        client.chat("r", "odd").await;
        client
            .expect_error("Service unavailable: the backend did not answer (retry)")
            .await;
    }
    assert_eq!(backend.calls().len(), 4, "every call reached the backend");
    let failures = |reason: &str| {
        format!(r#"wsgate_proxy_failures_total{{proxy="publish",reason="{reason}"}}"#)
    };
    assert_eq!(metric(&gw, &failures("status")).await, 4);
    assert_eq!(metric(&gw, &failures("breaker_open")).await, 0);
}

#[tokio::test]
async fn on_a_cluster_each_node_asks_the_backend_and_what_it_allows_reaches_every_node() {
    let redis = RedisServer::start();
    let backend = Backend::start(
        |call| match (call["event"].as_str(), call["room"].as_str()) {
            (Some("join"), Some("closed")) => {
                Answer::json(json!({"error": {"message": "room closed"}}))
            }
            (Some("publish"), _) => {
                let node = call["node"].as_str().unwrap_or_default();
                let text = call["message"].as_str().unwrap_or_default();
                Answer::json(json!({"result": {"message": format!("{text} (via {node})")}}))
            }
            _ => Answer::allow(),
        },
    );
    let (join, publish) = (backend.url("/join"), backend.url("/publish"));
    let nodes: Vec<TestGateway> = (0..3)
        .map(|_| {
            let (join, publish) = (join.clone(), publish.clone());
            node_with(&redis, 1, move |c| {
                c.join_proxy = Some(ProxySettings::at(&join));
                c.publish_proxy = Some(ProxySettings::at(&publish));
            })
        })
        .collect();
    let mut clients = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        wait_readiness(node, 200).await;
        let mut client = user_on(node, &format!("user{i}")).await;
        client.join("general").await;
        client.send("join_room", json!({"room": "closed"})).await;
        assert_eq!(
            client.next_not_presence().await,
            json!({"type": "error", "error": "room closed"})
        );
        clients.push(client);
    }
    let sender_node = backend.calls()[0]["node"].as_str().unwrap().to_owned();
    clients[0].chat("general", "hello").await;
    let expected = format!("hello (via {sender_node})");
    for client in &mut clients {
        let got = tokio::time::timeout(PATIENCE, client.chats(1))
            .await
            .unwrap();
        assert_eq!(got[0].1, expected);
    }
    let publishes = backend
        .calls()
        .iter()
        .filter(|c| c["event"] == "publish")
        .count();
    assert_eq!(publishes, 1, "asked once, by the sender's node");
}

#[test]
fn a_proxy_is_a_url_or_a_table_and_bad_ones_are_refused_by_name() {
    let dir = std::env::temp_dir().join(format!("wsgate-proxy-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let load = |toml: &str| {
        let path = dir.join("wsgate.toml");
        std::fs::write(&path, toml).unwrap();
        let config = wsgate::Config::load(Some(&path), &Default::default())?;
        wsgate::node::preflight(&config).map(|_| config)
    };
    let config = load(
        "publish_proxy = \"http://127.0.0.1:3000/p\"\n\
         [join_proxy]\nurl = \"http://backend/j\"\ntimeout = \"250ms\"\non_error = \"allow\"\n",
    )
    .unwrap();
    assert_eq!(
        config.publish_proxy,
        Some(ProxySettings::at("http://127.0.0.1:3000/p"))
    );
    let join = config.join_proxy.unwrap();
    assert_eq!(join.timeout, Duration::from_millis(250));
    assert_eq!(join.on_error, ProxyFailure::Allow);
    assert_eq!(join.max_in_flight, 100);
    for (toml, named) in [
        ("connect_proxy = \"https://backend/c\"", "connect_proxy"),
        ("connect_proxy = \"not a url\"", "connect_proxy"),
        (
            "[join_proxy]\nurl = \"http://b/j\"\ntimeout = \"0s\"",
            "join_proxy.timeout",
        ),
        (
            "[join_proxy]\nurl = \"http://b/j\"\nretries = 3",
            "join_proxy",
        ),
        ("proxy_headers = [\"bad header\"]", "proxy_headers"),
        (
            "connect_proxy = \"http://user:secret@backend/c\"",
            "connect_proxy",
        ),
        (
            "[join_proxy]\nurl = \"http://b/j\"\ntimeout = \"10s\"",
            "join_proxy.timeout",
        ),
        (
            "[join_proxy]\nurl = \"http://b/j\"\nbreaker_cooldown = \"2h\"",
            "join_proxy.breaker_cooldown",
        ),
    ] {
        let error = load(toml).expect_err(toml).to_string();
        assert!(error.contains(named), "{toml}: {error}");
        assert!(
            !error.contains("secret"),
            "credentials are never shown: {error}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The README's example backend (`examples/backend.py`, standard-library Python) behind a real
/// gateway: what it says it does, it does.
#[tokio::test]
async fn the_example_backend_greets_guards_staff_rooms_and_moderates() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/backend.py");
    // Killed however the test ends.
    let _python = KilledOnDrop(
        std::process::Command::new("python3")
            .args([script, &port.to_string()])
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3 runs"),
    );
    let deadline = std::time::Instant::now() + PATIENCE;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the example never listened"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let url = |path: &str| format!("http://127.0.0.1:{port}/{path}");
    let (connect, join, publish) = (url("connect"), url("join"), url("publish"));
    let gw = gateway(
        move |c| {
            c.connect_proxy = Some(ProxySettings::at(&connect));
            c.join_proxy = Some(ProxySettings::at(&join));
            c.publish_proxy = Some(ProxySettings::at(&publish));
        },
        1,
    );
    assert_eq!(refused_as(&gw, "mallory").await, (4030, "banned".into()));
    let mut alice = greeted(as_user(&gw, "alice")).await;
    let hello = alice.expect("connected").await;
    assert_eq!(hello["data"], json!({"motd": "welcome, alice"}));
    alice.send("join_room", json!({"room": "staff-only"})).await;
    assert_eq!(
        alice.recv().await,
        json!({"type": "error", "error": "staff-only is for staff", "code": 403})
    );
    alice.join("general").await;
    alice.chat("general", "darn, see http://x").await;
    assert_eq!(alice.recv().await["error"], "links are not allowed");
    alice.chat("general", "darn it").await;
    assert_eq!(alice.expect("chat_message").await["message"], "d**n it");
}

struct KilledOnDrop(std::process::Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
