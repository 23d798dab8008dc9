//! Nodes of a cluster on a real `redis-server`, and what the cluster tests wait for.

use std::time::Duration;

use serde_json::{Value, json};
use wsgate::config::BrokerKind;

use super::process::GatewayProcess;
use super::redis_server::RedisServer;
use super::{Client, PATIENCE, TestGateway, api, http_get};

/// A node of the cluster on `redis`.
pub fn node(redis: &RedisServer, shards: usize) -> TestGateway {
    node_with(redis, shards, |_| {})
}

/// A node of the cluster on `redis`, with `customize`'s changes to its configuration.
pub fn node_with(
    redis: &RedisServer,
    shards: usize,
    customize: impl FnOnce(&mut wsgate::Config),
) -> TestGateway {
    let url = redis.url();
    TestGateway::start_with(
        move |config| {
            config.broker = BrokerKind::Redis;
            config.redis_url = url.into();
            config.redis_unsubscribe_grace = Duration::from_millis(200);
            config.history_size = 1000;
            config.api_key = Some(super::API_KEY.into());
            customize(config);
        },
        shards,
    )
}

/// A node of the cluster on `redis` as a process of its own (one shard), to be killed (`drop`):
/// no goodbye, as a crash.
pub fn node_process(redis: &RedisServer) -> GatewayProcess {
    let url = redis.url();
    let env = [
        ("WSGATE_BROKER", "redis"),
        ("WSGATE_REDIS_URL", url.as_str()),
        ("WSGATE_JWT_SECRET", super::TEST_SECRET),
        ("WSGATE_SHARDS", "1"),
        ("WSGATE_API_KEY", super::API_KEY),
    ];
    GatewayProcess::start(&[], &env, None)
}

/// A client of a [`node_process`], as `user`.
pub async fn user_on_process(node: &GatewayProcess, user: &str) -> Client {
    let url = format!("ws://{}/ws?token={}", node.addr, super::token_for(user));
    Client::connect(&url).await
}

/// Two nodes, and a user on each (`alice` on the first, `bob` on the second) in `room`.
pub async fn two_members(redis: &RedisServer, room: &str) -> (Vec<TestGateway>, Client, Client) {
    let nodes = cluster(redis, &[1, 1]).await;
    let mut alice = user_on(&nodes[0], "alice").await;
    let mut bob = user_on(&nodes[1], "bob").await;
    alice.join(room).await;
    bob.join(room).await;
    (nodes, alice, bob)
}

/// Waits until `/readyz` answers `status`.
pub async fn wait_readiness(gw: &TestGateway, status: u16) {
    let deadline = tokio::time::Instant::now() + 2 * PATIENCE;
    loop {
        let (got, _, body) = http_get(gw.addr, "/readyz", "").await;
        if got == status {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz still {got} ({body}), expected {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn cluster(redis: &RedisServer, shards: &[usize]) -> Vec<TestGateway> {
    let nodes: Vec<TestGateway> = shards.iter().map(|&s| node(redis, s)).collect();
    for n in &nodes {
        wait_readiness(n, 200).await;
    }
    nodes
}

pub async fn send_all(client: &mut Client, tag: &str, count: usize) {
    for i in 0..count {
        client.chat("order", &format!("{tag}{i}")).await;
    }
}

/// Sends `message` until it is published: the sender is a member, so it sees its own message
/// come back; "Service unavailable: retry" means try again.
pub async fn publish_surely(client: &mut Client, room: &str, message: &str) -> u64 {
    loop {
        client.chat(room, message).await;
        let reply = client.next_not_presence().await;
        match reply["type"].as_str() {
            Some("chat_message") if reply["message"] == message => {
                return reply["offset"].as_u64().unwrap();
            }
            Some("error") if reply["error"] == "Service unavailable: retry" => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            _ => panic!("unexpected {reply}"),
        }
    }
}

pub async fn counter(gw: &TestGateway, name: &str) -> u64 {
    let (_, _, body) = http_get(gw.addr, "/healthz", "").await;
    let health: Value = serde_json::from_str(&body).unwrap();
    health["refused"][name].as_u64().unwrap()
}

/// Polls `read` until it gives something (within the patience window).
pub async fn eventually<T>(mut read: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(value) = read() {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "never came");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn wait_until(what: &str, done: impl FnMut() -> bool) {
    wait_until_for(what, PATIENCE, done).await;
}

/// [`wait_until`], for what takes a node's time-to-live.
pub async fn wait_until_slowly(what: &str, done: impl FnMut() -> bool) {
    wait_until_for(what, Duration::from_secs(12), done).await;
}

pub async fn wait_until_for(what: &str, patience: Duration, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + patience;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn user_on(gw: &TestGateway, user: &str) -> Client {
    gw.client_as(user).await
}

/// The presence notices `client` gets until it answers an echo (so none is missed).
pub async fn notices(client: &mut Client) -> Vec<(String, String)> {
    client.send("echo", json!("sync")).await;
    let mut seen = Vec::new();
    loop {
        let msg = client.recv().await;
        match msg["type"].as_str() {
            Some(kind @ ("user_joined" | "user_left")) => {
                seen.push((kind.to_owned(), msg["userId"].as_str().unwrap().to_owned()))
            }
            Some("echo") => return seen,
            _ => panic!("unexpected {msg}"),
        }
    }
}

/// Long enough for a change on another node to arrive through Redis, before a check that
/// nothing (more) came.
pub async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

pub async fn eventually_async<T, F: Future<Output = Option<T>>>(mut read: impl FnMut() -> F) -> T {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(value) = read().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "never came");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `GET path` on `gw`'s API once the answer satisfies `done` (Redis is written asynchronously).
pub async fn api_until(gw: &TestGateway, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    eventually_async(|| async {
        let (status, answer) = api(gw.addr, "GET", path, Value::Null).await;
        assert_eq!(status, 200, "{answer}");
        done(&answer).then_some(answer)
    })
    .await
}

pub fn room_list(answer: &Value) -> Vec<(String, u64)> {
    answer["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["room"].as_str().unwrap().to_owned(),
                r["members"].as_u64().unwrap(),
            )
        })
        .collect()
}
