//! JWT authentication at the upgrade: where tokens come from, which are refused and why, claims
//! in use (username, room allow-list), refresh and expiry (4001), dev mode, the `token` command,
//! and the Origin allow-list.

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use support::{Client, TEST_SECRET, TestGateway, http_get, token_for};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use wsgate::auth::{Claims, claims_for};
use wsgate::base::time::now_secs;
use wsgate::config::HeartbeatMode;

const UPGRADE: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\n\
                       Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn sign(claims: &Claims, alg: Algorithm, key: &EncodingKey) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, key).unwrap()
}

fn secret_key(secret: &str) -> EncodingKey {
    EncodingKey::from_secret(secret.as_bytes())
}

/// A gateway that requires tokens, verified with `TEST_SECRET` unless `customize` says otherwise.
fn gateway(customize: impl FnOnce(&mut wsgate::Config)) -> TestGateway {
    TestGateway::start_with(
        |c| {
            c.allow_anonymous = false;
            customize(c);
        },
        1,
    )
}

/// Upgrades with `token` in the query; returns the HTTP status and JSON body of a refusal, or
/// 101 and null.
async fn try_upgrade(gw: &TestGateway, token: Option<&str>) -> (u16, Value) {
    let path = match token {
        Some(t) => format!("/ws?token={t}"),
        None => "/ws".into(),
    };
    let (status, _, body) = http_get(gw.addr, &path, UPGRADE).await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

async fn refused_because(gw: &TestGateway, token: Option<&str>) -> String {
    let (status, body) = try_upgrade(gw, token).await;
    assert_eq!(status, 401, "{body}");
    // (The WWW-Authenticate: Bearer header is checked in `refusals_name_the_bearer_scheme`.)
    assert!(body["error"].is_string(), "{body}");
    body["reason"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn bad_tokens_are_refused_with_401_naming_the_reason() {
    let gw = gateway(|c| c.jwt_leeway = Duration::ZERO);
    assert_eq!(refused_because(&gw, None).await, "missing_token");
    assert_eq!(
        refused_because(&gw, Some("not-a-jwt")).await,
        "malformed_token"
    );

    let mut expired = claims_for("alice", None, Duration::ZERO);
    expired.exp = now_secs() - 60;
    let token = sign(&expired, Algorithm::HS256, &secret_key(TEST_SECRET));
    assert_eq!(refused_because(&gw, Some(&token)).await, "token_expired");

    let claims = claims_for("alice", None, Duration::from_secs(60));
    let forged = sign(
        &claims,
        Algorithm::HS256,
        &secret_key("another-secret-of-16+b"),
    );
    assert_eq!(refused_because(&gw, Some(&forged)).await, "bad_signature");

    // `alg: none` with no signature.
    let b64 = |v: &Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&serde_json::to_value(&claims).unwrap())
    );
    assert_eq!(
        refused_because(&gw, Some(&none)).await,
        "algorithm_not_allowed"
    );

    // Not valid before a time still to come.
    let mut early = serde_json::to_value(&claims).unwrap();
    early["nbf"] = json!(now_secs() + 3600);
    let key = secret_key(TEST_SECRET);
    let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &early, &key).unwrap();
    assert_eq!(
        refused_because(&gw, Some(&token)).await,
        "token_not_yet_valid"
    );

    // Critical header extensions, which no verifier here understands (RFC 7515 §4.1.11).
    let header = Header {
        crit: Some(vec!["exp".into()]),
        ..Header::new(Algorithm::HS256)
    };
    let token = jsonwebtoken::encode(&header, &claims, &key).unwrap();
    assert_eq!(
        refused_because(&gw, Some(&token)).await,
        "unsupported_critical_header"
    );

    // No subject.
    let mut anonymous = claims_for("x", None, Duration::from_secs(60));
    anonymous.sub = None;
    let token = sign(&anonymous, Algorithm::HS256, &secret_key(TEST_SECRET));
    assert_eq!(refused_because(&gw, Some(&token)).await, "bad_claims");

    // Each refusal is counted by reason.
    let (_, _, body) = http_get(gw.addr, "/healthz", "").await;
    let health: Value = serde_json::from_str(&body).unwrap();
    let auth = &health["refused"]["auth_refused"];
    assert_eq!(auth["missing_token"], 1);
    assert_eq!(auth["token_expired"], 1);
    assert_eq!(auth["bad_signature"], 1);
    assert_eq!(auth["bad_claims"], 1);
    assert_eq!(auth["token_not_yet_valid"], 1);
    assert_eq!(auth["unsupported_critical_header"], 1);
}

#[tokio::test]
async fn refusals_name_the_bearer_scheme() {
    let gw = gateway(|_| {});
    let (status, head, _) = http_get(gw.addr, "/ws", UPGRADE).await;
    assert_eq!(status, 401);
    assert!(
        head.to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{head}"
    );
}

#[tokio::test]
async fn issuer_and_audience_are_checked_when_configured() {
    let gw = gateway(|c| {
        c.jwt_issuer = Some("https://issuer.example".into());
        c.jwt_audience = Some("wsgate".into());
    });
    let key = secret_key(TEST_SECRET);
    let mut claims = claims_for("alice", None, Duration::from_secs(60));
    claims.iss = Some("https://issuer.example".into());
    claims.aud = Some("wsgate".into());
    assert_eq!(
        try_upgrade(&gw, Some(&sign(&claims, Algorithm::HS256, &key)))
            .await
            .0,
        101
    );
    claims.iss = Some("https://evil.example".into());
    let token = sign(&claims, Algorithm::HS256, &key);
    assert_eq!(refused_because(&gw, Some(&token)).await, "wrong_issuer");
    claims.iss = Some("https://issuer.example".into());
    claims.aud = Some("other".into());
    let token = sign(&claims, Algorithm::HS256, &key);
    assert_eq!(refused_because(&gw, Some(&token)).await, "wrong_audience");
    // An audience list that names us is fine.
    claims.aud = Some(json!(["other", "wsgate"]));
    assert_eq!(
        try_upgrade(&gw, Some(&sign(&claims, Algorithm::HS256, &key)))
            .await
            .0,
        101
    );
    // Configured claims are required, not only checked when present.
    claims.aud = None;
    let token = sign(&claims, Algorithm::HS256, &key);
    assert_eq!(refused_because(&gw, Some(&token)).await, "bad_claims");
    claims.aud = Some("wsgate".into());
    claims.iss = None;
    let token = sign(&claims, Algorithm::HS256, &key);
    assert_eq!(refused_because(&gw, Some(&token)).await, "bad_claims");
}

#[tokio::test]
async fn public_key_algorithms_verify_and_hs_tokens_cannot_confuse_them() {
    let claims = claims_for("alice", None, Duration::from_secs(60));
    for (public, private, alg) in [
        ("rsa-public.pem", "rsa-private.pem", Algorithm::RS256),
        ("ec-public.pem", "ec-private.pem", Algorithm::ES256),
        (
            "ed25519-public.pem",
            "ed25519-private.pem",
            Algorithm::EdDSA,
        ),
    ] {
        let gw = gateway(|c| {
            c.jwt_secret = None;
            c.jwt_public_key_file = Some(fixture(public));
        });
        let pem = std::fs::read(fixture(private)).unwrap();
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
            Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
            _ => EncodingKey::from_ed_pem(&pem),
        }
        .unwrap();
        let (status, body) = try_upgrade(&gw, Some(&sign(&claims, alg, &key))).await;
        assert_eq!(status, 101, "{alg:?}: {body}");
        // Algorithm confusion: an HS256 token whose "secret" is the public key itself.
        let public_pem = std::fs::read_to_string(fixture(public)).unwrap();
        let confused = sign(&claims, Algorithm::HS256, &secret_key(&public_pem));
        assert_eq!(
            refused_because(&gw, Some(&confused)).await,
            "algorithm_not_allowed",
            "{alg:?}"
        );
    }
}

#[tokio::test]
async fn tokens_come_from_query_header_or_subprotocol() {
    let gw = gateway(|_| {});
    let token = token_for("carol");

    let mut by_query = Client::connect(&gw.url(&format!("/ws?token={token}"))).await;
    by_query.join("r").await;

    let mut request = gw.url("/ws").into_client_request().unwrap();
    let bearer = HeaderValue::from_str(&format!("Bearer {token}")).unwrap();
    request.headers_mut().insert("authorization", bearer);
    let (_, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.status(), 101);

    // Browsers: the token rides as a subprotocol; the server answers with the real protocol.
    let mut request = gw.url("/ws").into_client_request().unwrap();
    let offered = HeaderValue::from_str(&format!("wsgate, bearer.{token}")).unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", offered);
    let (_, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], "wsgate");

    // Only the token offered: it authenticates, but is never echoed back (it would land in
    // proxies' and browsers' logs of the response).
    let upgrade = format!(
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: bearer.{token}\r\n"
    );
    let (status, head, _) = support::http_get(gw.addr, "/ws", &upgrade).await;
    assert_eq!(status, 101, "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("sec-websocket-protocol"),
        "{head}"
    );
    assert!(!head.contains(&token), "{head}");

    // A token in the query string may be percent-encoded.
    let encoded = token.replace('.', "%2E");
    let mut by_encoded_query = Client::connect(&gw.url(&format!("/ws?token={encoded}"))).await;
    by_encoded_query.join("r").await;
}

#[tokio::test]
async fn claims_set_the_username_and_limit_the_rooms() {
    let gw = gateway(|_| {});
    let key = secret_key(TEST_SECRET);
    let mut claims = claims_for("u-42", Some("Dana"), Duration::from_secs(60));
    claims.rooms = Some(vec!["team-*".into(), "lobby".into()]);
    let dana = sign(&claims, Algorithm::HS256, &key);
    let mut dana = Client::connect(&gw.url(&format!("/ws?token={dana}"))).await;
    let mut erin = Client::connect(&gw.url(&format!("/ws?token={}", token_for("erin")))).await;

    erin.join("team-a").await;
    dana.join("team-a").await;
    let joined = erin.expect("user_joined").await;
    assert_eq!(joined["username"], "Dana");
    dana.send("chat_message", json!({"room": "team-a", "message": "hi"}))
        .await;
    assert_eq!(erin.expect("chat_message").await["username"], "Dana");
    dana.expect("chat_message").await;

    dana.join("lobby").await;
    dana.send("join_room", json!({"room": "general"})).await;
    dana.expect_error("Not allowed to join room: general").await;
    // erin's token has no allow-list.
    erin.join("general").await;
}

#[tokio::test]
async fn an_unrefreshed_token_closes_with_4001_and_a_refresh_keeps_the_connection() {
    let gw = gateway(|c| {
        c.jwt_leeway = Duration::ZERO;
        // The expiry check rides on the heartbeat wheel; keep pings out of the way.
        c.heartbeat_interval = Duration::from_secs(60);
        c.heartbeat_mode = HeartbeatMode::Frame;
    });
    let key = secret_key(TEST_SECRET);
    let short = |user: &str, secs: u64| {
        sign(
            &claims_for(user, None, Duration::from_secs(secs)),
            Algorithm::HS256,
            &key,
        )
    };

    let mut lapsing = Client::connect(&gw.url(&format!("/ws?token={}", short("frank", 2)))).await;
    let mut refreshing =
        Client::connect(&gw.url(&format!("/ws?token={}", short("grace", 2)))).await;

    refreshing
        .send("refresh", json!({"token": "garbage"}))
        .await;
    refreshing
        .expect_error("Invalid token: malformed token")
        .await;
    refreshing
        .send("refresh", json!({"token": short("mallory", 60)}))
        .await;
    refreshing
        .expect_error("Invalid token: it is for another user than this connection's")
        .await;
    refreshing
        .send("refresh", json!({"token": short("grace", 60)}))
        .await;
    let refreshed = refreshing.expect("token_refreshed").await;
    assert!(refreshed["expiresAt"].as_u64().unwrap() >= now_secs() + 50);

    let close = lapsing.expect_close().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 4001);
    assert_eq!(close.reason.as_str(), "token expired");

    // Past the first token's expiry, the refreshed connection still works.
    refreshing.send("echo", json!("still here")).await;
    assert_eq!(refreshing.expect("echo").await["payload"], "still here");
    let (_, _, body) = http_get(gw.addr, "/healthz", "").await;
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["refused"]["tokens_expired"], 1);
}

#[tokio::test]
async fn a_refresh_applies_the_new_tokens_room_allow_list_and_name() {
    let gw = gateway(|_| {});
    let key = secret_key(TEST_SECRET);
    let token = |name: &str, rooms: &[&str]| {
        let mut claims = claims_for("u-7", Some(name), Duration::from_secs(600));
        claims.rooms = Some(rooms.iter().map(|r| r.to_string()).collect());
        sign(&claims, Algorithm::HS256, &key)
    };
    let mut ivy = Client::connect(&gw.url(&format!(
        "/ws?token={}",
        token("Ivy", &["team-a", "team-b"])
    )))
    .await;
    let mut other = Client::connect(&gw.url(&format!("/ws?token={}", token_for("otto")))).await;
    other.join("team-a").await;
    other.join("team-b").await;
    ivy.join("team-a").await;
    ivy.join("team-b").await;
    assert_eq!(other.expect("user_joined").await["userId"], "u-7");
    other.expect("user_joined").await;

    // The refreshed token no longer covers team-b, and renames the user.
    ivy.send("refresh", json!({"token": token("Ivy R.", &["team-a"])}))
        .await;
    ivy.expect("token_refreshed").await;
    let left = ivy.expect("room_left").await;
    assert_eq!(left["room"], "team-b");
    let notice = other.expect("user_left").await;
    assert_eq!(
        (&notice["room"], &notice["username"], &notice["userId"]),
        (&json!("team-b"), &json!("Ivy"), &json!("u-7")),
        "members are told as for any leave, under the name they knew"
    );
    ivy.send("chat_message", json!({"room": "team-b", "message": "x"}))
        .await;
    ivy.expect_error("Not a member of room: team-b").await;
    ivy.send("join_room", json!({"room": "team-b"})).await;
    ivy.expect_error("Not allowed to join room: team-b").await;
    // Still in team-a, under the new name; the user id tells who it is whatever the name.
    ivy.send("chat_message", json!({"room": "team-a", "message": "hi"}))
        .await;
    let said = other.expect("chat_message").await;
    assert_eq!(
        (&said["username"], &said["userId"]),
        (&json!("Ivy R."), &json!("u-7"))
    );
}

#[tokio::test]
async fn dev_mode_serves_tokens_and_a_configured_key_turns_it_off() {
    let dev = gateway(|c| c.jwt_secret = None);
    let (status, _, body) = http_get(dev.addr, "/dev/token?user=henry", "").await;
    assert_eq!(status, 200, "{body}");
    let token: Value = serde_json::from_str(&body).unwrap();
    let token = token["token"].as_str().unwrap();
    let mut henry = Client::connect(&dev.url(&format!("/ws?token={token}"))).await;
    henry.join("r").await;
    let (status, _, _) = http_get(dev.addr, "/dev/token?user=bad%20name", "").await;
    assert_eq!(status, 400);

    let configured = gateway(|_| {});
    let (status, _, _) = http_get(configured.addr, "/dev/token?user=henry", "").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn the_token_command_mints_what_the_gateway_accepts() {
    /// Runs `wsgate token ARGS` with `secret` as WSGATE_JWT_SECRET; the token, or the exit code.
    fn mint(args: &[&str], secret: Option<&str>) -> Result<String, Option<i32>> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsgate"));
        cmd.arg("token").args(args).env_remove("WSGATE_JWT_SECRET");
        if let Some(secret) = secret {
            cmd.env("WSGATE_JWT_SECRET", secret);
        }
        let out = cmd.output().unwrap();
        if !out.status.success() {
            return Err(out.status.code());
        }
        Ok(String::from_utf8(out.stdout).unwrap().trim().to_owned())
    }

    let gw = gateway(|_| {});
    let args = ["--user", "ivan", "--username", "Ivan", "--ttl", "10m"];
    let token = mint(&args, Some(TEST_SECRET)).unwrap();
    let mut ivan = Client::connect(&gw.url(&format!("/ws?token={token}"))).await;
    ivan.join("r").await;

    // With a private key instead of the secret.
    let rsa = gateway(|c| {
        c.jwt_secret = None;
        c.jwt_public_key_file = Some(fixture("rsa-public.pem"));
    });
    let key = fixture("rsa-private.pem");
    let token = mint(
        &["--user", "ivan", "--private-key", key.to_str().unwrap()],
        None,
    )
    .unwrap();
    assert_eq!(try_upgrade(&rsa, Some(&token)).await.0, 101);

    // No key at all: nothing to sign with.
    assert_eq!(mint(&["--user", "ivan"], None), Err(Some(2)));
}

#[tokio::test]
async fn browser_origins_outside_the_allow_list_get_403() {
    let gw = TestGateway::start_with(
        |c| c.allowed_origins = vec!["https://app.example".into()],
        1,
    );
    let upgrade = "Upgrade: websocket\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";
    let (status, _, body) = http_get(
        gw.addr,
        "/ws",
        &format!("{upgrade}Origin: https://evil.example\r\n"),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let (status, _, _) = http_get(
        gw.addr,
        "/ws",
        &format!("{upgrade}Origin: https://app.example\r\n"),
    )
    .await;
    assert_eq!(status, 101);
    // Non-browser clients send no Origin.
    let (status, _, _) = http_get(gw.addr, "/ws", upgrade).await;
    assert_eq!(status, 101);
}

/// Upgrades offering the `wsgate` subprotocol (and `extra` protocols and headers), as a browser
/// using the SDK does; returns the close frame the gateway answers with, after its 101.
async fn refused_in_a_close_frame(
    gw: &TestGateway,
    protocols: &str,
    origin: Option<&str>,
) -> (u16, String) {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let mut request = gw.url("/ws").into_client_request().unwrap();
    let headers = request.headers_mut();
    headers.insert(
        "sec-websocket-protocol",
        HeaderValue::from_str(protocols).unwrap(),
    );
    if let Some(origin) = origin {
        headers.insert("origin", HeaderValue::from_str(origin).unwrap());
    }
    let (mut ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.status(), 101);
    assert_eq!(response.headers()["sec-websocket-protocol"], "wsgate");
    match ws.next().await.expect("a close frame").unwrap() {
        Message::Close(Some(close)) => (u16::from(close.code), close.reason.to_string()),
        other => panic!("expected a close frame, got {other:?}"),
    }
}

#[tokio::test]
async fn a_client_offering_wsgate_is_told_a_refusal_in_a_close_frame_browsers_can_read() {
    // One WebSocket place: refusals must not keep it.
    let gw = TestGateway::start_with(
        |c| {
            c.allow_anonymous = false;
            c.allowed_origins = vec!["https://app.example".into()];
            c.max_connections = 1;
        },
        1,
    );
    let sockets = || async {
        let (_, _, health) = http_get(gw.addr, "/healthz", "").await;
        serde_json::from_str::<Value>(&health).unwrap()["sockets"].clone()
    };
    let idle = sockets().await;
    assert_eq!(
        refused_in_a_close_frame(&gw, "wsgate", None).await,
        (
            4401,
            format!(
                "missing_token: {}",
                wsgate::auth::AuthError::Missing.message()
            )
        )
    );
    assert_eq!(
        refused_in_a_close_frame(&gw, "wsgate, bearer.not.a.token", None).await,
        (4401, "malformed_token: malformed token".to_owned())
    );
    let mut claims = claims_for("dave", None, Duration::ZERO);
    claims.exp = now_secs() - 60;
    let expired = sign(&claims, Algorithm::HS256, &secret_key(TEST_SECRET));
    assert_eq!(
        refused_in_a_close_frame(&gw, &format!("wsgate, bearer.{expired}"), None).await,
        (4401, "token_expired: token expired".to_owned())
    );
    let token = token_for("erin");
    assert_eq!(
        refused_in_a_close_frame(
            &gw,
            &format!("wsgate, bearer.{token}"),
            Some("https://evil.example")
        )
        .await,
        (4403, "origin not allowed".to_owned())
    );
    // Counted as any refusal; clients that did not offer wsgate still get the HTTP status.
    let (_, _, health) = http_get(gw.addr, "/healthz", "").await;
    let refused: Value = serde_json::from_str::<Value>(&health).unwrap()["refused"].clone();
    assert_eq!(refused["origin_refused"], 1, "{refused}");
    assert_eq!(refused["auth_refused"]["missing_token"], 1, "{refused}");
    assert_eq!(refused["auth_refused"]["token_expired"], 1, "{refused}");
    assert_eq!(try_upgrade(&gw, None).await.0, 401);
    // The places were given back: the sockets once the refusals closed, and the one WebSocket
    // place is there for a client with a token.
    let deadline = std::time::Instant::now() + support::PATIENCE;
    while sockets().await != idle {
        assert!(
            std::time::Instant::now() < deadline,
            "sockets not given back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut welcome = Client::connect(&gw.url(&format!("/ws?token={}", token_for("frank")))).await;
    welcome.join("r").await;
}
