//! Prometheus metrics: `GET /metrics`, in the OpenMetrics text format, names under `wsgate_`.
//!
//! A scrape reads and sums each shard's [`ShardMetrics`] (written by its shard alone, with no
//! lock: see [`crate::runtime::metrics`]) and the node's
//! [`Counters`](crate::runtime::counters::Counters) of refusals and forced closes.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use super::Edge;
use crate::backend::{ANSWERS, Failure, ProxyKind};
use crate::runtime::metrics::{
    CLOSE_LABELS, LATENCY_BUCKETS, LocalCounter, LocalHistogram, ShardMetrics,
};

/// Node counters that refuse a connection before it is a WebSocket: one family, by reason.
const HANDSHAKE_REFUSALS: [(&str, &str); 8] = [
    ("tls_handshake_failures", "tls"),
    ("origin_refused", "origin"),
    ("draining_refused", "draining"),
    ("server_full", "server_full"),
    ("ip_connections_refused", "ip_connections"),
    ("ip_handshakes_refused", "ip_handshakes"),
    ("bad_requests", "bad_request"),
    ("handshake_timeouts", "handshake_timeout"),
];

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Every metric of the node, as OpenMetrics text.
pub fn render(edge: &Arc<Edge>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(EdgeCollector(edge.clone())));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)
        .expect("writing to a String cannot fail");
    text
}

struct EdgeCollector(Arc<Edge>);

/// Which of a shard's counters a metric reads.
type ReadCounter = fn(&ShardMetrics) -> &LocalCounter;

impl fmt::Debug for EdgeCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EdgeCollector")
    }
}

/// One sample's value.
#[derive(Clone, Copy)]
enum Value {
    Counter(u64),
    Gauge(f64),
}

impl Value {
    fn kind(self) -> MetricType {
        match self {
            Value::Counter(_) => MetricType::Counter,
            Value::Gauge(_) => MetricType::Gauge,
        }
    }

    fn encode(self, mut encoder: MetricEncoder<'_>) -> fmt::Result {
        match self {
            Value::Counter(n) => encoder.encode_counter::<NoLabelSet, _, u64>(&n, None),
            Value::Gauge(v) => encoder.encode_gauge(&v),
        }
    }
}

/// A metric with one sample.
fn one(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: Value) -> fmt::Result {
    value.encode(encoder.encode_descriptor(name, help, None, value.kind())?)
}

/// A metric with a sample per value of `label`.
fn family(
    encoder: &mut DescriptorEncoder,
    (name, help, kind): (&str, &str, MetricType),
    label: &str,
    samples: impl IntoIterator<Item = (String, Value)>,
) -> fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (label_value, value) in samples {
        let labels = [(label, label_value.as_str())];
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauge(n: usize) -> Value {
    Value::Gauge(n as f64)
}

fn flag(on: bool) -> Value {
    Value::Gauge(f64::from(u8::from(on)))
}

impl EdgeCollector {
    /// A counter of every shard's [`ShardMetrics`], by shard.
    fn per_shard(&self, read: impl Fn(&ShardMetrics) -> &LocalCounter) -> Vec<(String, Value)> {
        let shards = self.0.shared.metrics.iter().enumerate();
        shards
            .map(|(i, m)| (i.to_string(), Value::Counter(read(m).get())))
            .collect()
    }

    fn gauges(&self, gauges: &[AtomicUsize]) -> Vec<(String, Value)> {
        let shards = gauges.iter().enumerate();
        shards
            .map(|(i, g)| (i.to_string(), gauge(g.load(Ordering::Relaxed))))
            .collect()
    }

    fn connections(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let node = &*self.0;
        let gauge_kind = MetricType::Gauge;
        let counter = MetricType::Counter;
        family(
            e,
            (
                "wsgate_connections",
                "Open WebSocket connections",
                gauge_kind,
            ),
            "shard",
            self.gauges(&node.shared.connections),
        )?;
        family(
            e,
            (
                "wsgate_engine",
                "The I/O engine the shards' event loops run on (1 for the one in use)",
                gauge_kind,
            ),
            "engine",
            [(node.shared.config.engine.name().to_owned(), gauge(1))],
        )?;
        one(
            e,
            "wsgate_connection_capacity",
            "WebSocket connections accepted at most (max_connections)",
            gauge(node.shared.config.max_connections),
        )?;
        one(
            e,
            "wsgate_http_connections",
            "Open plain HTTP connections",
            gauge(node.http.len()),
        )?;
        family(
            e,
            (
                "wsgate_connections_accepted",
                "WebSocket connections opened",
                counter,
            ),
            "shard",
            self.per_shard(|m| &m.accepted),
        )?;
        let closed = CLOSE_LABELS.iter().enumerate().map(|(i, label)| {
            let sum = node.shared.metrics.iter().map(|m| m.closed_with(i)).sum();
            ((*label).to_owned(), Value::Counter(sum))
        });
        family(
            e,
            (
                "wsgate_connections_closed",
                "WebSocket connections ended, by the close code sent to them (none: the peer \
                 vanished without a close handshake)",
                counter,
            ),
            "code",
            closed,
        )?;
        let counters = &node.shared.counters;
        let refusals =
            counters
                .auth_refused_counts()
                .map(|(reason, n)| (format!("auth_{reason}"), Value::Counter(n)))
                .chain(HANDSHAKE_REFUSALS.iter().map(|(name, reason)| {
                    ((*reason).to_owned(), Value::Counter(counters.get(name)))
                }));
        family(
            e,
            (
                "wsgate_handshakes_refused",
                "Connections or upgrades refused before they became WebSockets, by reason",
                counter,
            ),
            "reason",
            refusals,
        )
    }

    fn traffic(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let node = &*self.0;
        let counter = MetricType::Counter;
        let per_shard: [(&str, &str, ReadCounter); 9] = [
            (
                "wsgate_messages_received",
                "Data messages received from clients",
                |m| &m.messages_received,
            ),
            (
                "wsgate_received_bytes",
                "Bytes read from WebSocket connections",
                |m| &m.bytes_received,
            ),
            (
                "wsgate_frames_sent",
                "Frames written to WebSocket connections (every kind)",
                |m| &m.frames_sent,
            ),
            (
                "wsgate_sent_bytes",
                "Bytes written to WebSocket connections",
                |m| &m.bytes_sent,
            ),
            (
                "wsgate_deliveries",
                "Publication frames queued to recipients, one per recipient",
                |m| &m.deliveries,
            ),
            (
                "wsgate_compressed_connections",
                "Connections opened that agreed to permessage-deflate",
                |m| &m.compressed_connections,
            ),
            (
                "wsgate_compressed_publications",
                "Publications compressed for their recipients that agreed to permessage-deflate: \
                 once each, however many they are (plus once per recipient that asked for a \
                 window too small for the shared compression)",
                |m| &m.compressions,
            ),
            (
                "wsgate_compressed_messages_received",
                "Data messages that arrived compressed (permessage-deflate), inflated",
                |m| &m.inflated,
            ),
            (
                "wsgate_io_uring_buffer_waits",
                "Receives that found the shard's io_uring buffer ring empty and waited for buffers \
                 (nothing is lost; steadily rising: raise io_uring_buffers)",
                |m| &m.buffer_waits,
            ),
        ];
        for (name, help, read) in per_shard {
            family(e, (name, help, counter), "shard", self.per_shard(read))?;
        }
        let dropped = node.shared.bus.dropped_by_shard().into_iter().enumerate();
        family(
            e,
            (
                "wsgate_inbox_dropped",
                "Publications dropped because a shard's inbox was full (max_shard_inbox_bytes)",
                counter,
            ),
            "shard",
            dropped.map(|(i, n)| (i.to_string(), Value::Counter(n))),
        )?;
        family(
            e,
            (
                "wsgate_queued_bytes",
                "Bytes queued for writing to clients (as of each shard's last heartbeat tick)",
                MetricType::Gauge,
            ),
            "shard",
            self.gauges(&node.shared.queued_bytes),
        )?;
        let latency = summed(node.shared.metrics.iter().map(|m| &m.delivery_latency));
        let (sum, count, buckets) = &latency;
        e.encode_descriptor(
            "wsgate_delivery_latency",
            "From a publication entering this node's bus to its frame queued to a shard's \
             recipients",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?
        .encode_histogram::<NoLabelSet>(*sum, *count, buckets, None)
    }

    /// The webhooks, if configured: events queued, sent and dropped; requests.
    fn webhooks(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let Some(webhooks) = &self.0.webhooks else {
            return Ok(());
        };
        let counters = &webhooks.counters;
        let read = |n: &std::sync::atomic::AtomicU64| Value::Counter(n.load(Ordering::Relaxed));
        family(
            e,
            (
                "wsgate_webhook_events",
                "Webhook events, by outcome: queued, sent (taken by the backend), dropped (past \
                 webhook_queue, or unsent after webhook_retry_for)",
                MetricType::Counter,
            ),
            "outcome",
            [
                ("queued".to_owned(), read(&counters.queued)),
                ("sent".to_owned(), read(&counters.sent)),
                ("dropped".to_owned(), read(&counters.dropped)),
            ],
        )?;
        family(
            e,
            (
                "wsgate_webhook_requests",
                "Webhook requests, by result (failed ones are sent again)",
                MetricType::Counter,
            ),
            "result",
            [
                ("ok".to_owned(), read(&counters.requests_ok)),
                ("failed".to_owned(), read(&counters.requests_failed)),
            ],
        )
    }

    /// The proxies to the backend that are configured: answers, failures, latency.
    fn proxies(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let node = &*self.0;
        let configured: Vec<ProxyKind> = ProxyKind::ALL
            .into_iter()
            .filter(|kind| kind.settings(&node.shared.config).is_some())
            .collect();
        if configured.is_empty() {
            return Ok(());
        }
        let of = |kind: ProxyKind| node.proxy_metrics.iter().map(move |m| m.of(kind));
        let mut answers = e.encode_descriptor(
            "wsgate_proxy_answers",
            "Answers from the backend's proxies, by proxy and answer",
            None,
            MetricType::Counter,
        )?;
        for &kind in &configured {
            for (i, answer) in ANSWERS.iter().enumerate() {
                let n: u64 = of(kind).map(|m| m.answers[i].get()).sum();
                let labels = [("proxy", kind.name()), ("answer", answer)];
                Value::Counter(n).encode(answers.encode_family(&labels)?)?;
            }
        }
        let mut failures = e.encode_descriptor(
            "wsgate_proxy_failures",
            "Calls to the backend's proxies that failed (then on_error decided), by proxy and \
             reason",
            None,
            MetricType::Counter,
        )?;
        for &kind in &configured {
            for failure in Failure::ALL {
                let n: u64 = of(kind).map(|m| m.failures[failure as usize].get()).sum();
                let labels = [("proxy", kind.name()), ("reason", failure.name())];
                Value::Counter(n).encode(failures.encode_family(&labels)?)?;
            }
        }
        let mut latency = e.encode_descriptor(
            "wsgate_proxy_duration",
            "Calls to the backend's proxies that were sent, from the request to the answer (or \
             the timeout)",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for &kind in &configured {
            let (sum, count, buckets) = summed(of(kind).map(|m| &m.latency));
            let labels = [("proxy", kind.name())];
            latency
                .encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
        Ok(())
    }

    fn state(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let node = &*self.0;
        one(
            e,
            "wsgate_rooms",
            "Rooms with members on this node",
            gauge(node.shared.rooms.room_count()),
        )?;
        one(
            e,
            "wsgate_draining",
            "1 once a graceful shutdown has begun",
            flag(node.shared.is_draining()),
        )?;
        one(
            e,
            "wsgate_broker_ready",
            "1 while the broker can be used: always with the memory broker; with Redis, while \
             connected and caught up",
            flag(node.broker.is_ready()),
        )?;
        for (name, help, value) in node.broker.gauges() {
            one(e, name, help, Value::Gauge(value))?;
        }
        // Every other refusal and forced close, one counter each (the inbox's is by shard, above).
        let counters = node.shared.counters.described();
        let rest = counters.iter().filter(|(name, ..)| {
            *name != "inbox_dropped"
                && !HANDSHAKE_REFUSALS
                    .iter()
                    .any(|(refusal, _)| refusal == name)
        });
        for (name, help, counter) in rest {
            let value = Value::Counter(counter.load(Ordering::Relaxed));
            one(e, &format!("wsgate_{name}"), help, value)?;
        }
        Ok(())
    }
}

impl Collector for EdgeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        self.connections(&mut encoder)?;
        self.traffic(&mut encoder)?;
        self.proxies(&mut encoder)?;
        self.webhooks(&mut encoder)?;
        self.state(&mut encoder)
    }
}

/// Histograms of several shards as one: the sum in seconds, the count, and the count in each
/// bucket (not cumulative: the encoder adds them up).
fn summed<'h>(histograms: impl Iterator<Item = &'h LocalHistogram>) -> (f64, u64, Vec<(f64, u64)>) {
    let bounds = LATENCY_BUCKETS.iter().copied().chain([f64::INFINITY]);
    let mut buckets: Vec<(f64, u64)> = bounds.map(|bound| (bound, 0)).collect();
    let mut sum_nanos = 0u64;
    for histogram in histograms {
        for (bucket, counted) in buckets.iter_mut().zip(&histogram.buckets) {
            bucket.1 += counted.get();
        }
        sum_nanos += histogram.sum_nanos.get();
    }
    let count = buckets.iter().map(|(_, n)| n).sum();
    (sum_nanos as f64 / 1e9, count, buckets)
}
