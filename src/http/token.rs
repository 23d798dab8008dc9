//! Where a token is read from an upgrade request: `?token=`, `Authorization: Bearer …`, or — for
//! browsers, which cannot set headers on a WebSocket — a `bearer.<token>` subprotocol entry.

use std::borrow::Cow;

use hyper::header::{AUTHORIZATION, HeaderValue, SEC_WEBSOCKET_PROTOCOL};

/// The subprotocol wsgate speaks (its JSON protocol), for clients that name one.
const OUR_PROTOCOL: &str = "wsgate";

/// The prefix that marks a token among the offered subprotocols.
const PROTOCOL_TOKEN_PREFIX: &str = "bearer.";

/// A token found in an upgrade request, and the subprotocol to answer with.
pub struct Presented<'a> {
    /// Borrowed from the request, or percent-decoded from the query string.
    pub token: Option<Cow<'a, str>>,
    /// `wsgate`, when the client offered it; never the `bearer.<token>` entry, which would put the
    /// token in every proxy's and browser's logs of the response.
    pub protocol: Option<HeaderValue>,
}

/// Finds the token in `?token=`, `Authorization: Bearer`, or a `bearer.<token>` subprotocol.
pub fn presented<B>(req: &hyper::Request<B>) -> Presented<'_> {
    let offered: Vec<&str> = req
        .headers()
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    let from_protocol = offered
        .iter()
        .find_map(|p| p.strip_prefix(PROTOCOL_TOKEN_PREFIX));
    // RFC 6455 §4.2.2: answer with a protocol we speak, `wsgate`, when offered; nothing else is
    // ever answered. (A browser that offers subprotocols fails the connection unless one comes
    // back, so browsers offer `["wsgate", "bearer.<token>"]`, as the test page does.)
    let protocol = offered
        .contains(&OUR_PROTOCOL)
        .then(|| HeaderValue::from_static(OUR_PROTOCOL));
    let from_query = req.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|pair| pair.strip_prefix("token="))
            .filter(|t| !t.is_empty())
            .and_then(|t| percent_encoding::percent_decode_str(t).decode_utf8().ok())
    });
    let from_header = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            // The scheme is case-insensitive (RFC 7235).
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    Presented {
        token: from_query.or(from_header.or(from_protocol).map(Cow::Borrowed)),
        protocol,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_sources_and_the_answered_subprotocol() {
        let req = |uri: &str, headers: &[(&str, &str)]| {
            let mut b = hyper::Request::builder().uri(uri);
            for (k, v) in headers {
                b = b.header(*k, *v);
            }
            b.body(()).unwrap()
        };
        let token = |r: &hyper::Request<()>| presented(r).token.map(Cow::into_owned);
        let r = req("/ws?a=1&token=abc", &[]);
        assert_eq!(token(&r).as_deref(), Some("abc"));
        let r = req("/ws?token=a%2Eb%2ec", &[]);
        assert_eq!(token(&r).as_deref(), Some("a.b.c"), "percent-decoded");
        let r = req("/ws", &[("authorization", "Bearer xyz")]);
        assert_eq!(token(&r).as_deref(), Some("xyz"));
        let r = req("/ws", &[("sec-websocket-protocol", "wsgate, bearer.t.o.k")]);
        assert_eq!(token(&r).as_deref(), Some("t.o.k"));
        assert_eq!(presented(&r).protocol.unwrap(), "wsgate");
        for offer in ["bearer.t.o.k", "mqtt, bearer.t.o.k"] {
            let r = req("/ws", &[("sec-websocket-protocol", offer)]);
            assert_eq!(token(&r).as_deref(), Some("t.o.k"));
            assert!(
                presented(&r).protocol.is_none(),
                "the token entry is never echoed back"
            );
        }
        let r = req("/ws?token=abc", &[("sec-websocket-protocol", "mqtt")]);
        assert!(
            presented(&r).protocol.is_none(),
            "a protocol we do not speak is not answered"
        );
        let r = req("/ws", &[("authorization", "BEARER xyz")]);
        assert_eq!(token(&r).as_deref(), Some("xyz"));
        let r = req("/ws", &[]);
        assert!(presented(&r).token.is_none() && presented(&r).protocol.is_none());
    }
}
