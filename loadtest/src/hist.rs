//! Latency histograms that cross process boundaries: worker processes send theirs to the
//! coordinator, which merges them bucket by bucket (exactly, not by averaging percentiles).

use hdrhistogram::Histogram;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Microseconds, 1 µs to 1 minute, 3 significant digits; larger values are clamped to the top.
#[derive(Debug, Clone)]
pub struct Latencies(pub Histogram<u64>);

impl Default for Latencies {
    fn default() -> Self {
        Latencies(Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds"))
    }
}

impl Latencies {
    pub fn record_micros(&mut self, micros: u64) {
        self.0.saturating_record(micros.max(1));
    }

    pub fn record(&mut self, elapsed: std::time::Duration) {
        self.record_micros(elapsed.as_micros() as u64);
    }

    pub fn merge(&mut self, other: &Latencies) {
        self.0
            .add(&other.0)
            .expect("every Latencies has the same bounds");
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }
}

/// On the wire: the non-empty buckets as `[value, count]` pairs, where value is the bucket's
/// highest equivalent value — recording it again lands in the same bucket.
impl Serialize for Latencies {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(
            self.0
                .iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value())),
        )
    }
}

impl<'de> Deserialize<'de> for Latencies {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let buckets = Vec::<(u64, u64)>::deserialize(deserializer)?;
        let mut latencies = Latencies::default();
        for (value, count) in buckets {
            latencies
                .0
                .record_n(value, count)
                .map_err(|e| serde::de::Error::custom(format!("bucket {value}: {e:?}")))?;
        }
        Ok(latencies)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Splitting samples over "processes", shipping each part as JSON and merging gives the
    /// same histogram as recording everything in one place.
    #[test]
    fn merging_shipped_parts_equals_recording_in_one_place() {
        let samples: Vec<u64> = (0..20_000u64).map(|i| (i * 7919) % 250_000 + 1).collect();
        let mut whole = Latencies::default();
        let mut parts = vec![Latencies::default(); 3];
        for (i, s) in samples.iter().enumerate() {
            whole.record_micros(*s);
            parts[i % 3].record_micros(*s);
        }
        let mut merged = Latencies::default();
        for part in &parts {
            let json = serde_json::to_string(part).unwrap();
            merged.merge(&serde_json::from_str(&json).unwrap());
        }
        assert_eq!(merged.count(), samples.len() as u64);
        assert_eq!(merged.0.max(), whole.0.max());
        for q in [0.0, 0.5, 0.9, 0.99, 0.999, 1.0] {
            assert_eq!(
                merged.0.value_at_quantile(q),
                whole.0.value_at_quantile(q),
                "quantile {q}"
            );
        }
        assert_eq!(merged.0, whole.0);
    }
}
