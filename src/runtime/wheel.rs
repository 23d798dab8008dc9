//! A hashed timer wheel: one per shard, for heartbeats (and any per-connection deadline) instead
//! of a tokio timer per connection.
//!
//! Time is counted in coarse ticks. Inserting files an item under the slot of its tick: O(1).
//! Advancing the wheel takes out the items of each slot passed: O(1) per item. Cancelling is lazy
//! and O(1): items carry what identifies their owner's current state (a connection's slab key
//! and generation), and whoever takes them out drops the ones that no longer match. Items must be
//! due within `slots - 1` ticks; later ones are filed at the furthest slot and simply come out
//! early, which a re-checking caller (as the heartbeat is) handles by filing them again.

/// A tick count since the wheel started.
pub type Tick = u64;

pub struct TimerWheel<T> {
    slots: Box<[Vec<T>]>,
    /// The last tick advanced to: items in its slot have been taken out.
    now: Tick,
}

impl<T> TimerWheel<T> {
    /// A wheel whose items may be due up to `horizon` ticks ahead.
    pub fn new(horizon: u64) -> Self {
        let slots = (horizon + 1).next_power_of_two().max(2) as usize;
        TimerWheel {
            slots: (0..slots).map(|_| Vec::new()).collect(),
            now: 0,
        }
    }

    pub fn now(&self) -> Tick {
        self.now
    }

    /// Files `item` to come out when the wheel reaches tick `due` (at the next tick when `due`
    /// has passed, at the horizon when it is further).
    pub fn insert(&mut self, due: Tick, item: T) {
        let horizon = self.slots.len() as u64 - 1;
        let due = due.clamp(self.now + 1, self.now + horizon);
        let slot = self.slot(due);
        self.slots[slot].push(item);
    }

    /// Moves the wheel to tick `to`, appending every item due by then to `expired`.
    pub fn advance(&mut self, to: Tick, expired: &mut Vec<T>) {
        // Past a full turn every slot is due: visit each once.
        let from = self.now.max(to.saturating_sub(self.slots.len() as u64));
        for tick in from + 1..=to {
            let slot = self.slot(tick);
            expired.append(&mut self.slots[slot]);
        }
        self.now = self.now.max(to);
    }

    /// Items waiting in the wheel (cancelled ones included until they come out).
    pub fn len(&self) -> usize {
        self.slots.iter().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn slot(&self, tick: Tick) -> usize {
        (tick as usize) & (self.slots.len() - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn advance(wheel: &mut TimerWheel<u32>, to: Tick) -> Vec<u32> {
        let mut out = Vec::new();
        wheel.advance(to, &mut out);
        out.sort_unstable();
        out
    }

    #[test]
    fn items_come_out_at_their_tick() {
        let mut wheel = TimerWheel::new(10);
        wheel.insert(3, 30);
        wheel.insert(1, 10);
        wheel.insert(3, 31);
        wheel.insert(10, 100);
        assert_eq!(advance(&mut wheel, 1), vec![10]);
        assert_eq!(advance(&mut wheel, 2), Vec::<u32>::new());
        assert_eq!(advance(&mut wheel, 3), vec![30, 31]);
        assert_eq!(advance(&mut wheel, 9), Vec::<u32>::new());
        assert_eq!(advance(&mut wheel, 10), vec![100]);
        assert!(wheel.is_empty());
    }

    #[test]
    fn overdue_and_too_far_items_are_clamped() {
        let mut wheel = TimerWheel::new(4); // 8 slots: horizon 7
        advance(&mut wheel, 5);
        wheel.insert(2, 1); // already due: next tick
        wheel.insert(1000, 2); // beyond the horizon: at now + 7
        assert_eq!(advance(&mut wheel, 6), vec![1]);
        assert_eq!(advance(&mut wheel, 11), Vec::<u32>::new());
        assert_eq!(advance(&mut wheel, 12), vec![2]);
    }

    #[test]
    fn a_long_jump_visits_every_slot_once() {
        let mut wheel = TimerWheel::new(4);
        for i in 1..=7 {
            wheel.insert(i, i as u32);
        }
        assert_eq!(
            advance(&mut wheel, 1_000_000),
            (1..=7).collect::<Vec<u32>>()
        );
        assert_eq!(wheel.now(), 1_000_000);
        wheel.insert(1_000_002, 9);
        assert_eq!(advance(&mut wheel, 1_000_002), vec![9]);
    }
}
