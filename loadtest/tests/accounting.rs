//! The load generator's own accounting, checked against real gateways started here: the
//! `loadtest` binary runs as a user would run it (with `--procs`, so results cross process
//! boundaries and are merged), and its JSON report must hold exact counts — including losses
//! it has to detect, which the gateway's own counters confirm.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use wsgate::{Config, Gateway};

fn gateway(customize: impl FnOnce(&mut Config)) -> Gateway {
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        shards: 2,
        log: "warn".into(),
        allow_anonymous: true,
        jwt_secret: Some("loadtest-accounting-secret-0123456789".into()),
        max_connections_per_ip: 1_000_000,
        max_handshakes_per_ip: 1e6,
        rate_limit_messages: 1e6,
        rate_limit_burst: 1_000_000,
        rate_limit_bytes: 1 << 40,
        rate_limit_burst_bytes: Some(1 << 40),
        rate_limit_frames: 1e6,
        rate_limit_frame_burst: 1_000_000,
        ..Config::default()
    };
    customize(&mut config);
    wsgate::start(config).expect("gateway starts")
}

/// Runs `loadtest ARGS --json FILE` (bounded to a minute) and returns (success, report).
fn loadtest(args: &[&str]) -> (bool, Value) {
    let json = std::env::temp_dir().join(format!(
        "loadtest-accounting-{}-{:?}.json",
        std::process::id(),
        std::thread::current().id()
    ));
    let mut child = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args(args)
        .arg("--json")
        .arg(&json)
        .stdout(Stdio::null())
        .spawn()
        .expect("loadtest starts");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("loadtest {args:?} ran for over a minute");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let report = std::fs::read_to_string(&json).expect("loadtest wrote its JSON report");
    let _ = std::fs::remove_file(&json);
    (status.success(), serde_json::from_str(&report).unwrap())
}

/// The gateway's /healthz, over a plain HTTP/1.1 request.
fn healthz(addr: SocketAddr) -> Value {
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let body = response.split_once("\r\n\r\n").expect("HTTP response").1;
    serde_json::from_str(body).unwrap()
}

fn wait_for_no_connections(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while healthz(addr)["connections"] != 0 {
        assert!(
            Instant::now() < deadline,
            "connections left open: {}",
            healthz(addr)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn fanout_counts_every_delivery_exactly_across_processes() {
    let gw = gateway(|_| {});
    let target = gw.local_addr().to_string();
    // 60 subscribers in 3 rooms (20 each), 3 publishers (one per room) × 20 messages.
    let (ok, report) = loadtest(&[
        "fanout",
        "--target",
        &target,
        "-n",
        "60",
        "--rooms",
        "3",
        "--publishers",
        "3",
        "--publish-rate",
        "200",
        "--messages",
        "20",
        "--duration",
        "20s",
        "--settle",
        "500ms",
        "--procs",
        "2",
    ]);
    assert!(ok, "{report:#}");
    assert_eq!(report["published"], 60);
    assert_eq!(report["expected"], 60 * 20);
    assert_eq!(report["received"], 60 * 20);
    assert_eq!(report["latency"]["count"], 60 * 20); // merged from both workers' histograms
    for clean in ["lost", "duplicates", "out_of_order", "publisher_errors"] {
        assert_eq!(report[clean], 0, "{clean}");
    }
    assert_eq!(report["opening"]["connected"], 63);
    wait_for_no_connections(gw.local_addr());
}

#[test]
fn fanout_detects_exactly_the_messages_the_gateway_refused() {
    // A tight per-connection rate limit: some of the publishers' messages are refused (error
    // reply, never broadcast), and every subscriber of that room must count each one as lost.
    let gw = gateway(|c| {
        c.rate_limit_messages = 20.0;
        c.rate_limit_burst = 5;
        c.rate_limit_strikes = 1_000_000;
    });
    let target = gw.local_addr().to_string();
    let (ok, report) = loadtest(&[
        "fanout",
        "--target",
        &target,
        "-n",
        "20",
        "--rooms",
        "2",
        "--publishers",
        "2",
        "--publish-rate",
        "200",
        "--messages",
        "40",
        "--duration",
        "20s",
        "--settle",
        "500ms",
        "--procs",
        "2",
    ]);
    let refused = healthz(gw.local_addr())["refused"]["rate_limited_messages"]
        .as_u64()
        .unwrap();
    assert!(refused > 0, "the limit should have refused some messages");
    assert!(!ok, "losses must fail the run: {report:#}");
    assert_eq!(report["published"], 80);
    assert_eq!(report["publisher_errors"], refused);
    // 10 subscribers per room.
    assert_eq!(report["lost"], refused * 10);
    assert_eq!(report["received"], 20 * 40 - refused * 10);
    assert_eq!(report["duplicates"], 0);
    assert_eq!(report["out_of_order"], 0);
}

#[test]
fn echo_round_trips_add_up_across_processes() {
    let gw = gateway(|_| {});
    let target = gw.local_addr().to_string();
    for path in ["/echo", "/ws"] {
        let (ok, report) = loadtest(&[
            "echo",
            "--target",
            &target,
            "--path",
            path,
            "-n",
            "10",
            "--messages",
            "50",
            "--duration",
            "30s",
            "--procs",
            "2",
        ]);
        assert!(ok, "{report:#}");
        assert_eq!(report["round_trips"], 500, "{path}");
        assert_eq!(report["latency"]["count"], 500, "{path}");
        assert_eq!(report["broken_off"], 0);
    }
    // Open loop: every message has a due time, and all of them are sent.
    let (ok, report) = loadtest(&[
        "echo",
        "--target",
        &target,
        "--path",
        "/echo",
        "-n",
        "4",
        "--open-loop",
        "200",
        "--duration",
        "1s",
    ]);
    assert!(ok, "{report:#}");
    assert_eq!(report["round_trips"], 200);
}

#[test]
fn connect_broadcast_reaches_every_connection_on_every_node() {
    let (a, b) = (gateway(|_| {}), gateway(|_| {}));
    let (ta, tb) = (a.local_addr().to_string(), b.local_addr().to_string());
    let (ok, report) = loadtest(&[
        "connect",
        "--target",
        &ta,
        "--target",
        &tb,
        "-n",
        "100",
        "--hold",
        "300ms",
        "--broadcast",
        "--procs",
        "3",
        "--source-ips",
        "127.0.0.1-127.0.0.2",
    ]);
    assert!(ok, "{report:#}");
    assert_eq!(report["held_to_the_end"], 100);
    let broadcast = &report["broadcast"];
    assert_eq!(broadcast["sent"], 2, "one per node");
    assert_eq!(broadcast["expected"], 100);
    assert_eq!(broadcast["received"], 100);
    assert_eq!(broadcast["lost"], 0);
    assert_eq!(broadcast["latency"]["count"], 100);
}

#[test]
fn connect_counts_failures_by_cause() {
    // Nothing listens there: every attempt fails at TCP connect, and the run fails.
    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = unused.local_addr().unwrap().to_string();
    drop(unused);
    let (ok, report) = loadtest(&["connect", "--target", &target, "-n", "7", "--procs", "2"]);
    assert!(!ok);
    assert_eq!(report["opening"]["connected"], 0);
    assert_eq!(report["opening"]["failures"]["connect"], 7);
}

#[test]
fn churn_closes_every_short_lived_connection_cleanly() {
    let gw = gateway(|_| {});
    let target = gw.local_addr().to_string();
    let (ok, report) = loadtest(&[
        "churn",
        "--target",
        &target,
        "-n",
        "6",
        "--churn-rate",
        "40",
        "--lifetime",
        "100ms",
        "--duration",
        "1s",
        "--procs",
        "2",
    ]);
    assert!(ok, "{report:#}");
    let opened = report["churned"]["connected"].as_u64().unwrap();
    assert!(opened >= 30, "40/s for 1 s opened {opened}");
    assert_eq!(report["closed_cleanly"], opened);
    assert_eq!(report["close_failures"], 0);
    assert_eq!(report["steady_broken_off"], 0);
    // Every steady connection kept exchanging (10/s each for 1 s).
    assert!(report["echo"]["count"].as_u64().unwrap() >= 6 * 9);
    wait_for_no_connections(gw.local_addr());
}

#[test]
fn connections_waiting_out_a_long_ramp_stay_alive() {
    // Heartbeats far shorter than the ramp: the first connections wait ~2 s for the last, and
    // are kept alive by their keepalive pings until the hold reads (and answers pings) again.
    let gw = gateway(|c| {
        c.heartbeat_interval = Duration::from_millis(200);
        c.heartbeat_timeout = Duration::from_millis(300);
    });
    let target = gw.local_addr().to_string();
    let (ok, report) = loadtest(&[
        "connect",
        "--target",
        &target,
        "-n",
        "20",
        "--rate",
        "10",
        "--keepalive",
        "100ms",
        "--hold",
        "1s",
        "--procs",
        "2",
    ]);
    assert!(ok, "{report:#}");
    assert_eq!(report["held_to_the_end"], 20);
    assert_eq!(healthz(gw.local_addr())["refused"]["heartbeat_timeouts"], 0);
}

#[test]
fn echo_after_a_long_ramp_skips_the_keepalive_pongs() {
    // Parked connections send pings; the gateway's pongs wait unread and come before the first
    // echo. They must not count as a wrong reply.
    let gw = gateway(|_| {});
    let target = gw.local_addr().to_string();
    let (ok, report) = loadtest(&[
        "echo",
        "--target",
        &target,
        "--path",
        "/echo",
        "-n",
        "10",
        "--rate",
        "10",
        "--keepalive",
        "100ms",
        "--messages",
        "5",
        "--duration",
        "30s",
        "--procs",
        "2",
    ]);
    assert!(ok, "{report:#}");
    assert_eq!(report["round_trips"], 50);
    assert_eq!(report["broken_off"], 0);
}

#[path = "../../tests/support/redis_server.rs"]
mod redis_server;

/// Three nodes of one cluster on a fresh redis-server; returns them once each is ready.
fn cluster(redis: &redis_server::RedisServer) -> Vec<Gateway> {
    let nodes: Vec<Gateway> = (0..3)
        .map(|_| {
            gateway(|c| {
                c.broker = wsgate::config::BrokerKind::Redis;
                c.redis_url = redis.url().into();
            })
        })
        .collect();
    for node in &nodes {
        let deadline = Instant::now() + Duration::from_secs(10);
        while healthz(node.local_addr())["broker"]["ready"] != true {
            assert!(Instant::now() < deadline, "a node never got ready");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    nodes
}

#[test]
fn fanout_across_cluster_nodes_counts_every_delivery_exactly() {
    let redis = redis_server::RedisServer::start();
    let nodes = cluster(&redis);
    let targets: Vec<String> = nodes.iter().map(|n| n.local_addr().to_string()).collect();
    // Subscribers and publishers round-robin over the three nodes: every room spans them.
    let mut args = vec!["fanout"];
    for target in &targets {
        args.extend(["--target", target]);
    }
    args.extend([
        "-n",
        "60",
        "--rooms",
        "3",
        "--publishers",
        "3",
        "--publish-rate",
        "200",
        "--messages",
        "20",
        "--duration",
        "20s",
        "--settle",
        "1s",
        "--procs",
        "2",
    ]);
    let (ok, report) = loadtest(&args);
    assert!(ok, "{report:#}");
    assert_eq!(report["expected"], 60 * 20);
    assert_eq!(report["received"], 60 * 20);
    for clean in ["lost", "duplicates", "out_of_order", "publisher_errors"] {
        assert_eq!(report[clean], 0, "{clean}");
    }
}

#[test]
fn one_broadcast_reaches_every_connection_of_a_cluster() {
    let redis = redis_server::RedisServer::start();
    let nodes = cluster(&redis);
    let targets: Vec<String> = nodes.iter().map(|n| n.local_addr().to_string()).collect();
    let mut args = vec!["connect"];
    for target in &targets {
        args.extend(["--target", target]);
    }
    args.extend([
        "-n",
        "90",
        "--hold",
        "300ms",
        "--broadcast",
        "--cluster",
        "--procs",
        "3",
    ]);
    let (ok, report) = loadtest(&args);
    assert!(ok, "{report:#}");
    let broadcast = &report["broadcast"];
    assert_eq!(broadcast["sent"], 1, "one message for the whole cluster");
    assert_eq!(broadcast["expected"], 90);
    assert_eq!(broadcast["received"], 90);
    assert_eq!(broadcast["lost"], 0);
}
