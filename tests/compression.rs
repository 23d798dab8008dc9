//! permessage-deflate over real sockets: what is agreed at the upgrade, compressed messages both
//! ways, a publication compressed once for all its compressing recipients, and the close code
//! for each kind of bad compressed input. The deflate stream of the client side is made here with
//! flate2 (zlib-rs), independently of the gateway's framing.

mod support;

use flate2::{Compress, Compression, FlushCompress};
use support::inflate::inflate_in_window;
use support::{RawClient, TestGateway};

const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CONTINUATION: u8 = 0x0;
const PING: u8 = 0x9;
const RSV1: u8 = 0x40;

const OFFER: &str = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n";

fn with_compression(shards: usize) -> TestGateway {
    TestGateway::start_with(|c| c.compression = wsgate::config::Compression::On, shards)
}

/// The value of the 101's `Sec-WebSocket-Extensions` header, if any.
fn agreed_extensions(head: &str) -> Option<String> {
    head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("sec-websocket-extensions")
            .then(|| value.trim().to_owned())
    })
}

/// `data` compressed as a permessage-deflate message: raw DEFLATE, sync flush, tail stripped.
fn deflate(data: &[u8]) -> Vec<u8> {
    let mut compressor = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(data.len() + 64);
    compressor
        .compress_vec(data, &mut out, FlushCompress::Sync)
        .unwrap();
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

fn inflate(data: &[u8]) -> Vec<u8> {
    inflate_in_window(data, 15)
}

/// Sends one compressed message (RSV1 on its only frame).
async fn send_compressed(raw: &mut RawClient, opcode: u8, data: &[u8]) {
    send_with_rsv1(raw, true, opcode, &deflate(data)).await;
}

async fn send_with_rsv1(raw: &mut RawClient, fin: bool, opcode: u8, payload: &[u8]) {
    let mut frame = support::raw_frame(fin, opcode, payload, true);
    frame[0] |= RSV1;
    tokio::io::AsyncWriteExt::write_all(&mut raw.stream, &frame)
        .await
        .unwrap();
}

fn chat_line(i: usize) -> String {
    format!("line {i}: the quick brown fox jumps over the lazy dog, again and again. ").repeat(8)
}

#[tokio::test]
async fn a_browser_offer_is_agreed_without_context_takeover_only_when_compression_is_on() {
    let gw = with_compression(1);
    let (mut first, head) = RawClient::connect_with_headers(gw.addr, "/echo", OFFER).await;
    assert_eq!(
        agreed_extensions(&head).as_deref(),
        Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover")
    );
    // A smaller server window is honoured in the answer.
    let offer = "Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=10\r\n";
    let (mut second, head) = RawClient::connect_with_headers(gw.addr, "/echo", offer).await;
    assert!(
        agreed_extensions(&head)
            .unwrap()
            .ends_with("; server_max_window_bits=10"),
        "{head}"
    );
    // No offer, no compression.
    let (mut third, head) = RawClient::connect_with_headers(gw.addr, "/echo", "").await;
    assert_eq!(agreed_extensions(&head), None);
    // Once each has had an echo, each is counted.
    for raw in [&mut first, &mut second, &mut third] {
        raw.send_frame(true, TEXT, b"?", true).await;
        assert_eq!(raw.read_frame().await, (true, TEXT, b"?".to_vec()));
    }
    // The one that asked for a 1 KiB window gets what a 1 KiB window inflates.
    let long = (0..40).map(chat_line).collect::<String>();
    send_compressed(&mut second, TEXT, long.as_bytes()).await;
    let (first_byte, payload) = second.read_frame_head_byte().await;
    assert_eq!(first_byte, 0x80 | RSV1 | TEXT);
    assert_eq!(inflate_in_window(&payload, 10), long.as_bytes());
    assert_eq!(
        metric_sum(&gw, "wsgate_compressed_connections_total").await,
        2
    );
    // Compression off (the default): the same offer is declined.
    let off = TestGateway::start(1);
    let (_, head) = RawClient::connect_with_headers(off.addr, "/echo", OFFER).await;
    assert_eq!(agreed_extensions(&head), None);
    assert_eq!(
        metric_sum(&off, "wsgate_compressed_connections_total").await,
        0
    );
}

#[tokio::test]
async fn a_bad_offer_is_declined_and_rsv1_is_then_a_protocol_error() {
    let gw = with_compression(1);
    for offer in [
        "permessage-deflate; server_max_window_bits=16",
        "permessage-deflate; client_max_window_bits=7",
        "permessage-deflate; unknown_parameter",
        "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
    ] {
        let header = format!("Sec-WebSocket-Extensions: {offer}\r\n");
        let (mut raw, head) = RawClient::connect_with_headers(gw.addr, "/echo", &header).await;
        assert_eq!(agreed_extensions(&head), None, "{offer}");
        send_compressed(&mut raw, TEXT, chat_line(0).as_bytes()).await;
        assert_eq!(raw.read_close_code().await, 1002, "{offer}");
    }
}

#[tokio::test]
async fn compressed_messages_echo_compressed_and_short_ones_plain() {
    let gw = with_compression(1);
    let (mut raw, _) = RawClient::connect_with_headers(gw.addr, "/echo", OFFER).await;
    for i in 0..3 {
        // Each message on its own: the gateway keeps no context between them.
        let text = chat_line(i);
        send_compressed(&mut raw, TEXT, text.as_bytes()).await;
        let (first, payload) = raw.read_frame_head_byte().await;
        assert_eq!(first, 0x80 | RSV1 | TEXT);
        assert!(payload.len() < text.len() / 3, "{} bytes", payload.len());
        assert_eq!(inflate(&payload), text.as_bytes());
    }
    // A compressed message in fragments: RSV1 on the first only.
    let data = vec![42u8; 5000];
    let compressed = deflate(&data);
    let (a, b) = compressed.split_at(compressed.len() / 2);
    send_with_rsv1(&mut raw, false, BINARY, a).await;
    raw.send_frame(true, CONTINUATION, b, true).await;
    let (first, payload) = raw.read_frame_head_byte().await;
    assert_eq!(first, 0x80 | RSV1 | BINARY);
    assert_eq!(inflate(&payload), data);
    // Short messages go plain either way.
    send_compressed(&mut raw, TEXT, b"hi").await;
    assert_eq!(
        raw.read_frame_head_byte().await,
        (0x80 | TEXT, b"hi".to_vec())
    );
    raw.send_frame(true, TEXT, b"plain", true).await;
    assert_eq!(
        raw.read_frame_head_byte().await,
        (0x80 | TEXT, b"plain".to_vec())
    );
}

#[tokio::test]
async fn a_decompression_bomb_is_closed_1009_and_counted() {
    let gw = TestGateway::start_with(
        |c| {
            c.compression = wsgate::config::Compression::On;
            c.max_message_size = 64 * 1024;
        },
        1,
    );
    let (mut raw, _) = RawClient::connect_with_headers(gw.addr, "/echo", OFFER).await;
    // 16 MiB of zeros: ~16 KiB on the wire, far under the limit; 256 times it inflated.
    let bomb = deflate(&vec![0u8; 16 << 20]);
    assert!(bomb.len() < 64 * 1024);
    send_with_rsv1(&mut raw, true, BINARY, &bomb).await;
    assert_eq!(raw.read_close_code().await, 1009);
    raw.expect_eof().await;
    assert_eq!(metric_sum(&gw, "wsgate_messages_too_big_total").await, 1);
    // A message that inflates to exactly the limit passes.
    let (mut raw, _) = RawClient::connect_with_headers(gw.addr, "/echo", OFFER).await;
    send_compressed(&mut raw, BINARY, &vec![1u8; 64 * 1024]).await;
    let (_, payload) = raw.read_frame_head_byte().await;
    assert_eq!(inflate(&payload).len(), 64 * 1024);
}

#[tokio::test]
async fn bad_compressed_input_gets_its_close_code() {
    let gw = with_compression(1);
    // A compressed control frame: 1002.
    let (mut raw, _) = RawClient::connect_with_headers(gw.addr, "/echo", OFFER).await;
    send_with_rsv1(&mut raw, true, PING, b"").await;
    assert_eq!(raw.read_close_code().await, 1002);
    // RSV1 on a continuation frame: 1002.
    let (mut raw, _) = RawClient::connect_with_headers(gw.addr, "/echo", OFFER).await;
    raw.send_frame(false, TEXT, b"abc", true).await;
    send_with_rsv1(&mut raw, true, CONTINUATION, b"def").await;
    assert_eq!(raw.read_close_code().await, 1002);
    // Data that is not DEFLATE: 1007.
    let (mut raw, _) = RawClient::connect_with_headers(gw.addr, "/echo", OFFER).await;
    send_with_rsv1(&mut raw, true, BINARY, &[0xff; 16]).await;
    assert_eq!(raw.read_close_code().await, 1007);
    // Text that inflates to invalid UTF-8: 1007.
    let (mut raw, _) = RawClient::connect_with_headers(gw.addr, "/echo", OFFER).await;
    send_compressed(&mut raw, TEXT, &[b'a', 0xff, 0xfe, b'b']).await;
    assert_eq!(raw.read_close_code().await, 1007);
}

#[tokio::test]
async fn a_room_message_is_compressed_once_for_every_compressing_member_on_every_shard() {
    let gw = with_compression(2);
    // Three members that compress and one that does not, on both shards.
    let mut members = Vec::new();
    for (shard, offer) in [(0, OFFER), (1, OFFER), (1, OFFER), (0, "")] {
        let mut raw = member_on_shard(&gw, shard, offer).await;
        let join = br#"{"type":"join_room","payload":{"room":"deflated"}}"#;
        raw.send_frame(true, TEXT, join, true).await;
        while !read_message(&mut raw).await.1.contains("room_joined") {}
        members.push(raw);
    }
    let before = metric_sum(&gw, "wsgate_compressed_publications_total").await;
    let text = chat_line(7);
    let message =
        format!(r#"{{"type":"chat_message","payload":{{"room":"deflated","message":"{text}"}}}}"#);
    let sender = members.last_mut().unwrap();
    sender
        .send_frame(true, TEXT, message.as_bytes(), true)
        .await;
    let mut compressed = Vec::new();
    for member in &mut members {
        let (wire, json) = loop {
            let (wire, json) = read_message(member).await;
            if json.contains(&text) {
                break (wire, json);
            }
        };
        assert!(json.contains(r#""type":"chat_message""#), "{json}");
        compressed.push((wire.0 & RSV1 != 0, wire.1));
    }
    let flags: Vec<bool> = compressed.iter().map(|(c, _)| *c).collect();
    assert_eq!(flags, [true, true, true, false]);
    assert!(compressed[..3].iter().all(|(_, p)| *p == compressed[0].1));
    let after = metric_sum(&gw, "wsgate_compressed_publications_total").await;
    assert_eq!(
        after - before,
        1,
        "one compression for three recipients on two shards"
    );
}

/// A chat connection (with its `connected` greeting read) that landed on `shard`.
async fn member_on_shard(gw: &TestGateway, shard: u16, extra_headers: &str) -> RawClient {
    for _ in 0..200 {
        let (mut raw, _) = RawClient::connect_with_headers(gw.addr, "/ws", extra_headers).await;
        let (_, greeting) = read_message(&mut raw).await;
        let greeting: serde_json::Value = serde_json::from_str(&greeting).unwrap();
        let id = greeting["clientId"].as_str().unwrap().to_owned();
        if id.split('.').nth(1) == Some(&format!("{shard:x}")) {
            return raw;
        }
    }
    panic!("no connection landed on shard {shard} in 200 tries");
}

/// Reads one text message: the frame as it came (first header byte, payload), and its text
/// (inflated if it came compressed).
async fn read_message(raw: &mut RawClient) -> ((u8, Vec<u8>), String) {
    let (first, payload) = raw.read_frame_head_byte().await;
    let text = if first & RSV1 != 0 {
        inflate(&payload)
    } else {
        payload.clone()
    };
    ((first, payload), String::from_utf8(text).unwrap())
}

/// The sum of a metric's samples over all its labels (a per-shard counter's node total).
async fn metric_sum(gw: &TestGateway, name: &str) -> u64 {
    let (_, _, body) = support::http_get(gw.addr, "/metrics", "").await;
    body.lines()
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let metric = series.split('{').next()?;
            (metric == name).then(|| value.parse::<u64>().unwrap())
        })
        .sum()
}

#[tokio::test]
async fn a_replayed_history_is_compressed_once_for_every_rejoining_member() {
    let gw = with_compression(1);
    // A member that does not compress writes three messages: nobody needed them compressed.
    let mut writer = member_on_shard(&gw, 0, "").await;
    let join = br#"{"type":"join_room","payload":{"room":"replayed"}}"#;
    writer.send_frame(true, TEXT, join, true).await;
    let joined = loop {
        let (_, json) = read_message(&mut writer).await;
        if json.contains("room_joined") {
            break serde_json::from_str::<serde_json::Value>(&json).unwrap();
        }
    };
    let texts: Vec<String> = (0..3).map(chat_line).collect();
    for text in &texts {
        let chat = format!(
            r#"{{"type":"chat_message","payload":{{"room":"replayed","message":"{text}"}}}}"#
        );
        writer.send_frame(true, TEXT, chat.as_bytes(), true).await;
        while !read_message(&mut writer).await.1.contains(text.as_str()) {}
    }
    assert_eq!(
        metric_sum(&gw, "wsgate_compressed_publications_total").await,
        0
    );
    // Two members that compress come back for what they missed: each message compressed once.
    let since = serde_json::json!({
        "type": "join_room",
        "payload": {"room": "replayed", "since": {"offset": 0, "epoch": joined["epoch"]}},
    });
    let mut replays = Vec::new();
    for _ in 0..2 {
        let mut member = member_on_shard(&gw, 0, OFFER).await;
        member
            .send_frame(true, TEXT, since.to_string().as_bytes(), true)
            .await;
        let mut got = Vec::new();
        while got.len() < texts.len() {
            let ((first, payload), json) = read_message(&mut member).await;
            if json.contains("chat_message") {
                assert_eq!(first & RSV1, RSV1, "replayed compressed: {json}");
                assert!(json.contains(&texts[got.len()]), "in order: {json}");
                got.push(payload);
            }
        }
        replays.push(got);
    }
    assert_eq!(replays[0], replays[1], "the same compressed frames");
    assert_eq!(
        metric_sum(&gw, "wsgate_compressed_publications_total").await,
        3
    );
}
