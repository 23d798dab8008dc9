//! What the shards' event loops must get right at the socket, seen from raw clients: frames cut
//! into single bytes and frames packed into one segment, a reply far larger than the socket
//! takes at once (partial writes), a client that half-closes, a client that resets while its
//! replies are in flight, and thousands of connections opening and closing at once; which engine
//! runs (io_uring, epoll, and epoll where a sandbox refuses io_uring). CI runs this file, as the
//! whole suite, once per engine (`WSGATE_ENGINE`). (Readers that stop reading are
//! tests/backpressure.rs's.)

mod support;

use std::time::Duration;

use serde_json::Value;
use support::process::GatewayProcess;
use support::{PATIENCE, RawClient, TestGateway, http_get};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use wsgate::config::Engine;

/// The gateway's queued bytes, from `/healthz`.
async fn queued_bytes(gw: &TestGateway) -> u64 {
    let (status, _, body) = http_get(gw.addr, "/healthz", "").await;
    assert_eq!(status, 200, "{body}");
    let health: Value = serde_json::from_str(&body).unwrap();
    health["queued_bytes"].as_u64().expect("queued_bytes")
}

/// Waits for the gateway to count no queued bytes (the gauge follows at each shard's heartbeat
/// tick, at most a second apart).
async fn nothing_stays_queued(gw: &TestGateway) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while queued_bytes(gw).await != 0 {
        assert!(tokio::time::Instant::now() < deadline, "bytes stay queued");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_frame_written_a_byte_at_a_time_and_frames_packed_together_are_each_handled_once() {
    let gw = TestGateway::start(1);
    let mut raw = RawClient::connect(gw.addr, "/echo").await;
    raw.stream.set_nodelay(true).unwrap();
    // One frame, one byte per segment: every read the gateway makes is short.
    let frame = support::raw_frame(true, 0x1, b"one byte at a time", true);
    for byte in &frame {
        raw.stream
            .write_all(std::slice::from_ref(byte))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(
        raw.read_frame().await,
        (true, 0x1, b"one byte at a time".to_vec())
    );
    // Three frames in one write: one read holds them all.
    let mut packed = Vec::new();
    for text in ["first", "second", "third"] {
        packed.extend(support::raw_frame(true, 0x1, text.as_bytes(), true));
    }
    raw.stream.write_all(&packed).await.unwrap();
    for text in ["first", "second", "third"] {
        assert_eq!(
            raw.read_frame().await,
            (true, 0x1, text.as_bytes().to_vec())
        );
    }
}

#[tokio::test]
async fn a_reply_larger_than_the_socket_takes_leaves_in_partial_writes_and_arrives_whole() {
    const SIZE: usize = 3 << 20;
    let gw = TestGateway::start_with(
        |c| {
            c.max_message_size = 4 << 20;
            c.max_queued_bytes = 8 << 20;
        },
        1,
    );
    let mut raw = RawClient::connect_with_small_window(gw.addr, "/echo").await;
    let payload: Vec<u8> = (0..SIZE).map(|i| (i * 7 % 251) as u8).collect();
    raw.send_frame(true, 0x2, &payload, true).await;
    // A slow reader: the gateway's socket fills, and the rest leaves in pieces as it drains.
    let mut echoed = Vec::new();
    let mut header = [0u8; 10];
    raw.stream.read_exact(&mut header).await.unwrap();
    assert_eq!(header[0], 0x82);
    assert_eq!(header[1], 127);
    let len = u64::from_be_bytes(header[2..10].try_into().unwrap()) as usize;
    assert_eq!(len, SIZE);
    let mut chunk = vec![0u8; 64 * 1024];
    while echoed.len() < SIZE {
        let n = tokio::time::timeout(PATIENCE, raw.stream.read(&mut chunk))
            .await
            .expect("the rest keeps coming")
            .unwrap();
        assert!(n > 0, "closed mid-message");
        echoed.extend_from_slice(&chunk[..n]);
        if echoed.len() < SIZE / 2 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    assert_eq!(echoed.len(), SIZE, "nothing more than the message");
    assert!(echoed == payload, "the echo is the message, byte for byte");
    nothing_stays_queued(&gw).await;
}

#[tokio::test]
async fn a_client_that_half_closes_gets_its_answer_and_is_released() {
    let gw = TestGateway::start(1);
    let mut raw = RawClient::connect(gw.addr, "/echo").await;
    raw.send_frame(true, 0x1, b"last words", true).await;
    raw.stream.shutdown().await.unwrap();
    assert_eq!(raw.read_frame().await, (true, 0x1, b"last words".to_vec()));
    raw.expect_eof().await;
    gw.wait_for_connections(0).await;
}

#[tokio::test]
async fn a_client_reset_while_its_replies_are_in_flight_is_released_and_costs_nothing_more() {
    let gw = TestGateway::start_with(|c| c.max_queued_bytes = 4 << 20, 1);
    let mut raw = RawClient::connect_with_small_window(gw.addr, "/echo").await;
    let payload = vec![7u8; 60 * 1024];
    // Echoes it never reads: its socket fills and the rest waits in the gateway's queue.
    for _ in 0..40 {
        raw.send_frame(true, 0x2, &payload, true).await;
    }
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while queued_bytes(&gw).await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "nothing queued");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A reset, not a FIN: linger 0.
    let std = raw.stream.into_std().unwrap();
    socket2::SockRef::from(&std)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(std);
    gw.wait_for_connections(0).await;
    nothing_stays_queued(&gw).await;
    // The shard goes on serving.
    let mut next = RawClient::connect(gw.addr, "/echo").await;
    next.send_frame(true, 0x1, b"still here", true).await;
    assert_eq!(next.read_frame().await, (true, 0x1, b"still here".to_vec()));
}

#[tokio::test]
async fn thousands_of_connections_opening_and_closing_at_once_are_all_served_and_released() {
    const CLIENTS: usize = 2000;
    let gw = TestGateway::start_with(|c| c.max_connections_per_ip = 10_000, 2);
    let addr = gw.addr;
    let mut clients = JoinSet::new();
    for i in 0..CLIENTS {
        clients.spawn(async move {
            let mut raw = RawClient::connect(addr, "/echo").await;
            let text = format!("client {i}");
            raw.send_frame(true, 0x1, text.as_bytes(), true).await;
            assert_eq!(raw.read_frame().await, (true, 0x1, text.into_bytes()));
            if i % 2 == 0 {
                // A clean close: our close frame, its answer, its hang-up.
                raw.send_frame(true, 0x8, &1000u16.to_be_bytes(), true)
                    .await;
                assert_eq!(raw.read_close_code().await, 1000);
                raw.expect_eof().await;
            }
            // The odd ones just drop the socket.
        });
    }
    while let Some(done) = clients.join_next().await {
        done.unwrap();
    }
    gw.wait_for_connections(0).await;
    nothing_stays_queued(&gw).await;
    let mut next = RawClient::connect(addr, "/echo").await;
    next.send_frame(true, 0x1, b"after the storm", true).await;
    assert_eq!(
        next.read_frame().await,
        (true, 0x1, b"after the storm".to_vec())
    );
}

/// The engine a gateway reports in `/healthz` and `/metrics`.
async fn reported_engine(addr: std::net::SocketAddr) -> String {
    let (_, _, body) = http_get(addr, "/healthz", "").await;
    let health: Value = serde_json::from_str(&body).unwrap();
    let engine = health["engine"].as_str().unwrap_or_default().to_owned();
    let (status, _, metrics) = http_get(addr, "/metrics", "").await;
    assert_eq!(status, 200);
    let sample = format!(r#"wsgate_engine{{engine="{engine}"}} "#);
    let value = metrics
        .lines()
        .find_map(|l| l.strip_prefix(&sample))
        .unwrap_or_else(|| panic!("no {sample}sample: {metrics}"));
    assert_eq!(value.parse::<f64>().unwrap(), 1.0);
    engine
}

async fn echoes(addr: std::net::SocketAddr) {
    let mut raw = RawClient::connect(addr, "/echo").await;
    raw.send_frame(true, 0x1, b"on this engine", true).await;
    assert_eq!(
        raw.read_frame().await,
        (true, 0x1, b"on this engine".to_vec())
    );
}

#[tokio::test]
async fn each_engine_runs_when_asked_for_and_is_reported_in_healthz_and_metrics() {
    for engine in [Engine::IoUring, Engine::Epoll] {
        let gw = TestGateway::start_with(|c| c.engine = engine, 1);
        assert_eq!(reported_engine(gw.addr).await, engine.name());
        echoes(gw.addr).await;
    }
}

#[tokio::test]
async fn auto_takes_io_uring_where_the_kernel_allows_it() {
    let gw = TestGateway::start_with(|c| c.engine = Engine::Auto, 1);
    assert_eq!(reported_engine(gw.addr).await, "io_uring");
}

#[tokio::test]
async fn without_io_uring_auto_falls_back_to_epoll_and_io_uring_refuses_to_start() {
    // A sandbox whose seccomp profile refuses io_uring (as Docker's default one does).
    let gw = GatewayProcess::start_without_io_uring(
        &[],
        &[
            ("WSGATE_ENGINE", "auto"),
            ("WSGATE_ALLOW_ANONYMOUS", "true"),
        ],
    );
    assert_eq!(reported_engine(gw.addr).await, "epoll");
    echoes(gw.addr).await;
    let logs = gw.logs();
    assert!(logs.contains("io_uring is unavailable here"), "{logs}");

    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"));
    cmd.args(["--listen", "127.0.0.1:0"])
        .env("WSGATE_ENGINE", "io_uring")
        .stdout(std::process::Stdio::null());
    support::process::deny_io_uring(&mut cmd);
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("engine = io_uring, but io_uring is unavailable here")
            && stderr.contains("Operation not permitted"),
        "{stderr}"
    );
}

#[tokio::test]
async fn receives_that_find_the_buffer_ring_empty_wait_and_lose_or_reorder_nothing() {
    // Eight 4 KiB buffers for the shard, and forty clients each sending ten 48 KiB messages at
    // once: the ring runs dry over and over.
    let gw = TestGateway::start_with(
        |c| {
            c.engine = Engine::IoUring;
            c.io_uring_buffers = 8;
            // The echoes are read only once all is sent: nothing here is a slow consumer.
            c.max_queued_bytes = 1 << 24;
        },
        1,
    );
    let payload = |client: usize, message: usize| -> Vec<u8> {
        (0..48 * 1024)
            .map(|i| (i * 7 + client * 31 + message * 101) as u8)
            .collect()
    };
    let mut clients = JoinSet::new();
    for client in 0..40 {
        let addr = gw.addr;
        clients.spawn(async move {
            let mut raw = RawClient::connect(addr, "/echo").await;
            let mut wire = Vec::new();
            for message in 0..10 {
                wire.extend(support::raw_frame(
                    true,
                    0x2,
                    &payload(client, message),
                    true,
                ));
            }
            raw.stream.write_all(&wire).await.unwrap();
            for message in 0..10 {
                let (fin, opcode, echoed) = raw.read_frame().await;
                assert!(fin && opcode == 0x2);
                assert!(
                    echoed == payload(client, message),
                    "client {client}: echo {message} is not message {message}"
                );
            }
        });
    }
    while let Some(done) = clients.join_next().await {
        done.unwrap();
    }
    let (_, _, metrics) = http_get(gw.addr, "/metrics", "").await;
    let waits: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(r#"wsgate_io_uring_buffer_waits_total{shard="0"} "#))
        .unwrap_or_else(|| panic!("no buffer waits sample: {metrics}"))
        .parse()
        .unwrap();
    assert!(
        waits > 0.0,
        "the ring never ran dry: the test proves nothing"
    );
}

/// The descriptors a process holds.
fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[tokio::test]
async fn a_connection_dropped_with_sends_stuck_in_flight_lets_its_socket_go_in_the_end() {
    // A client that sends and never reads: its echoes fill its window and the gateway's socket,
    // and a send stays in flight. It does not answer pings either, so the gateway closes it, the
    // close times out, and the connection is dropped with bytes unsent: they may linger (as a
    // closed socket's would) but the socket must not be kept for good.
    let gw = GatewayProcess::start(
        &["--shards", "1"],
        &[
            ("WSGATE_ENGINE", "io_uring"),
            ("WSGATE_ALLOW_ANONYMOUS", "true"),
            ("WSGATE_HEARTBEAT_INTERVAL", "1s"),
            ("WSGATE_HEARTBEAT_TIMEOUT", "1s"),
            ("WSGATE_CLOSE_TIMEOUT", "1s"),
            ("WSGATE_MAX_QUEUED_BYTES", "8388608"),
            ("WSGATE_RATE_LIMIT_BYTES", "1000000000"),
            ("WSGATE_RATE_LIMIT_BURST_BYTES", "1000000000"),
            ("WSGATE_RATE_LIMIT_MESSAGES", "100000"),
            ("WSGATE_RATE_LIMIT_BURST", "100000"),
        ],
        None,
    );
    let idle = open_descriptors(gw.pid());
    let mut raw = RawClient::connect_with_small_window(gw.addr, "/echo").await;
    let payload = vec![3u8; 60 * 1024];
    for _ in 0..40 {
        raw.send_frame(true, 0x2, &payload, true).await;
    }
    let connections = || async {
        let (_, _, body) = http_get(gw.addr, "/healthz", "").await;
        let health: Value = serde_json::from_str(&body).unwrap();
        health["connections"].as_u64().unwrap()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while connections().await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "never dropped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // At most the linger (10 s) later, the gateway holds no more descriptors than when idle.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while open_descriptors(gw.pid()) > idle {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dropped connection's socket is still held: {} descriptors, {idle} when idle",
            open_descriptors(gw.pid())
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(raw);
}
