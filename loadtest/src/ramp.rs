//! Opening a worker's share of the connections at a rate, spread over targets and sources.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::cli::{Common, Ramp, Worker};
use crate::client::{self, Failure, Ws};
use crate::progress::Progress;
use crate::report::Opening;

/// A connection and its index in the whole run (over all workers): it picks the target, the
/// source address and, in the scenarios with rooms, the room.
pub type Numbered = (usize, Ws);

/// The name of room `n` of a run.
pub fn room_name(n: usize) -> String {
    format!("lt-{n}")
}

/// What every connection does once upgraded, before it counts as open.
#[derive(Clone, Copy)]
pub struct Setup {
    /// Read the chat endpoint's `connected` greeting.
    pub greeting: bool,
    /// Join one of this many rooms, round-robin by position in the group.
    pub rooms: Option<usize>,
}

/// Opens connection `index`: TCP from its source to its target, the upgrade, the greeting if
/// `greeting`, and joining `room` if given.
pub async fn open_one(
    common: &Common,
    index: usize,
    greeting: bool,
    room: Option<String>,
    timeout: Duration,
) -> Result<Ws, Failure> {
    let source = common.source_ips.0[index % common.source_ips.0.len()];
    let target = common.targets[index % common.targets.len()];
    let path = common.url_path();
    tokio::time::timeout(timeout, async {
        let mut ws = client::connect(source, target, &path).await?;
        if greeting {
            client::read_greeting(&mut ws).await?;
        }
        if let Some(room) = room {
            client::join(&mut ws, &room).await?;
        }
        Ok(ws)
    })
    .await
    .unwrap_or(Err(Failure::Timeout))
}

/// Opens this worker's share of a group of `ramp.connections` connections whose global indices
/// start at `offset`, at its share of `ramp.rate`.
pub async fn open_share(
    common: &Common,
    ramp: &Ramp,
    worker: Worker,
    offset: usize,
    setup: Setup,
    progress: &Arc<Progress>,
) -> (Vec<Numbered>, Opening) {
    let (first, count) = worker.share(ramp.connections);
    let in_flight = Arc::new(Semaphore::new(ramp.concurrency.max(1)));
    let mut attempts = JoinSet::new();
    let rate = worker.rate(ramp.rate).max(0.001);
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    for index in offset + first..offset + first + count {
        ticker.tick().await;
        let permit = in_flight
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore open");
        let (common, progress, timeout) =
            (common.clone(), progress.clone(), ramp.handshake_timeout);
        let room = setup
            .rooms
            .map(|rooms| room_name((index - offset) % rooms.max(1)));
        attempts.spawn(async move {
            let begun = Instant::now();
            let result = open_one(&common, index, setup.greeting, room, timeout).await;
            drop(permit);
            match &result {
                Ok(_) => progress.connected(),
                Err(_) => progress.failed(),
            }
            (index, begun.elapsed(), result)
        });
    }
    let mut held = Vec::with_capacity(count);
    let mut opening = Opening::default();
    while let Some(joined) = attempts.join_next().await {
        let (index, took, result) = joined.expect("connection task does not panic");
        match result {
            Ok(ws) => {
                opening.handshake.record(took);
                opening.connected += 1;
                held.push((index, ws));
            }
            Err(cause) => *opening.failures.entry(cause).or_insert(0) += 1,
        }
    }
    held.sort_unstable_by_key(|(index, _)| *index);
    (held, opening)
}
