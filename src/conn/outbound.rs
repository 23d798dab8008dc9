//! One connection's outbound queue: the frames waiting to be written to its socket.
//!
//! - **Accounting.** A queued frame is charged its length plus [`ITEM_OVERHEAD`] (its queue slot
//!   and allocation), so a flood of tiny frames costs what it really occupies: 10,000 queued
//!   2-byte pongs count as ~660 KB, not 20 KB. Every change is mirrored in the shard's
//!   [`QueueTotal`], which the shard holds against its share of `max_total_queued_bytes`.
//! - **Pongs coalesce.** At most [`MAX_QUEUED_PONGS`] pongs wait in a queue; past them a newer ping
//!   replaces the payload of the last one (RFC 6455 §5.5.3 allows answering only the most recent
//!   ping). A client's few pings each get their answer; a flood of them costs a few slots.
//! - **Stale bytes.** What the socket refused at the connection's last write attempt, and is
//!   still queued. A reader is judged slow by these alone: a burst the gateway queued while the
//!   connection had no turn to write is the gateway's backlog, not the reader's.
//! - **Dropping is O(1) amortized.** Under the `drop` policy the oldest broadcasts are turned into
//!   tombstones from a cursor that only moves forward, instead of searching the queue each time.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::num::NonZeroU32;

use bytes::{Buf, Bytes};

use crate::ws::deflate::{self, Deflate};

/// What a queued frame costs beyond its bytes: a queue slot (a 40-byte entry in a `VecDeque`
/// that grows by doubling) and the frame's allocation. Charged to every frame, so the queue
/// bound is a bound on memory rather than on wire bytes.
pub const ITEM_OVERHEAD: usize = 64;

/// Pongs a queue holds before newer ones replace the last (each at most 127 bytes).
pub const MAX_QUEUED_PONGS: u16 = 16;

/// What a write took off a queue.
#[derive(Debug, PartialEq, Eq)]
pub struct Advanced {
    /// Frames completed.
    pub frames: u64,
    /// Broadcasts dropped for the reader since it last caught up (0 unless it just did).
    pub dropped: u64,
}

/// What a frame costs its queue.
pub fn cost(frame: &Bytes) -> usize {
    frame.len() + ITEM_OVERHEAD
}

/// Tells a shard's driver that the parked connection with this key has something to write.
pub type Wake = fn(usize);

/// Bytes queued across all of a shard's connections, as charged by [`cost`], and how the shard's
/// driver learns that a parked connection got a frame.
#[derive(Debug)]
pub struct QueueTotal {
    bytes: usize,
    wake: Wake,
}

impl Default for QueueTotal {
    fn default() -> Self {
        QueueTotal {
            bytes: 0,
            wake: |_| {},
        }
    }
}

impl QueueTotal {
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether more than `budget` is queued.
    pub fn over(&self, budget: usize) -> bool {
        self.bytes > budget
    }

    /// What a frame queued for a parked connection calls (the driver's scheduler).
    pub fn set_wake(&mut self, wake: Wake) {
        self.wake = wake;
    }

    /// Gives the connection at `key` a turn of the driver's loop.
    pub fn schedule(&self, key: usize) {
        (self.wake)(key);
    }

    fn add(&mut self, n: usize) {
        self.bytes += n;
    }

    fn sub(&mut self, n: usize) {
        debug_assert!(self.bytes >= n, "queue total would go negative");
        self.bytes = self.bytes.saturating_sub(n);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A reply to the connection's own request (an error, `room_joined`, an echo…): never dropped.
    Reply,
    /// A broadcast: may be dropped for a slow reader under the `drop` policy.
    Broadcast,
    /// The answer to a ping: the last one queued takes the payload of newer pings past
    /// [`MAX_QUEUED_PONGS`].
    Pong,
    /// A dropped broadcast: an empty frame that still holds its slot until the queue passes it.
    Dropped,
}

struct Queued {
    frame: Bytes,
    kind: Kind,
}

/// The part of a queue that exists only while two or more frames are pending.
#[derive(Default)]
struct Backlog {
    queue: VecDeque<Queued>,
    /// Pongs in `queue`, and the index of the last of them.
    pongs: u16,
    last_pong: Option<usize>,
    /// Frame bytes of the broadcasts in `queue`: what dropping them could free (their slots stay
    /// charged until the writer passes them).
    droppable: usize,
    /// Index in `queue` before which no broadcast is left: where the next drop looks first.
    drop_from: usize,
    /// Broadcasts dropped since the reader last caught up.
    dropped: u64,
}

/// Frames waiting to be written to one connection, and how to wake the task that writes them.
#[derive(Default)]
pub struct Outbound {
    /// The oldest queued frame, kept inline: a connection with at most one frame pending (most
    /// of them, most of the time) costs no allocation for its queue. Possibly half written, so
    /// never dropped.
    head: Option<Bytes>,
    /// Everything behind `head`; boxed, and allocated only while needed: an idle connection pays
    /// one pointer for it, in every slab slot.
    backlog: Option<Box<Backlog>>,
    /// While the connection waits for someone else's frames: its key (plus one), which a frame
    /// arriving in the empty queue hands to [`QueueTotal`]'s wake. A key, not a `Waker`: 4 bytes in
    /// every slab slot instead of 16.
    parked: Option<NonZeroU32>,
    /// Charged bytes queued (u32: bounded by `max_queued_bytes` plus one burst, at most ~2 GiB;
    /// this struct is in every slab slot).
    queued: u32,
    /// Charged bytes the socket refused at the last write attempt that are still queued.
    stale: u32,
    /// The code of our close frame once it is queued (nothing may follow it on the wire); 0
    /// before.
    close_code: u16,
    /// Whether the connection agreed to permessage-deflate (its replies are compressed as they
    /// are queued; broadcasts come compressed already).
    deflate: Deflate,
}

impl Outbound {
    /// The queue of a connection that agreed to permessage-deflate (`deflate`), or not.
    pub fn new(deflate: Deflate) -> Self {
        Outbound {
            deflate,
            ..Outbound::default()
        }
    }

    pub fn deflate(&self) -> Deflate {
        self.deflate
    }

    /// Queues a reply (compressed, if the connection agreed to compression and it is worth
    /// it), unless the connection is closing (then it is dropped: the peer will not read past
    /// our close frame).
    pub fn push(&mut self, frame: Bytes, total: &mut QueueTotal) {
        if self.is_closing() {
            return;
        }
        let frame = deflate::for_connection(frame, self.deflate);
        self.enqueue(frame, Kind::Reply, total);
    }

    /// Queues a reply made for many connections (a replay of a room's history), as this one
    /// takes it; `compressing` is called if that takes a compression (see
    /// [`deflate::Prepared::for_connection`]).
    pub fn push_prepared(
        &mut self,
        frame: &deflate::Prepared,
        compressing: impl FnOnce(),
        total: &mut QueueTotal,
    ) {
        if self.is_closing() {
            return;
        }
        let frame = frame.for_connection(self.deflate, compressing);
        self.enqueue(frame, Kind::Reply, total);
    }

    /// Queues a broadcast frame, as the connection takes it (see
    /// [`deflate::Prepared::for_connection`]).
    pub fn push_broadcast(&mut self, frame: Bytes, total: &mut QueueTotal) {
        self.enqueue(frame, Kind::Broadcast, total);
    }

    /// Queues the answer to a ping; with [`MAX_QUEUED_PONGS`] waiting already, it replaces the
    /// last one's payload instead.
    pub fn push_pong(&mut self, frame: Bytes, total: &mut QueueTotal) {
        if self.is_closing() {
            return;
        }
        let full = self
            .backlog
            .as_ref()
            .is_some_and(|b| b.pongs >= MAX_QUEUED_PONGS);
        if !full {
            return self.enqueue(frame, Kind::Pong, total);
        }
        let backlog = self.backlog.as_mut().expect("full");
        let last = backlog.last_pong.expect("pongs are queued");
        let older = std::mem::replace(&mut backlog.queue[last].frame, frame);
        let newer = backlog.queue[last].frame.len();
        // Pongs carry at most 125 bytes: the charge moves by that much at most.
        self.queued = (self.queued + newer as u32).saturating_sub(older.len() as u32);
        total.add(newer);
        total.sub(older.len());
    }

    fn enqueue(&mut self, frame: Bytes, kind: Kind, total: &mut QueueTotal) {
        if self.is_closing() {
            return;
        }
        let charge = cost(&frame);
        self.queued = self.queued.saturating_add(charge as u32);
        total.add(charge);
        if self.head.is_some() {
            let backlog = self.backlog.get_or_insert_default();
            match kind {
                Kind::Broadcast => backlog.droppable += frame.len(),
                Kind::Pong => {
                    backlog.pongs += 1;
                    backlog.last_pong = Some(backlog.queue.len());
                }
                Kind::Reply | Kind::Dropped => {}
            }
            backlog.queue.push_back(Queued { frame, kind });
            return;
        }
        self.head = Some(frame);
        self.wake(total);
    }

    /// Drops the oldest queued broadcasts until `needed` more bytes fit under `bound`; returns
    /// how many were dropped and whether the room was made. Nothing is dropped when even
    /// dropping every queued broadcast would not be enough.
    pub fn make_room(
        &mut self,
        needed: usize,
        bound: usize,
        total: &mut QueueTotal,
    ) -> (u64, bool) {
        let queued = self.queued as usize;
        if queued + needed <= bound {
            return (0, true);
        }
        let Some(backlog) = self.backlog.as_mut() else {
            return (0, false);
        };
        if queued - backlog.droppable + needed > bound {
            return (0, false);
        }
        let mut dropped = 0;
        while self.queued as usize + needed > bound {
            let at = backlog.drop_from;
            if backlog.queue[at].kind != Kind::Broadcast {
                backlog.drop_from += 1;
                continue;
            }
            let mut freed = backlog.queue[at].frame.len();
            backlog.droppable -= freed;
            if at == 0 {
                // At the front (the usual case: the oldest go first): its slot goes too.
                backlog.queue.pop_front();
                backlog.last_pong = backlog.last_pong.map(|i| i - 1);
                freed += ITEM_OVERHEAD;
            } else {
                // Behind a reply: a tombstone keeps the slot until the writer passes it.
                let item = &mut backlog.queue[at];
                item.frame = Bytes::new();
                item.kind = Kind::Dropped;
                backlog.drop_from += 1;
            }
            self.queued -= freed as u32;
            total.sub(freed);
            dropped += 1;
        }
        self.stale = self.stale.min(self.queued);
        backlog.dropped += dropped;
        (dropped, true)
    }

    /// Counts broadcasts this reader will not get (it is told once it catches up).
    pub fn note_dropped(&mut self, n: u64) {
        self.backlog.get_or_insert_default().dropped += n;
    }

    /// Queues our close frame: the last frame this connection will send. Always wakes the task,
    /// which may be asleep on a full socket, so it starts the (time-bounded) close.
    pub fn push_close(&mut self, frame: Bytes, total: &mut QueueTotal) {
        // A second close is not sent (nothing follows the first on the wire): the first's code
        // stands.
        if !self.is_closing() {
            // The code is the payload's first two bytes, after a two-byte header (a close
            // frame's payload is at most 125 bytes).
            let code = frame
                .get(2..4)
                .map_or(1005, |c| u16::from_be_bytes([c[0], c[1]]));
            self.push(frame, total);
            self.close_code = code.max(1);
        }
        self.wake(total);
    }

    fn wake(&self, total: &QueueTotal) {
        if let Some(key) = self.parked {
            (total.wake)(key.get() as usize - 1);
        }
    }

    pub fn is_closing(&self) -> bool {
        self.close_code != 0
    }

    /// The code of the close frame queued for the peer, if any.
    pub fn close_code(&self) -> Option<u16> {
        self.is_closing().then_some(self.close_code)
    }

    pub fn is_empty(&self) -> bool {
        self.head.is_none()
    }

    /// Charged bytes queued.
    pub fn queued_bytes(&self) -> usize {
        self.queued as usize
    }

    /// Charged bytes the reader has had a chance to take and has not.
    pub fn stale_bytes(&self) -> usize {
        self.stale as usize
    }

    /// The socket took less than was queued: everything queued now is the reader's backlog.
    pub fn mark_stale(&mut self) {
        self.stale = self.queued;
    }

    /// Fills `slices` with the front of the queue, for one vectored write.
    pub fn slices<'a>(&'a self, slices: &mut [IoSlice<'a>]) -> usize {
        let rest = self
            .backlog
            .iter()
            .flat_map(|b| b.queue.iter().map(|q| &q.frame));
        let frames = self.head.iter().chain(rest).filter(|f| !f.is_empty());
        let mut n = 0;
        for (slot, frame) in slices.iter_mut().zip(frames) {
            *slot = IoSlice::new(frame);
            n += 1;
        }
        n
    }

    /// Drops `written` bytes from the front of the queue; returns how many frames they completed,
    /// and, once the queue is caught up, how many broadcasts were dropped for it on the way (for
    /// the reader to be told).
    pub fn advance(&mut self, mut written: usize, total: &mut QueueTotal) -> Advanced {
        let (mut freed, mut frames) = (0, 0);
        while let Some(front) = self.head.as_mut() {
            if front.len() > written {
                front.advance(written);
                freed += written;
                written = 0;
                break;
            }
            written -= front.len();
            freed += front.len() + ITEM_OVERHEAD;
            frames += 1;
            self.head = self.backlog.as_mut().and_then(|b| b.pop_front());
        }
        debug_assert_eq!(written, 0, "wrote more than was queued");
        self.queued -= freed as u32;
        self.stale = self.stale.saturating_sub(freed as u32);
        total.sub(freed);
        // Caught up: give a burst's queue back (an idle connection keeps no allocation), and
        // say what the reader missed.
        let dropped = if self.head.is_none() {
            self.backlog.take().map_or(0, |b| b.dropped)
        } else {
            0
        };
        Advanced { frames, dropped }
    }

    /// The connection (slab `key`) waits: a frame arriving in its empty queue, or a close, wakes
    /// it.
    pub fn park(&mut self, key: usize) {
        self.parked = NonZeroU32::new(key as u32 + 1);
    }

    /// The connection runs: frames it queues for itself are flushed before it parks again, and
    /// waking it would only give it one more turn for nothing.
    pub fn unpark(&mut self) {
        self.parked = None;
    }

    /// Gives back everything still queued (the connection is gone).
    pub fn clear(&mut self, total: &mut QueueTotal) {
        total.sub(self.queued as usize);
        self.queued = 0;
        self.stale = 0;
        self.head = None;
        self.backlog = None;
    }
}

impl Backlog {
    /// The next frame to write after the head.
    fn pop_front(&mut self) -> Option<Bytes> {
        let next = self.queue.pop_front()?;
        self.drop_from = self.drop_from.saturating_sub(1);
        self.last_pong = self.last_pong.and_then(|i| i.checked_sub(1));
        match next.kind {
            Kind::Broadcast => self.droppable -= next.frame.len(),
            Kind::Pong => self.pongs -= 1,
            Kind::Reply | Kind::Dropped => {}
        }
        Some(next.frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: usize) -> Bytes {
        Bytes::from(vec![1u8; n])
    }

    /// Broadcasts dropped since the reader last caught up.
    fn dropped(out: &Outbound) -> u64 {
        out.backlog.as_ref().map_or(0, |b| b.dropped)
    }

    fn pending(out: &Outbound) -> Vec<Vec<u8>> {
        let mut slices = [IoSlice::new(&[]); 16];
        let n = out.slices(&mut slices);
        slices[..n].iter().map(|s| s.to_vec()).collect()
    }

    #[test]
    fn is_fifo_across_partial_writes_and_frees_its_queue_when_drained() {
        let mut total = QueueTotal::default();
        let mut out = Outbound::default();
        for f in ["ab", "cde", "f"] {
            out.push(Bytes::from_static(f.as_bytes()), &mut total);
        }
        assert_eq!(out.queued_bytes(), 6 + 3 * ITEM_OVERHEAD);
        assert_eq!(total.bytes(), out.queued_bytes());
        out.advance(3, &mut total); // "ab" and the "c" of "cde"
        assert_eq!(pending(&out), vec![b"de".to_vec(), b"f".to_vec()]);
        assert_eq!(out.queued_bytes(), 3 + 2 * ITEM_OVERHEAD);
        out.advance(3, &mut total);
        assert!(out.is_empty());
        assert_eq!((out.queued_bytes(), total.bytes()), (0, 0));
        assert!(out.backlog.is_none());
    }

    #[test]
    fn only_the_first_close_is_queued_and_its_code_is_the_one_kept() {
        use crate::ws::close::CloseCode;
        let mut total = QueueTotal::default();
        let mut out = Outbound::default();
        assert_eq!(out.close_code(), None);
        let slow = crate::ws::frame::encode_close(CloseCode::POLICY_VIOLATION, "slow consumer");
        out.push_close(slow.clone(), &mut total);
        out.push_close(
            crate::ws::frame::encode_close(CloseCode::GOING_AWAY, ""),
            &mut total,
        );
        out.push(frame(3), &mut total);
        assert_eq!(out.close_code(), Some(1008));
        assert_eq!(pending(&out), vec![slow.to_vec()]);
        assert_eq!(
            out.advance(slow.len(), &mut total).frames,
            1,
            "one frame written"
        );
    }

    #[test]
    fn pongs_are_answered_in_order_and_past_a_few_coalesce_into_the_last() {
        let mut total = QueueTotal::default();
        let mut out = Outbound::default();
        out.push(frame(10), &mut total); // being written
        let pongs = MAX_QUEUED_PONGS as usize + 50;
        for i in 0..pongs {
            out.push_pong(Bytes::from(format!("p{i}")), &mut total);
            if i == 3 {
                out.push(frame(5), &mut total);
            }
        }
        let mut expected: Vec<Vec<u8>> = vec![vec![1; 10]];
        expected.extend((0..4).map(|i| format!("p{i}").into_bytes()));
        expected.push(vec![1; 5]);
        let kept = MAX_QUEUED_PONGS as usize - 4;
        expected.extend((4..4 + kept - 1).map(|i| format!("p{i}").into_bytes()));
        // The last queued pong answers the latest ping.
        expected.push(format!("p{}", pongs - 1).into_bytes());
        let mut slices = [IoSlice::new(&[]); 64];
        let n = out.slices(&mut slices);
        let all: Vec<Vec<u8>> = slices[..n].iter().map(|s| s.to_vec()).collect();
        assert_eq!(all, expected);
        assert_eq!(total.bytes(), out.queued_bytes());
        let written = all.iter().map(Vec::len).sum();
        out.advance(written, &mut total);
        assert_eq!((out.queued_bytes(), total.bytes()), (0, 0));
        // Drained: a new round of pings is answered one by one again.
        out.push(frame(1), &mut total);
        out.push_pong(Bytes::from_static(b"again"), &mut total);
        assert_eq!(pending(&out), vec![vec![1], b"again".to_vec()]);
    }

    #[test]
    fn stale_bytes_are_what_the_socket_refused_and_shrink_as_it_takes_them() {
        let mut total = QueueTotal::default();
        let mut out = Outbound::default();
        out.push(frame(100), &mut total);
        out.push(frame(100), &mut total);
        assert_eq!(out.stale_bytes(), 0, "not yet tried");
        out.mark_stale();
        assert_eq!(out.stale_bytes(), 200 + 2 * ITEM_OVERHEAD);
        out.push_broadcast(frame(100), &mut total);
        assert_eq!(
            out.stale_bytes(),
            200 + 2 * ITEM_OVERHEAD,
            "new frames are not stale"
        );
        out.advance(100, &mut total);
        assert_eq!(out.stale_bytes(), 100 + ITEM_OVERHEAD);
    }

    #[test]
    fn make_room_drops_only_the_oldest_broadcasts_and_only_when_that_is_enough() {
        let mut total = QueueTotal::default();
        let mut out = Outbound::default();
        out.push(frame(10), &mut total); // head: never dropped
        out.push_broadcast(frame(300), &mut total);
        out.push(frame(200), &mut total); // a reply: never dropped
        out.push_broadcast(frame(300), &mut total);
        let queued = 810 + 4 * ITEM_OVERHEAD;
        assert_eq!(out.queued_bytes(), queued);
        // Dropping frees frame bytes (a dropped frame's slot stays charged until it is passed).
        let bound = 1000 + 4 * ITEM_OVERHEAD;
        // Even dropping both broadcasts leaves 210: 900 more cannot fit in 1000.
        assert_eq!(out.make_room(900, bound, &mut total), (0, false));
        assert_eq!(out.queued_bytes(), queued, "nothing dropped for nothing");
        // 400 more: dropping the oldest broadcast (300) is enough.
        assert_eq!(out.make_room(400, bound, &mut total), (1, true));
        assert_eq!(
            out.queued_bytes(),
            queued - 300 - ITEM_OVERHEAD,
            "its slot too"
        );
        assert_eq!(total.bytes(), out.queued_bytes());
        assert_eq!(dropped(&out), 1);
        // The tombstone is skipped on the wire.
        assert_eq!(pending(&out), vec![vec![1; 10], vec![1; 200], vec![1; 300]]);
        // Caught up: the reader is told how many it missed, exactly.
        out.advance(210, &mut total);
        out.note_dropped(70_000);
        assert_eq!(dropped(&out), 70_001);
        let advanced = out.advance(300, &mut total);
        assert_eq!(
            advanced,
            Advanced {
                frames: 1,
                dropped: 70_001
            }
        );
        assert!(out.is_empty());
    }

    #[test]
    fn dropping_from_a_long_queue_does_not_rescan_it() {
        let mut total = QueueTotal::default();
        let mut out = Outbound::default();
        out.push(frame(1), &mut total); // the head, being written
        out.push(frame(1), &mut total); // a reply at the front: dropped frames pile up behind it
        for _ in 0..10_000 {
            out.push_broadcast(frame(100), &mut total);
        }
        let bound = out.queued_bytes() + 100_000;
        let mut last_cursor = 0;
        for round in 0..1_000 {
            out.push_broadcast(frame(1000), &mut total);
            let (dropped, fits) = out.make_room(1000 + ITEM_OVERHEAD, bound, &mut total);
            assert!(fits, "round {round}");
            // The cursor only moves forward: each drop starts where the last one stopped.
            let cursor = out.backlog.as_ref().unwrap().drop_from;
            assert!(cursor >= last_cursor && cursor as u64 >= dropped);
            last_cursor = cursor;
        }
        assert!(out.queued_bytes() + 1000 + ITEM_OVERHEAD <= bound);
        assert_eq!(total.bytes(), out.queued_bytes());
    }

    #[test]
    fn dropped_frames_at_the_front_give_their_slots_back_at_once() {
        let mut total = QueueTotal::default();
        let mut out = Outbound::default();
        out.push(frame(1), &mut total);
        for _ in 0..100 {
            out.push_broadcast(frame(100), &mut total);
        }
        let bound = out.queued_bytes();
        for round in 0..10_000 {
            let (dropped, fits) = out.make_room(100 + ITEM_OVERHEAD, bound, &mut total);
            assert_eq!((dropped, fits), (1, true), "round {round}");
            out.push_broadcast(frame(100), &mut total);
        }
        assert_eq!(out.backlog.as_ref().unwrap().queue.len(), 100);
        assert_eq!(dropped(&out), 10_000);
        assert_eq!(total.bytes(), out.queued_bytes());
    }

    #[test]
    fn clear_gives_everything_back() {
        let mut total = QueueTotal::default();
        let mut out = Outbound::default();
        out.push(frame(10), &mut total);
        out.push_broadcast(frame(10), &mut total);
        out.push_pong(frame(2), &mut total);
        out.clear(&mut total);
        assert_eq!(total.bytes(), 0);
        assert!(out.is_empty());
    }
}
