//! Opening a worker's share of the connections at a rate, spread over targets and sources.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fastwebsockets::{Frame, OpCode, Payload};
use tokio::sync::{Semaphore, mpsc, watch};
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
        let mut ws = client::connect(source, target, &path, common.compression).await?;
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

/// Connections a ramp opened. Until the run takes them, each one is parked in its own task,
/// which sends a ping every `keepalive` so a long ramp does not get the first connections closed
/// for silence (the gateway counts any frame as a sign of life; a parked connection does not
/// read, so it answers the gateway's pings only once the run reads again).
pub struct Held {
    parked: JoinSet<Parked<Numbered>>,
    release: watch::Sender<bool>,
    /// Connections the run has finished with, kept open until the worker exits.
    pub kept: Vec<Numbered>,
}

impl Held {
    /// Ends the parking: the connections still open, in index order. One that closed while
    /// parked moves in `opening` from connected to failed (`closed_while_waiting`).
    pub async fn release(&mut self, opening: &mut Opening) -> Vec<Numbered> {
        let _ = self.release.send(true);
        let mut open = Vec::with_capacity(self.parked.len());
        while let Some(parked) = self.parked.join_next().await {
            match parked.expect("parked connection does not panic") {
                Parked::Open(numbered) => open.push(numbered),
                Parked::NeverOpened => {}
                Parked::Closed => {
                    opening.connected -= 1;
                    *opening
                        .failures
                        .entry(Failure::ClosedWhileWaiting)
                        .or_insert(0) += 1;
                }
            }
        }
        open.sort_unstable_by_key(|(index, _)| *index);
        open
    }
}

/// How a parking task ended.
enum Parked<T> {
    /// The attempt failed (counted as such when it reported).
    NeverOpened,
    /// Closed by the other side while waiting.
    Closed,
    Open(T),
}

async fn park(mut ws: Ws, keepalive: Duration, mut release: watch::Receiver<bool>) -> Option<Ws> {
    loop {
        if *release.borrow_and_update() {
            return Some(ws);
        }
        tokio::select! {
            // Released, or the sender is gone (the worker is ending): either way, hand it back.
            changed = release.changed() => if changed.is_err() {
                return Some(ws);
            },
            _ = tokio::time::sleep(keepalive) => {
                let ping = Frame::new(true, OpCode::Ping, None, Payload::Borrowed(&[]));
                ws.write_frame(ping).await.ok()?;
            }
        }
    }
}

/// Opens this worker's share of a group of `ramp.connections` connections whose global indices
/// start at `offset`, at its share of `ramp.rate`; returns once every attempt has succeeded or
/// failed.
pub async fn open_share(
    common: &Common,
    ramp: &Ramp,
    worker: Worker,
    offset: usize,
    setup: Setup,
    progress: &Arc<Progress>,
) -> (Held, Opening) {
    let (first, count) = worker.share(ramp.connections);
    let in_flight = Arc::new(Semaphore::new(ramp.concurrency.max(1)));
    let (release, released) = watch::channel(false);
    let (outcomes, mut outcome) = mpsc::unbounded_channel();
    let mut parked = JoinSet::new();
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
        let (outcomes, released, keepalive) = (outcomes.clone(), released.clone(), ramp.keepalive);
        parked.spawn(async move {
            let begun = Instant::now();
            let result = open_one(&common, index, setup.greeting, room, timeout).await;
            drop(permit);
            let (result, ws) = match result {
                Ok(ws) => {
                    progress.connected();
                    (Ok(begun.elapsed()), Some(ws))
                }
                Err(cause) => {
                    progress.failed();
                    (Err(cause), None)
                }
            };
            let _ = outcomes.send(result);
            match ws {
                Some(ws) => park(ws, keepalive, released)
                    .await
                    .map_or(Parked::Closed, |ws| Parked::Open((index, ws))),
                None => Parked::NeverOpened,
            }
        });
    }
    let mut opening = Opening::default();
    for _ in 0..count {
        opening.record(outcome.recv().await.expect("every attempt reports"));
    }
    let held = Held {
        parked,
        release,
        kept: Vec::with_capacity(count),
    };
    (held, opening)
}
