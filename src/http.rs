//! HTTP/1.1 in front of the WebSocket endpoints (hyper), and the upgrade hand-off.
//!
//! | route      | what                                                         |
//! |------------|--------------------------------------------------------------|
//! | `GET /`    | the test client page; a WebSocket upgrade here is the chat protocol |
//! | `GET /ws`  | WebSocket upgrade: the JSON chat protocol                    |
//! | `GET /echo`| WebSocket upgrade: raw echo (RFC 6455 conformance target)    |
//! | `GET /healthz` | liveness and a few gauges, as JSON                       |
//! | `GET /readyz`  | readiness: 503 once shutdown has begun                    |
//! | `GET /dev/token?user=NAME` | dev mode only (no key configured): a 1-hour token |
//!
//! After the upgrade, hyper's connection is taken apart back into the raw `TcpStream` plus the
//! bytes hyper had read past the handshake, and the connection task takes over with its own
//! framing: no per-connection read buffer survives the handshake.

use std::convert::Infallible;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue, ORIGIN, SEC_WEBSOCKET_PROTOCOL, WWW_AUTHENTICATE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tracing::{debug, error, info};

use crate::limits::Refusal;
use crate::shard::{Endpoint, SHUTDOWN_REASON, Shard};
use crate::{auth, conn};

const TEST_PAGE: &str = include_str!("page/index.html");

type Body = Full<Bytes>;

/// Serves one accepted TCP connection until it closes or is upgraded.
pub async fn serve(shard: Rc<Shard>, stream: TcpStream, peer: IpAddr) {
    let config = shard.node.config.clone();
    let service = service_fn(move |req| {
        let shard = shard.clone();
        async move { Ok::<_, Infallible>(route(&shard, req, peer)) }
    });
    let result = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(config.handshake_timeout)
        .max_buf_size(config.max_header_bytes)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await;
    if let Err(e) = result {
        debug!(error = %e, "http connection ended with an error");
    }
}

fn route(shard: &Rc<Shard>, req: Request<Incoming>, peer: IpAddr) -> Response<Body> {
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET, "/") if fastwebsockets::upgrade::is_upgrade_request(&req) => {
            upgrade(shard, req, Endpoint::Chat, peer)
        }
        (&Method::GET, "/") => {
            let mut res = Response::new(Full::new(Bytes::from_static(TEST_PAGE.as_bytes())));
            res.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            res
        }
        (&Method::GET, "/ws") => upgrade(shard, req, Endpoint::Chat, peer),
        (&Method::GET, "/echo") => upgrade(shard, req, Endpoint::Echo, peer),
        (&Method::GET, "/healthz") => {
            let node = &shard.node;
            json(
                StatusCode::OK,
                &serde_json::json!({
                    "status": "ok",
                    "connections": node.connection_count(),
                    "queued_bytes": node.queued_bytes(),
                    "rooms": node.rooms.room_count(),
                    "shards": node.shards(),
                    "refused": node.counters.snapshot(),
                }),
            )
        }
        (&Method::GET, "/dev/token") if shard.node.auth.dev_mode() => dev_token(shard, req.uri()),
        (&Method::GET, "/readyz") if shard.node.is_draining() => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining: the server is shutting down",
        ),
        (&Method::GET, "/readyz") => json(StatusCode::OK, &serde_json::json!({"status": "ready"})),
        (_, "/" | "/ws" | "/echo" | "/healthz" | "/readyz") => {
            error_response(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => error_response(StatusCode::NOT_FOUND, "not found"),
    }
}

/// Answers the upgrade and, once hyper lets go of the socket, runs the connection.
fn upgrade(
    shard: &Rc<Shard>,
    req: Request<Incoming>,
    endpoint: Endpoint,
    peer: IpAddr,
) -> Response<Body> {
    if shard.node.is_draining() {
        shard
            .node
            .counters
            .draining_refused
            .fetch_add(1, Ordering::Relaxed);
        return error_response(StatusCode::SERVICE_UNAVAILABLE, SHUTDOWN_REASON);
    }
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        let mut res = error_response(
            StatusCode::UPGRADE_REQUIRED,
            "this endpoint speaks WebSocket: send an Upgrade: websocket request",
        );
        res.headers_mut()
            .insert("upgrade", HeaderValue::from_static("websocket"));
        return res;
    }
    let node = &shard.node;
    // Before the (costlier) token check: the per-IP handshake rate protects it too.
    if let Err(refusal) = node.admission.admit(peer) {
        node.counters.admission_refused(refusal);
        info!(%peer, reason = refusal.message(), "upgrade refused");
        let status = match refusal {
            Refusal::ServerFull => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::TooManyConnections | Refusal::TooManyHandshakes => {
                StatusCode::TOO_MANY_REQUESTS
            }
        };
        return error_response(status, refusal.message());
    }
    let response = upgrade_admitted(shard, req, endpoint, peer);
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        node.admission.release(peer);
    }
    response
}

/// The upgrade of an admitted connection: the place is the connection's from here on, given back
/// when it ends (or here, when the upgrade does not happen).
fn upgrade_admitted(
    shard: &Rc<Shard>,
    mut req: Request<Incoming>,
    endpoint: Endpoint,
    peer: IpAddr,
) -> Response<Body> {
    let node = &shard.node;
    if let Some(origin) = req.headers().get(ORIGIN)
        && !node.config.allowed_origins.is_empty()
        && !node
            .config
            .allowed_origins
            .iter()
            .any(|allowed| allowed.as_bytes() == origin.as_bytes())
    {
        node.counters.origin_refused.fetch_add(1, Ordering::Relaxed);
        info!(origin = ?origin, "upgrade refused (403): origin not allowed");
        return error_response(StatusCode::FORBIDDEN, "origin not allowed");
    }
    let presented = auth::presented(&req);
    let identity = match presented.token {
        None if node.config.allow_anonymous => node.anonymous.clone(),
        token => match node.auth.authenticate(token) {
            Ok(identity) => Arc::new(identity),
            Err(e) => {
                node.counters.auth_refused(e);
                // The reason only: the token itself is never logged.
                info!(reason = e.code(), "upgrade refused (401)");
                let mut res = json(
                    StatusCode::UNAUTHORIZED,
                    &serde_json::json!({ "error": e.message(), "reason": e.code() }),
                );
                res.headers_mut()
                    .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return res;
            }
        },
    };
    let protocol = presented.protocol;
    let (mut response, upgrading) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(pair) => pair,
        Err(fastwebsockets::WebSocketError::InvalidSecWebsocketVersion) => {
            let mut res = error_response(
                StatusCode::UPGRADE_REQUIRED,
                "unsupported WebSocket version (need 13)",
            );
            res.headers_mut()
                .insert("sec-websocket-version", HeaderValue::from_static("13"));
            return res;
        }
        Err(e) => return error_response(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    if let Some(protocol) = protocol {
        response
            .headers_mut()
            .insert(SEC_WEBSOCKET_PROTOCOL, protocol);
    }
    let shard = shard.clone();
    tokio::task::spawn_local(async move {
        let upgraded = match upgrading.await {
            Ok(ws) => ws.into_inner().into_inner(),
            Err(e) => {
                debug!(error = %e, "upgrade did not complete");
                shard.node.admission.release(peer);
                return;
            }
        };
        // Everything but the connection itself is dropped before the long await: whatever is
        // still in scope there stays in this task, for every connection, for its whole life.
        let connection = match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => conn::serve(
                shard,
                parts.io.into_inner(),
                parts.read_buf,
                endpoint,
                identity,
                peer,
            ),
            Err(_) => {
                error!("upgraded connection is not a plain TCP stream");
                shard.node.admission.release(peer);
                return;
            }
        };
        connection.await;
    });
    response.map(|_| Body::default())
}

/// Dev mode only: a one-hour token for `?user=NAME`, so the test page works without set-up.
fn dev_token(shard: &Shard, uri: &hyper::Uri) -> Response<Body> {
    let user = uri
        .query()
        .and_then(|q| q.split('&').find_map(|pair| pair.strip_prefix("user=")))
        .filter(|u| {
            (1..=64).contains(&u.len())
                && u.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        });
    let Some(user) = user else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "user: 1-64 characters of A-Z, a-z, 0-9, '_', '-', '.'",
        );
    };
    let claims = auth::claims_for(user, None, DEV_TOKEN_TTL);
    match shard.node.auth.mint(&claims) {
        Some(token) => json(
            StatusCode::OK,
            &serde_json::json!({ "token": token, "expiresAt": claims.exp }),
        ),
        None => error_response(StatusCode::INTERNAL_SERVER_ERROR, "cannot sign a token"),
    }
}

const DEV_TOKEN_TTL: Duration = Duration::from_secs(3600);

fn json(status: StatusCode, body: &serde_json::Value) -> Response<Body> {
    let mut res = Response::new(Full::new(Bytes::from(body.to_string())));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

fn error_response(status: StatusCode, message: &str) -> Response<Body> {
    json(status, &serde_json::json!({ "error": message }))
}
