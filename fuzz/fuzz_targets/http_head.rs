//! The HTTP side of admission on arbitrary bytes: the first-request-head check never panics, and a
//! head it accepts goes through the upgrade checks and the token lookup without panicking either.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsgate::http::{check_upgrade_request, head};

fuzz_target!(|data: &[u8]| {
    let Ok(Some(_)) = head::check(data) else {
        return;
    };
    // Accepted: build the request hyper would see.
    let mut headers = [httparse::EMPTY_HEADER; head::MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    assert!(parsed.parse(data).is_ok(), "check and parse agree");
    let mut request = hyper::Request::builder()
        .method(parsed.method.unwrap_or("GET"))
        .uri(parsed.path.unwrap_or("/"))
        .version(match parsed.version {
            Some(0) => hyper::Version::HTTP_10,
            _ => hyper::Version::HTTP_11,
        });
    for header in parsed.headers.iter() {
        request = request.header(header.name, header.value);
    }
    // hyper refuses some heads httparse takes (an invalid URI, say): those never get further.
    let Ok(request) = request.body(()) else {
        return;
    };
    let _ = check_upgrade_request(&request);
    let presented = wsgate::http::token::presented(&request);
    if let Some(protocol) = presented.protocol {
        assert_eq!(protocol, "wsgate", "only our own protocol is ever answered");
    }
});
