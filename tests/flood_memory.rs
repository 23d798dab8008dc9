//! Hostile clients' cost in memory: floods of tiny frames from clients that never read what they
//! cause the gateway to send cost at most a bounded queue each; clients holding unfinished
//! messages or frames cost at most the message size each; a closing peer that keeps streaming
//! costs nothing that stays.

mod support;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use serde_json::json;
use support::flood::{Floods, READ_BUFFER, empty_ping, upgrade, upgrade_with};
use support::process::GatewayProcess;
use support::{Client, raw_frame};

/// The default `max_queued_bytes`.
const QUEUE_BOUND: usize = 1024 * 1024;
/// Flooding clients. Few, so that each gets enough of a debug build's CPU to outrun the kernel's
/// socket buffers within the run (each ~4 MB of 2-byte answers): before answers were charged
/// their real cost and pongs coalesced, four of them grew the gateway by ~125 MB in 10 s.
const FLOODERS: usize = 4;

/// The flood tests' gateways: anonymous clients, and every rate limit out of the way, so that
/// the queue accounting alone must bound the memory.
const NO_RATE_LIMITS: [(&str, &str); 8] = [
    ("WSGATE_ALLOW_ANONYMOUS", "true"),
    ("WSGATE_MAX_HANDSHAKES_PER_IP", "100000"),
    ("WSGATE_RATE_LIMIT_FRAMES", "1000000000000"),
    ("WSGATE_RATE_LIMIT_FRAME_BURST", "4000000000"),
    ("WSGATE_RATE_LIMIT_MESSAGES", "1000000"),
    ("WSGATE_RATE_LIMIT_BURST", "1000000"),
    ("WSGATE_RATE_LIMIT_BYTES", "1000000000000"),
    ("WSGATE_RATE_LIMIT_BURST_BYTES", "1000000000000"),
];

/// Taken by the flood tests: one flood at a time, so that neither starves the other's gateway
/// (on two cores) of the CPU its accounting is measured under.
static ONE_FLOOD_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_flood_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_FLOOD_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[test]
fn flooding_non_readers_cost_at_most_their_queue_bound() {
    let _flood = one_flood_at_a_time();
    let gateway = GatewayProcess::start(&["--shards", "2"], &NO_RATE_LIMITS, None);
    let before = gateway.rss();
    // Ping floods on the chat endpoint and floods of empty messages on /echo: each frame asks
    // for an answer, and none of the answers is read.
    let mut floods = Floods::default();
    for i in 0..FLOODERS {
        let (path, frame) = if i % 2 == 0 {
            ("/ws", empty_ping())
        } else {
            ("/echo", raw_frame(true, 0x2, b"", true))
        };
        floods.start(upgrade(gateway.addr, path), &frame);
    }
    std::thread::sleep(Duration::from_secs(10));
    let grown = gateway.rss().saturating_sub(before);
    // Meanwhile the gateway serves others.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut client = Client::connect(&format!("ws://{}/ws", gateway.addr)).await;
        client.send("echo", json!("still here")).await;
        assert_eq!(client.expect("echo").await["payload"], "still here");
    });
    let written = floods.stop();
    let bound = (FLOODERS * (QUEUE_BOUND + READ_BUFFER)) as u64 + (16 << 20);
    assert!(
        grown <= bound,
        "the gateway grew by {grown} bytes under the flood (bound {bound}; the flooders wrote \
         {written} bytes)"
    );
    assert!(
        written > (FLOODERS << 23) as u64,
        "the flooders did flood ({written} bytes)"
    );
}

/// Compressed messages that inflate to the message size limit, echoed to clients that never read
/// them: each echo is queued compressed (a hundred bytes) and must cost that, not the
/// allocation the compression started from (the inflated size), or a non-reader's queue bound
/// would hold hundreds of megabytes.
#[test]
fn compressed_echoes_to_non_readers_cost_at_most_their_queue_bound() {
    let _flood = one_flood_at_a_time();
    const COMPRESSING_FLOODERS: usize = 2;
    let env = [&NO_RATE_LIMITS[..], &[("WSGATE_COMPRESSION", "on")]].concat();
    let gateway = GatewayProcess::start(&["--shards", "2"], &env, None);
    // 64 KiB of zeros (the default message size limit), compressed: ~90 bytes.
    let mut compressor = flate2::Compress::new(flate2::Compression::default(), false);
    let mut zeros = Vec::with_capacity(1024);
    compressor
        .compress_vec(&[0u8; 64 * 1024], &mut zeros, flate2::FlushCompress::Sync)
        .unwrap();
    zeros.truncate(zeros.len() - 4);
    let mut frame = raw_frame(true, 0x2, &zeros, true);
    frame[0] |= 0x40;
    let before = gateway.rss();
    let mut floods = Floods::default();
    let offer = "Sec-WebSocket-Extensions: permessage-deflate\r\n";
    for _ in 0..COMPRESSING_FLOODERS {
        floods.start(upgrade_with(gateway.addr, "/echo", offer), &frame);
    }
    std::thread::sleep(Duration::from_secs(6));
    let grown = gateway.rss().saturating_sub(before);
    let written = floods.stop();
    // Per flooder: its queue bound, a read buffer, and the shard's inflate buffer.
    let bound = (COMPRESSING_FLOODERS * (QUEUE_BOUND + 2 * READ_BUFFER)) as u64 + (16 << 20);
    assert!(
        grown <= bound,
        "the gateway grew by {grown} bytes under compressed floods (bound {bound}; the \
         flooders wrote {written} bytes, each frame inflating to 64 KiB)"
    );
    // Enough echoes to pass the bound many times over had each kept 64 KiB.
    let frames = written / frame.len() as u64;
    assert!(
        frames * 64 * 1024 > 4 * bound,
        "the flooders did flood ({frames} frames)"
    );
}

/// Connections that each hold what the README bounds inbound memory by.
const HOLDERS: usize = 300;

fn gateway_for_holders() -> GatewayProcess {
    GatewayProcess::start(
        &["--shards", "2"],
        &[
            ("WSGATE_ALLOW_ANONYMOUS", "true"),
            ("WSGATE_MAX_HANDSHAKES_PER_IP", "100000"),
        ],
        None,
    )
}

/// Opens `HOLDERS` upgraded connections and writes `bytes` on each; returns them, held open (a
/// client that never reads: the kernel holds what the gateway sends it).
fn hold(gateway: &GatewayProcess, path: &str, bytes: &[u8]) -> Vec<TcpStream> {
    (0..HOLDERS)
        .map(|_| {
            let mut stream = upgrade(gateway.addr, path);
            stream.write_all(bytes).unwrap();
            stream
        })
        .collect()
}

#[test]
fn unfinished_messages_and_frames_cost_at_most_the_message_size() {
    let gateway = gateway_for_holders();
    let before = gateway.rss();
    // A fragmented message just under max_message_size (64 KiB), and the first bytes of its next
    // fragment — sent in pieces, so buffers would double if they could.
    let first = raw_frame(false, 0x1, &[b'a'; 65_436], true);
    let next = raw_frame(false, 0x0, &[b'b'; 50], true);
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&first);
    bytes.extend_from_slice(&next[..next.len() - 5]);
    let held: Vec<TcpStream> = (0..HOLDERS)
        .map(|_| {
            let mut stream = upgrade(gateway.addr, "/ws");
            for piece in bytes.chunks(10_000) {
                stream.write_all(piece).unwrap();
                std::thread::sleep(Duration::from_millis(1));
            }
            stream
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let per_connection = gateway.rss().saturating_sub(before) / HOLDERS as u64;
    // The message size, plus what any connection costs (~1 KiB) and allocator slack.
    assert!(
        per_connection < 64 * 1024 + 16 * 1024,
        "{per_connection} bytes per connection holding an unfinished message (was ~229 KB)"
    );
    drop(held);
}

#[test]
fn a_closing_peer_that_keeps_streaming_holds_nothing() {
    let gateway = gateway_for_holders();
    let before = gateway.rss();
    // A bad frame (RSV bit: 1002); once the gateway is closing and waits for our close frame,
    // the header of a 1 TiB frame and 255 KiB of it, which it must not keep.
    let mut held = hold(&gateway, "/echo", &raw_frame(true, 0x1 | 0x40, b"x", true));
    std::thread::sleep(Duration::from_millis(500));
    let mut huge = vec![0x82, 0xFF];
    huge.extend_from_slice(&(1u64 << 40).to_be_bytes());
    huge.extend_from_slice(&[1, 2, 3, 4]);
    huge.extend(std::iter::repeat_n(0u8, 255 * 1024));
    for stream in &mut held {
        stream.write_all(&huge).unwrap();
    }
    std::thread::sleep(Duration::from_secs(1));
    let per_connection = gateway.rss().saturating_sub(before) / HOLDERS as u64;
    assert!(
        per_connection < 16 * 1024,
        "{per_connection} bytes per closing connection (was ~270 KB)"
    );
    drop(held);
}

#[test]
fn the_kernel_holds_a_bounded_send_buffer_for_a_client_that_does_not_read() {
    let gateway = GatewayProcess::start(
        &["--shards", "1"],
        &[
            ("WSGATE_ALLOW_ANONYMOUS", "true"),
            ("WSGATE_RATE_LIMIT_BYTES", "1000000000000"),
            ("WSGATE_RATE_LIMIT_BURST_BYTES", "1000000000000"),
            ("WSGATE_RATE_LIMIT_MESSAGES", "1000000"),
            ("WSGATE_RATE_LIMIT_BURST", "1000000"),
        ],
        None,
    );
    // An echo client with a small window that sends 60 KB messages and never reads.
    let message = raw_frame(true, 0x2, &[5; 60_000], true);
    let mut stream = upgrade(gateway.addr, "/echo");
    stream
        .set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let end = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < end {
        if stream.write_all(&message).is_err() {
            break;
        }
    }
    // The gateway's side of the connection, as the kernel reports it: `tb` is its send buffer.
    let filter = format!("( sport = :{} )", gateway.addr.port());
    let out = std::process::Command::new("ss")
        .args(["-tmnH", "state", "established", &filter])
        .output()
        .expect("ss (iproute2)");
    let report = String::from_utf8_lossy(&out.stdout);
    let send_buffer: u64 = report
        .split(|c: char| c == ',' || c == '(' || c.is_whitespace())
        .find_map(|field| field.strip_prefix("tb")?.parse().ok())
        .unwrap_or_else(|| panic!("no tb in {report:?}"));
    // The default socket_send_buffer is 256 KiB, which the kernel doubles for its bookkeeping.
    // Left to itself, it grows the buffer of such a connection to ~4 MiB.
    assert!(
        send_buffer <= 2 * 256 * 1024,
        "kernel send buffer {send_buffer} bytes: {report}"
    );
    drop(stream);
}
