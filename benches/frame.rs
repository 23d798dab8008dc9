//! Frame codec: decoding masked client frames in place, encoding server frames once.

#[path = "../tests/support/client_frame.rs"]
mod client_frame;

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use wsgate::ws::frame::{Decoded, Decoder, OpCode, encode};

fn masked_frame(payload: &[u8]) -> Vec<u8> {
    client_frame::client_frame(true, 0x1, payload, Some([1, 2, 3, 4]))
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame/decode");
    for size in [20, 1024, 16 * 1024] {
        let frame = masked_frame(&vec![b'a'; size]);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &frame, |b, frame| {
            let mut decoder = Decoder::new(64 * 1024);
            let mut buf = frame.clone();
            b.iter(|| {
                // Decoding unmasks in place; re-masking is the same XOR, so the next round
                // decodes the original frame again.
                buf.copy_from_slice(frame);
                match decoder.decode(black_box(&mut buf)) {
                    Ok(Decoded::Frame { consumed, .. }) => consumed,
                    _ => unreachable!(),
                }
            });
        });
    }
    group.finish();
}

fn encode_frames(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame/encode");
    for size in [20, 1024, 16 * 1024] {
        let payload = vec![b'a'; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &payload, |b, payload| {
            b.iter(|| encode(OpCode::Text, black_box(payload)))
        });
    }
    group.finish();
}

criterion_group!(benches, decode, encode_frames);
criterion_main!(benches);
