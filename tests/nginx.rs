//! The shipped nginx configuration (`deploy/compose/nginx.conf`) in front of real gateways: the
//! upgrade passes through, a cluster behind it chats across nodes, per-address limits count the
//! client nginx names (not nginx, and not what the client claims), and what is for the inside
//! (`/metrics`, `/api/`) is not served outside.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::nginx::Nginx;
use support::redis_server::RedisServer;
use support::{Client, TestGateway, http_get, websocket_from};
use wsgate::config::BrokerKind;

/// nginx's own address, the only trusted proxy.
const NGINX: &str = "127.0.0.1/32";

fn node(customize: impl FnOnce(&mut wsgate::Config)) -> TestGateway {
    TestGateway::start_with(
        |c| {
            c.trusted_proxies = vec![NGINX.into()];
            // With the API on, a request nginx passed would get the gateway's 401, not a 404.
            c.api_key = Some(support::API_KEY.into());
            customize(c);
        },
        1,
    )
}

async fn client_from(source: [u8; 4], nginx: SocketAddr) -> Client {
    Client::from_stream(websocket_from(source, nginx, &[]).await.unwrap()).await
}

#[tokio::test]
async fn a_cluster_behind_nginx_chats_across_its_nodes() {
    let redis = RedisServer::start();
    let url = redis.url();
    let nodes: Vec<TestGateway> = (0..3)
        .map(|_| {
            let url = url.clone();
            node(move |c| {
                c.broker = BrokerKind::Redis;
                c.redis_url = url.into();
            })
        })
        .collect();
    let nginx = Nginx::start(&nodes.iter().map(|n| n.addr).collect::<Vec<_>>());
    for n in &nodes {
        let deadline = tokio::time::Instant::now() + 2 * support::PATIENCE;
        while http_get(n.addr, "/readyz", "").await.0 != 200 {
            assert!(tokio::time::Instant::now() < deadline, "node not ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // least_conn spreads held connections over the three nodes.
    let mut clients = Vec::new();
    for source in 2..8u8 {
        let mut client = client_from([127, 0, 0, source], nginx.addr).await;
        client.join("lobby").await;
        clients.push(client);
    }
    let busy_nodes = nodes
        .iter()
        .filter(|n| n.gateway().connection_count() > 0)
        .count();
    assert_eq!(busy_nodes, 3, "nginx used every upstream");
    clients[0].chat("lobby", "through nginx").await;
    for client in &mut clients {
        loop {
            let message = client.next_not_presence().await;
            if message["type"] == "chat_message" {
                assert_eq!(message["message"], "through nginx", "{message}");
                break;
            }
        }
    }
    // The inside stays inside: nginx answers for /metrics and /api/ itself (the nodes would
    // serve /metrics to their loopback peer, and answer /api/ 401 without the key).
    for path in ["/metrics", "/api/stats"] {
        let (status, _, _) = http_get(nginx.addr, path, "").await;
        assert_eq!(status, 404, "{path} through nginx");
        let (direct, _, _) = http_get(nodes[0].addr, path, "").await;
        assert_ne!(direct, 404, "{path} on the node");
    }
    let (status, _, health) = http_get(nginx.addr, "/healthz", "").await;
    assert_eq!(status, 200, "{health}\n{}", nginx.error_log());
    // A backend calls the API on nginx's other port: any node answers for the cluster.
    let (status, published) = support::api(
        nginx.api_addr,
        "POST",
        "/api/publish",
        serde_json::json!({"room": "lobby", "data": {"from": "the backend"}}),
    )
    .await;
    assert_eq!(status, 200, "{published}\n{}", nginx.error_log());
    for client in &mut clients {
        let message = client.next_not_presence().await;
        assert_eq!(message["data"], serde_json::json!({"from": "the backend"}));
    }
    let (status, _, _) = http_get(nginx.api_addr, "/healthz", "").await;
    assert_eq!(status, 404, "only the API on the API's port");
}

#[tokio::test]
async fn behind_nginx_limits_count_the_client_nginx_names() {
    let gw = node(|c| c.max_connections_per_ip = 2);
    let nginx = Nginx::start(&[gw.addr]);
    let alice = [127, 0, 0, 2];
    let _held = [
        websocket_from(alice, nginx.addr, &[]).await.unwrap(),
        websocket_from(alice, nginx.addr, &[]).await.unwrap(),
    ];
    // nginx's 429 is the gateway's, passed through.
    assert_eq!(
        websocket_from(alice, nginx.addr, &[]).await.err(),
        Some(429)
    );
    // Claiming to be someone else does not help: nginx appends the address it saw, and the
    // gateway reads the chain from the right.
    let spoofed = [("x-forwarded-for", "203.0.113.9")];
    assert_eq!(
        websocket_from(alice, nginx.addr, &spoofed).await.err(),
        Some(429)
    );
    // Another client behind the same nginx is not at alice's cap.
    let _bob = websocket_from([127, 0, 0, 3], nginx.addr, &[])
        .await
        .unwrap();
    // Reaching the node past nginx, alice is still alice (her two places are taken), whatever
    // she claims.
    assert_eq!(
        websocket_from(alice, gw.addr, &spoofed).await.err(),
        Some(429)
    );
}

#[tokio::test]
async fn the_tls_example_serves_wss_and_the_admin_ui_only_on_the_api_port() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;

    let files = support::pki::pem_files("nginx");
    let pki = support::pki::Pki::issue(&files);
    let gw = node(|_| {});
    let nginx = Nginx::start_tls(&[gw.addr], &files);
    // wss:// through nginx's TLS (tls.conf included in the public server): greeted and joined.
    let mut ws = pki.websocket(nginx.tls_addr.unwrap(), "/ws").await;
    assert_eq!(
        next_json(&mut ws).await["type"],
        "connected",
        "{}",
        nginx.error_log()
    );
    let join = serde_json::json!({"type": "join_room", "payload": {"room": "tls"}, "id": 1});
    ws.send(Message::text(join.to_string())).await.unwrap();
    let joined = loop {
        let message = next_json(&mut ws).await;
        if message["type"] == "room_joined" {
            break message;
        }
    };
    assert_eq!(joined["id"], 1);
    // The admin UI is for the inside, as the API is: on the API's port only (the TLS port is the
    // public server's).
    for path in ["/admin", "/admin.js"] {
        let (status, _, _) = http_get(nginx.addr, path, "").await;
        assert_eq!(status, 404, "{path} on the public port");
        let (status, _, _) = http_get(nginx.api_addr, path, "").await;
        assert_eq!(status, 200, "{path}: {}", nginx.error_log());
    }
    let tls = pki.connect(nginx.tls_addr.unwrap()).await.unwrap();
    let status = https_status(tls, "/api/stats").await;
    assert_eq!(status, 404, "the API over TLS on the public server");
}

/// The next text message of `ws`, as JSON.
async fn next_json(ws: &mut support::pki::Wss) -> serde_json::Value {
    use futures_util::StreamExt;
    loop {
        let message = ws.next().await.expect("open").expect("a message");
        if let tokio_tungstenite::tungstenite::Message::Text(text) = message {
            return serde_json::from_str(&text).unwrap();
        }
    }
}

/// The status `GET path` gets over `tls`.
async fn https_status(
    mut tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    path: &str,
) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    answer
        .split(' ')
        .nth(1)
        .and_then(|status| status.parse().ok())
        .unwrap_or_else(|| panic!("an HTTP answer: {answer}"))
}
