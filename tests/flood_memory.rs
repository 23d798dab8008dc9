//! Hostile clients' cost in memory: floods of tiny frames from clients that never read what they
//! cause the gateway to send cost at most a bounded queue each.

mod support;

use std::time::Duration;

use serde_json::json;
use support::flood::{Floods, READ_BUFFER, empty_ping, upgrade};
use support::process::GatewayProcess;
use support::{Client, raw_frame};

/// The default `max_queued_bytes`.
const QUEUE_BOUND: usize = 1024 * 1024;
/// Flooding clients. Few, so that each gets enough of a debug build's CPU to outrun the kernel's
/// socket buffers within the run (each ~4 MB of 2-byte answers): before answers were charged
/// their real cost and pongs coalesced, four of them grew the gateway by ~125 MB in 10 s.
const FLOODERS: usize = 4;

#[test]
fn flooding_non_readers_cost_at_most_their_queue_bound() {
    // Rate limits out of the way: the queue accounting alone must bound the memory.
    let gateway = GatewayProcess::start(
        &["--shards", "2"],
        &[
            ("WSGATE_ALLOW_ANONYMOUS", "true"),
            ("WSGATE_MAX_HANDSHAKES_PER_IP", "100000"),
            ("WSGATE_RATE_LIMIT_FRAMES", "1000000000000"),
            ("WSGATE_RATE_LIMIT_FRAME_BURST", "4000000000"),
            ("WSGATE_RATE_LIMIT_MESSAGES", "1000000000000"),
            ("WSGATE_RATE_LIMIT_BURST", "4000000000"),
            ("WSGATE_RATE_LIMIT_BYTES", "1000000000000"),
            ("WSGATE_RATE_LIMIT_BURST_BYTES", "1000000000000"),
        ],
        None,
    );
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
