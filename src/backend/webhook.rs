//! Webhooks: what happens in rooms, told to the backend after the fact — a room's first and last
//! connection, a user's first and last connection in a room, and (on request) every client's chat
//! message — in batches, signed, retried, at least once.
//!
//! Events are queued (bounded: past `webhook_queue` new ones are dropped and counted) and sent
//! by a thread of their own, one request at a time, in the order they were queued: `POST
//! <webhook_url>` with `{"time": ms, "events": [...]}`, signed with HMAC-SHA256 over
//! `<timestamp>.<body>` (headers `X-Wsgate-Timestamp`, Unix seconds, and `X-Wsgate-Signature:
//! sha256=<hex>`). A batch is sent again (same events, same ids, a fresh timestamp) until a 2xx
//! answer, with back-off, for `webhook_retry_for`; then its events are dropped and counted. Each
//! event's `id` (`<node>-<n>`) is unique: a backend that keeps them can drop a duplicate.
//!
//! Who sends an event is decided once for the cluster: the node whose change it was (or that
//! took a dead node's connections out), as Redis's scripts say; see the broker.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use aws_lc_rs::hmac;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderValue, USER_AGENT};
use hyper::{Method, Request, Uri};
use serde::Serialize;
use serde_json::value::RawValue;
use tracing::{debug, warn};

use super::HttpClient;
use crate::base::time::now_ms;
use crate::config::{Config, WebhookEvent};

/// The first wait before a batch is sent again, doubled at each failure up to the longest.
const FIRST_RETRY: Duration = Duration::from_millis(250);
const LONGEST_RETRY: Duration = Duration::from_secs(30);

/// One event, as the backend gets it.
#[derive(Serialize, Debug)]
pub struct Event {
    /// `<node>-<n>`: unique, the same in every attempt.
    pub id: String,
    pub name: &'static str,
    /// When it happened, Unix milliseconds.
    pub time: u64,
    pub room: Arc<str>,
    /// member_added, member_removed, chat_message: the user (`anonymous` connections are each
    /// their own member, as `<node>.<client>`) and its display name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<Arc<str>>,
    /// chat_message: the message as members got it, and its offset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

/// What webhooks counted, for `/metrics`.
#[derive(Default)]
pub struct WebhookCounters {
    /// Every event the node produced (then sent, dropped, or still on its way).
    pub queued: AtomicU64,
    pub sent: AtomicU64,
    /// Past the queue's bound, or still unsent after `webhook_retry_for`.
    pub dropped: AtomicU64,
    pub requests_ok: AtomicU64,
    pub requests_failed: AtomicU64,
}

/// The node's webhooks: where events are queued (from any thread).
pub struct Webhooks {
    queue: SyncSender<Event>,
    wanted: [bool; WebhookEvent::ALL.len()],
    node: Arc<str>,
    next_id: AtomicU64,
    pub counters: Arc<WebhookCounters>,
}

impl Webhooks {
    /// The webhooks `config` asks for, if any (its URL checked at start-up), with the thread
    /// that sends them.
    pub fn start(config: &Config, node: Arc<str>) -> Option<Arc<Webhooks>> {
        let url = config.webhook_url.as_deref()?;
        let uri = super::proxy::parse_url(url).expect("checked at start-up");
        let secret = config.webhook_secret.as_ref()?.expose().as_bytes().to_vec();
        let (queue, queued) = sync_channel(config.webhook_queue);
        let counters = Arc::new(WebhookCounters::default());
        let sender = Sender {
            uri,
            key: hmac::Key::new(hmac::HMAC_SHA256, &secret),
            batch: config.webhook_batch,
            timeout: config.webhook_timeout,
            retry_for: config.webhook_retry_for,
            counters: counters.clone(),
        };
        let started = std::thread::Builder::new()
            .name("wsgate-webhooks".into())
            .spawn(move || sender.run(queued));
        if let Err(e) = started {
            warn!(error = %e, "cannot start the webhooks' thread: no webhooks");
            return None;
        }
        let mut wanted = [false; WebhookEvent::ALL.len()];
        for event in &config.webhook_events {
            wanted[*event as usize] = true;
        }
        Some(Arc::new(Webhooks {
            queue,
            wanted,
            node,
            next_id: AtomicU64::new(1),
            counters,
        }))
    }

    /// Whether `kind` events are sent.
    pub fn wants(&self, kind: WebhookEvent) -> bool {
        self.wanted[kind as usize]
    }

    /// Queues a `kind` event of `room` (with the user, for a member event), if it is wanted.
    pub fn emit(&self, kind: WebhookEvent, room: &Arc<str>, user: Option<(&Arc<str>, &Arc<str>)>) {
        if self.wants(kind) {
            let mut event = self.event(kind, room);
            if let Some((user, username)) = user {
                event.user = Some(user.clone());
                event.username = Some(username.clone());
            }
            self.queue(event);
        }
    }

    /// Queues a chat_message event, if it is wanted: `message` (JSON) published at `offset`.
    pub fn chat_message(&self, room: &Arc<str>, message: &[u8], offset: u64) {
        if !self.wants(WebhookEvent::ChatMessage) {
            return;
        }
        let Ok(data) = serde_json::from_slice::<&RawValue>(message) else {
            return;
        };
        let mut event = self.event(WebhookEvent::ChatMessage, room);
        event.data = Some(data.to_owned());
        event.offset = Some(offset);
        self.queue(event);
    }

    /// Waits (blocking: call it off any runtime) until every event queued so far was sent or
    /// dropped, or `patience` is over: for a stopping node, whose process may end right after.
    pub fn flush(&self, patience: Duration) {
        let deadline = Instant::now() + patience;
        let counters = &self.counters;
        let pending = || {
            let queued = counters.queued.load(Ordering::Relaxed);
            let done =
                counters.sent.load(Ordering::Relaxed) + counters.dropped.load(Ordering::Relaxed);
            queued.saturating_sub(done)
        };
        while pending() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let left = pending();
        if left > 0 {
            warn!(events = left, "webhooks: the node stops with events unsent");
        }
    }

    fn event(&self, kind: WebhookEvent, room: &Arc<str>) -> Event {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        Event {
            id: format!("{}-{n}", self.node),
            name: kind.name(),
            time: now_ms(),
            room: room.clone(),
            user: None,
            username: None,
            data: None,
            offset: None,
        }
    }

    fn queue(&self, event: Event) {
        self.counters.queued.fetch_add(1, Ordering::Relaxed);
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.queue.try_send(event)
        {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The webhooks' thread: takes what is queued, a batch at a time, and sends it.
struct Sender {
    uri: Uri,
    key: hmac::Key,
    batch: usize,
    timeout: Duration,
    retry_for: Duration,
    counters: Arc<WebhookCounters>,
}

impl Sender {
    fn run(self, queued: Receiver<Event>) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                warn!(error = %e, "cannot start the webhooks' runtime: no webhooks");
                return;
            }
        };
        // One batch at a time: one connection.
        let client = super::http_client(self.timeout, 1);
        let mut batch = Vec::with_capacity(self.batch);
        // Waits for the first event; takes what else is queued, up to a batch.
        while let Ok(first) = queued.recv() {
            batch.push(first);
            while batch.len() < self.batch {
                match queued.try_recv() {
                    Ok(event) => batch.push(event),
                    Err(_) => break,
                }
            }
            runtime.block_on(self.deliver(&client, &batch));
            batch.clear();
        }
    }

    /// Sends one batch until it is taken or `retry_for` is over.
    async fn deliver(&self, client: &HttpClient, batch: &[Event]) {
        #[derive(Serialize)]
        struct Body<'a> {
            time: u64,
            events: &'a [Event],
        }
        let body = serde_json::to_vec(&Body {
            time: now_ms(),
            events: batch,
        })
        .expect("serializing to memory cannot fail");
        let body = Bytes::from(body);
        let started = Instant::now();
        let mut wait = FIRST_RETRY;
        loop {
            match tokio::time::timeout(self.timeout, self.send(client, body.clone())).await {
                Ok(Ok(())) => {
                    self.counters.requests_ok.fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .sent
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    return;
                }
                Ok(Err(problem)) => debug!(problem, "webhook request failed"),
                Err(_) => debug!("webhook request timed out"),
            }
            self.counters
                .requests_failed
                .fetch_add(1, Ordering::Relaxed);
            if started.elapsed() + wait > self.retry_for {
                warn!(
                    events = batch.len(),
                    "webhooks: the backend took none of a batch within webhook_retry_for: dropped"
                );
                self.counters
                    .dropped
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                return;
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(LONGEST_RETRY);
        }
    }

    async fn send(&self, client: &HttpClient, body: Bytes) -> Result<(), String> {
        let timestamp = now_ms() / 1000;
        let signature = self.sign(timestamp, &body);
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.uri.clone();
        let headers = request.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("wsgate/", env!("CARGO_PKG_VERSION"))),
        );
        headers.insert("x-wsgate-timestamp", HeaderValue::from(timestamp));
        headers.insert(
            "x-wsgate-signature",
            HeaderValue::try_from(signature).expect("hex is a header value"),
        );
        let response = client.request(request).await.map_err(|e| e.to_string())?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("answered {}", response.status()))
        }
    }

    /// `sha256=<hex of HMAC-SHA256(secret, "<timestamp>.<body>")>`.
    fn sign(&self, timestamp: u64, body: &[u8]) -> String {
        let mut context = hmac::Context::with_key(&self.key);
        context.update(timestamp.to_string().as_bytes());
        context.update(b".");
        context.update(body);
        let tag = context.sign();
        let mut signature = String::from("sha256=");
        for byte in tag.as_ref() {
            signature.push_str(&format!("{byte:02x}"));
        }
        signature
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hmac_sha256_of_the_timestamp_and_body_in_hex() {
        let sender = Sender {
            uri: Uri::from_static("http://backend/"),
            key: hmac::Key::new(hmac::HMAC_SHA256, b"key"),
            batch: 1,
            timeout: Duration::from_secs(1),
            retry_for: Duration::from_secs(1),
            counters: Arc::default(),
        };
        // Python: hmac.new(b"key", b"1764000000.{}", hashlib.sha256).hexdigest()
        assert_eq!(
            sender.sign(1_764_000_000, b"{}"),
            "sha256=135a1a8c79ff2a07661486422c8068924d01c7a70da314a29ce512bc61231899"
        );
    }
}
