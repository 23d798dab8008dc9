//! permessage-deflate: what compressing a chat message on its own (no context takeover) costs
//! and saves, by size — where `MIN_SHARED_PAYLOAD` and `MIN_OWN_PAYLOAD` come from —, for one connection (a reply,
//! the faster level) and for many (a publication, compressed once at the tighter level), and what
//! inflating costs. The compressed sizes are printed once per size before the timings.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use wsgate::ws::deflate::{self, Deflate, Prepared};
use wsgate::ws::frame::{OpCode, encode, server_payload};

/// A chat message as members get it, its text words drawn (pseudo-randomly, the same each run)
/// from a few hundred bytes of English, padded to `len` bytes of JSON.
fn chat_json(len: usize) -> Vec<u8> {
    let head = r#"{"type":"chat_message","room":"general","username":"alice","userId":"u-4821","message":""#;
    let tail = r#"","timestamp":1765432109876,"offset":4242}"#;
    let words: Vec<&str> = "we could ship the release on friday if the tests pass but the staging \
        cluster still shows a memory leak in the session store so maybe wait until monday when \
        everyone is back and we have time to look at the heap profiles together with the team \
        that owns the cache layer because their last change touched eviction and retries"
        .split_whitespace()
        .collect();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut text = String::new();
    while head.len() + text.len() + tail.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        text.push_str(words[(state % words.len() as u64) as usize]);
        text.push(' ');
    }
    format!("{head}{text}{tail}").into_bytes()
}

fn agreed() -> Deflate {
    deflate::negotiate([b"permessage-deflate".as_slice()])
        .expect("a plain offer is agreed")
        .deflate
}

const SIZES: [usize; 6] = [128, 192, 256, 512, 1024, 4096];

fn compress(c: &mut Criterion) {
    let on = agreed();
    for (name, shared) in [("reply", false), ("publication", true)] {
        // A publication: compressed when its first compressing recipient takes it.
        let compressed = |frame: &bytes::Bytes| match shared {
            true => Prepared::new(frame.clone()).for_connection(on, || {}),
            false => deflate::for_connection(frame.clone(), on),
        };
        let mut group = c.benchmark_group(format!("deflate/compress-{name}"));
        for size in SIZES {
            let frame = encode(OpCode::Text, &chat_json(size));
            let payload = server_payload(&frame).len();
            let sent = server_payload(&compressed(&frame)).len();
            eprintln!(
                "{name}: chat JSON of {payload} B: {sent} B compressed ({:.0}%)",
                100.0 * sent as f64 / payload as f64
            );
            group.throughput(Throughput::Bytes(payload as u64));
            group.bench_with_input(BenchmarkId::from_parameter(payload), &frame, |b, frame| {
                b.iter(|| compressed(black_box(frame)))
            });
        }
        group.finish();
    }
}

fn inflate(c: &mut Criterion) {
    let on = agreed();
    let mut group = c.benchmark_group("deflate/inflate");
    for size in SIZES {
        let frame = Prepared::new(encode(OpCode::Text, &chat_json(size)));
        let compressed = frame.for_connection(on, || {});
        assert_eq!(
            compressed[0] & 0x40,
            0x40,
            "a compressed frame of {size} bytes"
        );
        let payload = server_payload(&compressed);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &payload, |b, payload| {
            b.iter(|| deflate::inflate(black_box(payload), 1 << 20, |m| m.len()).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, compress, inflate);
criterion_main!(benches);
