//! Frame codec: decoding masked client frames in place, encoding server frames once.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use wsgate::frame::{Decoded, Decoder, OpCode, encode};

fn masked_frame(payload: &[u8]) -> Vec<u8> {
    let mask = [1, 2, 3, 4];
    let mut out = vec![0x81];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
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
