//! HTTP/1.1 in front of the WebSocket endpoints (hyper), and the upgrade hand-off.
//!
//! | route      | what                                                         |
//! |------------|--------------------------------------------------------------|
//! | `GET /`    | the test client page; a WebSocket upgrade here is the chat protocol |
//! | `GET /ws`  | WebSocket upgrade: the JSON chat protocol                    |
//! | `GET /echo`| WebSocket upgrade: raw echo (RFC 6455 conformance target)    |
//! | `GET /healthz` | liveness and a few gauges, as JSON                       |
//! | `GET /readyz`  | readiness: 503 once shutdown has begun                    |
//!
//! After the upgrade, hyper's connection is taken apart back into the raw `TcpStream` plus the
//! bytes hyper had read past the handshake, and the connection task takes over with its own
//! framing: no per-connection read buffer survives the handshake.

use std::convert::Infallible;
use std::rc::Rc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tracing::{debug, error};

use crate::conn;
use crate::shard::{Endpoint, SHUTDOWN_REASON, Shard};

const TEST_PAGE: &str = include_str!("page/index.html");

type Body = Full<Bytes>;

/// Serves one accepted TCP connection until it closes or is upgraded.
pub async fn serve(shard: Rc<Shard>, stream: TcpStream) {
    let service = service_fn(move |req| {
        let shard = shard.clone();
        async move { Ok::<_, Infallible>(route(&shard, req)) }
    });
    let result = http1::Builder::new()
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await;
    if let Err(e) = result {
        debug!(error = %e, "http connection ended with an error");
    }
}

fn route(shard: &Rc<Shard>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET, "/") if fastwebsockets::upgrade::is_upgrade_request(&req) => {
            upgrade(shard, req, Endpoint::Chat)
        }
        (&Method::GET, "/") => {
            let mut res = Response::new(Full::new(Bytes::from_static(TEST_PAGE.as_bytes())));
            res.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            res
        }
        (&Method::GET, "/ws") => upgrade(shard, req, Endpoint::Chat),
        (&Method::GET, "/echo") => upgrade(shard, req, Endpoint::Echo),
        (&Method::GET, "/healthz") => {
            let node = &shard.node;
            json(
                StatusCode::OK,
                &serde_json::json!({
                    "status": "ok",
                    "connections": node.connection_count(),
                    "rooms": node.rooms.room_count(),
                    "shards": node.shards(),
                    "slow_consumers_closed": node.slow_consumers.load(Ordering::Relaxed),
                    "heartbeat_timeouts": node.heartbeat_timeouts.load(Ordering::Relaxed),
                }),
            )
        }
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
fn upgrade(shard: &Rc<Shard>, mut req: Request<Incoming>, endpoint: Endpoint) -> Response<Body> {
    if shard.node.is_draining() {
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
    let (response, upgrading) = match fastwebsockets::upgrade::upgrade(&mut req) {
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
    let shard = shard.clone();
    tokio::task::spawn_local(async move {
        let upgraded = match upgrading.await {
            Ok(ws) => ws.into_inner().into_inner(),
            Err(e) => {
                debug!(error = %e, "upgrade did not complete");
                return;
            }
        };
        // Everything but the connection itself is dropped before the long await: whatever is
        // still in scope there stays in this task, for every connection, for its whole life.
        let connection = match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => conn::serve(shard, parts.io.into_inner(), parts.read_buf, endpoint),
            Err(_) => {
                error!("upgraded connection is not a plain TCP stream");
                return;
            }
        };
        connection.await;
    });
    response.map(|_| Body::default())
}

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
