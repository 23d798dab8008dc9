//! RFC 6455 framing over real sockets: echo, fragments, control frames, and the close code for
//! each kind of bad input.

mod support;

use futures_util::{SinkExt, StreamExt};
use support::{Client, RawClient, TestGateway};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CONTINUATION: u8 = 0x0;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

#[tokio::test]
async fn echo_endpoint_returns_text_and_binary_as_sent() {
    let gw = TestGateway::start_with(|c| c.max_message_size = 1 << 20, 1);
    let (mut ws, _) = tokio_tungstenite::connect_async(gw.url("/echo"))
        .await
        .unwrap();
    ws.send(Message::text("héllo")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("héllo"));
    let big: Vec<u8> = (0..70_000u32).map(|i| i as u8).collect();
    ws.send(Message::binary(big.clone())).await.unwrap();
    // 64-bit length encoding both ways; compared without printing 70 KB on failure.
    let echoed = ws.next().await.unwrap().unwrap();
    assert!(echoed == Message::binary(big), "binary echo differs");
}

#[tokio::test]
async fn fragmented_messages_are_reassembled_around_control_frames() {
    let gw = TestGateway::start(1);
    let mut raw = RawClient::connect(gw.addr, "/echo").await;
    raw.send_frame(false, TEXT, "frag".as_bytes(), true).await;
    raw.send_frame(true, PING, b"mid", true).await;
    raw.send_frame(false, CONTINUATION, "mé".as_bytes(), true)
        .await;
    raw.send_frame(true, CONTINUATION, "nted".as_bytes(), true)
        .await;
    assert_eq!(raw.read_frame().await, (true, PONG, b"mid".to_vec()));
    assert_eq!(
        raw.read_frame().await,
        (true, TEXT, "fragménted".as_bytes().to_vec())
    );
}

#[tokio::test]
async fn a_frame_split_across_many_writes_is_decoded() {
    let gw = TestGateway::start(1);
    let mut raw = RawClient::connect(gw.addr, "/echo").await;
    let frame = support::raw_frame(true, BINARY, &[7u8; 3000], true);
    for chunk in frame.chunks(7) {
        tokio::io::AsyncWriteExt::write_all(&mut raw.stream, chunk)
            .await
            .unwrap();
        tokio::io::AsyncWriteExt::flush(&mut raw.stream)
            .await
            .unwrap();
    }
    assert_eq!(raw.read_frame().await, (true, BINARY, vec![7u8; 3000]));
}

#[tokio::test]
async fn ping_is_answered_with_the_same_payload() {
    let gw = TestGateway::start(1);
    let mut raw = RawClient::connect(gw.addr, "/ws").await;
    assert_eq!(raw.read_frame().await.1, TEXT); // `connected`
    raw.send_frame(true, PING, b"are you there", true).await;
    assert_eq!(
        raw.read_frame().await,
        (true, PONG, b"are you there".to_vec())
    );
}

#[tokio::test]
async fn client_close_is_answered_with_its_code_and_the_server_hangs_up() {
    let gw = TestGateway::start(1);
    let mut raw = RawClient::connect(gw.addr, "/echo").await;
    let mut payload = 4321u16.to_be_bytes().to_vec();
    payload.extend_from_slice(b"done");
    raw.send_frame(true, CLOSE, &payload, true).await;
    assert_eq!(raw.read_close_code().await, 4321);
    raw.expect_eof().await;
    // The gateway waits for the client to hang up too, as clients do after the handshake.
    drop(raw);
    gw.wait_for_connections(0).await;
}

#[tokio::test]
async fn tungstenite_close_handshake_completes_cleanly() {
    let gw = TestGateway::start(1);
    let mut client = Client::connect(&gw.url("/ws")).await;
    client
        .ws
        .close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        }))
        .await
        .unwrap();
    let reply = client
        .expect_close()
        .await
        .expect("a close frame with a code");
    assert_eq!(reply.code, CloseCode::Normal);
    assert!(
        client.ws.next().await.is_none(),
        "stream ends after the handshake"
    );
    gw.wait_for_connections(0).await;
}

/// Sends `frames` on a fresh connection and returns the close code the server answers with.
async fn close_code_for(gw: &TestGateway, path: &str, frames: &[Vec<u8>]) -> u16 {
    let mut raw = RawClient::connect(gw.addr, path).await;
    for frame in frames {
        tokio::io::AsyncWriteExt::write_all(&mut raw.stream, frame)
            .await
            .unwrap();
    }
    let code = raw.read_close_code().await;
    raw.expect_eof().await;
    code
}

#[tokio::test]
async fn protocol_violations_close_with_1002() {
    let gw = TestGateway::start(1);
    let f = support::raw_frame;
    let cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
        ("unmasked frame", vec![f(true, TEXT, b"hi", false)]),
        ("reserved bit", vec![f(true, TEXT | 0x40, b"hi", true)]),
        ("reserved opcode", vec![f(true, 0x3, b"hi", true)]),
        ("fragmented ping", vec![f(false, PING, b"", true)]),
        ("oversized ping", vec![f(true, PING, &[0; 126], true)]),
        (
            "stray continuation",
            vec![f(true, CONTINUATION, b"x", true)],
        ),
        (
            "interleaved message",
            vec![f(false, TEXT, b"a", true), f(true, TEXT, b"b", true)],
        ),
        (
            "bad close code",
            vec![f(true, CLOSE, &1005u16.to_be_bytes(), true)],
        ),
    ];
    for path in ["/echo", "/ws"] {
        for (name, frames) in &cases {
            assert_eq!(
                close_code_for(&gw, path, frames).await,
                1002,
                "{name} on {path}"
            );
        }
    }
    let (_, _, body) = support::http_get(gw.addr, "/healthz", "").await;
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["refused"]["protocol_errors"], 2 * cases.len());
    gw.wait_for_connections(0).await;
}

#[tokio::test]
async fn invalid_utf8_closes_with_1007() {
    let gw = TestGateway::start(1);
    let f = support::raw_frame;
    let single = vec![f(true, TEXT, &[b'a', 0xff, b'b'], true)];
    let fragmented = vec![
        f(false, TEXT, &[0xed, 0xa0], true),
        f(true, CONTINUATION, &[0x80], true),
    ];
    for path in ["/echo", "/ws"] {
        assert_eq!(close_code_for(&gw, path, &single).await, 1007, "{path}");
        assert_eq!(close_code_for(&gw, path, &fragmented).await, 1007, "{path}");
    }
    let (_, _, body) = support::http_get(gw.addr, "/healthz", "").await;
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["refused"]["invalid_utf8"], 4);
}

#[tokio::test]
async fn messages_over_the_size_limit_close_with_1009() {
    let gw = TestGateway::start_with(|c| c.max_message_size = 1024, 1);
    let f = support::raw_frame;
    let one_frame = vec![f(true, BINARY, &[0; 1025], true)];
    let fragments = vec![
        f(false, TEXT, &[b'a'; 600], true),
        f(true, CONTINUATION, &[b'a'; 600], true),
    ];
    for path in ["/echo", "/ws"] {
        assert_eq!(close_code_for(&gw, path, &one_frame).await, 1009, "{path}");
        assert_eq!(close_code_for(&gw, path, &fragments).await, 1009, "{path}");
    }
    let (_, _, body) = support::http_get(gw.addr, "/healthz", "").await;
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        health["refused"]["messages_too_big"], 4,
        "each close is counted"
    );
    // Exactly at the limit is fine.
    let (mut ws, _) = tokio_tungstenite::connect_async(gw.url("/echo"))
        .await
        .unwrap();
    ws.send(Message::binary(vec![1u8; 1024])).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::binary(vec![1u8; 1024])
    );
}

#[tokio::test]
async fn an_oversized_frame_is_refused_from_its_header_alone() {
    // The client declares 1 GiB and sends nothing more: the gateway must not wait for (or buffer)
    // the payload before refusing it.
    let gw = TestGateway::start_with(|c| c.max_message_size = 1024, 1);
    let mut raw = RawClient::connect(gw.addr, "/echo").await;
    let mut head = vec![0x82, 0x80 | 127];
    head.extend_from_slice(&(1u64 << 30).to_be_bytes());
    head.extend_from_slice(&[1, 2, 3, 4]);
    tokio::io::AsyncWriteExt::write_all(&mut raw.stream, &head)
        .await
        .unwrap();
    assert_eq!(raw.read_close_code().await, 1009);
}

#[tokio::test]
async fn a_huge_length_arriving_in_pieces_is_refused_without_reserving_it() {
    let gw = TestGateway::start(1);
    let mut raw = RawClient::connect(gw.addr, "/echo").await;
    // The header of a 1 TiB binary frame, split so the length comes in a read of its own: the
    // bytes kept meanwhile must not be sized from what the header claims.
    raw.stream.write_all(&[0x82, 0xFF]).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let mut rest = (1u64 << 40).to_be_bytes().to_vec();
    rest.extend_from_slice(&[1, 2, 3, 4]);
    raw.stream.write_all(&rest).await.unwrap();
    assert_eq!(raw.read_close_code().await, 1009);
    // Still serving.
    let mut other = gw.client().await;
    other.send("echo", serde_json::json!(1)).await;
    other.expect("echo").await;
}
