//! One proxy to the backend on one shard: `POST <url>` with a JSON body describing the event,
//! answered with one of
//!
//! - `{"result": {…}}`: allowed (what `result` may hold depends on the event: see [`Allowed`]);
//! - `{"error": {"message": "…", "code": N}}`: denied; the client gets the message (and the code,
//!   if any) as an error, or for a connection, a close with `code` (4000–4999, default 4403);
//! - `{"disconnect": {"code": 4000–4999, "reason": "…"}}`: the client is closed with that code.
//!
//! Anything else — no answer within the timeout, a status other than 200, a body that is not one
//! of those — is a [`Failure`], and the proxy's `on_error` decides: refuse, or allow as if the
//! backend had. Calls share a pool of keep-alive connections; at most `max_in_flight` wait at
//! once; `breaker_failures` failures in a row open a circuit breaker for `breaker_cooldown`
//! (calls fail at once), after which one call tries again.

use std::cell::Cell;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::header::{CONTENT_TYPE, HeaderValue, USER_AGENT};
use hyper::{Method, Request, StatusCode, Uri};
use serde::Deserialize;
use serde_json::value::RawValue;
use tracing::debug;

use super::{Failure, HttpClient, ProxyKind, ProxyMetrics, ShardProxyMetrics};
use crate::base::identity::Identity;
use crate::config::{ProxyFailure, ProxySettings};
use crate::ws::close::CloseCode;
use crate::ws::frame::MAX_CLOSE_REASON;

/// The largest answer read from a backend.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// The longest denial message passed to a client (longer ones are cut at a character boundary).
const MAX_MESSAGE_BYTES: usize = 512;
/// A connection's close code when a denial gives none: the gateway's own for a refused
/// connection.
pub const DEFAULT_DENY_CODE: u16 = CloseCode::FORBIDDEN.0;

/// What the backend allowed, with what it added. Fields an event does not use are ignored.
#[derive(Debug, Default, Deserialize)]
pub struct Allowed {
    /// connect: the user this connection is (the backend knows it, from a cookie say).
    pub user: Option<String>,
    /// connect: the user's display name.
    pub username: Option<String>,
    /// connect: JSON for the client's `connected` greeting (as its `data`).
    pub data: Option<Box<RawValue>>,
    /// publish: the text to publish instead of the client's.
    pub message: Option<String>,
}

impl Allowed {
    /// The identity a connection allowed at connect has: the backend's `user` and `username`
    /// where it gave them (a user named without a display name is shown by its id), the rest
    /// (room patterns, expiry, claims) the token's.
    pub fn name(&self, identity: Arc<Identity>) -> Arc<Identity> {
        let user = self.user.as_deref().filter(|u| !u.is_empty());
        let username = self.username.as_deref().filter(|u| !u.is_empty());
        if user.is_none() && username.is_none() {
            return identity;
        }
        let user_id: Arc<str> = user.map_or_else(|| identity.user_id.clone(), Arc::from);
        let username = match (username, user) {
            (Some(name), _) => Arc::from(name),
            (None, Some(_)) => user_id.clone(),
            (None, None) => identity.username.clone(),
        };
        Arc::new(Identity {
            user_id,
            username,
            roles: identity.roles.clone(),
            rooms: identity.rooms.clone(),
            expires_at: identity.expires_at,
            claims: identity.claims.clone(),
        })
    }
}

/// Why the event does not take place.
#[derive(Debug)]
pub enum Refusal {
    /// Refused: the client is told `message` (with `code`, if the backend gave one).
    Deny { code: Option<u16>, message: String },
    /// The client is closed with `code` (4000–4999) and `reason`.
    Disconnect { code: u16, reason: String },
    /// The call failed and the proxy refuses on failure: the client should retry later.
    Unavailable,
}

/// A backend's answer: allowed, or refused.
type Answer = Result<Allowed, Refusal>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Written {
    result: Option<Allowed>,
    error: Option<Denial>,
    disconnect: Option<Disconnection>,
}

#[derive(Deserialize)]
struct Denial {
    message: String,
    code: Option<u16>,
}

#[derive(Deserialize)]
struct Disconnection {
    code: Option<u16>,
    #[serde(default)]
    reason: String,
}

/// A circuit breaker's state.
#[derive(Clone, Copy)]
enum Breaker {
    /// Calls go through; this many failed in a row.
    Closed(u32),
    /// Calls fail at once until then.
    Open(Instant),
    /// One call is trying the backend again; the others fail at once.
    Probing,
}

pub struct Proxy {
    kind: ProxyKind,
    settings: ProxySettings,
    uri: Uri,
    client: HttpClient,
    in_flight: Cell<usize>,
    breaker: Cell<Breaker>,
    metrics: Arc<[ShardProxyMetrics]>,
    shard: usize,
}

/// The URL of a proxy, if it is one wsgate can call: `http://host[:port]/path`.
pub fn parse_url(url: &str) -> Result<Uri, String> {
    let uri: Uri = url.parse().map_err(|e| format!("not a URL ({e})"))?;
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(
            "credentials in the URL are not sent (put a key in the URL's path, or let \
                    only the gateway's network reach the backend)"
                .into(),
        );
    }
    if uri.scheme_str() != Some("http") || uri.host().is_none_or(str::is_empty) {
        return Err(
            "must be http://host[:port]/path (https is not supported: reach the backend \
                    over the private network, or through a TLS sidecar)"
                .into(),
        );
    }
    Ok(uri)
}

impl Proxy {
    /// Shard `shard`'s proxy for `kind` (its URL checked by [`parse_url`] at start-up).
    pub fn new(
        kind: ProxyKind,
        settings: &ProxySettings,
        metrics: Arc<[ShardProxyMetrics]>,
        shard: usize,
    ) -> Self {
        let client = super::http_client(settings.timeout, settings.max_in_flight.min(32));
        Proxy {
            kind,
            uri: parse_url(&settings.url).expect("checked at start-up"),
            settings: settings.clone(),
            client,
            in_flight: Cell::new(0),
            breaker: Cell::new(Breaker::Closed(0)),
            metrics,
            shard,
        }
    }

    fn metrics(&self) -> &ProxyMetrics {
        self.metrics[self.shard].of(self.kind)
    }

    /// Asks the backend about an event (`body`, JSON): allowed (with what the backend added),
    /// or why not.
    pub async fn ask(&self, body: Vec<u8>) -> Result<Allowed, Refusal> {
        match self.call(body).await {
            Ok(answer) => {
                let counted = match answer {
                    Ok(_) => 0,
                    Err(Refusal::Deny { .. }) => 1,
                    Err(Refusal::Disconnect { .. } | Refusal::Unavailable) => 2,
                };
                self.metrics().answers[counted].add(1);
                answer
            }
            Err(failure) => {
                self.metrics().failures[failure as usize].add(1);
                debug!(
                    proxy = self.kind.name(),
                    failure = failure.name(),
                    "backend call failed"
                );
                match self.settings.on_error {
                    ProxyFailure::Refuse => Err(Refusal::Unavailable),
                    ProxyFailure::Allow => Ok(Allowed::default()),
                }
            }
        }
    }

    /// One call within the in-flight bound and the breaker.
    async fn call(&self, body: Vec<u8>) -> Result<Answer, Failure> {
        match self.breaker.get() {
            Breaker::Open(until) if Instant::now() < until => return Err(Failure::BreakerOpen),
            Breaker::Open(_) => self.breaker.set(Breaker::Probing),
            Breaker::Probing => return Err(Failure::BreakerOpen),
            Breaker::Closed(_) => {}
        }
        if self.in_flight.get() >= self.settings.max_in_flight {
            return Err(Failure::Overloaded);
        }
        self.in_flight.set(self.in_flight.get() + 1);
        let started = Instant::now();
        let result = match tokio::time::timeout(self.settings.timeout, self.post(body)).await {
            Ok(result) => result,
            Err(_) => Err(Failure::Timeout),
        };
        self.in_flight.set(self.in_flight.get() - 1);
        self.metrics().latency.observe(started.elapsed());
        self.breaker.set(match (&result, self.breaker.get()) {
            (Err(failure), breaker) if failure.trips_breaker() => {
                let failures = match breaker {
                    Breaker::Closed(n) => n + 1,
                    Breaker::Open(_) | Breaker::Probing => self.settings.breaker_failures,
                };
                if failures >= self.settings.breaker_failures {
                    // The cooldown is at most an hour (checked by the configuration).
                    Breaker::Open(Instant::now() + self.settings.breaker_cooldown)
                } else {
                    Breaker::Closed(failures)
                }
            }
            _ => Breaker::Closed(0),
        });
        result
    }

    async fn post(&self, body: Vec<u8>) -> Result<Answer, Failure> {
        let mut request = Request::new(Full::new(Bytes::from(body)));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.uri.clone();
        let headers = request.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("wsgate/", env!("CARGO_PKG_VERSION"))),
        );
        let response = self.client.request(request).await.map_err(|e| {
            debug!(error = %e, "backend unreachable");
            Failure::Unreachable
        })?;
        match response.status() {
            StatusCode::OK => {}
            status if status.is_server_error() => return Err(Failure::ServerError),
            _ => return Err(Failure::Status),
        }
        let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| match e.downcast_ref::<LengthLimitError>() {
                Some(_) => Failure::Malformed,
                None => Failure::Unreachable,
            })?
            .to_bytes();
        read_answer(&body).ok_or(Failure::Malformed)
    }
}

/// Reads a backend's answer: exactly one of `result`, `error` and `disconnect`.
fn read_answer(body: &[u8]) -> Option<Answer> {
    let answer: Written = serde_json::from_slice(body).ok()?;
    match answer {
        Written {
            result: Some(allowed),
            error: None,
            disconnect: None,
        } => Some(Ok(allowed)),
        Written {
            result: None,
            error: Some(denial),
            disconnect: None,
        } => Some(Err(Refusal::Deny {
            code: denial.code,
            message: cut(denial.message, MAX_MESSAGE_BYTES),
        })),
        Written {
            result: None,
            error: None,
            disconnect: Some(d),
        } => {
            let code = d.code.unwrap_or(DEFAULT_DENY_CODE);
            (4000..=4999).contains(&code).then(|| {
                Err(Refusal::Disconnect {
                    code,
                    // A close code's reason must fit a control frame.
                    reason: cut(d.reason, MAX_CLOSE_REASON),
                })
            })
        }
        _ => None,
    }
}

/// `text` cut to at most `max` bytes, at a character boundary.
fn cut(mut text: String, max: usize) -> String {
    text.truncate(text.floor_char_boundary(max));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(json: &str) -> String {
        format!("{:?}", read_answer(json.as_bytes()))
    }

    #[test]
    fn answers_are_read_strictly() {
        assert!(read(r#"{"result":{}}"#).starts_with("Some(Ok("));
        assert!(read(r#"{"result":{"message":"hi","data":{"a":1}}}"#).contains("\"hi\""));
        assert_eq!(
            read(r#"{"error":{"message":"no","code":7}}"#),
            r#"Some(Err(Deny { code: Some(7), message: "no" }))"#
        );
        assert_eq!(
            read(r#"{"disconnect":{"code":4100,"reason":"bye"}}"#),
            r#"Some(Err(Disconnect { code: 4100, reason: "bye" }))"#
        );
        assert_eq!(
            read(r#"{"disconnect":{}}"#),
            r#"Some(Err(Disconnect { code: 4403, reason: "" }))"#
        );
        for bad in [
            "",
            "{}",
            "[]",
            r#"{"result":{},"error":{"message":"x"}}"#,
            r#"{"status":"ok"}"#,
            r#"{"error":{}}"#,
            r#"{"disconnect":{"code":1000}}"#,
            r#"{"result":{"message":5}}"#,
        ] {
            assert_eq!(read(bad), "None", "{bad}");
        }
    }

    #[test]
    fn long_texts_are_cut_at_a_character_boundary() {
        assert_eq!(cut("ééé".into(), 3), "é");
        assert_eq!(cut("abc".into(), 3), "abc");
    }
}
