//! Webhooks against a real HTTP backend started by each test: which events a backend is told, in
//! what order, signed how; retries, drops; and, on a three-node cluster with a real
//! redis-server, that each change of who is in a room is told once — whichever nodes the
//! connections are on, and when a node dies.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::backend::{Answer, Backend, Call};
use support::cluster::{eventually_async, node_with, user_on, wait_readiness, wait_until};
use support::process::GatewayProcess;
use support::redis_server::RedisServer;
use support::{Client, PATIENCE, TEST_SECRET, TestGateway, http_get, metric};
use wsgate::config::WebhookEvent;

const SECRET: &str = "webhook-secret-0123456789";

fn with_webhooks(url: &str) -> impl FnOnce(&mut wsgate::Config) + use<> {
    let url = url.to_owned();
    move |c: &mut wsgate::Config| {
        c.webhook_url = Some(url);
        c.webhook_secret = Some(SECRET.into());
        c.webhook_events = WebhookEvent::ALL.to_vec();
    }
}

/// The events the backend was sent, in order, as (name, room, user), once each (a batch sent
/// again is counted once: ids are unique).
fn events(backend: &Backend) -> Vec<(String, String, Option<String>)> {
    let mut seen = std::collections::HashSet::new();
    let mut events = Vec::new();
    for call in backend.calls() {
        for event in call["events"].as_array().cloned().unwrap_or_default() {
            if seen.insert(event["id"].as_str().unwrap().to_owned()) {
                events.push((
                    event["name"].as_str().unwrap().to_owned(),
                    event["room"].as_str().unwrap().to_owned(),
                    event["user"].as_str().map(str::to_owned),
                ));
            }
        }
    }
    events
}

/// Waits until the backend got `n` distinct events.
async fn wait_for_events(backend: &Backend, n: usize) -> Vec<(String, String, Option<String>)> {
    let deadline = Instant::now() + 2 * PATIENCE;
    loop {
        let got = events(backend);
        if got.len() >= n {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "expected {n} events, got {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Leaves `room`, once the gateway says it is done.
async fn leave(client: &mut Client, room: &str) {
    let leave = json!({"type": "leave_room", "id": "leave", "payload": {"room": room}});
    client.send_text(leave.to_string()).await;
    // Past what the room still sent it.
    while client.recv().await != json!({"type": "ack", "id": "leave"}) {}
}

fn event(name: &str, room: &str, user: Option<&str>) -> (String, String, Option<String>) {
    (name.to_owned(), room.to_owned(), user.map(str::to_owned))
}

/// Checks a request's signature as a backend would (HMAC-SHA256 of "<timestamp>.<body>").
fn signed(call: &Call) -> bool {
    use aws_lc_rs::hmac;
    let timestamp = call.header("x-wsgate-timestamp").expect("a timestamp");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let fresh = timestamp.parse::<u64>().is_ok_and(|t| t.abs_diff(now) < 60);
    let key = hmac::Key::new(hmac::HMAC_SHA256, SECRET.as_bytes());
    let mut message = format!("{timestamp}.").into_bytes();
    message.extend_from_slice(&call.raw);
    let tag = hmac::sign(&key, &message);
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    fresh && call.header("x-wsgate-signature") == Some(&format!("sha256={hex}"))
}

#[tokio::test]
async fn a_room_and_its_members_come_and_go_once_each_signed_and_in_order() {
    let backend = Backend::start(|_| Answer::allow());
    let gw = TestGateway::start_with(with_webhooks(&backend.url("/hooks")), 2);
    let mut alice = gw.client_as("alice").await;
    let mut alice_again = gw.client_as("alice").await;
    let mut bob = gw.client_as("bob").await;
    alice.join("r").await;
    alice_again.join("r").await;
    bob.join("r").await;
    alice.chat("r", "hello").await;
    let offset = alice.chats(1).await[0].0;
    leave(&mut alice, "r").await;
    leave(&mut alice_again, "r").await;
    wait_for_events(&backend, 5).await;
    bob.ws.close(None).await.unwrap();
    let got = wait_for_events(&backend, 7).await;
    assert_eq!(
        got,
        [
            event("room_occupied", "r", None),
            event("member_added", "r", Some("alice")),
            event("member_added", "r", Some("bob")),
            event("chat_message", "r", None),
            event("member_removed", "r", Some("alice")),
            event("member_removed", "r", Some("bob")),
            event("room_vacated", "r", None),
        ]
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        events(&backend).len(),
        7,
        "nothing more: {:?}",
        events(&backend)
    );

    let requests = backend.requests();
    assert!(requests.iter().all(signed), "every request is signed");
    let all: Vec<Value> = requests
        .iter()
        .flat_map(|call| call.body["events"].as_array().cloned().unwrap_or_default())
        .collect();
    let chat = all.iter().find(|e| e["name"] == "chat_message").unwrap();
    assert_eq!(chat["offset"], offset);
    assert_eq!(chat["data"]["message"], "hello");
    assert_eq!(chat["data"]["userId"], "alice");
    let added = all.iter().find(|e| e["name"] == "member_added").unwrap();
    assert_eq!(added["username"], "alice");
    assert!(added["time"].as_u64().unwrap() > 1_600_000_000_000);
    assert!(added["id"].as_str().unwrap().contains('-'));
    let sent = r#"wsgate_webhook_events_total{outcome="sent"}"#;
    assert_eq!(metric(&gw, sent).await, 7);
}

#[tokio::test]
async fn a_stopping_node_tells_who_left_with_it_before_it_exits() {
    let backend = Backend::start(|_| Answer::allow().after(Duration::from_millis(100)));
    let mut gw = TestGateway::start_with(with_webhooks(&backend.url("/hooks")), 1);
    let mut alice = gw.client_as("alice").await;
    alice.join("r").await;
    gw.stop().await;
    // Stopped: whatever it had to say was said (or it waited for nothing).
    assert_eq!(
        events(&backend),
        [
            event("room_occupied", "r", None),
            event("member_added", "r", Some("alice")),
            event("member_removed", "r", Some("alice")),
            event("room_vacated", "r", None),
        ]
    );
}

#[tokio::test]
async fn a_failing_backend_gets_the_same_events_again_until_it_takes_them() {
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = answered.clone();
    let backend = Backend::start(move |_| {
        if counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2 {
            Answer {
                status: 503,
                body: String::new(),
                delay: Duration::ZERO,
            }
        } else {
            Answer::allow()
        }
    });
    // The default events: no chat_message.
    let url = backend.url("/hooks");
    let gw = TestGateway::start_with(
        move |c| {
            c.webhook_url = Some(url);
            c.webhook_secret = Some(SECRET.into());
        },
        1,
    );
    let mut alice = gw.client_as("alice").await;
    alice.join("r").await;
    alice.chat("r", "not told").await;
    let deadline = Instant::now() + 2 * PATIENCE;
    while backend.requests().len() < 3 {
        assert!(Instant::now() < deadline, "the batch was not sent again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ids = |call: &Value| -> Vec<String> {
        let events = call["events"].as_array().unwrap();
        events
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let calls = backend.calls();
    assert_eq!(
        ids(&calls[0]),
        ids(&calls[2]),
        "the same events, the same ids"
    );
    assert_eq!(
        events(&backend),
        [
            event("room_occupied", "r", None),
            event("member_added", "r", Some("alice"))
        ]
    );
    let requests = |result: &str| format!(r#"wsgate_webhook_requests_total{{result="{result}"}}"#);
    assert_eq!(metric(&gw, &requests("failed")).await, 2);
    // Every request counted (the two events may have gone in one batch or two).
    let ok = metric(&gw, &requests("ok")).await;
    assert_eq!(ok + 2, backend.requests().len() as u64);
    let sent = r#"wsgate_webhook_events_total{outcome="sent"}"#;
    assert_eq!(metric(&gw, sent).await, 2);
}

#[tokio::test]
async fn a_slow_then_stopped_backend_gets_the_events_once_restarted_under_the_same_ids() {
    let mut backend = Backend::start(|_| Answer::allow().after(Duration::from_secs(2)));
    let url = backend.url("/hooks");
    let gw = TestGateway::start_with(
        move |c| {
            c.webhook_url = Some(url);
            c.webhook_secret = Some(SECRET.into());
            c.webhook_timeout = Duration::from_millis(200);
        },
        1,
    );
    let mut alice = gw.client_as("alice").await;
    alice.join("r").await;
    // Slow: each attempt times out, and is made again.
    wait_until("tried twice", || backend.requests().len() >= 2).await;
    backend.stop();
    // Down: an attempt finds no one.
    let failed = r#"wsgate_webhook_requests_total{result="failed"}"#;
    eventually_async(|| async { (metric(&gw, failed).await >= 3).then_some(()) }).await;
    backend.answer_with(|_| Answer::allow());
    backend.restart();
    let sent = r#"wsgate_webhook_events_total{outcome="sent"}"#;
    eventually_async(|| async { (metric(&gw, sent).await == 2).then_some(()) }).await;
    // Every attempt carried the events under their first ids: two events, two ids in all.
    let ids: std::collections::HashSet<String> = backend
        .calls()
        .iter()
        .flat_map(|call| call["events"].as_array().cloned().unwrap_or_default())
        .map(|event| event["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert_eq!(
        events(&backend),
        [
            event("room_occupied", "r", None),
            event("member_added", "r", Some("alice"))
        ]
    );
    assert!(backend.requests().iter().all(signed));
    let dropped = r#"wsgate_webhook_events_total{outcome="dropped"}"#;
    assert_eq!(metric(&gw, dropped).await, 0);
}

#[tokio::test]
async fn events_a_backend_never_takes_are_dropped_and_counted() {
    let backend = Backend::start(|_| Answer {
        status: 500,
        body: String::new(),
        delay: Duration::ZERO,
    });
    let url = backend.url("/hooks");
    let gw = TestGateway::start_with(
        move |c| {
            c.webhook_url = Some(url);
            c.webhook_secret = Some(SECRET.into());
            c.webhook_retry_for = Duration::from_millis(600);
        },
        1,
    );
    let mut alice = gw.client_as("alice").await;
    alice.join("r").await;
    let dropped = r#"wsgate_webhook_events_total{outcome="dropped"}"#;
    let deadline = Instant::now() + PATIENCE;
    while metric(&gw, dropped).await < 2 {
        assert!(Instant::now() < deadline, "never dropped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(backend.requests().len() >= 2, "tried more than once");
    let sent = r#"wsgate_webhook_events_total{outcome="sent"}"#;
    assert_eq!(metric(&gw, sent).await, 0);
}

#[tokio::test]
async fn on_a_cluster_each_change_is_told_once_whatever_the_nodes_and_when_a_node_dies() {
    let redis = RedisServer::start();
    let backend = Backend::start(|_| Answer::allow());
    let url = backend.url("/hooks");
    let nodes: Vec<TestGateway> = (0..3)
        .map(|_| node_with(&redis, 1, with_webhooks(&url)))
        .collect();
    for node in &nodes {
        wait_readiness(node, 200).await;
    }
    let mut alice_0 = user_on(&nodes[0], "alice").await;
    let mut alice_1 = user_on(&nodes[1], "alice").await;
    let mut bob = user_on(&nodes[2], "bob").await;
    alice_0.join("r").await;
    alice_1.join("r").await;
    bob.join("r").await;
    // A node that will die without a goodbye, with a member of its own.
    let env = [
        ("WSGATE_BROKER", "redis"),
        ("WSGATE_REDIS_URL", &redis.url()),
        ("WSGATE_JWT_SECRET", TEST_SECRET),
        ("WSGATE_SHARDS", "1"),
        ("WSGATE_WEBHOOK_URL", &url),
        ("WSGATE_WEBHOOK_SECRET", SECRET),
    ];
    let doomed = GatewayProcess::start(&[], &env, None);
    let deadline = Instant::now() + 2 * PATIENCE;
    while http_get(doomed.addr, "/readyz", "").await.0 != 200 {
        assert!(Instant::now() < deadline, "the doomed node never got ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut carol = support::cluster::user_on_process(&doomed, "carol").await;
    carol.join("r").await;
    let got = wait_for_events(&backend, 4).await;
    let mut sorted = got.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [
            event("member_added", "r", Some("alice")),
            event("member_added", "r", Some("bob")),
            event("member_added", "r", Some("carol")),
            event("room_occupied", "r", None),
        ]
    );
    assert_eq!(got[0], event("room_occupied", "r", None));

    // Alice is still in the room on the other node: nothing to tell.
    leave(&mut alice_0, "r").await;
    leave(&mut alice_1, "r").await;
    let got = wait_for_events(&backend, 5).await;
    assert_eq!(got[4], event("member_removed", "r", Some("alice")));

    // Carol's node dies: once the others see it dead, one of them takes it out, and tells.
    // Killed with its member still connected (a crash: no write, no webhook of its own).
    drop(doomed);
    drop(carol);
    let deadline = Instant::now() + Duration::from_secs(30);
    while events(&backend).len() < 6 {
        assert!(
            Instant::now() < deadline,
            "the dead node's member was never told gone"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        events(&backend)[5],
        event("member_removed", "r", Some("carol"))
    );

    leave(&mut bob, "r").await;
    let got = wait_for_events(&backend, 8).await;
    assert_eq!(
        got[6..],
        [
            event("member_removed", "r", Some("bob")),
            event("room_vacated", "r", None)
        ]
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        events(&backend).len(),
        8,
        "each told once: {:?}",
        events(&backend)
    );
}
