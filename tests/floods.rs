//! Hostile clients: floods of tiny frames do not stall the other connections of their shard, and
//! are closed with 1008 once past their frame budget. (What floods cost in memory is in
//! `flood_memory.rs`, a test binary of its own so its load does not skew the timings here.)

mod support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::flood::{Floods, READ_BUFFER, empty_ping, upgrade};
use support::{Client, TestGateway, http_get, raw_frame};

async fn counters(addr: SocketAddr) -> Value {
    let (_, _, body) = http_get(addr, "/healthz", "").await;
    serde_json::from_str::<Value>(&body).unwrap()["refused"].clone()
}

/// Median and maximum of `n` echo round trips of `client`.
async fn round_trips(client: &mut Client, n: usize) -> (Duration, Duration) {
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let start = Instant::now();
        client.send("echo", json!(i)).await;
        assert_eq!(client.expect("echo").await["payload"], i);
        times.push(start.elapsed());
    }
    times.sort();
    (times[n / 2], times[n - 1])
}

#[tokio::test]
async fn a_frame_flood_is_closed_with_1008_and_counted() {
    // The default frame budget (the test harness lifts it for other tests).
    let gw = TestGateway::start_with(
        |c| {
            c.rate_limit_frames = 200.0;
            c.rate_limit_frame_burst = 1000;
        },
        1,
    );
    for frame in [
        raw_frame(true, 0xA, b"", true), // empty pongs
        empty_ping(),
    ] {
        let stream = upgrade(gw.addr, "/ws");
        let mut reader = stream.try_clone().unwrap();
        let mut flood = Floods::default();
        flood.start(stream, &frame);
        // The gateway answers what it accepted, then closes: find the close frame's code.
        let code = tokio::task::spawn_blocking(move || {
            let mut all = Vec::new();
            reader.read_to_end(&mut all).ok();
            close_code(&all)
        })
        .await
        .unwrap();
        flood.stop();
        assert_eq!(code, Some(1008));
    }
    let counters = counters(gw.addr).await;
    assert_eq!(counters["flood_closed"], 2, "{counters}");
    // Each flooder spent its burst, then its 20 strikes on frames over the budget.
    assert!(
        counters["frames_rate_limited"].as_u64().unwrap() >= 2 * 21,
        "{counters}"
    );
}

/// The code of the first close frame among the unmasked server frames in `wire`.
fn close_code(mut wire: &[u8]) -> Option<u16> {
    while wire.len() >= 2 {
        let (len, start) = match wire[1] & 0x7F {
            126 => (u16::from_be_bytes([wire[2], wire[3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(wire[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        if wire.len() < start + len {
            return None;
        }
        if wire[0] & 0x0F == 0x8 {
            return Some(u16::from_be_bytes([wire[start], wire[start + 1]]));
        }
        wire = &wire[start + len..];
    }
    None
}

#[tokio::test]
async fn a_flood_of_tiny_frames_does_not_stall_its_shard() {
    // Limits lifted, so the flooders stay connected: what protects the victim is that a turn of
    // the shard on one connection is bounded.
    let gw = TestGateway::start(1);
    let mut victim = gw.client().await;
    let (calm, _) = round_trips(&mut victim, 50).await;
    let mut floods = Floods::default();
    for _ in 0..2 {
        floods.start(upgrade(gw.addr, "/ws"), &raw_frame(true, 0xA, b"", true));
        // Empty continuation frames of a message that never ends.
        let mut stream = upgrade(gw.addr, "/echo");
        stream
            .write_all(&raw_frame(false, 0x2, b"x", true))
            .unwrap();
        floods.start(stream, &raw_frame(false, 0x0, b"", true));
    }
    // Let the floods get going.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (median, max) = round_trips(&mut victim, 200).await;
    let written = floods.stop();
    assert!(
        written > (4 * READ_BUFFER) as u64,
        "the flood ran ({written} bytes)"
    );
    // With unbounded turns the victim now and then waits behind whole megabytes of tiny frames:
    // 270-310 ms at worst in a debug build here. Bounded, it waits at most a turn of each
    // flooder: 8-13 ms in a debug build (the margin is for a loaded machine).
    assert!(
        max < Duration::from_millis(50),
        "victim's slowest round trip {max:?} under the flood (calm: {calm:?}, median {median:?})"
    );
}
