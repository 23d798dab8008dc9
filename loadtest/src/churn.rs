//! The `churn` scenario: steady connections exchange echoes on a schedule while short-lived
//! connections open (joining a room on the chat endpoint), live a little and close with a close
//! handshake, at a rate. Shows what connection turnover costs the traffic that stays, and that
//! every opened connection is closed cleanly.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::cli::{ChurnArgs, Common, Worker};
use crate::client;
use crate::driver::{Outcome, Scenario};
use crate::echo::{self, Message, Pace};
use crate::hist::Latencies;
use crate::progress::Progress;
use crate::ramp::{self, Held, Setup, room_name};
use crate::report::{self, Measured, Opening, OpeningSummary, Percentiles};

/// Global indices of short-lived connections start here (after any steady ones), so they
/// spread over targets and sources the same way.
const CHURN_INDEX_BASE: usize = 1 << 32;

pub(crate) struct Churn(pub ChurnArgs);

#[derive(Serialize, Deserialize, Default)]
pub(crate) struct ChurnPartial {
    steady: Opening,
    echo: Latencies,
    steady_broken_off: u64,
    churned: Opening,
    closed_cleanly: u64,
    close_failures: u64,
}

#[derive(Serialize)]
pub(crate) struct ChurnReport {
    steady: OpeningSummary,
    /// Steady connections' round trips, from when each message was due.
    echo: Percentiles,
    steady_broken_off: u64,
    churned: OpeningSummary,
    churned_per_second: f64,
    closed_cleanly: u64,
    close_failures: u64,
    measured: Measured,
}

/// Opens one short-lived connection, holds it for `lifetime`, closes it.
async fn churn_one(
    common: Common,
    index: usize,
    lifetime: Duration,
    timeout: Duration,
) -> (Result<Duration, client::Failure>, bool) {
    let begun = std::time::Instant::now();
    let room = common.chat_protocol().then(|| room_name(0));
    let opened = ramp::open_one(&common, index, common.chat_protocol(), room, timeout).await;
    match opened {
        Ok(ws) => {
            let took = begun.elapsed();
            tokio::time::sleep(lifetime).await;
            let clean = tokio::time::timeout(timeout, client::close(ws))
                .await
                .unwrap_or(false);
            (Ok(took), clean)
        }
        Err(cause) => (Err(cause), false),
    }
}

impl Scenario for Churn {
    type Prepared = (Held, Opening);
    type Partial = ChurnPartial;
    type Report = ChurnReport;

    fn common(&self) -> &Common {
        &self.0.common
    }

    fn connections(&self) -> usize {
        self.0.ramp.connections
    }

    async fn prepare(&self, worker: Worker, progress: Arc<Progress>) -> Self::Prepared {
        let setup = Setup {
            greeting: self.0.common.chat_protocol(),
            rooms: None,
        };
        ramp::open_share(&self.0.common, &self.0.ramp, worker, 0, setup, &progress).await
    }

    async fn run(
        &self,
        (held, opening): &mut Self::Prepared,
        worker: Worker,
        progress: Arc<Progress>,
    ) -> ChurnPartial {
        let args = &self.0;
        let start = Instant::now();
        let deadline = start + args.duration;
        let message = Message::new(args.payload, args.common.chat_protocol());
        let interval = Duration::from_secs_f64(1.0 / args.message_rate.max(1e-3));
        let total = args.ramp.connections.max(1);
        let mut steady = JoinSet::new();
        for (index, mut ws) in held.release(opening).await {
            let (message, progress) = (message.clone(), progress.clone());
            steady.spawn(async move {
                let pace = Pace::staggered(start, interval, index, total);
                let done = echo::exchange(&mut ws, &message, pace, deadline, None, &progress).await;
                (index, ws, done)
            });
        }

        let mut churners = JoinSet::new();
        let rate = worker.rate(args.churn_rate).max(1e-3);
        let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        let mut next = CHURN_INDEX_BASE + worker.index as usize;
        while Instant::now() < deadline {
            ticker.tick().await;
            let common = args.common.clone();
            let (lifetime, timeout) = (args.lifetime, args.ramp.handshake_timeout);
            churners.spawn(churn_one(common, next, lifetime, timeout));
            next += worker.count as usize;
        }

        let mut partial = ChurnPartial {
            steady: std::mem::take(opening),
            ..ChurnPartial::default()
        };
        while let Some(joined) = churners.join_next().await {
            let (opened, clean) = joined.expect("churner does not panic");
            if opened.is_ok() {
                partial.closed_cleanly += u64::from(clean);
                partial.close_failures += u64::from(!clean);
                progress.message();
            }
            partial.churned.record(opened);
        }
        while let Some(joined) = steady.join_next().await {
            let (index, ws, done) = joined.expect("echo loop does not panic");
            partial.echo.merge(&done.latency);
            partial.steady_broken_off += u64::from(done.broken);
            held.kept.push((index, ws));
        }
        partial
    }

    fn merge(total: &mut ChurnPartial, part: ChurnPartial) {
        total.steady.merge(part.steady);
        total.echo.merge(&part.echo);
        total.steady_broken_off += part.steady_broken_off;
        total.churned.merge(part.churned);
        total.closed_cleanly += part.closed_cleanly;
        total.close_failures += part.close_failures;
    }

    fn report(&self, total: ChurnPartial, measured: Measured) -> Outcome<ChurnReport> {
        let errors = total.steady.failed()
            + total.steady_broken_off
            + total.churned.failed()
            + total.close_failures;
        let report = ChurnReport {
            steady: (&total.steady).into(),
            echo: Percentiles::of(&total.echo),
            steady_broken_off: total.steady_broken_off,
            churned: (&total.churned).into(),
            churned_per_second: total.churned.connected as f64 / measured.run.seconds.max(1e-9),
            closed_cleanly: total.closed_cleanly,
            close_failures: total.close_failures,
            measured,
        };
        Outcome {
            report,
            errors,
            losses: 0,
        }
    }
}

impl fmt::Display for ChurnReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "churn: {} steady connections ({} broken off), {} short-lived opened ({:.0}/s), {} closed cleanly, {} close failures",
            self.steady.connected,
            self.steady_broken_off,
            self.churned.connected,
            self.churned_per_second,
            self.closed_cleanly,
            self.close_failures
        )?;
        report::print_failures(f, &self.steady.failures)?;
        report::print_failures(f, &self.churned.failures)?;
        writeln!(f, "steady round trip: {}", self.echo)?;
        writeln!(f, "short-lived handshake: {}", self.churned.handshake)?;
        write!(f, "{}", self.measured)
    }
}
