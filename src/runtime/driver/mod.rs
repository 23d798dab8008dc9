//! The driver: how a shard's WebSocket connections meet their sockets — the shard's own event
//! loop ([`event_loop`]) over a slab of connections ([`connection`]) with no task each, on an
//! io_uring ring ([`uring`]) or, where the kernel or sandbox has none, epoll ([`epoll`]); its
//! delivery of what other shards send, its heartbeat ticks and its drain at shutdown — and the
//! node's timed chores ([`housekeeping`]). It uses only the shard's synchronous calls
//! ([`Shard::register`], [`crate::runtime::input::Input`], the slab entry's outbound queue,
//! [`Shard::tick`], [`Shard::unregister`]). What stays on tokio: the HTTP edge (accept, hyper;
//! the upgrade hands the socket to [`EventLoop::adopt`]), the bus's inbox (a tokio channel the
//! loop also waits on), timers, and the shard thread's runtime (`server.rs`) that runs the loop
//! as one task.

pub mod connection;
pub mod epoll;
pub mod event_loop;
mod socket;
pub mod uring;
mod wake;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Shared;
use super::bus::{Inbox, Sent};
use super::shard::Shard;
use crate::config::Engine;

pub use event_loop::EventLoop;
use event_loop::Turns;

/// The engine the shards' loops run on for `wanted`: `auto` is io_uring where this kernel and
/// sandbox run it (a probe ring with `buffers` receive buffers says), else epoll; `io_uring`
/// without it is an error that says why.
pub fn choose(wanted: Engine, buffers: u16) -> io::Result<Engine> {
    match wanted {
        Engine::Epoll => Ok(Engine::Epoll),
        Engine::IoUring => uring::probe(buffers)
            .map(|()| Engine::IoUring)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("engine = io_uring, but io_uring is unavailable here: {e}"),
                )
            }),
        Engine::Auto => match uring::probe(buffers) {
            Ok(()) => Ok(Engine::IoUring),
            Err(e) => {
                warn!(error = %e, "io_uring is unavailable here: the shards run on epoll");
                Ok(Engine::Epoll)
            }
        },
    }
}

/// Runs a shard's loop until `shutdown`; then drains it (see `drain`) once `settled()` resolves
/// (what was handed to the broker is answered) or at `drain_timeout`.
pub async fn run<F: Future<Output = ()>>(
    shard: &Shard,
    event_loop: &EventLoop,
    inbox: &mut Inbox,
    shutdown: &CancellationToken,
    settled: impl FnOnce() -> F,
) {
    let mut turns = Turns::new(event_loop, shard, inbox);
    turns.run_until(|_| false, None, Some(shutdown)).await;
    drain(&mut turns, shard, settled()).await;
}

/// Runs a batch from the inbox; the latency of each publication (from the bus to its
/// recipients' queues) goes to the shard's metrics.
fn deliver_batch(shard: &Shard, batch: &mut Vec<Sent>) {
    let latency = &shard.metrics().delivery_latency;
    for (delivery, sent) in batch.drain(..) {
        delivery.run(shard);
        if delivery.is_publication() {
            latency.observe(sent.elapsed());
        }
    }
}

/// Shutdown of one shard: what was published before the signal is delivered, then every
/// connection gets 1001 after its queue, and the loop runs until the close handshakes are over.
async fn drain(turns: &mut Turns<'_>, shard: &Shard, settled: impl Future<Output = ()>) {
    let deadline = Instant::now() + shard.shared.config.drain_timeout;
    // Room messages on their way to the broker are answered first (published, or refused), and
    // the answers delivered, before the connections close; the loop serves meanwhile.
    tokio::select! {
        () = settled => {}
        () = turns.run_until(|_| false, Some(deadline), None) => {}
    }
    while Instant::now() < deadline && turns.deliver_inbox() {
        turns.turn_once().await;
    }
    let open = shard.connection_count();
    shard.close_all_going_away();
    turns
        .run_until(|s| s.connection_count() == 0, Some(deadline), None)
        .await;
    let left = shard.connection_count();
    turns.finish_all();
    if left > 0 {
        warn!(
            shard = shard.index,
            open, left, "drain timeout: dropping connections"
        );
    } else {
        info!(shard = shard.index, closed = open, "drained");
    }
}

/// The node's chores, once per `every`: forgetting rooms whose members are gone and whose history
/// expired, and logging refusals and forced closes as one line per reason that counted, the count
/// a field (exact totals stay in the counters), not one line per event: under an attack or a mass
/// disconnect, per-event lines would let a client drive the log volume and stall the shards on
/// the log writer's lock.
pub async fn housekeeping(shared: Arc<Shared>, every: Duration) {
    // From zero, not from the values now: refusals before this task first runs are logged too.
    let mut last: Vec<(String, u64)> = shared
        .counters
        .values()
        .into_iter()
        .map(|(name, _)| (name, 0))
        .collect();
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        shared.rooms.sweep();
        let now = shared.counters.values();
        // One line per reason that counted, its count a field (a log collector sums them):
        // at most one line per reason per interval, however many refusals.
        for ((reason, new), (_, old)) in now.iter().zip(&last) {
            if new > old {
                info!(
                    reason = %reason,
                    count = new - old,
                    interval = ?every,
                    "refused or closed"
                );
            }
        }
        last = now;
    }
}
