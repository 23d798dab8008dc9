//! HTTP/1.1 in front of the WebSocket endpoints (hyper), and the upgrade hand-off.
//!
//! | route      | what                                                         |
//! |------------|--------------------------------------------------------------|
//! | `GET /`    | the test client page; a WebSocket upgrade here is the chat protocol |
//! | `GET /ws`  | WebSocket upgrade: the JSON chat protocol                    |
//! | `GET /echo`| WebSocket upgrade: raw echo (RFC 6455 conformance target; `echo_endpoint`) |
//! | `GET /healthz` | liveness, gauges and (`healthz_detail`, for who may read `/metrics`) refusal counters, as JSON |
//! | `GET /metrics` | Prometheus metrics (see [`metrics`]): `metrics_key`, or loopback |
//! | `GET /readyz`  | readiness: 503 once shutdown has begun, or while Redis is away (`broker = "redis"`) |
//! | `GET /dev/token?user=NAME` | dev mode only (no key configured): a 1-hour token |
//! | `/api/…` | the server API for backends, with `api_key` (see [`api`]) |
//!
//! Every accepted socket is admitted first (per-address cap, file descriptors; see
//! [`crate::conn::limits::Admission`]). Its first request head is read by [`head`] (bounded in size and
//! time, answered in JSON when bad), then hyper serves it; plain HTTP connections are registered in
//! [`idle::HttpConnections`] so the longest idle go first when descriptors run short.
//!
//! After the upgrade, hyper's connection is taken apart back into the raw `TcpStream` plus the
//! bytes hyper had read past the handshake, and the connection task takes over with its own
//! framing: no per-connection read buffer survives the handshake.

pub mod api;
pub mod forwarded;
pub mod head;
pub mod idle;
pub mod metrics;
pub mod proxy_header;
pub mod token;

use std::cell::Cell;
use std::convert::Infallible;
use std::io;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use base64::Engine;
use bytes::{Bytes, BytesMut};
use fastwebsockets::upgrade::UpgradeFut;
use futures_util::future::Either;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{
    CACHE_CONTROL, CONNECTION, CONTENT_SECURITY_POLICY, CONTENT_TYPE, HOST, HeaderName,
    HeaderValue, ORIGIN, REFERRER_POLICY, SEC_WEBSOCKET_EXTENSIONS, SEC_WEBSOCKET_KEY,
    SEC_WEBSOCKET_PROTOCOL, SEC_WEBSOCKET_VERSION, WWW_AUTHENTICATE, X_CONTENT_TYPE_OPTIONS,
    X_FRAME_OPTIONS,
};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioIo, TokioTimer};
use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, error};

use crate::auth::{self, Authenticator};
use crate::backend::proxy::{self, DEFAULT_DENY_CODE, Proxy};
use crate::backend::webhook::Webhooks;
use crate::backend::{Event, ProxyKind, ShardProxyMetrics};
use crate::broker::Broker;
use crate::config::Compression;
use crate::conn::limits::Refusal;
use crate::runtime::driver::EventLoop;
use crate::runtime::shard::{SHUTDOWN_REASON, Shard};
use crate::runtime::{AppId, Newcomer, Shared};
use crate::transport::Stream;
use crate::transport::certificate::Tls;
use crate::ws::close::CloseCode;
use crate::ws::deflate::{self, Deflate};
use crate::ws::frame;
use forwarded::TrustedProxies;
use head::{HeadError, Prefixed};
use idle::{HttpConnections, Registered};

const TEST_PAGE: &str = include_str!("../page/index.html");
/// The client SDK (clients/js) as one ES module, which the test page imports: pages may import
/// it from the gateway too (`import { WsgateClient } from "https://…/wsgate-client.js"`).
const CLIENT_SDK: &str = include_str!("../page/wsgate-client.js");
/// How long a refused upgrade's close handshake may take (at most `close_timeout`).
const REFUSAL_CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// The admin UI: the server API's nodes, rooms and presence, publish and disconnect, in a page
/// that asks for the API key (served only with an `api_key`).
const ADMIN_PAGE: &str = include_str!("../page/admin.html");
const ADMIN_SCRIPT: &str = include_str!("../page/admin.js");
/// What the admin page may load and do: its own script and the API, nothing inline but styles,
/// never inside a frame.
const ADMIN_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; \
     connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

type Body = Full<Bytes>;

/// What the HTTP edge of a node works with: the shards' shared state, the broker (readiness, the
/// server API), token checking, TLS, the trusted proxies, its plain HTTP connections, and which
/// app each WebSocket route leads to.
pub struct Edge {
    pub shared: Arc<Shared>,
    pub broker: Arc<dyn Broker>,
    pub auth: Arc<Authenticator>,
    /// The listener's TLS, with `tls_cert_file` and `tls_key_file`.
    pub tls: Option<Tls>,
    /// The proxies whose word on a client's address is taken (`trusted_proxies`).
    pub proxies: TrustedProxies,
    /// Plain HTTP connections, for closing the longest idle first when descriptors run short.
    pub http: HttpConnections,
    /// What each shard's proxies to the backend count.
    pub proxy_metrics: Arc<[ShardProxyMetrics]>,
    /// The node's webhooks, if configured (for `/metrics`).
    pub webhooks: Option<Arc<Webhooks>>,
    /// The app of `/ws` and `/`, and of `/echo`.
    pub chat: AppId,
    pub echo: AppId,
}

/// The edge on one shard: that shard (whose connections upgrades become) and the node's edge.
pub struct ShardEdge {
    pub shard: Rc<Shard>,
    /// The shard's event loop, which upgraded connections are handed to.
    pub event_loop: Rc<EventLoop>,
    pub edge: Arc<Edge>,
    /// The shard's connect proxy, if one is configured.
    pub connect_proxy: Option<Rc<Proxy>>,
}

/// Back-off after a failed `accept`, doubling up to the maximum while failures go on (short: a
/// health probe waits in the backlog meanwhile).
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(5), Duration::from_millis(100));

/// Accepts sockets on one shard's listener, for ever (the caller aborts it).
pub async fn accept_loop(shard: Rc<ShardEdge>, listener: TcpListener) {
    let mut backoff = ACCEPT_BACKOFF.0;
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                backoff = ACCEPT_BACKOFF.0;
                // On a dual-stack listener IPv4 clients come as ::ffff:a.b.c.d: every rule
                // (loopback, per-IP caps, trusted proxies, logs) sees them as the IPv4 they are.
                admit(&shard, stream, peer.ip().to_canonical());
            }
            Err(e) => {
                // Typically EMFILE, out of file descriptors: make room by closing the longest
                // idle HTTP connection, and back off instead of spinning; the pending connections
                // wait in the backlog.
                let node = &shard.edge;
                let errors = &node.shared.counters.accept_errors;
                errors.fetch_add(1, Ordering::Relaxed);
                // (The evicted connection counts itself.)
                node.http.evict_oldest_idle();
                debug!(shard = shard.shard.index, error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
            }
        }
    }
}

/// Admits an accepted socket (closing the longest idle HTTP connection to make room when every
/// descriptor is taken), or answers 429/503 and closes it.
fn admit(shard: &Rc<ShardEdge>, stream: TcpStream, ip: IpAddr) {
    let _ = stream.set_nodelay(true);
    let node = &shard.edge;
    let config = &node.shared.config;
    if config.socket_send_buffer > 0 {
        let _ = SockRef::from(&stream).set_send_buffer_size(config.socket_send_buffer);
    }
    // A trusted proxy's socket counts against its client once the client is known.
    let counted_as = (!node.proxies.trusts(ip)).then_some(ip);
    let admission = &node.shared.admission;
    let admitted = match admission.admit_socket(counted_as) {
        Err(Refusal::ServerFull) if node.http.evict_oldest_idle() => {
            admission.admit_socket_replacing(counted_as)
        }
        admitted => admitted,
    };
    match admitted {
        Ok(()) => {
            tokio::task::spawn_local(serve(shard.clone(), stream, ip));
        }
        Err(refusal) => {
            node.shared.counters.admission_refused(refusal);
            tokio::task::spawn_local(refuse(shard.clone(), stream, refusal));
        }
    }
}

/// Serves one accepted, admitted TCP connection until it closes or is upgraded, and gives its
/// admission back unless a WebSocket connection took it over.
pub async fn serve(shard: Rc<ShardEdge>, tcp: TcpStream, peer: IpAddr) {
    let place = SocketPlace {
        shard: &shard,
        counted_as: Cell::new((!shard.edge.proxies.trusts(peer)).then_some(peer)),
        upgraded: Cell::new(false),
    };
    let deadline = tokio::time::Instant::now() + shard.edge.shared.config.handshake_timeout;
    // Idle from accept: a socket that sends nothing, or half a TLS handshake, is closed to make
    // room like any idle HTTP connection (else a few hundred of them lock every client out).
    let registered = shard.edge.http.register();
    let handshaken = tokio::select! {
        stream = handshake(&shard, tcp, &place, deadline) => stream,
        _ = registered.evict.notified() => {
            evicted(&shard.edge, peer);
            None
        }
    };
    if let Some(stream) = handshaken {
        serve_http(&shard, stream, peer, &place, &registered, deadline).await;
    }
}

/// An idle connection was closed to make room.
fn evicted(node: &Edge, peer: IpAddr) {
    node.shared
        .counters
        .http_evicted
        .fetch_add(1, Ordering::Relaxed);
    debug!(%peer, "idle HTTP connection closed to make room");
}

/// An accepted socket's place in the admission counts, given back when its task ends however
/// it ends (a panic included) unless a WebSocket connection took it over.
struct SocketPlace<'a> {
    shard: &'a ShardEdge,
    /// The address the place is counted against: a trusted proxy's socket has none until its
    /// client is known (see `Admission::claim_ip`).
    counted_as: Cell<Option<IpAddr>>,
    upgraded: Cell<bool>,
}

impl SocketPlace<'_> {
    /// Whether the socket must start with a PROXY protocol header: a trusted proxy's, with
    /// `proxy_protocol` on (its client not known yet).
    fn expects_proxy_header(&self) -> bool {
        self.shard.edge.shared.config.proxy_protocol && self.counted_as.get().is_none()
    }

    /// A PROXY header named `client`: the socket is the client's from here on, if the client
    /// has room under its cap (a refusal is counted).
    fn claim(&self, client: IpAddr) -> Result<(), Refusal> {
        let node = &self.shard.edge;
        node.shared
            .admission
            .claim_ip(client)
            .inspect_err(|&refusal| {
                node.shared.counters.admission_refused(refusal);
            })?;
        self.counted_as.set(Some(client));
        Ok(())
    }
}

impl Drop for SocketPlace<'_> {
    fn drop(&mut self) {
        if !self.upgraded.get() {
            let admission = &self.shard.edge.shared.admission;
            match self.counted_as.get() {
                Some(ip) => admission.release_socket(ip),
                None => admission.release_proxied_socket(),
            }
        }
    }
}

/// The TLS handshake, when the listener has TLS, by `deadline` (a PROXY header in front of it
/// read first, from a trusted proxy with `proxy_protocol`); `None` when it failed (counted).
/// Nothing is answered: an HTTP answer would need the handshake done.
async fn handshake(
    shard: &ShardEdge,
    mut tcp: TcpStream,
    place: &SocketPlace<'_>,
    deadline: tokio::time::Instant,
) -> Option<Stream> {
    let node = &shard.edge;
    let Some(tls) = &node.tls else {
        return Some(Stream::Plain(tcp));
    };
    let handshake = async {
        if place.expects_proxy_header() {
            match proxy_header::read_exactly(&mut tcp, node.shared.config.max_header_bytes).await {
                Ok(Some(client)) => place.claim(client).ok()?,
                // The proxy's own connection (a health check).
                Ok(None) => {}
                Err(proxy_header::ReadError::Invalid) => {
                    node.shared
                        .counters
                        .bad_requests
                        .fetch_add(1, Ordering::Relaxed);
                    debug!("no valid PROXY protocol header in front of TLS");
                    return None;
                }
                Err(proxy_header::ReadError::Io(_)) => return None,
            }
        }
        match crate::transport::tls::accept(tcp, tls.config.clone()).await {
            Ok(stream) => Some(Stream::Tls(Box::new(stream))),
            Err(e) => {
                node.shared
                    .counters
                    .tls_handshake_failures
                    .fetch_add(1, Ordering::Relaxed);
                debug!(error = %e, "TLS handshake failed");
                None
            }
        }
    };
    match tokio::time::timeout_at(deadline, handshake).await {
        Ok(stream) => stream,
        Err(_) => {
            node.shared
                .counters
                .handshake_timeouts
                .fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Whose a request is: the client's address (behind a trusted proxy, the one it forwarded),
/// and whether the socket is a proxy's not yet counted against any client.
#[derive(Clone, Copy)]
struct Origin {
    client: IpAddr,
    proxied: bool,
}

/// Serves HTTP on an accepted (and, with TLS, handshaken) socket; its first request head must
/// be complete by `deadline` (`handshake_timeout` from accept, shared with the TLS handshake).
async fn serve_http(
    shard: &Rc<ShardEdge>,
    mut stream: Stream,
    peer: IpAddr,
    place: &SocketPlace<'_>,
    registered: &Registered<'_>,
    deadline: tokio::time::Instant,
) {
    let (counted_as, upgraded) = (&place.counted_as, &place.upgraded);
    let node = &shard.edge;
    let config = &node.shared.config;
    // Over TLS the PROXY header came before the handshake.
    let proxy_header = node.tls.is_none() && place.expects_proxy_header();
    let evicted = || evicted(node, peer);
    let first = tokio::select! {
        head = head::read_first(
            &mut stream,
            shard.shard.read_buf_cell(),
            config.max_header_bytes,
            deadline,
            proxy_header,
        ) => head,
        _ = registered.evict.notified() => return evicted(),
    };
    // A head came: not idle while it is answered (the refusals below do not wait for eviction).
    registered.busy();
    let prefix = match first {
        Ok(head::First { bytes, source }) => {
            // The PROXY header named the client: the socket is the client's from here on.
            if let Some(client) = source
                && let Err(refusal) = place.claim(client)
            {
                let (status, reason) = refusal.status();
                let response = head::error_response(status, reason, refusal.message());
                return head::answer_and_close(stream, &response).await;
            }
            bytes
        }
        Err(HeadError::BadProxyHeader) => {
            node.shared
                .counters
                .bad_requests
                .fetch_add(1, Ordering::Relaxed);
            let message = "expected a PROXY protocol header (proxy_protocol)";
            let response = head::error_response(400, "Bad Request", message);
            return head::answer_and_close(stream, &response).await;
        }
        Err(HeadError::TooLarge) => {
            node.shared
                .counters
                .bad_requests
                .fetch_add(1, Ordering::Relaxed);
            let message = "request head too large (see max_header_bytes)";
            let response = head::error_response(431, "Request Header Fields Too Large", message);
            return head::answer_and_close(stream, &response).await;
        }
        Err(HeadError::Malformed) => {
            node.shared
                .counters
                .bad_requests
                .fetch_add(1, Ordering::Relaxed);
            let response = head::error_response(400, "Bad Request", "malformed HTTP request");
            return head::answer_and_close(stream, &response).await;
        }
        Err(HeadError::TimedOut) => {
            node.shared
                .counters
                .handshake_timeouts
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        Err(HeadError::Closed) => return,
    };
    let requests = Cell::new(0u32);
    let service = service_fn(|req: Request<Incoming>| {
        registered.busy();
        // Only the API reads bodies (and may wait for Redis); the rest answers at once.
        let routed = match origin(shard, &req, peer, counted_as.get()) {
            Err(problem) => {
                node.shared
                    .counters
                    .bad_requests
                    .fetch_add(1, Ordering::Relaxed);
                Either::Right(std::future::ready(error_response(
                    StatusCode::BAD_REQUEST,
                    problem,
                )))
            }
            Ok(_) if api::is_api(req.uri().path()) => Either::Left(api::serve(shard.clone(), req)),
            Ok(origin) => Either::Right(std::future::ready(route(shard, req, origin))),
        };
        let (registered, upgraded, requests) = (&registered, upgraded, &requests);
        async move {
            let mut response = routed.await;
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                // The socket now belongs to the WebSocket connection, admission and all.
                upgraded.set(true);
            } else {
                registered.idle();
                requests.set(requests.get() + 1);
                if requests.get() >= MAX_REQUESTS_PER_CONNECTION {
                    response
                        .headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                }
            }
            Ok::<_, Infallible>(response)
        }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        // Between requests: hyper's head timer starts when a keep-alive connection goes idle.
        .header_read_timeout(config.http_idle_timeout)
        .max_buf_size(config.max_header_bytes)
        .serve_connection(TokioIo::new(Prefixed::new(prefix, stream)), service)
        .with_upgrades();
    tokio::select! {
        result = connection => {
            if let Err(e) = result {
                debug!(error = %e, "http connection ended with an error");
            }
        }
        _ = registered.evict.notified() => evicted(),
        // However busy: a client that pipelines requests and never reads the answers is.
        _ = tokio::time::sleep(config.http_max_lifetime) => {
            node.shared.counters.http_expired.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Whose request `req` is, on a socket from `peer` counted against `counted_as`: a socket
/// counted against an address is that client's (directly, or named by a PROXY header); a
/// trusted proxy's socket carries requests of the clients its forwarding headers name.
fn origin(
    shard: &ShardEdge,
    req: &Request<Incoming>,
    peer: IpAddr,
    counted_as: Option<IpAddr>,
) -> Result<Origin, &'static str> {
    Ok(match counted_as {
        Some(client) => Origin {
            client,
            proxied: false,
        },
        None if shard.edge.shared.config.proxy_protocol => Origin {
            // A PROXY header that named nobody: the proxy's own request (a health check).
            client: peer,
            proxied: true,
        },
        None => Origin {
            client: shard.edge.proxies.client(req.headers(), peer)?,
            proxied: true,
        },
    })
}

/// Requests one plain HTTP connection serves; the last answer says `Connection: close`.
const MAX_REQUESTS_PER_CONNECTION: u32 = 100;

/// Answers a socket refused at accept, and closes it: after a moment of reading what the client
/// still sends (so the answer is not lost to a reset), while few refused sockets are lingering;
/// at once when descriptors are what is short, or many are.
pub async fn refuse(shard: Rc<ShardEdge>, stream: TcpStream, refusal: Refusal) {
    if shard.edge.tls.is_some() {
        // An answer would need a TLS handshake first: under the load that makes refusals, the
        // socket is just closed.
        return;
    }
    let (status, reason) = refusal.status();
    let response = head::error_response(status, reason, refusal.message());
    let admission = &shard.edge.shared.admission;
    if refusal != Refusal::ServerFull && admission.start_linger() {
        head::answer_and_close(Stream::Plain(stream), &response).await;
        admission.end_linger();
    } else {
        // One try, without waiting: the socket's buffer takes a short answer.
        let _ = stream.try_write(&response);
    }
}

fn route(shard: &Rc<ShardEdge>, req: Request<Incoming>, origin: Origin) -> Response<Body> {
    let path = req.uri().path();
    let config = &shard.edge.shared.config;
    match (req.method(), path) {
        (&Method::GET, "/") if fastwebsockets::upgrade::is_upgrade_request(&req) => {
            upgrade(shard, req, shard.edge.chat, origin)
        }
        (&Method::GET, "/") => static_file(TEST_PAGE, "text/html; charset=utf-8"),
        (&Method::GET, "/wsgate-client.js") => {
            static_file(CLIENT_SDK, "text/javascript; charset=utf-8")
        }
        (&Method::GET, "/admin") if config.api_key.is_some() => {
            let mut page = static_file(ADMIN_PAGE, "text/html; charset=utf-8");
            // It handles the API key: never inside another site's frame, never named to others,
            // no script but its own.
            let headers = page.headers_mut();
            headers.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
            headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
            headers.insert(
                CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(ADMIN_POLICY),
            );
            page
        }
        (&Method::GET, "/admin.js") if config.api_key.is_some() => {
            static_file(ADMIN_SCRIPT, "text/javascript; charset=utf-8")
        }
        (&Method::GET, "/ws") => upgrade(shard, req, shard.edge.chat, origin),
        (&Method::GET, "/echo") if config.echo_endpoint => {
            upgrade(shard, req, shard.edge.echo, origin)
        }
        (&Method::GET, "/healthz") => {
            // The counters only to who may read /metrics: they tell an attacker what works.
            let detail =
                config.healthz_detail && counters_refusal(shard, &req, origin.client).is_none();
            json(StatusCode::OK, &health(shard, detail))
        }
        (&Method::GET, "/metrics") => metrics(shard, &req, origin.client),
        (&Method::GET, "/dev/token") if shard.edge.auth.dev_mode() => dev_token(shard, req.uri()),
        (&Method::GET, "/readyz") if shard.edge.shared.is_draining() => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining: the server is shutting down",
        ),
        (&Method::GET, "/readyz") if !shard.edge.broker.is_ready() => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "broker unavailable: Redis cannot be reached (or its rooms are being caught up)",
        ),
        (&Method::GET, "/readyz") => json(StatusCode::OK, &serde_json::json!({"status": "ready"})),
        (_, "/" | "/wsgate-client.js" | "/ws" | "/healthz" | "/readyz" | "/metrics") => {
            error_response(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        (_, "/echo") if config.echo_endpoint => {
            error_response(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => error_response(StatusCode::NOT_FOUND, "not found"),
    }
}

/// A file built into the binary; revalidated at each load (a new version of the gateway serves a
/// new one).
fn static_file(body: &'static str, content_type: &'static str) -> Response<Body> {
    let mut res = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    let headers = res.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    res
}

/// `/healthz`: liveness, gauges, and (`detail`) the refusal counters.
fn health(shard: &ShardEdge, detail: bool) -> serde_json::Value {
    let node = &shard.edge;
    let mut health = serde_json::json!({
        "status": "ok",
        "connections": node.shared.connection_count(),
        "http_connections": node.http.len(),
        "sockets": node.shared.admission.sockets(),
        "queued_bytes": node.shared.queued_bytes(),
        "inbox_dropped_by_shard": node.shared.bus.dropped_by_shard(),
        "rooms": node.shared.rooms.room_count(),
        "shards": node.shared.shards(),
        "engine": node.shared.config.engine.name(),
        "broker": node.broker.health(),
    });
    if detail {
        health["refused"] = node.shared.counters.snapshot();
    }
    health
}

/// Who may read the counters (`/metrics`, `/healthz`'s detail): with `metrics_key`, callers that
/// send it; without, loopback callers only. The refusal for anyone else.
fn counters_refusal(
    shard: &ShardEdge,
    req: &Request<Incoming>,
    client: IpAddr,
) -> Option<Response<Body>> {
    match &shard.edge.shared.config.metrics_key {
        Some(key) if !api::authorized(req.headers(), key.expose()) => Some(unauthorized(
            serde_json::json!({ "error": "metrics: send Authorization: Bearer <metrics_key>" }),
        )),
        None if !client.is_loopback() => Some(error_response(
            StatusCode::FORBIDDEN,
            "metrics: only loopback callers are served without a metrics_key",
        )),
        _ => None,
    }
}

/// `/metrics`, for who may read the counters.
fn metrics(shard: &ShardEdge, req: &Request<Incoming>, client: IpAddr) -> Response<Body> {
    if let Some(refused) = counters_refusal(shard, req, client) {
        return refused;
    }
    let mut res = Response::new(Full::new(Bytes::from(metrics::render(&shard.edge))));
    res.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(metrics::CONTENT_TYPE),
    );
    res
}

/// `/api/stats`: what `/healthz` shows, with every counter whatever `healthz_detail` says.
fn stats(shard: &ShardEdge) -> serde_json::Value {
    health(shard, true)
}

/// Answers the upgrade and, once hyper lets go of the socket, runs the connection.
fn upgrade(
    shard: &Rc<ShardEdge>,
    req: Request<Incoming>,
    app: AppId,
    origin: Origin,
) -> Response<Body> {
    let peer = origin.client;
    let node = &shard.edge;
    if node.shared.is_draining() {
        node.shared
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
    if let Err(problem) = check_upgrade_request(&req) {
        node.shared
            .counters
            .bad_requests
            .fetch_add(1, Ordering::Relaxed);
        return error_response(StatusCode::BAD_REQUEST, problem);
    }
    // Before the (costlier) token check: the per-IP handshake rate protects it too.
    // A proxy's socket becomes its client's WebSocket: the client's connection cap applies.
    let admitted = node.shared.admission.admit_upgrade(peer).and_then(|()| {
        if origin.proxied {
            node.shared
                .admission
                .claim_ip(peer)
                .inspect_err(|_| node.shared.admission.release_upgrade())
        } else {
            Ok(())
        }
    });
    if let Err(refusal) = admitted {
        node.shared.counters.admission_refused(refusal);
        debug!(%peer, reason = refusal.message(), "upgrade refused");
        let status = StatusCode::from_u16(refusal.status().0).expect("a valid status");
        return error_response(status, refusal.message());
    }
    let response = upgrade_admitted(shard, req, app, peer);
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        node.shared.admission.release_upgrade();
        if origin.proxied {
            node.shared.admission.unclaim_ip(peer);
        }
    }
    response
}

/// What RFC 6455 §4.1 requires of an opening handshake beyond the upgrade headers: HTTP/1.1 or
/// later with one `Host`, one `Sec-WebSocket-Key` that is 16 bytes in base64, one version, at
/// most one `Origin`.
pub fn check_upgrade_request<B>(req: &Request<B>) -> Result<(), &'static str> {
    if req.version() < Version::HTTP_11 {
        return Err("WebSocket upgrades need HTTP/1.1");
    }
    let headers = req.headers();
    let count = |name: &HeaderName| headers.get_all(name).iter().count();
    if count(&HOST) != 1 {
        return Err("an upgrade needs exactly one Host header");
    }
    if count(&SEC_WEBSOCKET_KEY) > 1 || count(&SEC_WEBSOCKET_VERSION) > 1 || count(&ORIGIN) > 1 {
        return Err("duplicate Sec-WebSocket-Key, Sec-WebSocket-Version or Origin header");
    }
    let key = headers
        .get(SEC_WEBSOCKET_KEY)
        .ok_or("missing Sec-WebSocket-Key header")?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(key.as_bytes());
    if !decoded.is_ok_and(|k| k.len() == 16) {
        return Err("Sec-WebSocket-Key must be 16 bytes in base64");
    }
    Ok(())
}

/// The upgrade of an admitted connection: the place is the connection's from here on, given back
/// when it ends (or here, when the upgrade does not happen).
fn upgrade_admitted(
    shard: &Rc<ShardEdge>,
    mut req: Request<Incoming>,
    app: AppId,
    peer: IpAddr,
) -> Response<Body> {
    let node = &shard.edge;
    let origin_allowed = req.headers().get(ORIGIN).is_none_or(|origin| {
        let allowed = &node.shared.config.allowed_origins;
        allowed.is_empty() || allowed.iter().any(|a| a.as_bytes() == origin.as_bytes())
    });
    let presented = token::presented(&req);
    // `wsgate`, when the client offered it (never the `bearer.` entry). Such a client (the SDK,
    // the test page: browsers, which cannot read an upgrade's refusal) is told why in a close
    // frame; others, or when too many refusals are closing already, get the HTTP status.
    let protocol = presented.protocol.clone();
    if !origin_allowed {
        drop(presented);
        node.shared
            .counters
            .origin_refused
            .fetch_add(1, Ordering::Relaxed);
        debug!("upgrade refused (403): origin not allowed");
        let reason = "origin not allowed".to_owned();
        return protocol
            .and_then(|p| refuse_upgraded(shard, req, peer, p, CloseCode::FORBIDDEN, reason))
            .unwrap_or_else(|| error_response(StatusCode::FORBIDDEN, "origin not allowed"));
    }
    // Checked once the origin is (the costlier check last).
    let authenticated = match presented.token.as_deref() {
        None if node.shared.config.allow_anonymous => Ok(node.shared.anonymous.clone()),
        token => node.auth.authenticate(token).map(Arc::new),
    };
    drop(presented);
    let identity = match authenticated {
        Ok(identity) => identity,
        Err(e) => {
            node.shared.counters.auth_refused(e);
            // The reason only: the token itself is never logged.
            debug!(reason = e.code(), "upgrade refused (401)");
            let reason = format!("{}: {}", e.code(), e.message());
            let refused = protocol.and_then(|p| {
                refuse_upgraded(shard, req, peer, p, CloseCode::UNAUTHORIZED, reason)
            });
            return refused.unwrap_or_else(|| {
                unauthorized(serde_json::json!({ "error": e.message(), "reason": e.code() }))
            });
        }
    };
    // What the connect proxy is told, while the request is at hand.
    let connect = shard.connect_proxy.as_ref().map(|proxy| {
        let headers = forwarded_to_backend(&req, &node.shared.config.proxy_headers);
        let mut event = Event::new(ProxyKind::Connect, &node.shared.id, &identity, peer);
        event.headers = headers.as_ref();
        (proxy.clone(), event.to_json())
    });
    let agreement = match node.shared.config.compression {
        Compression::On => {
            let offers = req.headers().get_all(SEC_WEBSOCKET_EXTENSIONS);
            deflate::negotiate(offers.iter().map(HeaderValue::as_bytes))
        }
        Compression::Off => None,
    };
    let (mut response, upgrading) = match start_upgrade(node, &mut req, protocol) {
        Ok(started) => started,
        Err(refused) => return *refused,
    };
    let deflate = match agreement {
        Some(agreement) => {
            let value = HeaderValue::from_str(&agreement.response).expect("a header value");
            response
                .headers_mut()
                .insert(SEC_WEBSOCKET_EXTENSIONS, value);
            agreement.deflate
        }
        None => Deflate::OFF,
    };
    let shard = shard.clone();
    // Waits for hyper to finish the handshake, then hands the socket to the shard's loop: the
    // connection has no task of its own.
    tokio::task::spawn_local(async move {
        let Some(parts) = upgraded(upgrading).await else {
            return give_back(&shard, peer);
        };
        let (identity, data) = match connect {
            None => (identity, None),
            Some((proxy, event)) => match proxy.ask(event).await {
                Ok(allowed) => (allowed.name(identity), allowed.data),
                Err(refused) => {
                    let (code, reason) = refused_connection(refused);
                    let close = frame::encode_close(code, &reason);
                    let timeout = shard.edge.shared.config.close_timeout;
                    close_unadopted(parts.io.into_inner(), &close, timeout).await;
                    return give_back(&shard, peer);
                }
            },
        };
        let (stream, unread_prefix) = parts.io.into_inner().into_parts();
        // What hyper read past the handshake, then what it never read of our prefix.
        let mut preread = BytesMut::from(parts.read_buf);
        preread.extend_from_slice(&unread_prefix);
        let newcomer = Newcomer {
            app,
            identity,
            peer,
            data: data.as_deref(),
            deflate,
        };
        let adopted = shard
            .event_loop
            .adopt(&shard.shard, stream, &preread, newcomer);
        if let Err(e) = adopted {
            debug!(error = %e, "cannot move an upgraded socket to the event loop");
            give_back(&shard, peer);
        }
    });
    response
}

/// hyper's answer to an upgrade (with `protocol`, the subprotocol chosen), and the future of the
/// upgraded socket; an upgrade that cannot be made is answered with its status.
fn start_upgrade(
    node: &Edge,
    req: &mut Request<Incoming>,
    protocol: Option<HeaderValue>,
) -> Result<(Response<Body>, UpgradeFut), Box<Response<Body>>> {
    let (mut response, upgrading) = match fastwebsockets::upgrade::upgrade(req) {
        Ok(pair) => pair,
        Err(fastwebsockets::WebSocketError::InvalidSecWebsocketVersion) => {
            node.shared
                .counters
                .bad_requests
                .fetch_add(1, Ordering::Relaxed);
            let mut res = error_response(
                StatusCode::UPGRADE_REQUIRED,
                "unsupported WebSocket version (need 13)",
            );
            res.headers_mut()
                .insert("sec-websocket-version", HeaderValue::from_static("13"));
            return Err(Box::new(res));
        }
        Err(e) => {
            return Err(Box::new(error_response(
                StatusCode::BAD_REQUEST,
                &e.to_string(),
            )));
        }
    };
    if let Some(protocol) = protocol {
        response
            .headers_mut()
            .insert(SEC_WEBSOCKET_PROTOCOL, protocol);
    }
    Ok((response.map(|_| Body::default()), upgrading))
}

/// The socket hyper upgraded, with what it read past the handshake, once the handshake is done
/// (none: the client went away first).
async fn upgraded(upgrading: UpgradeFut) -> Option<hyper::upgrade::Parts<TokioIo<Prefixed>>> {
    let upgraded = match upgrading.await {
        Ok(ws) => ws.into_inner().into_inner(),
        Err(e) => {
            debug!(error = %e, "upgrade did not complete");
            return None;
        }
    };
    let parts = upgraded.downcast::<TokioIo<Prefixed>>();
    if parts.is_err() {
        error!("upgraded connection is not the stream it was served on");
    }
    parts.ok()
}

/// Upgrades a refused connection only to close it with `code` and `reason`: for clients that
/// offered the `wsgate` subprotocol, which can read a close frame but not an HTTP refusal. The
/// refusal was counted. It keeps no WebSocket place (given back at once), and takes one of the
/// few places for refused sockets to linger, for at most [`REFUSAL_CLOSE_TIMEOUT`]: none left,
/// and `None` (the caller answers with the HTTP status).
fn refuse_upgraded(
    shard: &Rc<ShardEdge>,
    mut req: Request<Incoming>,
    peer: IpAddr,
    protocol: HeaderValue,
    code: CloseCode,
    reason: String,
) -> Option<Response<Body>> {
    let node = &shard.edge;
    let admission = &node.shared.admission;
    if !admission.start_linger() {
        return None;
    }
    let (response, upgrading) = match start_upgrade(node, &mut req, Some(protocol)) {
        Ok(started) => started,
        Err(refused) => {
            admission.end_linger();
            return Some(*refused);
        }
    };
    // A 101: the caller leaves the upgrade's place to the connection, which a refusal does not
    // need.
    admission.release_upgrade();
    let shard = shard.clone();
    tokio::task::spawn_local(async move {
        if let Some(parts) = upgraded(upgrading).await {
            let close = frame::encode_close(code, &reason);
            let timeout = shard.edge.shared.config.close_timeout;
            let timeout = timeout.min(REFUSAL_CLOSE_TIMEOUT);
            close_unadopted(parts.io.into_inner(), &close, timeout).await;
        }
        let admission = &shard.edge.shared.admission;
        admission.release_socket(peer);
        admission.end_linger();
    });
    Some(response)
}

/// The headers of `req` named in `names` (`proxy_headers`), for the connect proxy.
fn forwarded_to_backend<B>(
    req: &Request<B>,
    names: &[String],
) -> Option<serde_json::Map<String, serde_json::Value>> {
    if names.is_empty() {
        return None;
    }
    let headers = names.iter().filter_map(|name| {
        let value = req.headers().get(name.as_str())?.to_str().ok()?;
        Some((name.to_ascii_lowercase(), value.into()))
    });
    Some(headers.collect())
}

/// The close a connection the connect proxy did not allow gets.
fn refused_connection(refusal: proxy::Refusal) -> (CloseCode, String) {
    match refusal {
        proxy::Refusal::Deny { code, message } => {
            let code = code
                .filter(|c| (4000..=4999).contains(c))
                .unwrap_or(DEFAULT_DENY_CODE);
            (CloseCode(code), message)
        }
        proxy::Refusal::Disconnect { code, reason } => (CloseCode(code), reason),
        proxy::Refusal::Unavailable => (
            CloseCode::TRY_AGAIN_LATER,
            "backend unavailable: try again later".into(),
        ),
    }
}

/// Sends `close` on an upgraded connection that never joined a shard, and ends it as a close
/// handshake would: our side done, then what the client sends read and dropped until it hangs
/// up (so no reset destroys our close frame before the client read it), within `timeout`.
async fn close_unadopted(mut io: Prefixed, close: &[u8], timeout: Duration) {
    let closing = async {
        io.write_all(close).await?;
        io.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut drained = 0;
        while drained < CLOSE_DRAIN_BYTES {
            match io.read(&mut sink).await? {
                0 => break,
                n => drained += n,
            }
        }
        io::Result::Ok(())
    };
    let _ = tokio::time::timeout(timeout, closing).await;
}

/// What a refused connection may still send us before we stop reading it.
const CLOSE_DRAIN_BYTES: usize = 64 * 1024;

/// Gives back the admission of an upgrade that did not happen.
fn give_back(shard: &ShardEdge, peer: IpAddr) {
    shard.edge.shared.admission.release_upgrade();
    shard.edge.shared.admission.release_socket(peer);
}

/// Dev mode only: a one-hour token for `?user=NAME`, so the test page works without set-up.
fn dev_token(shard: &ShardEdge, uri: &hyper::Uri) -> Response<Body> {
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
    match shard.edge.auth.mint(&claims) {
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

/// 401 with `body`, asking for a bearer token.
fn unauthorized(body: serde_json::Value) -> Response<Body> {
    let mut res = json(StatusCode::UNAUTHORIZED, &body);
    res.headers_mut()
        .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    res
}

fn error_response(status: StatusCode, message: &str) -> Response<Body> {
    json(status, &serde_json::json!({ "error": message }))
}
