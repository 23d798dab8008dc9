//! permessage-deflate negotiation on arbitrary `Sec-WebSocket-Extensions` values (split into header
//! lines at newlines). It must never panic, and an agreement is always one the gateway can keep:
//! no context takeover both ways, a server window of 8 to 15 bits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsgate::ws::deflate;

fuzz_target!(|data: &[u8]| {
    let Some(agreement) = deflate::negotiate(data.split(|&b| b == b'\n')) else {
        return;
    };
    assert!(agreement.deflate.is_on());
    let response = agreement.response;
    assert!(response.starts_with(
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    ));
    if let Some((_, bits)) = response.split_once("server_max_window_bits=") {
        assert!((8..=15).contains(&bits.parse::<u8>().unwrap()));
    }
});
