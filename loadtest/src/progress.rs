//! Live progress: counters the scenarios bump, and the bar (indicatif, on stderr, hidden when
//! stderr is not a terminal) that shows them with current rates.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

/// Bumped by the scenarios as they go; read by the bar (or sent to the coordinator).
#[derive(Default, Debug)]
pub struct Progress {
    pub connected: AtomicU64,
    pub failed: AtomicU64,
    /// Messages exchanged (round trips, deliveries, connections churned).
    pub messages: AtomicU64,
}

impl Progress {
    pub fn connected(&self) {
        self.connected.fetch_add(1, Ordering::Relaxed);
    }

    pub fn failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn message(&self) {
        self.messages.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            connected: self.connected.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            messages: self.messages.load(Ordering::Relaxed),
        }
    }
}

/// Progress counters at one moment (what a worker process reports to the coordinator).
#[derive(Serialize, Deserialize, Debug, Default, Clone, Copy)]
pub struct Snapshot {
    pub connected: u64,
    pub failed: u64,
    pub messages: u64,
}

impl std::ops::Add for Snapshot {
    type Output = Snapshot;
    fn add(self, o: Snapshot) -> Snapshot {
        Snapshot {
            connected: self.connected + o.connected,
            failed: self.failed + o.failed,
            messages: self.messages + o.messages,
        }
    }
}

/// How often the bar is redrawn and workers report.
pub const TICK: Duration = Duration::from_millis(250);

/// The progress bar: connections opened out of the target, failures, and messages per second.
pub struct Bar {
    bar: ProgressBar,
    /// The counters when the rate was last taken, and when.
    last: Snapshot,
    last_at: Instant,
}

impl Bar {
    pub fn new(connections: usize) -> Self {
        let bar = ProgressBar::with_draw_target(
            Some(connections as u64),
            ProgressDrawTarget::stderr_with_hz(4),
        );
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>5} [{elapsed_precise}] {bar:30} {pos}/{len} connected  {msg}",
            )
            .expect("valid template"),
        );
        bar.set_prefix("ramp");
        Bar {
            bar,
            last: Snapshot::default(),
            last_at: Instant::now(),
        }
    }

    pub fn phase(&self, name: &'static str) {
        self.bar.set_prefix(name);
    }

    pub fn update(&mut self, now: Snapshot) {
        self.bar.set_position(now.connected);
        // Worker processes report one after another: the rate is taken over a whole tick.
        let seconds = self.last_at.elapsed().as_secs_f64();
        if seconds >= TICK.as_secs_f64() {
            let rate = now.messages.saturating_sub(self.last.messages) as f64 / seconds;
            self.bar
                .set_message(format!("{} failed  {rate:.0} msg/s", now.failed));
            (self.last, self.last_at) = (now, Instant::now());
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
