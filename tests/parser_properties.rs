//! Property tests (proptest) for the two parsers that see untrusted bytes: the frame decoder and
//! the JSON protocol reader. Arbitrary input must never panic, and valid input must survive any
//! fragmentation and any split into reads. (`fuzz/` has libFuzzer targets for longer runs.)

#[path = "support/client_frame.rs"]
mod client_frame;

use proptest::prelude::*;
use wsgate::protocol::{ErrorReply, JsonParser};
use wsgate::ws::frame::{Decoded, Decoder, Event};

const MAX: usize = 4096;

/// Feeds `stream` to a decoder in the given read sizes, the way the connection does: whole frames
/// are decoded, an incomplete tail is kept for the next read. Returns the messages, or the close
/// code the decoder failed with.
fn decode_in_reads(stream: &[u8], reads: &[usize]) -> Result<Vec<(bool, Vec<u8>)>, u16> {
    let mut decoder = Decoder::new(MAX);
    let mut pending = Vec::new();
    let mut messages = Vec::new();
    let mut offset = 0;
    let sizes = reads.iter().copied().chain(std::iter::repeat(usize::MAX));
    for size in sizes {
        if offset >= stream.len() {
            break;
        }
        let end = stream.len().min(offset.saturating_add(size.max(1)));
        pending.extend_from_slice(&stream[offset..end]);
        offset = end;
        let mut pos = 0;
        loop {
            match decoder.decode(&mut pending[pos..]) {
                Ok(Decoded::Incomplete) => break,
                Ok(Decoded::Frame { consumed, event }) => {
                    if let Event::Message { text, payload, .. } = event {
                        messages.push((text, payload.as_slice().to_vec()));
                    }
                    pos += consumed;
                }
                Err(e) => return Err(e.code.0),
            }
        }
        pending.drain(..pos);
    }
    Ok(messages)
}

/// A masked client frame.
fn frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    client_frame::client_frame(fin, opcode, payload, Some(mask))
}

/// A message: text or binary, and the fragment sizes to send it in.
fn message() -> impl Strategy<Value = (bool, Vec<u8>, Vec<usize>)> {
    let text = ".{0,300}".prop_map(|s: String| (true, s.into_bytes()));
    let binary = proptest::collection::vec(any::<u8>(), 0..600).prop_map(|b| (false, b));
    (
        prop_oneof![text, binary],
        proptest::collection::vec(1usize..200, 0..5),
    )
        .prop_map(|((text, payload), cuts)| (text, payload, cuts))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2000),
                                   reads in proptest::collection::vec(1usize..64, 0..20)) {
        if let Err(code) = decode_in_reads(&bytes, &reads) {
            prop_assert!([1002, 1007, 1009].contains(&code), "close code {}", code);
        }
    }

    #[test]
    fn fragmented_messages_survive_any_read_split(
        messages in proptest::collection::vec(message(), 1..6),
        pings in proptest::collection::vec(any::<bool>(), 6),
        reads in proptest::collection::vec(1usize..100, 0..40),
        mask in any::<[u8; 4]>(),
    ) {
        let mut stream = Vec::new();
        for (i, (text, payload, cuts)) in messages.iter().enumerate() {
            // Split the payload at the cut points into fragments.
            let mut fragments = Vec::new();
            let mut rest = &payload[..];
            for &cut in cuts {
                let cut = cut.min(rest.len());
                fragments.push(&rest[..cut]);
                rest = &rest[cut..];
            }
            fragments.push(rest);
            let last = fragments.len() - 1;
            for (j, fragment) in fragments.iter().enumerate() {
                let opcode = if j > 0 { 0 } else if *text { 1 } else { 2 };
                stream.extend(frame(j == last, opcode, fragment, mask));
                // A control frame may come between fragments.
                if pings[i] && j == 0 {
                    stream.extend(frame(true, 9, b"p", mask));
                }
            }
        }
        let decoded = decode_in_reads(&stream, &reads).expect("valid frames decode");
        let expected: Vec<(bool, Vec<u8>)> =
            messages.into_iter().map(|(text, payload, _)| (text, payload)).collect();
        prop_assert_eq!(decoded, expected);
    }

    #[test]
    fn arbitrary_json_input_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut input = bytes;
        JsonParser::default().parse(&mut input, |result| {
            if let Err(e) = result {
                // Every error renders to a message.
                assert!(!e.to_string().is_empty());
            }
        });
    }

    #[test]
    fn protocol_fields_survive_escaping(room in "[A-Za-z0-9_.:-]{1,64}", message in ".{0,200}") {
        let json = serde_json::json!({"type": "chat_message", "payload": {"room": room, "message": message}});
        let mut input = json.to_string().into_bytes();
        JsonParser::default().parse(&mut input, |result| match result {
            Ok(wsgate::protocol::ClientMessage::Chat {
                room: r,
                message: m,
                ..
            }) => {
                assert_eq!((r, m), (room.as_str(), message.as_str()));
            }
            other => panic!("{other:?}"),
        });
    }

    #[test]
    fn unknown_types_are_named_in_the_error(kind in "[a-z_]{1,20}") {
        prop_assume!(!wsgate::protocol::CLIENT_MESSAGE_TYPES.contains(&kind.as_str()));
        let mut input = serde_json::json!({"type": kind}).to_string().into_bytes();
        JsonParser::default().parse(&mut input, |result| {
            assert_eq!(result.unwrap_err(), ErrorReply::UnknownType(&kind));
        });
    }
}
