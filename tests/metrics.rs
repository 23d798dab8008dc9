//! `/metrics` over real HTTP: what the gateway counts shows up under Prometheus names, summed
//! over the shards, and only callers allowed to read it can.

mod support;

use std::time::Duration;

use serde_json::json;
use support::{PATIENCE, TestGateway, http_get};

const METRICS_KEY: &str = "prometheus-key-0123456789";

/// The sum of every sample of `name` whose labels contain `labels` (e.g. `code="1000"`).
fn sum(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            (metric == name && rest.contains(labels)).then(|| value.parse::<f64>().unwrap())
        })
        .sum()
}

async fn scrape(gw: &TestGateway) -> String {
    let (status, head, body) = http_get(gw.addr, "/metrics", "").await;
    assert_eq!(status, 200, "{body}");
    assert!(head.contains("application/openmetrics-text"), "{head}");
    assert!(body.ends_with("# EOF\n"), "{body}");
    body
}

/// Scrapes until `done` holds (counters of other threads are read as they are written).
async fn scrape_until(gw: &TestGateway, done: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let text = scrape(gw).await;
        if done(&text) {
            return text;
        }
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn traffic_connections_and_refusals_are_counted_over_every_shard() {
    let gw = TestGateway::start(2);
    let mut a = gw.client_on_shard(0).await;
    let mut b = gw.client_on_shard(1).await;
    a.join("r").await;
    b.join("r").await;
    a.expect("user_joined").await;
    for n in 0..5 {
        a.send(
            "chat_message",
            json!({"room": "r", "message": format!("m{n}")}),
        )
        .await;
    }
    for client in [&mut a, &mut b] {
        for _ in 0..5 {
            client.expect("chat_message").await;
        }
    }
    // One normal close, one refused upgrade.
    b.ws.close(None).await.unwrap();
    let (status, _, _) = http_get(
        gw.addr,
        "/ws?token=garbage",
        "Upgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
    )
    .await;
    assert_eq!(status, 401);

    // Five chat messages to two members, and a's notices of b's join and leave.
    let text = scrape_until(&gw, |t| {
        sum(t, "wsgate_connections_closed_total", "code=\"1000\"") == 1.0
            && sum(t, "wsgate_deliveries_total", "") == 12.0
            // Connections dropped on the way (see below) may still be ending.
            && sum(t, "wsgate_connections", "") == 1.0
    })
    .await;
    // Every shard's counters, summed.
    assert_eq!(sum(&text, "wsgate_connections", ""), 1.0, "{text}");
    assert!(text.contains("wsgate_connections{shard=\"1\"}"), "{text}");
    // Every connection opened is open or closed (finding a client on a shard may take tries).
    assert_eq!(
        sum(&text, "wsgate_connections_accepted_total", ""),
        1.0 + sum(&text, "wsgate_connections_closed_total", "")
    );
    // Two joins and five chat messages.
    assert_eq!(sum(&text, "wsgate_messages_received_total", ""), 7.0);
    assert!(sum(&text, "wsgate_received_bytes_total", "") > 0.0);
    // Greetings, room_joined, user_joined, ten chat messages, b's close: what was written.
    assert!(sum(&text, "wsgate_frames_sent_total", "") >= 15.0, "{text}");
    assert!(sum(&text, "wsgate_sent_bytes_total", "") > 0.0);
    // The room's five messages went over the bus to both shards' members; the join notice too.
    assert!(
        sum(&text, "wsgate_delivery_latency_seconds_count", "") >= 10.0,
        "{text}"
    );
    assert_eq!(
        sum(
            &text,
            "wsgate_delivery_latency_seconds_bucket",
            "le=\"+Inf\""
        ),
        sum(&text, "wsgate_delivery_latency_seconds_count", "")
    );
    assert_eq!(
        sum(
            &text,
            "wsgate_handshakes_refused_total",
            "reason=\"auth_malformed_token\""
        ),
        1.0
    );
    assert_eq!(sum(&text, "wsgate_rooms", ""), 1.0);
    assert_eq!(sum(&text, "wsgate_broker_ready", ""), 1.0);
    assert_eq!(sum(&text, "wsgate_heartbeat_timeouts_total", ""), 0.0);
    assert!(
        text.contains("# TYPE wsgate_heartbeat_timeouts counter"),
        "{text}"
    );
}

#[tokio::test]
async fn with_a_metrics_key_only_callers_that_send_it_are_served() {
    let gw = TestGateway::start_with(|c| c.metrics_key = Some(METRICS_KEY.into()), 1);
    let (status, head, body) = http_get(gw.addr, "/metrics", "").await;
    assert_eq!(status, 401, "even from loopback: {body}");
    assert!(head.contains("www-authenticate: Bearer"), "{head}");
    assert!(body.contains("metrics_key"), "{body}");
    let wrong = "Authorization: Bearer not-the-key-0123456789\r\n";
    assert_eq!(http_get(gw.addr, "/metrics", wrong).await.0, 401);
    let right = format!("Authorization: Bearer {METRICS_KEY}\r\n");
    let (status, _, body) = http_get(gw.addr, "/metrics", &right).await;
    assert_eq!(status, 200);
    assert!(body.contains("# TYPE wsgate_connections gauge"), "{body}");
    // /healthz's counters follow the same rule; its liveness is for everyone.
    let health = |body: String| serde_json::from_str::<serde_json::Value>(&body).unwrap();
    let anyone = health(http_get(gw.addr, "/healthz", "").await.2);
    assert_eq!(anyone["status"], "ok");
    assert!(anyone.get("refused").is_none(), "{anyone}");
    let scraper = health(http_get(gw.addr, "/healthz", &right).await.2);
    assert!(scraper["refused"]["auth_refused"].is_object(), "{scraper}");
}

#[tokio::test]
async fn the_grafana_dashboard_uses_only_metrics_that_exist() {
    // A single node, and a cluster node (the Redis gauges, once its first probe came back).
    let single = TestGateway::start(1);
    let redis = support::redis_server::RedisServer::start();
    let url = redis.url();
    let clustered = TestGateway::start_with(
        |c| {
            c.broker = wsgate::config::BrokerKind::Redis;
            c.redis_url = url.into();
        },
        1,
    );
    let text = scrape(&single).await
        + &scrape_until(&clustered, |text| {
            text.contains("wsgate_redis_probe_round_trip_seconds ")
        })
        .await;
    let series: std::collections::HashSet<&str> = text
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split([' ', '{']).next())
        .collect();
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana/wsgate-dashboard.json"
    ))
    .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let mut used = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for name in expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|word| word.starts_with("wsgate_"))
            {
                assert!(series.contains(name), "{name} (in {expr}) is not exported");
                used += 1;
            }
        }
    }
    assert!(
        used > 20,
        "the dashboard reads the gateway's metrics: {used}"
    );
}

#[tokio::test]
async fn a_dual_stack_listener_serves_ipv4_loopback_scrapes() {
    // IPv4 clients of `[::]` arrive as ::ffff:127.0.0.1: still loopback.
    let gw = TestGateway::start_with(|c| c.listen = "[::]:0".parse().unwrap(), 1);
    let v4 = std::net::SocketAddr::from(([127, 0, 0, 1], gw.addr.port()));
    let (status, _, body) = http_get(v4, "/metrics", "").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("# TYPE wsgate_connections gauge"), "{body}");
    let v6 = std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, gw.addr.port()));
    let mut stream = tokio::net::TcpStream::connect(v6).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}
