//! Token verification on arbitrary strings: never panics, and refuses everything not signed with
//! the key (the fuzzer cannot forge an HMAC), naming a known reason.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use wsgate::Config;
use wsgate::auth::{AuthError, Authenticator};

static AUTH: LazyLock<Authenticator> = LazyLock::new(|| {
    let config = Config {
        jwt_secret: Some("fuzzing-secret-0123456789".into()),
        ..Config::default()
    };
    Authenticator::from_config(&config).expect("authenticator")
});

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    match AUTH.verify(token) {
        Ok(identity) => panic!("a forged token passed as {:?}", identity.user_id),
        Err(e) => assert!(AuthError::ALL.contains(&e)),
    }
});
