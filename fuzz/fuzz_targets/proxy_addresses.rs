//! What proxies say about clients, on arbitrary bytes: the PROXY header parser never panics, a
//! header it accepts is self-delimiting (every shorter prefix is incomplete, the same bytes alone
//! parse the same), and forwarding headers from a trusted peer give an address or an error.
#![no_main]

use std::net::IpAddr;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use wsgate::config::ForwardedHeader;
use wsgate::http::forwarded::TrustedProxies;
use wsgate::http::proxy_header::{Parsed, parse};

static PROXIES: LazyLock<[TrustedProxies; 2]> = LazyLock::new(|| {
    let trusted = ["10.0.0.0/8".to_owned(), "::1".to_owned()];
    [ForwardedHeader::XForwardedFor, ForwardedHeader::Forwarded]
        .map(|header| TrustedProxies::parse(&trusted, header).unwrap())
});

fuzz_target!(|data: &[u8]| {
    if let Ok(Parsed::Complete { len, source }) = parse(data) {
        assert!(len <= data.len());
        assert_eq!(parse(&data[..len]), Ok(Parsed::Complete { len, source }));
        for cut in 0..len {
            assert_eq!(parse(&data[..cut]), Ok(Parsed::Incomplete), "cut at {cut}");
        }
    }
    let Ok(value) = hyper::header::HeaderValue::from_bytes(data) else {
        return;
    };
    let peer = IpAddr::from([10, 1, 2, 3]);
    for (name, proxies) in ["x-forwarded-for", "forwarded"].iter().zip(PROXIES.iter()) {
        let mut headers = hyper::HeaderMap::new();
        headers.insert(*name, value.clone());
        let _ = proxies.client(&headers, peer);
    }
});
