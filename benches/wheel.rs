//! The per-shard timer wheel behind heartbeats: cost per insert, per expired item, per tick.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use wsgate::runtime::wheel::TimerWheel;

/// Heartbeat-like horizon: 40 s of 100 ms ticks.
const HORIZON: u64 = 400;

fn insert(c: &mut Criterion) {
    let mut group = c.benchmark_group("wheel/insert");
    group.throughput(Throughput::Elements(1));
    group.bench_function("one", |b| {
        let mut wheel = TimerWheel::new(HORIZON);
        let mut i = 0u64;
        let mut sink = Vec::new();
        b.iter(|| {
            i += 1;
            wheel.insert(black_box(wheel.now() + 1 + i % HORIZON), (i as u32, 0u32));
            // Keep the wheel from growing without bound: turn it now and then.
            if i.is_multiple_of(100_000) {
                let now = wheel.now();
                wheel.advance(now + HORIZON, &mut sink);
                sink.clear();
            }
        });
    });
    group.finish();
}

/// One tick of a wheel holding `n` connections spread evenly over its slots, each re-filed as
/// it comes out (what the heartbeat does): the cost of a tick, and per connection handled.
fn tick(c: &mut Criterion) {
    let mut group = c.benchmark_group("wheel/tick");
    for n in [10_000u64, 100_000] {
        let mut wheel = TimerWheel::new(HORIZON);
        for i in 0..n {
            wheel.insert(1 + i % HORIZON, (i as u32, 0u32));
        }
        let mut expired = Vec::new();
        group.throughput(Throughput::Elements(n / HORIZON));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                let now = wheel.now() + 1;
                wheel.advance(now, &mut expired);
                for item in expired.drain(..) {
                    wheel.insert(now + HORIZON, item);
                }
            })
        });
    }
    group.finish();
}

/// Cancelling is lazy: nothing happens when a connection leaves, and its entry is skipped when
/// it comes out, by comparing generations (as the heartbeat does against the slab). This is one
/// tick of 100k connections that have all left: the whole cost of cancelling them.
fn cancelled(c: &mut Criterion) {
    let n = 100_000u64;
    let mut group = c.benchmark_group("wheel/cancelled");
    let mut wheel = TimerWheel::new(HORIZON);
    for i in 0..n {
        wheel.insert(1 + i % HORIZON, (i as u32, 0u32));
    }
    // Every connection's generation moved on: each entry is stale.
    let generations = vec![1u32; n as usize];
    let mut expired = Vec::new();
    group.throughput(Throughput::Elements(n / HORIZON));
    group.bench_function(BenchmarkId::from_parameter(n), |b| {
        b.iter(|| {
            let now = wheel.now() + 1;
            wheel.advance(now, &mut expired);
            let mut live = 0;
            for (key, generation) in expired.drain(..) {
                if generations[key as usize] == generation {
                    live += 1;
                }
            }
            // Refill the slot so every round has the same work.
            for i in 0..n / HORIZON {
                wheel.insert(now + HORIZON, (i as u32, 0));
            }
            black_box(live)
        })
    });
    group.finish();
}

criterion_group!(benches, insert, tick, cancelled);
criterion_main!(benches);
