//! What a node reads from Redis's channels, on arbitrary bytes: never panics; a room message it
//! accepts is framed with its offset into valid JSON (RFC 8259's grammar: numbers out of an f64's
//! range included) ending with that offset; presence entries it accepts hold real counts; a
//! publication for a user names one and is JSON; an answer to a disconnect is read or refused
//! without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::de::IgnoredAny;
use wsgate::broker::redis::{answers, envelope};
use wsgate::rooms::presence::MAX_CONNS;
use wsgate::protocol::with_offset;

fuzz_target!(|data: &[u8]| {
    if let Some((offset, _epoch, json)) = envelope::room_message(data) {
        let frame = with_offset(json, offset);
        let payload = wsgate::ws::frame::server_payload(&frame);
        serde_json::from_slice::<IgnoredAny>(&payload).expect("a framed room message is JSON");
        let field = format!(",\"offset\":{offset}}}");
        assert!(payload.ends_with(field.as_bytes()), "with its offset last");
        assert!(std::str::from_utf8(&payload).is_ok(), "sent as text: UTF-8");
    }
    for whole in [false, true] {
        if let Some((_, _, entries)) = envelope::presence_change(data, whole) {
            assert!(entries.iter().all(|e| e.conns <= MAX_CONNS));
        }
    }
    if let Some((_, disconnect, _answer_id)) = envelope::control(data) {
        assert!((4000..=4999).contains(&disconnect.code), "only application codes");
    }
    let answers = std::sync::Arc::new(answers::Answers::default());
    let _waiting = answers.wait();
    answers.received(data);
    if let Some((_, json)) = envelope::notice(data) {
        serde_json::from_slice::<IgnoredAny>(json).expect("a notice is JSON");
        assert!(std::str::from_utf8(json).is_ok(), "sent as text: UTF-8");
    }
    if let Some((_, user, json)) = envelope::user_notice(data) {
        assert!(!user.is_empty(), "a publication is for someone");
        serde_json::from_slice::<IgnoredAny>(json).expect("a user's publication is JSON");
        assert!(std::str::from_utf8(json).is_ok(), "sent as text: UTF-8");
    }
});
