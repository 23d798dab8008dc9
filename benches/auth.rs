//! JWT verification at upgrade: what one handshake's token check costs, per algorithm, and what
//! refusing a forged token costs (it must not be more).

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use wsgate::Config;
use wsgate::auth::{Authenticator, claims_for};

const SECRET: &str = "bench-secret-0123456789abcdef";

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// An authenticator for the key, and a valid token signed with its private half.
fn setup(alg: Algorithm) -> (Authenticator, String) {
    let claims = claims_for("bench-user", Some("Bench"), Duration::from_secs(3600));
    let (config, key) = match alg {
        Algorithm::HS256 => (
            Config {
                jwt_secret: Some(SECRET.into()),
                ..Config::default()
            },
            EncodingKey::from_secret(SECRET.as_bytes()),
        ),
        _ => {
            let (public, private) = match alg {
                Algorithm::RS256 => ("rsa-public.pem", "rsa-private.pem"),
                Algorithm::ES256 => ("ec-public.pem", "ec-private.pem"),
                _ => ("ed25519-public.pem", "ed25519-private.pem"),
            };
            let pem = std::fs::read(fixture(private)).unwrap();
            let key = match alg {
                Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
                Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
                _ => EncodingKey::from_ed_pem(&pem),
            }
            .unwrap();
            let config = Config {
                jwt_public_key_file: Some(fixture(public).into()),
                ..Config::default()
            };
            (config, key)
        }
    };
    let token = jsonwebtoken::encode(&Header::new(alg), &claims, &key).unwrap();
    (Authenticator::from_config(&config).unwrap(), token)
}

fn verify(c: &mut Criterion) {
    let mut group = c.benchmark_group("auth/verify");
    group.throughput(Throughput::Elements(1));
    for alg in [
        Algorithm::HS256,
        Algorithm::RS256,
        Algorithm::ES256,
        Algorithm::EdDSA,
    ] {
        let (auth, token) = setup(alg);
        assert!(auth.verify(&token).is_ok(), "{alg:?} token verifies");
        group.bench_function(format!("{alg:?}"), |b| {
            b.iter(|| auth.verify(black_box(&token)).is_ok())
        });
    }
    // A token whose signature is wrong: refused after the same one check.
    let (auth, token) = setup(Algorithm::HS256);
    let forged = format!("{}AAAA", &token[..token.len() - 4]);
    assert!(auth.verify(&forged).is_err());
    group.bench_function("HS256 forged", |b| {
        b.iter(|| auth.verify(black_box(&forged)).is_err())
    });
    group.finish();
}

criterion_group!(benches, verify);
criterion_main!(benches);
