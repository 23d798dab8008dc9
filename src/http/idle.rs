//! Plain HTTP connections (before any upgrade), so that idle ones can be closed first when file
//! descriptors run short: a client holding keep-alive connections open (probing `/healthz` every
//! few seconds, say) must not lock out WebSocket clients and health checks.
//!
//! Node-wide and behind a lock: it is touched when an HTTP connection opens, closes, or starts
//! and ends a request, never per WebSocket message.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use slab::Slab;
use tokio::sync::Notify;

struct Entry {
    /// When the connection last became idle (opened, or finished a request); `None` while a
    /// request is being served or the connection is being upgraded.
    idle_since: Option<Instant>,
    evict: Arc<Notify>,
}

#[derive(Default)]
struct Registry {
    entries: Slab<Entry>,
    /// Idle connections, oldest first.
    idle: BTreeSet<(Instant, usize)>,
}

#[derive(Default)]
pub struct HttpConnections {
    registry: Mutex<Registry>,
}

/// One connection's place in [`HttpConnections`]; it leaves when dropped.
pub struct Registered<'a> {
    connections: &'a HttpConnections,
    key: usize,
    /// Notified when the connection is to be closed to make room.
    pub evict: Arc<Notify>,
}

impl HttpConnections {
    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a new connection, idle until its first request.
    pub fn register(&self) -> Registered<'_> {
        let now = Instant::now();
        let evict = Arc::new(Notify::new());
        let mut registry = self.registry();
        let key = registry.entries.insert(Entry {
            idle_since: Some(now),
            evict: evict.clone(),
        });
        registry.idle.insert((now, key));
        Registered {
            connections: self,
            key,
            evict,
        }
    }

    /// Closes the connection that has been idle longest; returns whether there was one. No
    /// minimum age: one would let a client holding only fresh connections keep every place
    /// (the newcomer that needs the place is the youngest of all).
    pub fn evict_oldest_idle(&self) -> bool {
        let mut registry = self.registry();
        let Some(&(since, key)) = registry.idle.first() else {
            return false;
        };
        registry.idle.remove(&(since, key));
        let entry = &mut registry.entries[key];
        entry.idle_since = None;
        // A stored permit: the connection's task sees it even if it is not waiting right now.
        entry.evict.notify_one();
        true
    }

    /// Connections registered (idle or serving a request).
    pub fn len(&self) -> usize {
        self.registry().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Registered<'_> {
    /// A request is being served: not idle.
    pub fn busy(&self) {
        let mut registry = self.connections.registry();
        if let Some(since) = registry.entries[self.key].idle_since.take() {
            registry.idle.remove(&(since, self.key));
        }
    }

    /// The request was answered: idle again, from now.
    pub fn idle(&self) {
        let now = Instant::now();
        let mut registry = self.connections.registry();
        let registry = &mut *registry;
        let entry = &mut registry.entries[self.key];
        if let Some(since) = entry.idle_since.replace(now) {
            registry.idle.remove(&(since, self.key));
        }
        registry.idle.insert((now, self.key));
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let mut registry = self.connections.registry();
        let entry = registry.entries.remove(self.key);
        if let Some(since) = entry.idle_since {
            registry.idle.remove(&(since, self.key));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_idle_goes_first_and_busy_ones_never() {
        let connections = HttpConnections::default();
        let oldest = connections.register();
        let busy = connections.register();
        busy.busy();
        let newer = connections.register();
        newer.busy();
        newer.idle(); // just finished a request: idle from now, after `oldest`
        assert!(connections.evict_oldest_idle());
        assert!(oldest.evict.notified().now_or_never_is_ready());
        assert!(!busy.evict.notified().now_or_never_is_ready());
        assert!(!newer.evict.notified().now_or_never_is_ready());
        assert!(connections.evict_oldest_idle(), "then the next idle one");
        assert!(newer.evict.notified().now_or_never_is_ready());
        // `busy` is serving a request: never evicted.
        assert!(!connections.evict_oldest_idle());
        drop((oldest, busy, newer));
        assert!(connections.is_empty());
    }

    trait NowOrNever {
        fn now_or_never_is_ready(self) -> bool;
    }

    impl<F: Future> NowOrNever for F {
        fn now_or_never_is_ready(self) -> bool {
            let mut fut = std::pin::pin!(self);
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            fut.as_mut().poll(&mut cx).is_ready()
        }
    }
}
