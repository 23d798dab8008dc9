//! Measuring the processes involved (gateway nodes and load generator: CPU, RSS) phase by
//! phase, and the pieces every scenario's report shares.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::client::Failure;
use crate::hist::Latencies;

#[derive(Serialize, Debug, Default, Clone, Copy)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    pub fn of(h: &Latencies) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        let h = &h.0;
        Percentiles {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

impl fmt::Display for Percentiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3} ms ({} samples)",
            self.p50_ms, self.p90_ms, self.p99_ms, self.p999_ms, self.max_ms, self.count
        )
    }
}

/// Connection attempts that failed, by cause.
pub type Failures = BTreeMap<Failure, u64>;

pub fn merge_failures(total: &mut Failures, part: Failures) {
    for (cause, n) in part {
        *total.entry(cause).or_insert(0) += n;
    }
}

pub fn print_failures(f: &mut fmt::Formatter<'_>, failures: &Failures) -> fmt::Result {
    for (cause, n) in failures {
        writeln!(f, "  failed to connect ({cause:?}): {n}")?;
    }
    Ok(())
}

/// Resident memory of a process, in KiB (from /proc).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU time (user + system) a process has used so far.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_secs_f64(ticks as f64 / per_sec as f64))
}

/// Total CPU of a set of processes, when at least one of them can be read.
fn total_cpu(pids: &[u32]) -> Option<Duration> {
    let times: Vec<Duration> = pids.iter().filter_map(|p| cpu_time(*p)).collect();
    (!times.is_empty()).then(|| times.iter().sum())
}

/// Bytes through the loopback interface so far (both directions, TCP/IP headers included),
/// from /proc/net/dev: the machine's whole traffic, so a phase's difference is the run's only
/// on an otherwise quiet machine (as the benchmark scripts run).
fn loopback_bytes() -> Option<u64> {
    let dev = std::fs::read_to_string("/proc/net/dev").ok()?;
    let line = dev
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("lo:"))?;
    line.split_whitespace().next()?.parse().ok()
}

/// Wall time and CPU of one phase of a run.
#[derive(Serialize, Debug, Default, Clone, Copy)]
pub struct Phase {
    pub seconds: f64,
    /// CPU used by the gateway nodes (all `--gateway-pid`s together).
    pub gateway_cpu_seconds: Option<f64>,
    /// CPU used by the load generator (all its processes together): near `seconds` × cores,
    /// the load generator was the bottleneck.
    pub loadtest_cpu_seconds: Option<f64>,
    /// Bytes through the loopback interface (the wire, headers and acknowledgements included;
    /// the machine's whole loopback traffic: meaningful on a quiet machine).
    pub loopback_bytes: Option<u64>,
}

impl Phase {
    /// `count` per second of gateway CPU in this phase (the steadier rate on a shared machine).
    pub fn per_gateway_cpu_second(&self, count: u64) -> Option<f64> {
        self.gateway_cpu_seconds
            .filter(|cpu| *cpu > 0.0)
            .map(|cpu| count as f64 / cpu)
    }
}

/// One gateway node's memory: at the start, and at the end of the run with every connection
/// still open.
#[derive(Serialize, Debug, Clone, Copy)]
pub struct NodeMemory {
    pub pid: u32,
    pub rss_before_kib: Option<u64>,
    pub rss_end_kib: Option<u64>,
}

/// What the driver measured around a scenario's two phases.
#[derive(Serialize, Debug, Default, Clone)]
pub struct Measured {
    /// Opening the connections.
    pub ramp: Phase,
    /// The scenario proper, all workers starting together.
    pub run: Phase,
    pub gateways: Vec<NodeMemory>,
}

impl Measured {
    /// RSS growth of all gateway nodes together, in bytes, per `connections`.
    pub fn rss_per_connection_bytes(&self, connections: usize) -> Option<f64> {
        let mut grown = 0i64;
        for node in &self.gateways {
            grown += node.rss_end_kib? as i64 - node.rss_before_kib? as i64;
        }
        (connections > 0 && !self.gateways.is_empty())
            .then(|| grown as f64 * 1024.0 / connections as f64)
    }
}

impl fmt::Display for Measured {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, phase) in [("ramp", &self.ramp), ("run", &self.run)] {
            write!(f, "{name} {:.2} s:", phase.seconds)?;
            if let Some(cpu) = phase.gateway_cpu_seconds {
                write!(
                    f,
                    " gateway CPU {cpu:.2} s ({:.0}% of a core),",
                    percent(cpu, phase.seconds)
                )?;
            }
            if let Some(cpu) = phase.loadtest_cpu_seconds {
                write!(
                    f,
                    " loadtest CPU {cpu:.2} s ({:.0}% of a core)",
                    percent(cpu, phase.seconds)
                )?;
            }
            if let Some(bytes) = phase.loopback_bytes {
                write!(f, ", loopback {:.1} MB", bytes as f64 / 1e6)?;
            }
            writeln!(f)?;
        }
        for node in &self.gateways {
            if let (Some(before), Some(end)) = (node.rss_before_kib, node.rss_end_kib) {
                writeln!(
                    f,
                    "gateway pid {}: RSS {before} KiB before, {end} KiB at the end",
                    node.pid
                )?;
            }
        }
        Ok(())
    }
}

pub fn percent(part: f64, whole: f64) -> f64 {
    if whole > 0.0 {
        100.0 * part / whole
    } else {
        0.0
    }
}

/// Takes the phase measurements: CPU of the gateway and load generator processes between laps,
/// gateway RSS at the start and at the last lap.
pub struct Meter {
    gateway_pids: Vec<u32>,
    loadtest_pids: Vec<u32>,
    started: Instant,
    gateway_cpu: Option<Duration>,
    loadtest_cpu: Option<Duration>,
    loopback: Option<u64>,
    rss_before: Vec<Option<u64>>,
}

impl Meter {
    pub fn start(gateway_pids: &[u32]) -> Self {
        let loadtest_pids = vec![std::process::id()];
        Meter {
            gateway_cpu: total_cpu(gateway_pids),
            loadtest_cpu: total_cpu(&loadtest_pids),
            loopback: loopback_bytes(),
            gateway_pids: gateway_pids.to_vec(),
            loadtest_pids,
            started: Instant::now(),
            rss_before: gateway_pids.iter().map(|p| rss_kib(*p)).collect(),
        }
    }

    /// Counts these (worker) processes as the load generator's too, from now on.
    pub fn add_loadtest_pids(&mut self, pids: &[u32]) {
        self.loadtest_pids.extend_from_slice(pids);
        self.loadtest_cpu = total_cpu(&self.loadtest_pids);
    }

    /// The phase since the last lap.
    pub fn lap(&mut self) -> Phase {
        let (gateway, loadtest, loopback) = (
            total_cpu(&self.gateway_pids),
            total_cpu(&self.loadtest_pids),
            loopback_bytes(),
        );
        let since = |before: Option<Duration>, now: Option<Duration>| {
            before
                .zip(now)
                .map(|(b, n)| n.saturating_sub(b).as_secs_f64())
        };
        let phase = Phase {
            seconds: self.started.elapsed().as_secs_f64(),
            gateway_cpu_seconds: since(self.gateway_cpu, gateway),
            loadtest_cpu_seconds: since(self.loadtest_cpu, loadtest),
            loopback_bytes: self
                .loopback
                .zip(loopback)
                .map(|(b, n)| n.saturating_sub(b)),
        };
        (self.started, self.gateway_cpu, self.loadtest_cpu) = (Instant::now(), gateway, loadtest);
        self.loopback = loopback;
        phase
    }

    pub fn memory(&self) -> Vec<NodeMemory> {
        self.gateway_pids
            .iter()
            .zip(&self.rss_before)
            .map(|(pid, before)| NodeMemory {
                pid: *pid,
                rss_before_kib: *before,
                rss_end_kib: rss_kib(*pid),
            })
            .collect()
    }
}

/// Per-connection results every scenario merges the same way.
#[derive(Serialize, Deserialize, Debug, Default, Clone)]
pub struct Opening {
    pub connected: u64,
    pub failures: Failures,
    /// Time from TCP connect to the upgrade done (and the greeting, on the chat endpoint).
    pub handshake: Latencies,
}

impl Opening {
    pub fn merge(&mut self, part: Opening) {
        self.connected += part.connected;
        merge_failures(&mut self.failures, part.failures);
        self.handshake.merge(&part.handshake);
    }

    /// Counts one attempt: how long it took to open, or why it failed.
    pub fn record(&mut self, attempt: Result<Duration, Failure>) {
        match attempt {
            Ok(took) => {
                self.connected += 1;
                self.handshake.record(took);
            }
            Err(cause) => *self.failures.entry(cause).or_insert(0) += 1,
        }
    }

    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }
}

/// The handshake side of a report.
#[derive(Serialize)]
pub struct OpeningSummary {
    pub connected: u64,
    pub failures: Failures,
    pub handshake: Percentiles,
}

impl From<&Opening> for OpeningSummary {
    fn from(o: &Opening) -> Self {
        OpeningSummary {
            connected: o.connected,
            failures: o.failures.clone(),
            handshake: Percentiles::of(&o.handshake),
        }
    }
}

/// Microseconds on the machine's monotonic clock: the same clock in every process, so a time
/// carried in a message from one worker process can be compared in another.
pub fn monotonic_micros() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1000
}
