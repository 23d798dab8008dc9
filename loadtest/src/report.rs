//! Measurements: latency histograms, process CPU and memory, and the printed/JSON report.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::client::Failure;

/// A latency histogram in microseconds, 1 µs to 1 minute, 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

#[derive(Serialize, Debug, Default)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
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

/// CPU used since it started, by the gateway (when its pid is known) and by the load generator.
pub struct CpuMeter {
    gateway_pid: Option<u32>,
    gateway: Option<Duration>,
    own: Option<Duration>,
}

impl CpuMeter {
    pub fn start(gateway_pid: Option<u32>) -> Self {
        CpuMeter {
            gateway_pid,
            gateway: gateway_pid.and_then(cpu_time),
            own: cpu_time(std::process::id()),
        }
    }

    /// Seconds of CPU used since the start: (gateway, this process).
    pub fn elapsed(&self) -> (Option<f64>, Option<f64>) {
        let since = |before: Option<Duration>, now: Option<Duration>| {
            before.zip(now).map(|(b, n)| (n - b).as_secs_f64())
        };
        (
            since(self.gateway, self.gateway_pid.and_then(cpu_time)),
            since(self.own, cpu_time(std::process::id())),
        )
    }
}

#[derive(Serialize, Debug, Default)]
pub struct ConnectReport {
    pub target_connections: usize,
    pub connected: usize,
    pub failures: BTreeMap<Failure, u64>,
    pub ramp_seconds: f64,
    pub connections_per_second: f64,
    pub handshake: Percentiles,
    pub gateway_rss_before_kib: Option<u64>,
    pub gateway_rss_held_kib: Option<u64>,
    /// (RSS while holding − RSS before) / connections held.
    pub gateway_rss_per_connection_bytes: Option<f64>,
    pub gateway_cpu_seconds: Option<f64>,
    /// Gateway CPU while the connections were held open and idle (heartbeats included).
    pub gateway_cpu_hold_seconds: Option<f64>,
    /// The same, as a percentage of one core.
    pub gateway_cpu_hold_percent: Option<f64>,
    /// Connections still open when the hold ended.
    pub held_to_the_end: usize,
    pub loadtest_cpu_seconds: Option<f64>,
}

impl ConnectReport {
    pub fn print(&self) {
        println!(
            "connect: {} of {} connected in {:.2} s ({:.0} connections/s)",
            self.connected, self.target_connections, self.ramp_seconds, self.connections_per_second
        );
        for (cause, n) in &self.failures {
            println!("  failed ({cause:?}): {n}");
        }
        let h = &self.handshake;
        println!(
            "handshake latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
            h.p50_ms, h.p90_ms, h.p99_ms, h.p999_ms, h.max_ms
        );
        if let (Some(before), Some(held)) = (self.gateway_rss_before_kib, self.gateway_rss_held_kib)
        {
            println!(
                "gateway RSS: {before} KiB before, {held} KiB holding → {:.0} bytes per connection",
                self.gateway_rss_per_connection_bytes.unwrap_or(0.0)
            );
        }
        if let Some(cpu) = self.gateway_cpu_seconds {
            println!("gateway CPU during the run: {cpu:.2} s");
        }
        if let (Some(cpu), Some(pct)) =
            (self.gateway_cpu_hold_seconds, self.gateway_cpu_hold_percent)
        {
            println!(
                "gateway CPU while holding {} idle connections: {cpu:.2} s ({pct:.2}% of a core)",
                self.held_to_the_end
            );
        }
        if let Some(cpu) = self.loadtest_cpu_seconds {
            println!("loadtest CPU during the run: {cpu:.2} s");
        }
    }
}

#[derive(Serialize, Debug, Default)]
pub struct EchoReport {
    pub connections: usize,
    pub payload_bytes: usize,
    pub failures: BTreeMap<Failure, u64>,
    pub seconds: f64,
    /// Round trips completed.
    pub messages: u64,
    pub messages_per_second: f64,
    /// Round-trip latency (closed loop: one message in flight per connection).
    pub latency: Percentiles,
    /// Connections that broke off with an error.
    pub errors: u64,
    pub gateway_cpu_seconds: Option<f64>,
    /// Messages per second of gateway CPU: steadier than messages/s on a shared machine.
    pub messages_per_gateway_cpu_second: Option<f64>,
    pub loadtest_cpu_seconds: Option<f64>,
}

impl EchoReport {
    pub fn print(&self) {
        println!(
            "echo: {} connections × {} B, {} round trips in {:.1} s: {:.0} messages/s",
            self.connections,
            self.payload_bytes,
            self.messages,
            self.seconds,
            self.messages_per_second
        );
        for (cause, n) in &self.failures {
            println!("  failed to connect ({cause:?}): {n}");
        }
        if self.errors > 0 {
            println!("  connections broken off: {}", self.errors);
        }
        let l = &self.latency;
        println!(
            "round trip ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
            l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms
        );
        if let (Some(cpu), Some(per_cpu)) = (
            self.gateway_cpu_seconds,
            self.messages_per_gateway_cpu_second,
        ) {
            println!("gateway CPU: {cpu:.2} s → {per_cpu:.0} messages per gateway CPU-second");
        }
        if let Some(cpu) = self.loadtest_cpu_seconds {
            println!("loadtest CPU: {cpu:.2} s");
        }
    }
}

#[derive(Serialize, Debug, Default)]
pub struct FanoutReport {
    pub subscribers: usize,
    pub publishers: usize,
    pub rooms: usize,
    pub failures: BTreeMap<Failure, u64>,
    pub join_failures: u64,
    pub seconds: f64,
    /// Messages the publishers sent.
    pub published: u64,
    /// Deliveries the subscribers should have had (each message times its room's subscribers).
    pub expected: u64,
    pub received: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub publisher_errors: u64,
    pub deliveries_per_second: f64,
    /// Publish-to-receive latency.
    pub latency: Percentiles,
    pub gateway_cpu_seconds: Option<f64>,
    pub loadtest_cpu_seconds: Option<f64>,
}

impl FanoutReport {
    pub fn print(&self) {
        println!(
            "fanout: {} subscribers, {} publishers, {} rooms: {} published, {} of {} expected deliveries in {:.1} s ({:.0}/s)",
            self.subscribers,
            self.publishers,
            self.rooms,
            self.published,
            self.received,
            self.expected,
            self.seconds,
            self.deliveries_per_second
        );
        println!(
            "lost {}  duplicated {}  out of order {}  publisher errors {}  join failures {}",
            self.lost,
            self.duplicates,
            self.out_of_order,
            self.publisher_errors,
            self.join_failures
        );
        for (cause, n) in &self.failures {
            println!("  failed to connect ({cause:?}): {n}");
        }
        let l = &self.latency;
        println!(
            "publish-to-receive ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
            l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms
        );
        if let Some(cpu) = self.gateway_cpu_seconds {
            println!("gateway CPU: {cpu:.2} s");
        }
        if let Some(cpu) = self.loadtest_cpu_seconds {
            println!("loadtest CPU: {cpu:.2} s");
        }
    }
}
