//! The JSON protocol reader on arbitrary bytes: never panics, and an echoed payload is always
//! re-serialized as valid JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsgate::protocol::{ClientMessage, JsonParser, encode_echo};

fuzz_target!(|data: &[u8]| {
    let mut input = data.to_vec();
    JsonParser::default().parse(&mut input, |result| match result {
        Ok(ClientMessage::Echo { payload }) => {
            let frame = encode_echo(payload);
            // Server frames: 2-, 4- or 10-byte header, then the JSON text.
            let head = match frame[1] {
                126 => 4,
                127 => 10,
                _ => 2,
            };
            serde_json::from_slice::<serde_json::Value>(&frame[head..])
                .expect("echo re-serializes to valid JSON");
        }
        Ok(_) => {}
        Err(e) => assert!(!e.to_string().is_empty()),
    });
});
