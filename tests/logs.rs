//! Logs under attack: refusals are logged as counts per interval, not a line each; JSON logs are
//! JSON on stdout too; each connection leaves one access line when it ends.

mod support;

use std::time::Duration;

use support::process::GatewayProcess;
use support::{PATIENCE, http_get};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const UPGRADE: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\n\
                       Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";

#[tokio::test]
async fn a_storm_of_refusals_is_logged_as_counts() {
    let gateway = GatewayProcess::start(
        &["--shards", "2"],
        &[
            ("WSGATE_LOG", "info"),
            ("WSGATE_JWT_SECRET", support::TEST_SECRET),
            ("WSGATE_MAX_HANDSHAKES_PER_IP", "1000000"),
        ],
        None,
    );
    const STORM: usize = 200;
    for _ in 0..STORM {
        let (status, _, _) = http_get(gateway.addr, "/ws?token=garbage", UPGRADE).await;
        assert_eq!(status, 401);
    }
    // The counts of the storm, summed over the interval lines that report them.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let logs = gateway.logs();
        let lines: Vec<&str> = logs
            .lines()
            .filter(|l| l.contains("refused or closed"))
            .collect();
        let counted: usize = lines
            .iter()
            .filter_map(|l| l.split("reason=auth_refused.malformed_token count=").nth(1))
            .filter_map(|rest| rest.split_whitespace().next()?.parse::<usize>().ok())
            .sum();
        if counted == STORM {
            assert!(
                lines.len() < 10,
                "a line per interval, not per refusal: {} lines",
                lines.len()
            );
            assert!(!logs.contains("garbage"), "tokens are never logged");
            assert!(!logs.contains('\x1b'), "no colour codes off a terminal");
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{counted} of {STORM} refusals logged:\n{logs}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    let gateway = GatewayProcess::start(
        &[],
        &[
            ("WSGATE_LOG", "info"),
            ("WSGATE_LOG_FORMAT", "json"),
            ("WSGATE_JWT_SECRET", support::TEST_SECRET),
        ],
        None,
    );
    // The line on stdout that says where it listens is a JSON object as well.
    let stdout_line = gateway.first_stdout_line();
    let listening: serde_json::Value = serde_json::from_str(&stdout_line)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {stdout_line}"));
    assert_eq!(
        listening["fields"]["url"],
        format!("http://{}/", gateway.addr),
        "{listening}"
    );
    let (status, _, _) = http_get(gateway.addr, "/ws?token=garbage", UPGRADE).await;
    assert_eq!(status, 401);
    // The start-up lines, and the refusal's interval line once it is written.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let logs = gateway.logs();
        let lines: Vec<serde_json::Value> = logs
            .lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
            .collect();
        // The count is a field, not words in the message.
        let refusal = lines.iter().find(|l| {
            l["fields"]["message"] == "refused or closed"
                && l["fields"]["reason"] == "auth_refused.malformed_token"
                && l["fields"]["count"] == 1
        });
        if let Some(refusal) = refusal {
            assert_eq!(refusal["level"], "INFO", "{refusal}");
            assert!(
                lines
                    .iter()
                    .any(|l| l["fields"]["message"] == "wsgate listening")
            );
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{logs}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn each_connection_leaves_an_access_line_when_it_ends_unless_turned_off() {
    for access_log in ["true", "false"] {
        let gateway = GatewayProcess::start(
            &[],
            &[
                ("WSGATE_LOG", "info"),
                ("WSGATE_LOG_FORMAT", "json"),
                ("WSGATE_JWT_SECRET", support::TEST_SECRET),
                ("WSGATE_ACCESS_LOG", access_log),
                ("WSGATE_CLOSE_TIMEOUT", "1s"),
            ],
            None,
        );
        let url = format!(
            "ws://{}/ws?token={}",
            gateway.addr,
            support::token_for("alice")
        );
        let mut client = support::Client::connect(&url).await;
        let normal = CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        };
        client.ws.close(Some(normal)).await.unwrap();
        let found = |logs: &str| {
            logs.lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|l| l["fields"]["message"] == "connection closed")
        };
        let deadline = tokio::time::Instant::now() + PATIENCE;
        if access_log == "true" {
            let line = loop {
                if let Some(line) = found(&gateway.logs()) {
                    break line;
                }
                assert!(tokio::time::Instant::now() < deadline, "{}", gateway.logs());
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            assert_eq!(line["target"], "wsgate::access", "{line}");
            assert_eq!(line["fields"]["user"], "alice", "{line}");
            assert_eq!(line["fields"]["close_code"], 1000, "{line}");
            assert_eq!(line["fields"]["peer"], "127.0.0.1", "{line}");
            assert!(line["fields"]["client"].is_string(), "{line}");
        } else {
            tokio::time::sleep(support::QUIET).await;
            assert!(found(&gateway.logs()).is_none(), "{}", gateway.logs());
        }
    }
}
