//! Fan-out: one broadcast to a room of N members on one shard. The gateway encodes once and
//! queues the same `Bytes` (a refcount bump) to each member; `naive-encode-each` is the seed's
//! design (JSON serialized per recipient), measured on the same queues for comparison. And the
//! `drop` policy with every queue full, at two queue depths.

use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use wsgate::config::SlowConsumerPolicy;
use wsgate::conn::outbound;
use wsgate::fanout::{self, Publication};
use wsgate::node::{CHAT, Node};
use wsgate::protocol::ServerMessage;
use wsgate::runtime::Newcomer;
use wsgate::runtime::shard::Shard;
use wsgate::{Config, rooms};

/// A one-shard node whose room "r" has `members` chat connections (no sockets: fan-out only
/// touches the slab and the queues).
fn shard_with_room(members: usize) -> Rc<Shard> {
    shard_with_room_under(
        members,
        Config {
            shards: 1,
            ..Config::default()
        },
    )
}

fn shard_with_room_under(members: usize, config: Config) -> Rc<Shard> {
    let (node, _inboxes, _) = Node::new(Arc::new(config), 1 << 20).expect("node");
    let shard = node.shard(0);
    let shared = &node.shared;
    for _ in 0..members {
        let peer = std::net::IpAddr::from([127, 0, 0, 1]);
        let key = shard.register(Newcomer::plain(CHAT, shared.anonymous.clone(), peer));
        let joined = shard
            .state()
            .rooms
            .join(&shared.rooms, 0, "r", key, None, None);
        assert!(matches!(joined, Ok(rooms::Joined::Joined(_))));
    }
    drain(&shard);
    shard
}

/// Empties every queue, as if each connection's socket took all of it.
fn drain(shard: &Shard) {
    let mut guard = shard.state();
    let state = &mut *guard;
    for (_, conn) in state.conns.iter_mut() {
        while !conn.outbound.is_empty() {
            let mut slices = [std::io::IoSlice::new(&[]); 64];
            let n = conn.outbound.slices(&mut slices);
            let written = slices[..n].iter().map(|s| s.len()).sum();
            conn.outbound.advance(written, &mut state.queued);
        }
    }
}

fn message() -> ServerMessage<'static> {
    ServerMessage::ChatMessage {
        room: "r",
        username: "Anonymous",
        user_id: "anonymous",
        message: "Hello everyone, how is the migration going?",
        timestamp: 1_764_000_000_000,
    }
}

/// Times only `deliver`; the queues are emptied between rounds, outside the clock.
fn timed(shard: &Shard, iters: u64, mut deliver: impl FnMut(&Shard)) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let start = Instant::now();
        deliver(shard);
        total += start.elapsed();
        drain(shard);
    }
    total
}

fn fanout(c: &mut Criterion) {
    let mut group = c.benchmark_group("fanout");
    for members in [1, 100, 10_000] {
        let shard = shard_with_room(members);
        group.throughput(Throughput::Elements(members as u64));
        group.bench_function(BenchmarkId::new("encode-once", members), |b| {
            b.iter_custom(|iters| {
                timed(&shard, iters, |shard| {
                    fanout::deliver(shard, &Publication::to_room("r".into(), message().encode()))
                })
            })
        });
        group.bench_function(BenchmarkId::new("naive-encode-each", members), |b| {
            b.iter_custom(|iters| {
                timed(&shard, iters, |shard| {
                    let mut state = shard.state();
                    let state = &mut *state;
                    let room = state.rooms.get("r").unwrap();
                    for &key in room.members.keys() {
                        state.conns[key]
                            .outbound
                            .push(message().encode(), &mut state.queued);
                    }
                })
            })
        });
    }
    group.finish();
}

/// The `drop` policy with every member's queue full (`depth` broadcasts behind, none read): each
/// new broadcast drops each member's oldest. The cost per recipient must not grow with the depth.
fn drop_policy(c: &mut Criterion) {
    const MEMBERS: usize = 1000;
    let mut group = c.benchmark_group("fanout/drop-policy-full-queues");
    for depth in [100, 10_000] {
        let frame = message().encode();
        let config = Config {
            shards: 1,
            slow_consumer_policy: SlowConsumerPolicy::Drop,
            max_queued_bytes: depth * outbound::cost(&frame),
            ..Config::default()
        };
        let shard = shard_with_room_under(MEMBERS, config);
        for _ in 0..depth {
            fanout::deliver(&shard, &Publication::to_room("r".into(), frame.clone()));
        }
        // None of it was read: it is all the readers' backlog.
        for (_, conn) in shard.state().conns.iter_mut() {
            conn.outbound.mark_stale();
        }
        group.throughput(Throughput::Elements(MEMBERS as u64));
        group.bench_function(BenchmarkId::from_parameter(depth), |b| {
            b.iter(|| fanout::deliver(&shard, &Publication::to_room("r".into(), frame.clone())))
        });
        let dropped = shard
            .shared
            .counters
            .dropped_messages
            .load(Ordering::Relaxed);
        assert!(dropped > 0, "the queues were full: broadcasts were dropped");
    }
    group.finish();
}

criterion_group!(benches, fanout, drop_policy);
criterion_main!(benches);
