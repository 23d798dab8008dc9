//! The driver: how a shard's WebSocket connections meet their sockets — today a tokio task per
//! connection ([`connection`]) with its readiness, the shard's delivery loop, its heartbeat timer
//! and its drain at shutdown — and the node's timed chores ([`housekeeping`]). It uses only the
//! shard's synchronous calls ([`Shard::register`], [`crate::runtime::input::Input`], the slab
//! entry's outbound queue, [`Shard::tick`], [`Shard::unregister`]): another I/O engine (io_uring,
//! epoll) is another driver beside this one. What stays on tokio whatever the driver: the HTTP
//! edge (accept, hyper, the upgrade hands the socket to [`connection::serve`]), the bus's inbox
//! (a tokio channel the loop waits on) and the shard thread's runtime (`server.rs`).

pub mod connection;

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Shared;
use super::bus::{Inbox, Sent};
use super::shard::Shard;
use super::wheel::Tick;

/// Runs a shard until `shutdown`: delivers what reaches its inbox and drives its heartbeats; then
/// drains it (see `drain`) once `settled()` resolves (what was handed to the broker is answered)
/// or at `drain_timeout`.
pub async fn run<F: Future<Output = ()>>(
    shard: &Rc<Shard>,
    inbox: &mut Inbox,
    shutdown: &CancellationToken,
    settled: impl FnOnce() -> F,
) {
    let heartbeats = tokio::task::spawn_local(heartbeats(shard.clone()));
    deliver_until(shard, inbox, shutdown).await;
    drain(shard, inbox, settled()).await;
    heartbeats.abort();
}

/// Drives a shard's wheel, one coarse tick at a time.
async fn heartbeats(shard: Rc<Shard>) {
    let tick = shard.tick_interval();
    let start = tokio::time::Instant::now();
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let now = (start.elapsed().as_nanos() / tick.as_nanos()) as Tick;
        shard.tick(now);
    }
}

/// Delivers what other shards publish to this shard's clients, until shutdown, a batch at a
/// time: connections write once per batch, and each is charged only for what it was given a chance
/// to write and did not (see `outbound`), so a burst is not held against a fast reader.
async fn deliver_until(shard: &Shard, inbox: &mut Inbox, shutdown: &CancellationToken) {
    let mut batch = Vec::new();
    loop {
        let more = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            more = inbox.recv_batch(&mut batch) => more,
        };
        if !more {
            return;
        }
        deliver_batch(shard, &mut batch);
        // Let the connections write this batch before the next one lands in their queues.
        tokio::task::yield_now().await;
    }
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
/// connection gets 1001 after its queue, and the shard waits for the close handshakes.
async fn drain(shard: &Shard, inbox: &mut Inbox, settled: impl Future<Output = ()>) {
    let deadline = tokio::time::Instant::now() + shard.shared.config.drain_timeout;
    // Room messages on their way to the broker are answered first (published, or refused), and
    // the answers delivered below, before the connections close.
    let _ = tokio::time::timeout_at(deadline, settled).await;
    let mut batch = Vec::new();
    loop {
        inbox.try_recv_batch(&mut batch);
        if batch.is_empty() {
            break;
        }
        deliver_batch(shard, &mut batch);
        tokio::task::yield_now().await;
        if tokio::time::Instant::now() >= deadline {
            break;
        }
    }
    let open = shard.connection_count();
    shard.close_all_going_away();
    while shard.connection_count() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let left = shard.connection_count();
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
/// expired, and logging refusals and forced closes as one line with the count of each reason
/// (exact totals stay in the counters), not one line per event: under an attack or a mass
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
        let changed: Vec<String> = now
            .iter()
            .zip(&last)
            .filter(|((_, new), (_, old))| new > old)
            .map(|((name, new), (_, old))| format!("{name}={}", new - old))
            .collect();
        if !changed.is_empty() {
            info!(
                interval = ?every,
                "refused or closed: {}",
                changed.join(" ")
            );
        }
        last = now;
    }
}
