//! Prometheus metrics: `GET /metrics`, in the OpenMetrics text format, names under `wsgate_`.
//!
//! The hot path takes no lock and no shared atomic: each shard owns its [`ShardMetrics`] (one
//! cache-line-aligned block per shard, written by that shard's thread only, so an increment is a
//! plain load and store), and a scrape reads and sums them. Refusals and forced closes, which
//! are rare, stay in the node's [`Counters`](crate::node::Counters).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::broker::Broker;
use crate::node::Node;

/// A counter written by one thread only (its shard's): adding is a load and a store, with no
/// locked instruction; a scrape from another thread reads a recent value.
#[derive(Default)]
pub struct LocalCounter(AtomicU64);

impl LocalCounter {
    pub fn add(&self, n: u64) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds (seconds) of the latency histogram's buckets; a last one takes the rest.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// A latency histogram written by one thread only (see [`LocalCounter`]).
#[derive(Default)]
pub struct LocalHistogram {
    /// Per bucket (not cumulative), the last one past every bound.
    buckets: [LocalCounter; LATENCY_BUCKETS.len() + 1],
    sum_nanos: LocalCounter,
}

impl LocalHistogram {
    pub fn observe(&self, latency: Duration) {
        let seconds = latency.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[bucket].add(1);
        self.sum_nanos
            .add(latency.as_nanos().min(u128::from(u64::MAX)) as u64);
    }
}

/// Close codes counted by value; other application codes are counted as `4xxx`, anything else
/// as `other`, and a connection that ended without a close frame (the peer vanished) as `none`.
const CLOSE_CODES: [u16; 9] = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1011, 4001];
const CLOSE_LABELS: [&str; CLOSE_CODES.len() + 3] = [
    "1000", "1001", "1002", "1003", "1007", "1008", "1009", "1011", "4001", "4xxx", "other", "none",
];

/// What one shard counts per message, connection and delivery.
#[derive(Default)]
#[repr(align(128))]
pub struct ShardMetrics {
    /// WebSocket connections opened.
    pub accepted: LocalCounter,
    /// Data messages received (after reassembly), and bytes read from sockets.
    pub messages_received: LocalCounter,
    pub bytes_received: LocalCounter,
    /// Frames written to sockets (every kind), and bytes written.
    pub frames_sent: LocalCounter,
    pub bytes_sent: LocalCounter,
    /// Publication frames queued to recipients (one per recipient).
    pub deliveries: LocalCounter,
    /// From a publication entering the bus to its frame queued to this shard's recipients.
    pub delivery_latency: LocalHistogram,
    closed: [LocalCounter; CLOSE_LABELS.len()],
}

impl ShardMetrics {
    /// A connection ended; `code` is the close code of the close frame it was sent, if any.
    pub fn closed(&self, code: Option<u16>) {
        let at = match code {
            None => CLOSE_LABELS.len() - 1,
            Some(code) => CLOSE_CODES.iter().position(|&c| c == code).unwrap_or(
                if (4000..=4999).contains(&code) {
                    CLOSE_CODES.len()
                } else {
                    CLOSE_CODES.len() + 1
                },
            ),
        };
        self.closed[at].add(1);
    }
}

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
pub fn render(node: &Arc<Node>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(NodeCollector(node.clone())));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)
        .expect("writing to a String cannot fail");
    text
}

struct NodeCollector(Arc<Node>);

/// Which of a shard's counters a metric reads.
type ReadCounter = fn(&ShardMetrics) -> &LocalCounter;

impl fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NodeCollector")
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

impl NodeCollector {
    /// A counter of every shard's [`ShardMetrics`], by shard.
    fn per_shard(&self, read: impl Fn(&ShardMetrics) -> &LocalCounter) -> Vec<(String, Value)> {
        let shards = self.0.metrics.iter().enumerate();
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
            self.gauges(&node.connections),
        )?;
        one(
            e,
            "wsgate_connection_capacity",
            "WebSocket connections accepted at most (max_connections)",
            gauge(node.config.max_connections),
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
            let sum = node.metrics.iter().map(|m| m.closed[i].get()).sum();
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
        let counters = &node.counters;
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
        let per_shard: [(&str, &str, ReadCounter); 5] = [
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
        ];
        for (name, help, read) in per_shard {
            family(e, (name, help, counter), "shard", self.per_shard(read))?;
        }
        let dropped = node.bus.dropped_by_shard().into_iter().enumerate();
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
            self.gauges(&node.queued_bytes),
        )?;
        // The latency histogram, summed over the shards.
        let bounds = LATENCY_BUCKETS.iter().copied().chain([f64::INFINITY]);
        let buckets: Vec<(f64, u64)> = bounds
            .enumerate()
            .map(|(i, bound)| {
                let count = node.metrics.iter();
                (
                    bound,
                    count.map(|m| m.delivery_latency.buckets[i].get()).sum(),
                )
            })
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum_nanos: u64 = node
            .metrics
            .iter()
            .map(|m| m.delivery_latency.sum_nanos.get())
            .sum();
        e.encode_descriptor(
            "wsgate_delivery_latency",
            "From a publication entering this node's bus to its frame queued to a shard's \
             recipients",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?
        .encode_histogram::<NoLabelSet>(sum_nanos as f64 / 1e9, count, &buckets, None)
    }

    fn state(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let node = &*self.0;
        one(
            e,
            "wsgate_rooms",
            "Rooms with members on this node",
            gauge(node.rooms.room_count()),
        )?;
        one(
            e,
            "wsgate_draining",
            "1 once a graceful shutdown has begun",
            flag(node.is_draining()),
        )?;
        one(
            e,
            "wsgate_broker_ready",
            "1 while the broker can be used: always with the memory broker; with Redis, while \
             connected and caught up",
            flag(node.broker.is_ready()),
        )?;
        if let Broker::Redis(redis) = &node.broker {
            if let Some(round_trip) = redis.probe_round_trip() {
                one(
                    e,
                    "wsgate_redis_probe_round_trip_seconds",
                    "The last probe's round trip through Redis (PUBLISH, then delivery on this \
                     node's subscription): how far behind the subscription runs",
                    Value::Gauge(round_trip.as_secs_f64()),
                )?;
            }
            one(
                e,
                "wsgate_redis_publish_queue",
                "Room messages waiting to be sent to Redis (at most redis_publish_queue)",
                gauge(redis.publish_queue_len()),
            )?;
        }
        // Every other refusal and forced close, one counter each (the inbox's is by shard, above).
        let counters = node.counters.described();
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

impl Collector for NodeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        self.connections(&mut encoder)?;
        self.traffic(&mut encoder)?;
        self.state(&mut encoder)
    }
}
