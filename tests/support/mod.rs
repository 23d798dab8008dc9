//! Shared test harness: a real gateway on an ephemeral port, real sockets, and two independent
//! clients — tokio-tungstenite for the protocol, and a raw-bytes client for frames that a
//! well-behaved library refuses to send.
#![allow(dead_code)] // each test binary uses its own part of the harness

pub mod backend;
mod client_frame;
pub mod cluster;
pub mod flood;
pub mod inflate;
pub mod nginx;
pub mod pki;
pub mod process;
pub mod redis_server;
pub use client_frame::client_frame;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use wsgate::{Config, Gateway};

/// The engine the gateways under test run on: `WSGATE_ENGINE` (CI runs the suite once per
/// engine), else `auto`.
pub fn engine_under_test() -> wsgate::config::Engine {
    match std::env::var("WSGATE_ENGINE").as_deref() {
        Ok("epoll") => wsgate::config::Engine::Epoll,
        Ok("io_uring") => wsgate::config::Engine::IoUring,
        Ok("auto") | Err(_) => wsgate::config::Engine::Auto,
        Ok(other) => panic!("WSGATE_ENGINE={other}: expected auto, io_uring or epoll"),
    }
}

/// The HS256 secret test gateways verify tokens with.
pub const TEST_SECRET: &str = "wsgate-test-secret-0123456789";

/// An HS256 token for `user` signed with [`TEST_SECRET`], valid for an hour.
pub fn token_for(user: &str) -> String {
    let claims = wsgate::auth::claims_for(user, None, Duration::from_secs(3600));
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(TEST_SECRET.as_bytes()),
    )
    .unwrap()
}

/// How long a test waits for something that should happen.
pub const PATIENCE: Duration = Duration::from_secs(5);
/// How long a test waits to be sure something does not happen.
pub const QUIET: Duration = Duration::from_millis(300);

pub struct TestGateway {
    gateway: Option<Gateway>,
    pub addr: SocketAddr,
}

impl TestGateway {
    pub fn start(shards: usize) -> Self {
        Self::start_with(|_| {}, shards)
    }

    /// Starts a gateway on 127.0.0.1:0 with `shards` shards and the given config changes.
    pub fn start_with(customize: impl FnOnce(&mut Config), shards: usize) -> Self {
        let mut config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            shards,
            engine: engine_under_test(),
            log: "warn".into(),
            jwt_secret: Some(TEST_SECRET.into()),
            // Tests of the protocol connect without tokens; tests/auth.rs turns this off.
            allow_anonymous: true,
            // Tests open connections and send messages as fast as they can; tests/limits.rs
            // sets real limits.
            max_handshakes_per_ip: 1e6,
            rate_limit_messages: 1e6,
            rate_limit_burst: 1_000_000,
            rate_limit_bytes: 1 << 40,
            rate_limit_burst_bytes: Some(1 << 40),
            rate_limit_frames: 1e6,
            rate_limit_frame_burst: 1_000_000,
            room_creation_rate: 1e6,
            room_creation_burst: 1_000_000,
            ..Config::default()
        };
        customize(&mut config);
        let gateway = wsgate::start(config).expect("gateway starts");
        let addr = gateway.local_addr();
        TestGateway {
            gateway: Some(gateway),
            addr,
        }
    }

    pub fn gateway(&self) -> &Gateway {
        self.gateway.as_ref().unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// A chat client, past its `connected` greeting.
    pub async fn client(&self) -> Client {
        Client::connect(&self.url("/ws")).await
    }

    /// A chat client with a token for `user`, past its greeting.
    pub async fn client_as(&self, user: &str) -> Client {
        Client::connect(&format!("{}?token={}", self.url("/ws"), token_for(user))).await
    }

    /// A chat client whose connection landed on `shard` (the kernel picks the shard; retry).
    pub async fn client_on_shard(&self, shard: u16) -> Client {
        for _ in 0..200 {
            let client = self.client().await;
            if client.shard() == shard {
                return client;
            }
        }
        panic!("no connection landed on shard {shard} in 200 tries");
    }

    /// Polls until the gateway counts `n` open connections.
    pub async fn wait_for_connections(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while self.gateway().connection_count() != n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "expected {n} connections, have {}",
                self.gateway().connection_count()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl TestGateway {
    /// Starts a graceful shutdown and waits for it to finish (off the async runtime: joining
    /// the shard threads blocks).
    pub async fn stop(&mut self) {
        let gateway = self.gateway.take().expect("gateway running");
        gateway.shutdown();
        tokio::task::spawn_blocking(move || gateway.join())
            .await
            .unwrap();
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(gateway) = self.gateway.take() {
            gateway.shutdown();
            gateway.join();
        }
    }
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A chat client over tokio-tungstenite.
pub struct Client {
    pub ws: Ws,
    pub id: String,
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("connects");
        Client::from_stream(ws).await
    }

    /// A chat client on an upgraded connection, past its `connected` greeting.
    pub async fn from_stream(ws: Ws) -> Client {
        let mut client = Client {
            ws,
            id: String::new(),
        };
        let hello = client.recv().await;
        assert_eq!(hello["type"], "connected", "{hello}");
        assert!(hello["timestamp"].as_u64().unwrap() > 1_600_000_000_000);
        client.id = hello["clientId"]
            .as_str()
            .expect("clientId is a string")
            .to_owned();
        client
    }

    /// The shard this client is on, read from its id (`node.shard.key.generation`).
    pub fn shard(&self) -> u16 {
        let shard = self.id.split('.').nth(1).unwrap();
        u16::from_str_radix(shard, 16).unwrap()
    }

    pub async fn send(&mut self, kind: &str, payload: Value) {
        self.send_text(json!({"type": kind, "payload": payload}).to_string())
            .await;
    }

    pub async fn send_text(&mut self, text: impl Into<String>) {
        self.ws
            .send(Message::text(text.into()))
            .await
            .expect("send");
    }

    /// The next JSON message; fails the test after [`PATIENCE`].
    pub async fn recv(&mut self) -> Value {
        self.recv_within(PATIENCE).await
    }

    /// The next message, which must be of `kind` and come within `patience`.
    pub async fn expect_within(&mut self, kind: &str, patience: Duration) -> Value {
        let msg = self.recv_within(patience).await;
        assert_eq!(msg["type"], kind, "{msg}");
        msg
    }

    async fn recv_within(&mut self, patience: Duration) -> Value {
        loop {
            let msg = tokio::time::timeout(patience, self.ws.next())
                .await
                .expect("a message within the patience window")
                .expect("stream open")
                .expect("no error");
            match msg {
                Message::Text(text) => return serde_json::from_str(&text).expect("JSON"),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected a text message, got {other:?}"),
            }
        }
    }

    /// The next message, which must be of `kind`.
    pub async fn expect(&mut self, kind: &str) -> Value {
        let msg = self.recv().await;
        assert_eq!(msg["type"], kind, "{msg}");
        msg
    }

    pub async fn expect_error(&mut self, error: &str) {
        let msg = self.recv().await;
        assert_eq!(msg, json!({"type": "error", "error": error}));
    }

    /// Asserts nothing arrives for a while. The positive control: the connection then answers an
    /// echo, and that answer is the next message — so this check could have seen a stray one.
    pub async fn expect_silence(&mut self) {
        if let Ok(msg) = tokio::time::timeout(QUIET, self.ws.next()).await {
            panic!("expected silence, got {msg:?}");
        }
        self.send("echo", json!("silence-check")).await;
        let next = self.recv().await;
        assert_eq!(
            next,
            json!({"type": "echo", "payload": "silence-check"}),
            "expected nothing before the echo"
        );
    }

    pub async fn join(&mut self, room: &str) -> u64 {
        self.joined(room).await["members"].as_u64().unwrap()
    }

    /// Joins `room`; returns the stream epoch of its `room_joined`.
    pub async fn join_room_epoch(&mut self, room: &str) -> String {
        self.joined(room).await["epoch"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn joined(&mut self, room: &str) -> Value {
        self.send("join_room", json!({"room": room})).await;
        let joined = self.expect("room_joined").await;
        assert_eq!(joined["room"], room);
        joined
    }

    /// Joins `room`, with `since` (offset, epoch) when given; returns its `room_joined`.
    pub async fn join_since(&mut self, room: &str, since: Option<(u64, &str)>) -> Value {
        let mut payload = json!({"room": room});
        if let Some((offset, epoch)) = since {
            payload["since"] = json!({"offset": offset, "epoch": epoch});
        }
        self.send("join_room", payload).await;
        self.expect("room_joined").await
    }

    /// Sends a chat message to `room`.
    pub async fn chat(&mut self, room: &str, message: &str) {
        self.send("chat_message", json!({"room": room, "message": message}))
            .await;
    }

    /// The next message that is not a presence notice.
    pub async fn next_not_presence(&mut self) -> Value {
        loop {
            let msg = self.recv().await;
            if !matches!(msg["type"].as_str(), Some("user_joined" | "user_left")) {
                return msg;
            }
        }
    }

    /// A chat message's `ack` and the message itself, in whichever order they come (with Redis
    /// the ack may come first), past presence notices.
    pub async fn ack_and_chat(&mut self) -> (Value, Value) {
        let (mut ack, mut message) = (None, None);
        while ack.is_none() || message.is_none() {
            let got = self.next_not_presence().await;
            match got["type"].as_str() {
                Some("ack") if ack.is_none() => ack = Some(got),
                Some("chat_message") if message.is_none() => message = Some(got),
                _ => panic!("unexpected {got}"),
            }
        }
        (ack.expect("an ack"), message.expect("the message"))
    }

    /// The next `n` chat messages as (offset, message), skipping presence notices.
    pub async fn chats(&mut self, n: usize) -> Vec<(u64, String)> {
        let mut got = Vec::new();
        while got.len() < n {
            let msg = self.next_not_presence().await;
            assert_eq!(msg["type"], "chat_message", "unexpected {msg}");
            got.push((
                msg["offset"].as_u64().expect("an offset"),
                msg["message"].as_str().unwrap().to_owned(),
            ));
        }
        got
    }

    /// Reads until the server's close frame; returns it.
    pub async fn expect_close(&mut self) -> Option<CloseFrame> {
        loop {
            let msg = tokio::time::timeout(PATIENCE, self.ws.next())
                .await
                .expect("close within the patience window");
            match msg {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }
}

/// A client that writes raw bytes after a hand-made handshake: it can send what RFC 6455 forbids.
pub struct RawClient {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl RawClient {
    pub async fn connect(addr: SocketAddr, path: &str) -> RawClient {
        Self::connect_on(TcpStream::connect(addr).await.unwrap(), path).await
    }

    /// A raw client whose receive buffer is small: the kernel soaks up little of what the
    /// gateway sends it, so what it does not read piles up in the gateway, as behind a slow link.
    pub async fn connect_with_small_window(addr: SocketAddr, path: &str) -> RawClient {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        Self::connect_on(socket.connect(addr).await.unwrap(), path).await
    }

    async fn connect_on(stream: TcpStream, path: &str) -> RawClient {
        Self::upgrade(stream, path, "").await.0
    }

    /// A raw client whose upgrade request carries `extra_headers` (each ending in CRLF); with the
    /// head of the 101 answer.
    pub async fn connect_with_headers(
        addr: SocketAddr,
        path: &str,
        extra_headers: &str,
    ) -> (RawClient, String) {
        Self::upgrade(TcpStream::connect(addr).await.unwrap(), path, extra_headers).await
    }

    async fn upgrade(mut stream: TcpStream, path: &str, extra: &str) -> (RawClient, String) {
        let addr = stream.peer_addr().unwrap();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        Self::read_handshake(stream).await
    }

    /// Reads the handshake response of a request already written to `stream`.
    pub async fn from_stream_after_handshake(stream: TcpStream) -> RawClient {
        Self::read_handshake(stream).await.0
    }

    async fn read_handshake(stream: TcpStream) -> (RawClient, String) {
        let mut raw = RawClient {
            stream,
            buf: Vec::new(),
        };
        let head = raw.read_until_blank_line().await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        // RFC 6455's own example key and accept value.
        assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
        (raw, head)
    }

    async fn read_until_blank_line(&mut self) -> String {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.buf.drain(..end + 4);
                return head;
            }
            self.fill().await;
        }
    }

    async fn fill(&mut self) {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(PATIENCE, self.stream.read(&mut chunk))
            .await
            .expect("data within the patience window")
            .unwrap();
        assert!(n > 0, "connection closed while waiting for data");
        self.buf.extend_from_slice(&chunk[..n]);
    }

    /// Sends one frame; `masked: false` breaks the rule that client frames are masked.
    pub async fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8], masked: bool) {
        self.stream
            .write_all(&raw_frame(fin, opcode, payload, masked))
            .await
            .unwrap();
    }

    /// Reads one server frame: (fin, opcode, payload). Server frames must be unmasked.
    pub async fn read_frame(&mut self) -> (bool, u8, Vec<u8>) {
        let (first, payload) = self.read_frame_head_byte().await;
        (first & 0x80 != 0, first & 0x0F, payload)
    }

    /// Reads one server frame: its first header byte (FIN, RSV bits, opcode) and its payload.
    pub async fn read_frame_head_byte(&mut self) -> (u8, Vec<u8>) {
        loop {
            if self.buf.len() >= 2 {
                assert_eq!(self.buf[1] & 0x80, 0, "server frames are never masked");
                let (len, start) = match self.buf[1] & 0x7F {
                    126 if self.buf.len() >= 4 => {
                        (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
                    }
                    127 if self.buf.len() >= 10 => (
                        u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize,
                        10,
                    ),
                    126 | 127 => (usize::MAX, 0),
                    n => (n as usize, 2),
                };
                if len != usize::MAX && self.buf.len() >= start + len {
                    let first = self.buf[0];
                    let payload = self.buf[start..start + len].to_vec();
                    self.buf.drain(..start + len);
                    return (first, payload);
                }
            }
            self.fill().await;
        }
    }

    /// Reads frames until a close frame; returns its code.
    pub async fn read_close_code(&mut self) -> u16 {
        loop {
            let (_, opcode, payload) = self.read_frame().await;
            if opcode == 0x8 {
                assert!(payload.len() >= 2, "close frame carries a code");
                return u16::from_be_bytes([payload[0], payload[1]]);
            }
        }
    }

    /// Waits for the server to close the TCP connection.
    pub async fn expect_eof(&mut self) {
        let mut chunk = [0u8; 1024];
        loop {
            let n = tokio::time::timeout(PATIENCE, self.stream.read(&mut chunk))
                .await
                .expect("server closes the connection")
                .unwrap_or(0);
            if n == 0 {
                return;
            }
        }
    }
}

/// Encodes a client frame (masked unless told otherwise).
pub fn raw_frame(fin: bool, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    client_frame(
        fin,
        opcode,
        payload,
        masked.then_some([0x12, 0x34, 0x56, 0x78]),
    )
}

/// A plain HTTP/1.1 GET; returns (status, headers, body). A `101 Switching Protocols` answer
/// returns at once with an empty body (the connection stays open for WebSocket frames).
pub async fn http_get(addr: SocketAddr, path: &str, extra_headers: &str) -> (u16, String, String) {
    http_get_from([127, 0, 0, 1], addr, path, extra_headers).await
}

/// [`http_get`] from the loopback address `source` (per-address limits see another client).
pub async fn http_get_from(
    source: [u8; 4],
    addr: SocketAddr,
    path: &str,
    extra_headers: &str,
) -> (u16, String, String) {
    http_request_from(source, addr, "GET", path, extra_headers, b"").await
}

/// The value of the `/metrics` sample of `gw` that starts with `sample` (its name and labels).
pub async fn metric(gw: &TestGateway, sample: &str) -> u64 {
    let (_, _, body) = http_get(gw.addr, "/metrics", "").await;
    let line = body
        .lines()
        .find(|line| line.starts_with(&format!("{sample} ")))
        .unwrap_or_else(|| panic!("no sample {sample} in\n{body}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// The server API key of tests that turn the API on.
pub const API_KEY: &str = "backend-key-0123456789";

/// Calls the server API with [`API_KEY`] (a null `body` sends none); returns (status, body as
/// JSON).
pub async fn api(addr: SocketAddr, method: &str, path: &str, body: Value) -> (u16, Value) {
    let body = if body.is_null() {
        Vec::new()
    } else {
        body.to_string().into_bytes()
    };
    let auth = format!("Authorization: Bearer {API_KEY}\r\n");
    let (status, _, answer) = http_request(addr, method, path, &auth, &body).await;
    let answer = serde_json::from_str(&answer).unwrap_or_else(|_| panic!("JSON: {answer}"));
    (status, answer)
}

/// A plain HTTP/1.1 request with `body` (and its `Content-Length`, when not empty); returns
/// (status, headers, body).
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    extra_headers: &str,
    body: &[u8],
) -> (u16, String, String) {
    http_request_from([127, 0, 0, 1], addr, method, path, extra_headers, body).await
}

async fn http_request_from(
    source: [u8; 4],
    addr: SocketAddr,
    method: &str,
    path: &str,
    extra_headers: &str,
    body: &[u8],
) -> (u16, String, String) {
    let mut stream = connect_from(source, addr).await;
    let length = if body.is_empty() {
        String::new()
    } else {
        format!("Content-Length: {}\r\n", body.len())
    };
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{length}{extra_headers}\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk).await.unwrap();
            response.extend_from_slice(&chunk[..n]);
            let switching = response.starts_with(b"HTTP/1.1 101")
                && response.windows(4).any(|w| w == b"\r\n\r\n");
            if n == 0 || switching {
                return;
            }
        }
    })
    .await
    .expect("response within the patience window");
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("a complete response");
    let status = head[9..12].parse().unwrap();
    (status, head.to_owned(), body.to_owned())
}

/// A TCP connection to `addr` from the loopback address `source`.
pub async fn connect_from(source: [u8; 4], addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((source, 0))).unwrap();
    socket.connect(addr).await.unwrap()
}

/// A WebSocket to `/ws` opened from `source` with `headers` (e.g. `X-Forwarded-For`), or the
/// HTTP status it was refused with.
pub async fn websocket_from(
    source: [u8; 4],
    addr: SocketAddr,
    headers: &[(&'static str, &str)],
) -> Result<Ws, u16> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://{addr}/ws").into_client_request().unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(*name, value.parse().unwrap());
    }
    let stream = connect_from(source, addr).await;
    match tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream)).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(e) => panic!("{e}"),
    }
}

/// A PROXY protocol v2 header naming `source` (TCP over IPv4, to 10.0.0.1:8080).
pub fn proxy_v2(source: [u8; 4]) -> Vec<u8> {
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.extend_from_slice(&[0x21, 0x11, 0, 12]);
    header.extend_from_slice(&source);
    header.extend_from_slice(&[10, 0, 0, 1, 0x30, 0x39, 0x1F, 0x90]);
    header
}

/// The user ids of a page of users (a `presence` reply, `/api/rooms/{room}`), in order.
/// The `(offset, message)` of each message in an `/api/history/{room}` answer, in its order.
pub fn history_texts(answer: &Value) -> Vec<(u64, &str)> {
    answer["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| {
            (
                m["offset"].as_u64().unwrap(),
                m["message"].as_str().unwrap(),
            )
        })
        .collect()
}

pub fn user_ids(page: &Value) -> Vec<&str> {
    page["users"]
        .as_array()
        .expect("a list of users")
        .iter()
        .map(|u| u["userId"].as_str().unwrap())
        .collect()
}
