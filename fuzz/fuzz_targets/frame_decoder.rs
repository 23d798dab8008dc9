//! The frame decoder on arbitrary bytes, fed in arbitrary read sizes the way a connection feeds it.
//! It must never panic, never hand out invalid UTF-8 as text, and never buffer past the limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsgate::ws::frame::{Decoded, Decoder, Event};

const MAX_MESSAGE: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&read_size, stream)) = data.split_first() else {
        return;
    };
    let read_size = usize::from(read_size).max(1);
    let mut decoder = Decoder::new(MAX_MESSAGE);
    let mut pending = Vec::new();
    for chunk in stream.chunks(read_size) {
        pending.extend_from_slice(chunk);
        let mut pos = 0;
        loop {
            let available = pending.len() - pos;
            match decoder.decode(&mut pending[pos..]) {
                Ok(Decoded::Incomplete) => break,
                Ok(Decoded::Frame { consumed, event }) => {
                    assert!(consumed > 0 && consumed <= available);
                    if let Event::Message { text, payload } = event {
                        assert!(payload.as_slice().len() <= MAX_MESSAGE);
                        if text {
                            assert!(std::str::from_utf8(payload.as_slice()).is_ok());
                        }
                    }
                    pos += consumed;
                }
                Err(e) => {
                    assert!([1002, 1007, 1009].contains(&e.code.0));
                    return;
                }
            }
        }
        pending.drain(..pos);
        // An incomplete frame is never more than its header and the largest allowed payload.
        assert!(pending.len() <= 14 + MAX_MESSAGE);
    }
});
