//! Graceful shutdown: readiness fails and upgrades are refused at once; everything published
//! before the signal is delivered; every client gets 1001 "server shutting down"; the process
//! exits 0.

mod support;

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;
use support::process::GatewayProcess;
use support::{Client, RawClient, TestGateway, http_get};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use wsgate::fanout::Publication;
use wsgate::rooms::Target;

/// Reads a client's stream to its end: the texts received (but `user_left` notices, which other
/// clients' closes may cause during the drain), and the close frame.
async fn read_to_close(client: &mut Client) -> (Vec<serde_json::Value>, (CloseCode, String)) {
    let mut texts = Vec::new();
    loop {
        let msg = tokio::time::timeout(support::PATIENCE, client.ws.next())
            .await
            .expect("the close arrives in time")
            .expect("a close frame before the stream ends")
            .expect("no error before the close");
        match msg {
            Message::Text(text) => {
                let msg: serde_json::Value = serde_json::from_str(&text).unwrap();
                if msg["type"] != "user_left" {
                    texts.push(msg);
                }
            }
            Message::Close(Some(frame)) => return (texts, (frame.code, frame.reason.to_string())),
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn shutdown_delivers_what_was_published_then_closes_everyone_with_1001() {
    let mut gw = TestGateway::start_with(
        |c| {
            c.close_timeout = Duration::from_secs(1);
            c.drain_timeout = Duration::from_secs(3);
        },
        2,
    );
    let mut a = gw.client_on_shard(0).await;
    let mut b = gw.client_on_shard(1).await;
    a.join("room").await;
    b.join("room").await;
    a.expect("user_joined").await;
    // A client that never reads (nor answers the close) keeps the drain going for a while.
    let _stuck = RawClient::connect(gw.addr, "/ws").await;

    const MESSAGES: usize = 200;
    for i in 0..MESSAGES {
        a.send(
            "chat_message",
            json!({"room": "room", "message": i.to_string()}),
        )
        .await;
    }
    // Wait until the last chat message has been handled (a's own copy comes back), so all were
    // published before the signal; then one more straight from the library API.
    for i in 0..MESSAGES {
        assert_eq!(a.expect("chat_message").await["message"], i.to_string());
    }
    gw.gateway().publish(Publication::to(
        Target::All,
        wsgate::ws::frame::encode(wsgate::ws::frame::OpCode::Text, br#"{"type":"last"}"#),
    ));
    let addr = gw.addr;
    let stopping = tokio::spawn(async move {
        gw.stop().await;
        gw
    });

    // During the drain: not ready, no new WebSockets, still alive.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, _, body) = http_get(addr, "/readyz", "").await;
    assert_eq!(status, 503, "{body}");
    let (status, _, _) = http_get(addr, "/healthz", "").await;
    assert_eq!(status, 200);
    let refused = tokio_tungstenite::connect_async(format!("ws://{addr}/ws")).await;
    assert!(refused.is_err(), "upgrades are refused while draining");

    let (texts, close) = read_to_close(&mut b).await;
    let chats: Vec<_> = texts
        .iter()
        .filter(|m| m["type"] == "chat_message")
        .collect();
    assert_eq!(
        chats.len(),
        MESSAGES,
        "every message published before the signal"
    );
    for (i, m) in chats.iter().enumerate() {
        assert_eq!(m["message"], i.to_string());
    }
    assert_eq!(texts.last().unwrap()["type"], "last");
    assert_eq!(close, (CloseCode::Away, "server shutting down".to_owned()));
    let (texts, close) = read_to_close(&mut a).await;
    assert_eq!(texts.last().unwrap()["type"], "last");
    assert_eq!(close.0, CloseCode::Away);

    let gw = tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("the drain ends within drain_timeout")
        .unwrap();
    drop(gw);
}

#[test]
fn sigterm_closes_clients_with_1001_and_exits_0() {
    let gateway = GatewayProcess::start(
        &["--shards", "2"],
        &[("WSGATE_JWT_SECRET", support::TEST_SECRET)],
        None,
    );
    let addr = gateway.addr;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let terminated = runtime.block_on(async {
        let token = support::token_for("alice");
        let mut client = Client::connect(&format!("ws://{addr}/ws?token={token}")).await;
        client.join("r").await;
        client
            .send("chat_message", json!({"room": "r", "message": "before"}))
            .await;
        assert_eq!(client.expect("chat_message").await["message"], "before");
        let pid = gateway.pid();
        let terminated = std::thread::spawn(move || gateway.terminate());
        let (_, close) = read_to_close(&mut client).await;
        assert_eq!(close, (CloseCode::Away, "server shutting down".to_owned()));
        (pid, terminated)
    });
    // The client is gone (with the runtime): the gateway's drain ends, and so does the process.
    drop(runtime);
    let (pid, terminated) = terminated;
    assert_eq!(terminated.join().unwrap(), Some(0), "wsgate {pid} exits 0");
}
