//! The JSON protocol reader on arbitrary bytes: never panics, and an echoed payload is always
//! re-serialized as valid JSON, with the message's `id` as it came.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsgate::protocol::{ClientMessage, JsonParser, RequestId, encode_echo};

fuzz_target!(|data: &[u8]| {
    let mut input = data.to_vec();
    JsonParser::default().parse_request(&mut input, |id, result| match result {
        Ok(ClientMessage::Echo { payload }) => {
            let frame = encode_echo(payload, id.as_ref());
            // Server frames: 2-, 4- or 10-byte header, then the JSON text.
            let head = match frame[1] {
                126 => 4,
                127 => 10,
                _ => 2,
            };
            let echoed: serde_json::Value =
                serde_json::from_slice(&frame[head..]).expect("echo re-serializes to valid JSON");
            match &id {
                None => assert!(echoed.get("id").is_none()),
                Some(RequestId::Number(n)) => assert_eq!(echoed["id"], *n),
                Some(RequestId::Text(t)) => assert_eq!(echoed["id"], **t),
            }
        }
        Ok(_) => {}
        Err(e) => assert!(!e.to_string().is_empty()),
    });
});
