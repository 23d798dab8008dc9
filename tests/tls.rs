//! TLS over real sockets with a real TLS client (tokio-rustls, and tokio-tungstenite over it): a
//! CA made by the test signs the gateway's certificate; wss:// chat and echo, https:// probes,
//! reloads that leave open connections alone, and what is not TLS.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rcgen::KeyPair;
use rustls::RootCertStore;
use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject;
use serde_json::{Value, json};
use support::pki::{Pki, pem_files, upgrade};
use support::{PATIENCE, TestGateway};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

fn gateway(files: &(PathBuf, PathBuf)) -> TestGateway {
    gateway_with(files, 2, |_| {})
}

/// A gateway serving TLS with `files`, on `shards` shards, with `customize`'s settings.
fn gateway_with(
    files: &(PathBuf, PathBuf),
    shards: usize,
    customize: impl FnOnce(&mut wsgate::Config),
) -> TestGateway {
    let (cert, key) = files.clone();
    TestGateway::start_with(
        move |c| {
            c.tls_cert_file = Some(cert);
            c.tls_key_file = Some(key);
            customize(c);
        },
        shards,
    )
}

async fn next_json<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> Value
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        let msg = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("a message in time")
            .unwrap()
            .unwrap();
        if let Message::Text(text) = msg {
            return serde_json::from_str(&text).unwrap();
        }
    }
}

/// GET over TLS; the status code.
async fn https_get(pki: &Pki, addr: SocketAddr, path: &str) -> u16 {
    https_request(pki, addr, path).await.0
}

/// GET over TLS; the status code and the body.
async fn https_request(pki: &Pki, addr: SocketAddr, path: &str) -> (u16, String) {
    let mut tls = pki.connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, tls.read_to_end(&mut response)).await;
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response[9..12].parse().unwrap();
    let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    (status, body.to_owned())
}

#[tokio::test]
async fn chat_and_echo_work_over_wss_and_probes_over_https() {
    let files = pem_files("serve");
    let pki = Pki::issue(&files);
    let gw = gateway(&files);
    let mut alice = pki.websocket(gw.addr, "/ws").await;
    assert_eq!(next_json(&mut alice).await["type"], "connected");
    let mut bob = pki.websocket(gw.addr, "/ws").await;
    next_json(&mut bob).await;
    for ws in [&mut alice, &mut bob] {
        let join = json!({"type": "join_room", "payload": {"room": "tls"}});
        ws.send(Message::text(join.to_string())).await.unwrap();
        assert_eq!(next_json(ws).await["type"], "room_joined");
    }
    let chat = json!({"type": "chat_message", "payload": {"room": "tls", "message": "hi"}});
    alice.send(Message::text(chat.to_string())).await.unwrap();
    for ws in [&mut alice, &mut bob] {
        let mut msg = next_json(ws).await;
        while msg["type"] == "user_joined" {
            msg = next_json(ws).await;
        }
        assert_eq!(
            (msg["type"].as_str(), msg["message"].as_str()),
            (Some("chat_message"), Some("hi"))
        );
    }
    // A message of many TLS records, both ways.
    let mut echo = pki.websocket(gw.addr, "/echo").await;
    let big: Vec<u8> = (0..60_000u32).map(|i| i as u8).collect();
    echo.send(Message::binary(big.clone())).await.unwrap();
    let back = tokio::time::timeout(PATIENCE, echo.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(back.into_data().as_ref(), big.as_slice());
    assert_eq!(https_get(&pki, gw.addr, "/healthz").await, 200);
    assert_eq!(https_get(&pki, gw.addr, "/readyz").await, 200);
}

#[tokio::test]
async fn what_is_not_tls_is_closed_and_counted() {
    let files = pem_files("plain");
    let pki = Pki::issue(&files);
    let gw = gateway(&files);
    let mut plain = TcpStream::connect(gw.addr).await.unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, plain.read_to_end(&mut answer)).await;
    assert!(
        !answer.starts_with(b"HTTP/1.1 200"),
        "no plain HTTP on a TLS listener"
    );
    // A client that does not trust the certificate fails its handshake too.
    let stranger = Pki::issue(&pem_files("stranger"));
    assert!(stranger.connect(gw.addr).await.is_err());
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let metrics = {
            let mut tls = pki.connect(gw.addr).await.unwrap();
            let request = "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
            tls.write_all(request.as_bytes()).await.unwrap();
            let mut body = String::new();
            let _ = tokio::time::timeout(PATIENCE, tls.read_to_string(&mut body)).await;
            body
        };
        if metrics.contains("wsgate_handshakes_refused_total{reason=\"tls\"} 2") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_reload_serves_the_new_certificate_and_keeps_open_connections() {
    let files = pem_files("reload");
    let first = Pki::issue(&files);
    let gw = gateway(&files);
    let mut open = first.websocket(gw.addr, "/echo").await;
    let second = Pki::issue(&files);
    assert_eq!(gw.gateway().reload_tls(), Ok(true));
    assert!(second.connect(gw.addr).await.is_ok(), "the new certificate");
    assert!(first.connect(gw.addr).await.is_err(), "not the old one");
    open.send(Message::text("still here")).await.unwrap();
    let back = tokio::time::timeout(PATIENCE, open.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(back.into_text().unwrap().as_str(), "still here");
    // Files that cannot be loaded: the current certificate stays.
    std::fs::write(&files.1, "not a key").unwrap();
    assert!(
        gw.gateway()
            .reload_tls()
            .unwrap_err()
            .contains("tls_key_file")
    );
    assert!(second.connect(gw.addr).await.is_ok());
    // Changed files are picked up without being told (checked every second).
    let third = Pki::issue(&files);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while third.connect(gw.addr).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "never reloaded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn missing_or_mismatched_files_stop_start_up_naming_the_file() {
    let files = pem_files("bad");
    Pki::issue(&files);
    let other = files_with_other_key(&files);
    for (cert, key, says) in [
        (
            Path::new("/nonexistent/cert.pem"),
            files.1.as_path(),
            "tls_cert_file",
        ),
        (
            files.0.as_path(),
            Path::new("/nonexistent/key.pem"),
            "tls_key_file",
        ),
        (files.0.as_path(), other.as_path(), "tls_key_file"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
            .env("WSGATE_TLS_CERT_FILE", cert)
            .env("WSGATE_TLS_KEY_FILE", key)
            .arg("--print-config")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains(says) && err.lines().count() == 1, "{err}");
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .env("WSGATE_TLS_CERT_FILE", &files.0)
        .arg("--print-config")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "one file without the other");
}

/// A key that is not the certificate's.
fn files_with_other_key(files: &(PathBuf, PathBuf)) -> PathBuf {
    let other = files.1.with_file_name("other-key.pem");
    std::fs::write(&other, KeyPair::generate().unwrap().serialize_pem()).unwrap();
    other
}

/// Runs `wsgate probe ARGS` with only `env` among the WSGATE_* variables; (exit code, stderr).
fn run_probe(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> (Option<i32>, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"));
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("WSGATE_")) {
        cmd.env_remove(key);
    }
    let out = cmd
        .arg("probe")
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn wsgate_probe_checks_a_tls_listener() {
    let files = pem_files("probe");
    let pki = Pki::issue(&files);
    let gw = gateway(&files);
    let ca = files.0.with_file_name("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let listen = gw.addr.to_string();
    // The health check's form: no URL, the gateway's own settings. With TLS configured it
    // speaks TLS; a plain-HTTP probe of this listener fails.
    let own = [
        ("WSGATE_LISTEN", listen.as_ref()),
        ("WSGATE_TLS_CERT_FILE", files.0.as_os_str()),
        ("WSGATE_TLS_KEY_FILE", files.1.as_os_str()),
    ];
    assert_eq!(run_probe(&[], &own).0, Some(0));
    let (code, stderr) = run_probe(&[], &own[..1]);
    assert_eq!(code, Some(1), "{stderr}");
    // A URL is verified: against the CA given, by name, or against the system's CAs (which do
    // not know this one) unless told to believe anyone.
    let by_name = format!("https://localhost:{}/readyz", gw.addr.port());
    let ca_flag = ca.to_str().unwrap();
    assert_eq!(run_probe(&[&by_name, "--ca", ca_flag], &[]).0, Some(0));
    let (code, stderr) = run_probe(&[&by_name], &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("invalid peer certificate: UnknownIssuer")
            || stderr.contains("no system CA certificates found"),
        "{stderr}"
    );
    assert_eq!(run_probe(&[&by_name, "--insecure"], &[]).0, Some(0));
    let by_address = format!("https://{}/readyz", gw.addr);
    let (code, stderr) = run_probe(&[&by_address, "--ca", ca_flag], &[]);
    assert_eq!(
        code,
        Some(1),
        "the certificate names localhost only: {stderr}"
    );
    // And what answers non-2xx fails the probe.
    let missing = format!("https://localhost:{}/nothing-here", gw.addr.port());
    let (code, stderr) = run_probe(&[&missing, "--ca", ca_flag], &[]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("answered 404"), "{stderr}");
}

#[tokio::test]
async fn the_proxy_protocol_in_front_of_tls_names_the_client() {
    let files = pem_files("proxy");
    let pki = Pki::issue(&files);
    let gw = gateway_with(&files, 1, |c| {
        c.trusted_proxies = vec!["127.0.0.1/32".into()];
        c.proxy_protocol = true;
        c.max_connections_per_ip = 2;
    });
    // As a TCP-mode load balancer sends it: the header, then the client's TLS bytes.
    let behind_proxy = async |header: Vec<u8>| {
        let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
        tcp.write_all(&header).await.unwrap();
        pki.connect_over(tcp).await
    };
    let client = [198, 51, 100, 7];
    let first = upgrade(
        behind_proxy(support::proxy_v2(client)).await.unwrap(),
        "/ws",
    )
    .await;
    // A header that arrives in pieces is read whole, and not a byte of TLS with it.
    let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
    let v1 = b"PROXY TCP4 198.51.100.7 10.0.0.1 5000 443\r\n";
    tcp.write_all(&v1[..9]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    tcp.write_all(&v1[9..]).await.unwrap();
    let second = upgrade(pki.connect_over(tcp).await.unwrap(), "/ws").await;
    // That client's cap is reached: closed before the handshake.
    assert!(behind_proxy(support::proxy_v2(client)).await.is_err());
    let other = behind_proxy(support::proxy_v2([198, 51, 100, 8])).await;
    let _other = upgrade(other.unwrap(), "/ws").await;
    // The proxy's own connection (LOCAL) is served; one without a header is not.
    let local = b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00".to_vec();
    let mut health = behind_proxy(local).await.unwrap();
    health
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    let _ = tokio::time::timeout(PATIENCE, health.read_to_string(&mut answer)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        pki.connect(gw.addr).await.is_err(),
        "no header from the proxy"
    );
    // Not from the trusted proxy: no header is read, TLS starts at once.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from(([127, 0, 0, 2], 0))).unwrap();
    let direct = pki
        .connect_over(socket.connect(gw.addr).await.unwrap())
        .await;
    let _direct = upgrade(direct.unwrap(), "/ws").await;
    // The health check, configured as the gateway is, sends a header naming nobody first.
    let listen = gw.addr.to_string();
    let own = [
        ("WSGATE_LISTEN", listen.as_ref()),
        ("WSGATE_TLS_CERT_FILE", files.0.as_os_str()),
        ("WSGATE_TLS_KEY_FILE", files.1.as_os_str()),
        ("WSGATE_TRUSTED_PROXIES", "[\"127.0.0.1/32\"]".as_ref()),
        ("WSGATE_PROXY_PROTOCOL", "true".as_ref()),
    ];
    let (code, stderr) = run_probe(&[], &own);
    assert_eq!(code, Some(0), "{stderr}");
    // Places are given back when that client's connections close.
    drop((first, second));
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while behind_proxy(support::proxy_v2(client)).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "places not given back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes at most `chunk` bytes per write, each sent at once (no Nagle): TLS records reach the
/// gateway in pieces.
struct Trickle {
    tcp: TcpStream,
    chunk: usize,
}

impl tokio::io::AsyncRead for Trickle {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Trickle {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let n = buf.len().min(self.chunk);
        std::pin::Pin::new(&mut self.tcp).poll_write(cx, &buf[..n])
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

async fn echo_back<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, message: Vec<u8>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    ws.send(Message::binary(message.clone())).await.unwrap();
    let back = tokio::time::timeout(PATIENCE, ws.next())
        .await
        .expect("the echo in time")
        .unwrap()
        .unwrap();
    let back = back.into_data();
    assert!(
        back.as_ref() == message.as_slice(),
        "{} bytes back for {}: {:?}",
        back.len(),
        message.len(),
        String::from_utf8_lossy(&back[..back.len().min(64)])
    );
}

#[tokio::test]
async fn records_in_pieces_large_messages_and_key_updates_pass() {
    let files = pem_files("records");
    let pki = Pki::issue(&files);
    let gw = gateway(&files);
    // The handshake and every record after it arrive 7 bytes at a time.
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let tls = pki
        .connector()
        .connect(name, Trickle { tcp, chunk: 7 })
        .await
        .expect("a handshake in pieces");
    let request = format!("wss://localhost:{}/echo", gw.addr.port())
        .into_client_request()
        .unwrap();
    let (mut trickled, _) = tokio_tungstenite::client_async(request, tls).await.unwrap();
    echo_back(&mut trickled, b"one byte after another".to_vec()).await;
    // A message of many records each way (the most a message may be), twice: the gateway keeps
    // no buffer between them.
    let mut ws = pki.websocket(gw.addr, "/echo").await;
    let big: Vec<u8> = (0..65_000u32).map(|i| (i * 7) as u8).collect();
    echo_back(&mut ws, big.clone()).await;
    echo_back(&mut ws, big).await;
    // The client asks for new keys (TLS 1.3 KeyUpdate): the gateway answers with its own and
    // the session goes on.
    ws.get_mut().get_mut().1.refresh_traffic_keys().unwrap();
    echo_back(&mut ws, b"after the key update".to_vec()).await;
    echo_back(&mut ws, vec![42; 40_000]).await;
    // A clean close: close_notify both ways.
    ws.close(None).await.unwrap();
    let end = tokio::time::timeout(PATIENCE, ws.next()).await.unwrap();
    assert!(matches!(end, None | Some(Ok(Message::Close(_)))), "{end:?}");
}

/// A TLS 1.3 client whose keys the test takes over after the handshake, to send records no TLS
/// library would: empty ones, handshake fragments.
struct HandRolled {
    encrypter: Box<dyn rustls::crypto::cipher::MessageEncrypter>,
    seq: u64,
}

impl HandRolled {
    /// Handshakes with the gateway, sends `first` (an HTTP request) and reads the answer's status
    /// line through rustls, then hands back the socket and the keys.
    async fn connect(pki: &Pki, addr: SocketAddr, first: &[u8]) -> (TcpStream, HandRolled) {
        use rustls::crypto::{CryptoProvider, aws_lc_rs};
        // One suite, to know the keys' kind: aws-lc's AES-GCM sealing keys insist on starting at
        // record 0, ChaCha20's do not.
        let suite = aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256;
        let provider = CryptoProvider {
            cipher_suites: vec![suite],
            ..aws_lc_rs::default_provider()
        };
        let mut roots = RootCertStore::empty();
        let ca = rustls::pki_types::CertificateDer::from_pem_slice(pki.ca_pem.as_bytes());
        roots.add(ca.unwrap()).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.enable_secret_extraction = true;
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .unwrap();
        tls.write_all(first).await.unwrap();
        let mut answer = [0u8; 12];
        tls.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer[..9], b"HTTP/1.1 ", "{answer:?}");
        // What else the answer had is left unread: only what the test sends matters from here.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (tcp, session) = tls.into_inner();
        let (seq, secrets) = session.dangerous_extract_secrets().unwrap().tx;
        let rustls::ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } = secrets else {
            panic!("ChaCha20-Poly1305 was the only suite offered");
        };
        let encrypter = suite.tls13().unwrap().aead_alg.encrypter(key, iv);
        (tcp, HandRolled { encrypter, seq })
    }

    /// The next record, of content type `typ`, carrying `payload`.
    fn seal(&mut self, typ: rustls::ContentType, payload: &[u8]) -> Vec<u8> {
        use rustls::crypto::cipher::{OutboundChunks, OutboundPlainMessage};
        let message = OutboundPlainMessage {
            typ,
            version: rustls::ProtocolVersion::TLSv1_2,
            payload: OutboundChunks::Single(payload),
        };
        let sealed = self.encrypter.encrypt(message, self.seq).unwrap().encode();
        self.seq += 1;
        sealed
    }
}

#[tokio::test]
async fn a_flood_of_records_without_data_is_closed() {
    let files = pem_files("barren");
    let pki = Pki::issue(&files);
    let gw = gateway(&files);
    // A WebSocket connection, upgraded by hand: after it, only records.
    let upgrade = "GET /echo HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
                   Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                   Sec-WebSocket-Version: 13\r\n\r\n";
    let (mut tcp, mut records) = HandRolled::connect(&pki, gw.addr, upgrade.as_bytes()).await;
    let mut record = |payload: &[u8]| records.seal(rustls::ContentType::ApplicationData, payload);
    // First the keys are shown to work: a few empty records between pings are taken, and the
    // connection stays open.
    let ping = support::client_frame(true, 0x9, b"hi", Some([1, 2, 3, 4]));
    for _ in 0..50 {
        let mut some = Vec::new();
        for _ in 0..8 {
            some.extend(record(&[]));
        }
        some.extend(record(&ping));
        tcp.write_all(&some).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    tcp.write_all(&record(&ping)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    tcp.write_all(&record(&ping))
        .await
        .expect("still open after valid records");
    // Then records with no data only (each costs the gateway a decryption, and no message
    // limit sees them), as fast as it takes them: the session ends within a few (rustls counts
    // consecutive empty records).
    let mut sent = 0usize;
    let closed = loop {
        let mut batch = Vec::new();
        for _ in 0..2000 {
            batch.extend(record(&[]));
        }
        let write = tokio::time::timeout(PATIENCE, tcp.write_all(&batch)).await;
        match write.expect("the gateway reads or closes") {
            Ok(()) => sent += batch.len(),
            Err(_) => break true,
        }
        if sent > 16 << 20 {
            break false;
        }
    };
    assert!(closed, "{sent} bytes of empty records taken");
    // The first batches may sit in socket buffers before the gateway reads them.
    assert!(sent < 1 << 20, "closed only after {sent} bytes");
}

#[tokio::test]
async fn half_a_handshake_message_after_the_handshake_costs_nothing_and_leaks_nothing() {
    let files = pem_files("fragment");
    let pki = Pki::issue(&files);
    let gw = gateway(&files);
    let health = || async {
        let (_, body) = https_request(&pki, gw.addr, "/healthz").await;
        serde_json::from_str::<Value>(&body).unwrap()["sockets"].clone()
    };
    let before = health().await;
    let panics_before = shard_panics();
    for _ in 0..5 {
        let request = b"GET /readyz HTTP/1.1\r\nHost: localhost\r\n\r\n";
        let (mut tcp, mut records) = HandRolled::connect(&pki, gw.addr, request).await;
        // A request, then the start of a key update that claims 50 bytes and brings 10: rustls
        // holds it (in the connection's buffer) while the gateway answers the request.
        let mut bytes = records.seal(rustls::ContentType::ApplicationData, request);
        let fragment = [24, 0, 0, 50, 1, 2, 3, 4, 5, 6];
        bytes.extend(records.seal(rustls::ContentType::Handshake, &fragment));
        tcp.write_all(&bytes).await.unwrap();
        // The answer comes (ciphertext: not read further).
        let mut answer = [0u8; 64];
        let n = tokio::time::timeout(PATIENCE, tcp.read(&mut answer))
            .await
            .expect("an answer")
            .unwrap();
        assert!(n > 0, "the gateway closed instead of answering");
        // Hanging up while the fragment is held: the gateway still closes its side cleanly.
        tcp.shutdown().await.unwrap();
    }
    // Every place is given back once those connections are gone, and nothing panicked.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while health().await != before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "sockets {} vs {before}",
            health().await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(shard_panics(), panics_before);
}

/// Panics in the gateway's shard threads so far (in this test process). A panic in a shard's
/// task is contained — the connection is dropped — so tests count them to see them.
fn shard_panics() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static PANICS: AtomicUsize = AtomicUsize::new(0);
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            if thread.name().is_some_and(|n| n.starts_with("wsgate-shard")) {
                PANICS.fetch_add(1, Ordering::Relaxed);
            }
            default_hook(info);
        }));
    });
    PANICS.load(Ordering::Relaxed)
}

#[tokio::test]
async fn a_corrupted_record_gets_an_alert_and_ends_the_session() {
    let files = pem_files("corrupt");
    let pki = Pki::issue(&files);
    let gw = gateway(&files);
    let panics_before = shard_panics();
    // An HTTPS keep-alive connection, idle after its first answer.
    let request = b"GET /readyz HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let (mut tcp, mut records) = HandRolled::connect(&pki, gw.addr, request).await;
    let mut bad = records.seal(rustls::ContentType::ApplicationData, request);
    let last = bad.len() - 1;
    bad[last] ^= 1;
    tcp.write_all(&bad).await.unwrap();
    // The gateway answers with an (encrypted) alert, then closes.
    let mut after = Vec::new();
    tokio::time::timeout(PATIENCE, tcp.read_to_end(&mut after))
        .await
        .expect("closed")
        .unwrap();
    assert!(!after.is_empty(), "no alert before the close");
    assert_eq!(after[0], 0x17, "a TLS 1.3 record");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(shard_panics(), panics_before);
}

#[tokio::test]
async fn the_tls_handshake_and_the_request_head_share_one_timeout() {
    let files = pem_files("deadline");
    let pki = Pki::issue(&files);
    let gw = gateway_with(&files, 1, |c| c.handshake_timeout = Duration::from_secs(2));
    let started = tokio::time::Instant::now();
    let mut tls = pki.connect(gw.addr).await.unwrap();
    // Most of the time goes by after the TLS handshake; then the head starts and never ends.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    tls.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(2 * PATIENCE, tls.read_to_end(&mut rest)).await;
    let closed_after = started.elapsed();
    // Closed at the 2 s from connecting, not 2 s after the TLS handshake (3.5 s).
    assert!(
        closed_after < Duration::from_millis(3000),
        "closed after {closed_after:?}"
    );
    assert!(closed_after >= Duration::from_secs(2), "{closed_after:?}");
}

#[tokio::test]
async fn half_open_tls_handshakes_are_evicted_like_idle_connections() {
    let files = pem_files("half-open");
    let pki = Pki::issue(&files);
    let (cert, key) = (files.0.to_str().unwrap(), files.1.to_str().unwrap());
    // 300 descriptors: room for ~230 sockets once the reserve is taken.
    let gateway = support::process::GatewayProcess::start(
        &["--shards", "1"],
        &[
            ("WSGATE_ALLOW_ANONYMOUS", "true"),
            ("WSGATE_TLS_CERT_FILE", cert),
            ("WSGATE_TLS_KEY_FILE", key),
        ],
        Some(300),
    );
    let addr = gateway.addr;
    // 300 sockets from one address, half of them with part of a ClientHello, none finishing.
    let mut held = Vec::new();
    for i in 0..300 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from(([127, 0, 0, 2], 0))).unwrap();
        let Ok(mut tcp) = socket.connect(addr).await else {
            continue;
        };
        if i % 2 == 0 {
            let _ = tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await;
        }
        held.push(tcp);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // A wss:// client from another address still gets in, and so does an https:// probe.
    let tcp = support::connect_from([127, 0, 0, 3], addr).await;
    let tls = tokio::time::timeout(PATIENCE, pki.connect_over(tcp))
        .await
        .expect("the handshake is answered within seconds")
        .expect("the handshake succeeds");
    let mut ws = upgrade(tls, "/ws").await;
    assert_eq!(next_json(&mut ws).await["type"], "connected");
    ws.send(Message::text(r#"{"type":"echo","payload":"in"}"#))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["payload"], "in");
    let (status, body) = https_request(&pki, addr, "/healthz").await;
    assert_eq!(status, 200, "{body}");
    let health: Value = serde_json::from_str(&body).unwrap();
    assert!(
        health["refused"]["http_evicted"].as_u64().unwrap() >= 2,
        "{health}"
    );
    drop(held);
}

#[tokio::test]
async fn certificate_files_that_are_not_plain_files_or_too_big_are_refused_without_stalling() {
    let files = pem_files("fifo");
    let pki = Pki::issue(&files);
    let gw = gateway(&files);
    let chain = std::fs::read_to_string(&files.0).unwrap();
    let mut before = pki.websocket(gw.addr, "/ws").await;
    assert_eq!(next_json(&mut before).await["type"], "connected");
    // The certificate replaced by a FIFO nobody writes to: the watcher notices the change and
    // refuses it at once; then by a valid chain followed by 2 MB of junk.
    std::fs::remove_file(&files.0).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&files.0)
        .status()
        .unwrap();
    assert!(made.success());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        gw.gateway()
            .reload_tls()
            .unwrap_err()
            .contains("not a plain file"),
        "SIGHUP's reload says why"
    );
    std::fs::remove_file(&files.0).unwrap();
    let junk = chain + &"x".repeat(2 << 20);
    std::fs::write(&files.0, junk).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        gw.gateway()
            .reload_tls()
            .unwrap_err()
            .contains("larger than")
    );
    // Every shard kept serving, with the certificate it had: old and new connections work.
    before
        .send(Message::text(r#"{"type":"echo","payload":"still"}"#))
        .await
        .unwrap();
    assert_eq!(next_json(&mut before).await["payload"], "still");
    for _ in 0..4 {
        let mut ws = pki.websocket(gw.addr, "/ws").await;
        assert_eq!(next_json(&mut ws).await["type"], "connected");
    }
    assert_eq!(https_get(&pki, gw.addr, "/healthz").await, 200);
}

#[tokio::test]
async fn sighup_reloads_the_certificate_off_the_signal_thread() {
    let files = pem_files("sighup");
    Pki::issue(&files);
    let (cert, key) = (files.0.to_str().unwrap(), files.1.to_str().unwrap());
    let gateway = support::process::GatewayProcess::start(
        &["--shards", "1"],
        &[
            ("WSGATE_TLS_CERT_FILE", cert),
            ("WSGATE_TLS_KEY_FILE", key),
            ("WSGATE_LOG", "info"),
        ],
        None,
    );
    // A new CA and certificate in the same files; SIGHUP takes them.
    let renewed = Pki::issue(&files);
    let status = std::process::Command::new("kill")
        .args(["-HUP", &gateway.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !gateway.logs().contains("reloaded (SIGHUP)") {
        assert!(tokio::time::Instant::now() < deadline, "{}", gateway.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(https_get(&renewed, gateway.addr, "/healthz").await, 200);
    // And SIGTERM is still answered: a clean exit.
    assert_eq!(gateway.terminate(), Some(0));
}
