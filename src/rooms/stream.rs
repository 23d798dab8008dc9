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

use crate::ws::deflate::Prepared;

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
    /// As members got it (a replay reuses its compression too).
    frame: Prepared,
    at: Instant,
}

pub struct Stream {
    /// The offset of the last message (0: none yet in this epoch).
    top: u64,
    epoch: Arc<str>,
    /// The most recent messages, oldest first, with consecutive offsets ending at `top`.
    history: VecDeque<Kept>,
    /// Whether `top` and `epoch` are the room's own. A node's stream always is with the memory
    /// broker; with a shared broker, from the node's first sync of the room until it
    /// unsubscribes.
    synced: bool,
    /// A sync with the broker was asked for and has not completed.
    pub subscribing: bool,
    /// The room's presence is to be read again with its next catch-up (a presence change was
    /// missed, or a node is back).
    pub presence_stale: bool,
    catch_up: CatchUp,
}

/// Whether the node is catching a stream up from the broker.
#[derive(Clone, Copy, PartialEq, Eq)]
enum CatchUp {
    Idle,
    Running,
    /// More was missed while catching up: once more when done.
    RunningAgain,
}

/// How a message from the broker fits the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Arrival {
    /// The next one: deliver it.
    Next,
    /// Already had (or from before the node's sync): ignore it.
    Seen,
    /// Something before it is missing, or the epoch changed: catch up from the broker.
    Missed,
}

impl Stream {
    /// A new stream, under a fresh epoch.
    pub fn new() -> Self {
        Stream {
            top: 0,
            epoch: new_epoch(),
            history: VecDeque::new(),
            synced: true,
            subscribing: false,
            presence_stale: false,
            catch_up: CatchUp::Idle,
        }
    }

    /// A stream whose position is the broker's, not known yet.
    pub fn unsynced() -> Self {
        Stream {
            synced: false,
            ..Stream::new()
        }
    }

    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// Forgets the position and history: the node no longer follows the room.
    pub fn unsync(&mut self) {
        self.synced = false;
        self.subscribing = false;
        self.top = 0;
        self.history.clear();
    }

    /// Where a message the broker gave `offset` in `epoch` fits. While the first sync is under
    /// way everything is `Missed`: the sync may have read the room before this message, so it
    /// runs once more.
    pub fn arrival(&self, offset: u64, epoch: &str) -> Arrival {
        if !self.synced {
            if self.subscribing {
                Arrival::Missed
            } else {
                // Not followed any more: on its way from before the UNSUBSCRIBE.
                Arrival::Seen
            }
        } else if *self.epoch != *epoch {
            Arrival::Missed
        } else if offset <= self.top {
            Arrival::Seen
        } else if offset == self.top + 1 {
            Arrival::Next
        } else {
            Arrival::Missed
        }
    }

    /// Starts catching up, unless that is under way already (then it runs once more when done).
    /// Returns whether the caller is to do it.
    pub fn begin_catch_up(&mut self) -> bool {
        match self.catch_up {
            CatchUp::Idle => {
                self.catch_up = CatchUp::Running;
                true
            }
            _ => {
                self.catch_up = CatchUp::RunningAgain;
                false
            }
        }
    }

    /// A catch-up ended (or was abandoned); returns whether to run another one.
    pub fn end_catch_up(&mut self) -> bool {
        let again = self.catch_up == CatchUp::RunningAgain;
        self.catch_up = if again {
            CatchUp::Running
        } else {
            CatchUp::Idle
        };
        again
    }

    /// Appends the broker's message `offset` (the one after `top`, see [`Stream::arrival`]).
    pub fn push(&mut self, offset: u64, frame: Prepared, limits: HistoryLimits, now: Instant) {
        debug_assert_eq!(offset, self.top + 1);
        self.top = offset;
        if limits.size > 0 {
            self.history.push_back(Kept {
                offset,
                frame,
                at: now,
            });
        }
        self.trim(limits, now);
    }

    /// Takes the broker's position and recent history (`kept`: consecutive offsets ending at
    /// `top`, or empty) as this stream's.
    pub fn reset(
        &mut self,
        position: Position,
        kept: Vec<(u64, Prepared)>,
        limits: HistoryLimits,
        now: Instant,
    ) {
        // History is only kept as consecutive offsets ending at `top`.
        let consecutive = kept
            .last()
            .is_some_and(|(last, _)| *last == position.offset)
            && kept.windows(2).all(|w| w[1].0 == w[0].0 + 1);
        self.top = position.offset;
        self.epoch = position.epoch;
        self.synced = true;
        self.subscribing = false;
        self.history = kept
            .into_iter()
            .filter(|_| consecutive)
            .map(|(offset, frame)| Kept {
                offset,
                frame,
                at: now,
            })
            .collect();
        self.trim(limits, now);
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
    ) -> (u64, Prepared) {
        let offset = self.top + 1;
        let frame = Prepared::new(frame(offset));
        self.push(offset, frame.clone(), limits, now);
        (offset, frame)
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

    /// The kept messages after offset `since` that have not expired, at most `limit`: the
    /// oldest of them first, or the newest first (`newest_first`). Their frames, as members got
    /// them.
    pub fn kept_after(
        &self,
        since: u64,
        limit: usize,
        newest_first: bool,
        limits: HistoryLimits,
        now: Instant,
    ) -> Vec<Prepared> {
        let live = self
            .history
            .iter()
            .filter(|kept| kept.offset > since && now.duration_since(kept.at) <= limits.ttl)
            .map(|kept| kept.frame.clone());
        if newest_first {
            live.rev().take(limit).collect()
        } else {
            live.take(limit).collect()
        }
    }

    /// The messages after `since`, if every one of them is still kept: `None` when the epoch is
    /// another, or some were forgotten — never a partial list.
    pub fn since(
        &self,
        since: &Position,
        limits: HistoryLimits,
        now: Instant,
    ) -> Option<Vec<Prepared>> {
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
    ) -> Option<Vec<Prepared>> {
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
pub fn new_epoch() -> Arc<str> {
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

    /// Message `offset` as the history keeps it.
    fn kept(offset: u64) -> Prepared {
        Prepared::new(frame(offset))
    }

    #[test]
    fn offsets_are_consecutive_and_history_is_bounded() {
        let mut stream = Stream::new();
        let now = Instant::now();
        for expected in 1..=5 {
            let (offset, kept) = stream.append(frame, LIMITS, now);
            assert_eq!((offset, kept.plain()), (expected, &frame(expected)));
        }
        let at = |offset| Position {
            offset,
            epoch: stream.position().epoch,
        };
        assert_eq!(stream.position().offset, 5);
        // Kept: 3, 4, 5.
        assert_eq!(
            stream.since(&at(2,), LIMITS, now),
            Some(vec![kept(3), kept(4), kept(5)])
        );
        assert_eq!(stream.since(&at(4), LIMITS, now), Some(vec![kept(5)]));
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
            Some(vec![kept(4), kept(5)])
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
        assert_eq!(stream.since(&since(1), LIMITS, later), Some(vec![kept(2)]));
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
