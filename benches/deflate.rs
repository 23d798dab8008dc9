//! permessage-deflate: what compressing a chat message on its own (no context takeover) costs
//! and saves, by size — where `MIN_COMPRESSED_PAYLOAD` comes from — and what inflating costs.
//! The compressed sizes are printed once per size before the timings.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use wsgate::ws::deflate::{self, Deflate};
use wsgate::ws::frame::{OpCode, encode, server_payload};

/// A chat message as members get it, its text padded with words to `len` bytes of JSON.
fn chat_json(len: usize) -> Vec<u8> {
    let head = r#"{"type":"chat_message","room":"general","username":"alice","userId":"u-4821","message":""#;
    let tail = r#"","timestamp":1765432109876,"offset":4242}"#;
    let words = [
        "see", "you", "at", "the", "standup", "in", "five", "minutes",
    ];
    let mut text = String::new();
    for word in words.iter().cycle() {
        if head.len() + text.len() + tail.len() >= len {
            break;
        }
        text.push_str(word);
        text.push(' ');
    }
    let json = format!("{head}{text}{tail}");
    json.into_bytes()
}

fn agreed() -> Deflate {
    deflate::negotiate([b"permessage-deflate".as_slice()])
        .expect("a plain offer is agreed")
        .deflate
}

const SIZES: [usize; 6] = [128, 192, 256, 512, 1024, 4096];

fn compress(c: &mut Criterion) {
    let on = agreed();
    let mut group = c.benchmark_group("deflate/compress");
    for size in SIZES {
        let frame = encode(OpCode::Text, &chat_json(size));
        let payload = server_payload(&frame).len();
        let compressed = deflate::for_connection(frame.clone(), on);
        let sent = server_payload(&compressed).len();
        eprintln!(
            "chat JSON of {payload} B: {sent} B compressed ({:.0}%)",
            100.0 * sent as f64 / payload as f64
        );
        group.throughput(Throughput::Bytes(payload as u64));
        group.bench_with_input(BenchmarkId::from_parameter(payload), &frame, |b, frame| {
            b.iter(|| deflate::for_connection(black_box(frame.clone()), on))
        });
    }
    group.finish();
}

fn inflate(c: &mut Criterion) {
    let on = agreed();
    let mut group = c.benchmark_group("deflate/inflate");
    for size in SIZES {
        let compressed = deflate::for_connection(encode(OpCode::Text, &chat_json(size)), on);
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
