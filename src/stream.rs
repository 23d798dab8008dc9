//! A room's stream: the one order in which every member receives the room's messages, each with
//! its offset (1, 2, 3, … within an epoch), and the recent ones kept so that a client that
//! reconnects can get exactly what it missed.
//!
//! An epoch names one run of offsets: when a stream starts over (the room was forgotten, the node
//! restarted), offsets start again from 1 under a new epoch, and a client holding an offset of the
//! old epoch is told it cannot be recovered rather than given the wrong messages.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// Where a client is (or a stream was) in a room's stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Position {
    pub offset: u64,
    pub epoch: Arc<str>,
}

/// How much history a stream keeps.
#[derive(Clone, Copy, Debug)]
pub struct HistoryLimits {
    /// Messages kept (0: none).
    pub size: usize,
    /// How long a message is kept.
    pub ttl: Duration,
}

struct Kept {
    offset: u64,
    frame: Bytes,
    at: Instant,
}

pub struct Stream {
    /// The offset of the last message (0: none yet in this epoch).
    top: u64,
    epoch: Arc<str>,
    /// The most recent messages, oldest first, with consecutive offsets ending at `top`.
    history: VecDeque<Kept>,
}

impl Stream {
    /// A new stream, under a fresh epoch.
    pub fn new() -> Self {
        Stream {
            top: 0,
            epoch: new_epoch(),
            history: VecDeque::new(),
        }
    }

    pub fn position(&self) -> Position {
        Position {
            offset: self.top,
            epoch: self.epoch.clone(),
        }
    }

    /// Gives the next offset to a message, framed by `frame(offset)`, and keeps it within
    /// `limits`; returns the offset and the frame.
    pub fn append(
        &mut self,
        frame: impl FnOnce(u64) -> Bytes,
        limits: HistoryLimits,
        now: Instant,
    ) -> (u64, Bytes) {
        self.top += 1;
        let frame = frame(self.top);
        if limits.size > 0 {
            self.history.push_back(Kept {
                offset: self.top,
                frame: frame.clone(),
                at: now,
            });
        }
        self.trim(limits, now);
        (self.top, frame)
    }

    /// Forgets what is past the limits; returns whether anything is left.
    pub fn trim(&mut self, limits: HistoryLimits, now: Instant) -> bool {
        while self.history.len() > limits.size
            || self
                .history
                .front()
                .is_some_and(|kept| now.duration_since(kept.at) > limits.ttl)
        {
            self.history.pop_front();
        }
        !self.history.is_empty()
    }

    /// The messages after `since`, if every one of them is still kept: `None` when the epoch is
    /// another, or some were forgotten — never a partial list.
    pub fn since(
        &self,
        since: &Position,
        limits: HistoryLimits,
        now: Instant,
    ) -> Option<Vec<Bytes>> {
        if *since.epoch != *self.epoch || since.offset > self.top {
            return None;
        }
        self.range(since.offset + 1, self.top, limits, now)
    }

    /// The messages with offsets `from..=to`, if every one of them is still kept.
    pub fn range(
        &self,
        from: u64,
        to: u64,
        limits: HistoryLimits,
        now: Instant,
    ) -> Option<Vec<Bytes>> {
        if from > to {
            return Some(Vec::new());
        }
        let first = self.history.front()?.offset;
        if from < first || to > self.top {
            return None;
        }
        let start = (from - first) as usize;
        let kept: Vec<&Kept> = self
            .history
            .range(start..=start + (to - from) as usize)
            .collect();
        if kept.iter().any(|k| now.duration_since(k.at) > limits.ttl) {
            return None;
        }
        Some(kept.into_iter().map(|k| k.frame.clone()).collect())
    }
}

impl Default for Stream {
    fn default() -> Self {
        Self::new()
    }
}

/// A new epoch: 8 random hex digits.
fn new_epoch() -> Arc<str> {
    let mut bytes = [0u8; 4];
    // Without randomness (never seen on Linux) epochs still differ by time.
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        bytes = nanos.to_le_bytes();
    }
    Arc::from(format!("{:08x}", u32::from_le_bytes(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HistoryLimits = HistoryLimits {
        size: 3,
        ttl: Duration::from_secs(60),
    };

    fn frame(offset: u64) -> Bytes {
        Bytes::from(format!("m{offset}"))
    }

    #[test]
    fn offsets_are_consecutive_and_history_is_bounded() {
        let mut stream = Stream::new();
        let now = Instant::now();
        for expected in 1..=5 {
            let (offset, kept) = stream.append(frame, LIMITS, now);
            assert_eq!((offset, kept), (expected, frame(expected)));
        }
        let at = |offset| Position {
            offset,
            epoch: stream.position().epoch,
        };
        assert_eq!(stream.position().offset, 5);
        // Kept: 3, 4, 5.
        assert_eq!(
            stream.since(&at(2,), LIMITS, now),
            Some(vec![frame(3), frame(4), frame(5)])
        );
        assert_eq!(stream.since(&at(4), LIMITS, now), Some(vec![frame(5)]));
        assert_eq!(stream.since(&at(5), LIMITS, now), Some(vec![]));
        // 2 was forgotten: no partial answer.
        assert_eq!(stream.since(&at(1), LIMITS, now), None);
        // An offset from the future, or another epoch.
        assert_eq!(stream.since(&at(6), LIMITS, now), None);
        let other = Position {
            offset: 4,
            epoch: "other".into(),
        };
        assert_eq!(stream.since(&other, LIMITS, now), None);
        assert_eq!(
            stream.range(4, 5, LIMITS, now),
            Some(vec![frame(4), frame(5)])
        );
        assert_eq!(stream.range(2, 5, LIMITS, now), None);
    }

    #[test]
    fn old_messages_expire() {
        let mut stream = Stream::new();
        let start = Instant::now();
        stream.append(frame, LIMITS, start);
        stream.append(frame, LIMITS, start + Duration::from_secs(30));
        let later = start + Duration::from_secs(70);
        let epoch = stream.position().epoch;
        let since = |offset| Position {
            offset,
            epoch: epoch.clone(),
        };
        assert_eq!(stream.since(&since(0), LIMITS, later), None, "1 expired");
        assert_eq!(stream.since(&since(1), LIMITS, later), Some(vec![frame(2)]));
        assert!(stream.trim(LIMITS, later));
        assert!(!stream.trim(LIMITS, start + Duration::from_secs(100)));
    }

    #[test]
    fn without_history_nothing_is_kept_but_offsets_go_on() {
        let mut stream = Stream::new();
        let none = HistoryLimits { size: 0, ..LIMITS };
        let now = Instant::now();
        stream.append(frame, none, now);
        stream.append(frame, none, now);
        let position = stream.position();
        assert_eq!(position.offset, 2);
        assert_eq!(
            stream.since(
                &Position {
                    offset: 1,
                    ..position.clone()
                },
                none,
                now
            ),
            None
        );
        assert_eq!(stream.since(&position, none, now), Some(vec![]));
        assert_ne!(
            Stream::new().position().epoch,
            position.epoch,
            "a new epoch each time"
        );
    }
}
