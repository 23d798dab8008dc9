//! The frame decoder on arbitrary bytes, fed in arbitrary read sizes the way a connection feeds it,
//! with permessage-deflate agreed or not (the first byte's low bit). It must never panic, never
//! hand out invalid UTF-8 as text, never buffer past the limit, and a compressed message never
//! inflates past it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsgate::ws::deflate;
use wsgate::ws::frame::{Decoded, Decoder, Event};

const MAX_MESSAGE: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&read_size, stream)) = data.split_first() else {
        return;
    };
    let compression = read_size & 1 == 1;
    let read_size = usize::from(read_size >> 1).max(1);
    let mut decoder = if compression {
        Decoder::compressed(MAX_MESSAGE)
    } else {
        Decoder::new(MAX_MESSAGE)
    };
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
                    if let Event::Message {
                        text,
                        compressed,
                        payload,
                    } = event
                    {
                        assert!(payload.as_slice().len() <= MAX_MESSAGE);
                        assert!(compression || !compressed);
                        if compressed {
                            let inflated = deflate::inflate(payload.as_slice(), MAX_MESSAGE, |m| m.len());
                            if let Err(e) = inflated {
                                assert!([1007, 1009].contains(&e.code.0));
                            } else {
                                assert!(inflated.unwrap() <= MAX_MESSAGE);
                            }
                        } else if text {
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
