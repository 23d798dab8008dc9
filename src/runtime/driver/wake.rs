//! Which connections of this thread's event loop want a turn, and the wakers that say so.
//!
//! A connection's waker is its slab key in a pointer's place (no allocation, no reference count):
//! waking it appends the key to this thread's list and wakes the loop's task if it waits. The
//! waker is what a connection's turn is polled with (TLS's and the turn's own "yield, call me
//! again"); a parked connection's outbound queue calls [`schedule`] with its key directly (another
//! connection's publication). All on the shard's own thread (one shard, one loop, per thread).

use std::cell::RefCell;
use std::task::{Poll, RawWaker, RawWakerVTable, Waker};

#[derive(Default)]
struct Scheduled {
    keys: Vec<u32>,
    /// The loop's task, while it waits for work.
    loop_waker: Option<Waker>,
}

thread_local! {
    static SCHEDULED: RefCell<Scheduled> = RefCell::default();
}

/// Gives `key` a turn in the loop's next round.
pub fn schedule(key: usize) {
    let waiting = SCHEDULED.with_borrow_mut(|s| {
        s.keys.push(key as u32);
        s.loop_waker.take()
    });
    if let Some(waker) = waiting {
        waker.wake();
    }
}

/// Moves the keys scheduled so far into `into` (emptied first): one round's worth. Keys woken
/// meanwhile wait for the next round.
pub fn take_round(into: &mut Vec<u32>) {
    into.clear();
    SCHEDULED.with_borrow_mut(|s| std::mem::swap(&mut s.keys, into));
}

/// Resolves once some connection is scheduled.
pub async fn scheduled() {
    std::future::poll_fn(|cx| {
        SCHEDULED.with_borrow_mut(|s| {
            if s.keys.is_empty() {
                s.loop_waker = Some(cx.waker().clone());
                Poll::Pending
            } else {
                s.loop_waker = None;
                Poll::Ready(())
            }
        })
    })
    .await
}

/// The waker of the connection at `key`.
pub fn waker(key: usize) -> Waker {
    // SAFETY: the vtable's functions never dereference the data pointer: it only carries the key.
    unsafe { Waker::from_raw(raw(key)) }
}

fn raw(key: usize) -> RawWaker {
    RawWaker::new(key as *const (), &VTABLE)
}

static VTABLE: RawWakerVTable = RawWakerVTable::new(
    |data| raw(data as usize),
    |data| schedule(data as usize),
    |data| schedule(data as usize),
    |_| {},
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn woken_keys_are_taken_a_round_at_a_time() {
        let mut round = Vec::new();
        waker(7).wake_by_ref();
        let clone = waker(3).clone();
        clone.wake();
        take_round(&mut round);
        assert_eq!(round, [7, 3]);
        waker(9).wake();
        take_round(&mut round);
        assert_eq!(round, [9]);
        take_round(&mut round);
        assert!(round.is_empty());
    }
}
