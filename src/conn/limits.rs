//! Limits that keep one client (or one address) from starving the others: admission at the
//! upgrade (global and per-IP connection caps, per-IP handshake rate) and a per-connection token
//! bucket on messages and bytes.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::config::Config;

/// A token bucket: `rate` tokens per second, holding at most `burst`.
#[derive(Clone, Copy, Debug)]
pub struct Bucket {
    tokens: f32,
    /// Milliseconds (on the owner's clock) of the last refill.
    at_ms: u32,
}

impl Bucket {
    pub fn full(burst: f32, now_ms: u32) -> Self {
        Bucket {
            tokens: burst,
            at_ms: now_ms,
        }
    }

    /// Takes `cost` tokens if there are enough.
    pub fn take(&mut self, cost: f32, rate: f32, burst: f32, now_ms: u32) -> bool {
        refill(
            &mut self.tokens,
            seconds_since(self.at_ms, now_ms),
            (rate, burst),
        );
        self.at_ms = now_ms;
        if self.tokens >= cost {
            self.tokens -= cost;
            true
        } else {
            false
        }
    }
}

/// Seconds between two readings of a millisecond clock (which may wrap).
fn seconds_since(then_ms: u32, now_ms: u32) -> f32 {
    now_ms.wrapping_sub(then_ms) as f32 / 1000.0
}

/// Adds what `elapsed` seconds at `rate` give, up to `burst`.
fn refill(tokens: &mut f32, elapsed: f32, (rate, burst): (f32, f32)) {
    *tokens = (*tokens + elapsed * rate).min(burst);
}

/// What an inbound frame or message is charged against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Charge {
    /// Any frame at all, control frames and fragments included: what a flood of tiny frames
    /// spends.
    Frame,
    /// A complete data message's bytes.
    Bytes(usize),
    /// A message (chat or echo) other than a room operation.
    Message,
    /// `join_room` / `leave_room`: a budget of their own, so a reconnecting client can rejoin all
    /// its rooms at once.
    RoomOp,
}

/// Per-connection rate limits, in 28 bytes: six token buckets sharing one refill time. Over a
/// limit, a frame or message is refused and costs a strike; strikes refill at one per second, and
/// a client out of strikes is closed with 1008.
pub struct RateLimiter {
    frames: f32,
    messages: f32,
    bytes: f32,
    room_ops: f32,
    /// Bytes of history that may be replayed to the connection (`join_room` with `since`).
    replay: f32,
    strikes: f32,
    /// Milliseconds (on the shard's clock) of the last refill.
    at_ms: u32,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Refused: answer with an error where the protocol has one.
    Refuse,
    /// Refused, and the client has flooded long enough: close it.
    Close,
}

/// The rates and bursts of [`RateLimiter`], resolved from the configuration once.
pub struct RateLimits {
    frames: (f32, f32),
    messages: (f32, f32),
    bytes: (f32, f32),
    room_ops: (f32, f32),
    replay: (f32, f32),
    strikes: f32,
}

impl RateLimits {
    pub fn new(config: &Config) -> Self {
        RateLimits {
            frames: (
                config.rate_limit_frames,
                config.rate_limit_frame_burst as f32,
            ),
            messages: (config.rate_limit_messages, config.rate_limit_burst as f32),
            bytes: (
                config.rate_limit_bytes as f32,
                config.rate_limit_burst_bytes() as f32,
            ),
            // Leaving every room and joining as many again at once always passes.
            room_ops: (
                config.rate_limit_messages,
                (2 * config.max_rooms_per_connection).max(config.rate_limit_burst as usize) as f32,
            ),
            // A replay may fill the connection's outbound queue once, then goes at the byte rate
            // the client may send at: rejoining with `since` is no amplifier.
            replay: (
                config.rate_limit_bytes as f32,
                config.max_queued_bytes as f32,
            ),
            strikes: config.rate_limit_strikes as f32,
        }
    }
}

impl RateLimiter {
    pub fn new(limits: &RateLimits, now_ms: u32) -> Self {
        RateLimiter {
            frames: limits.frames.1,
            messages: limits.messages.1,
            bytes: limits.bytes.1,
            room_ops: limits.room_ops.1,
            replay: limits.replay.1,
            strikes: limits.strikes,
            at_ms: now_ms,
        }
    }

    fn refill(&mut self, limits: &RateLimits, now_ms: u32) {
        // The clock is read once per turn: only the turn's first charge has anything to refill.
        // A reading older than the last one (it wraps, so "older" is a difference past half its
        // range) refills nothing: read as a jump of 49 days it would refill every bucket.
        let ahead = now_ms.wrapping_sub(self.at_ms);
        if ahead != 0 && ahead < u32::MAX / 2 {
            let elapsed = seconds_since(self.at_ms, now_ms);
            self.at_ms = now_ms;
            refill(&mut self.frames, elapsed, limits.frames);
            refill(&mut self.messages, elapsed, limits.messages);
            refill(&mut self.bytes, elapsed, limits.bytes);
            refill(&mut self.room_ops, elapsed, limits.room_ops);
            refill(&mut self.replay, elapsed, limits.replay);
            refill(&mut self.strikes, elapsed, (1.0, limits.strikes));
        }
    }

    /// Takes `bytes` of replayed history from the replay budget, if there are enough — or if the
    /// budget is full (a replay bigger than the whole budget is given once, and repaid before the
    /// next). A replay past it is not given (the join answers `recovered: false`) and costs no
    /// strike: asking for what one missed is no flood.
    pub fn take_replay(&mut self, limits: &RateLimits, bytes: usize, now_ms: u32) -> bool {
        self.refill(limits, now_ms);
        let cost = bytes as f32;
        if self.replay >= cost || self.replay >= limits.replay.1 {
            self.replay -= cost;
            true
        } else {
            false
        }
    }

    pub fn check(&mut self, limits: &RateLimits, charge: Charge, now_ms: u32) -> Verdict {
        self.refill(limits, now_ms);
        let (bucket, cost) = match charge {
            Charge::Frame => (&mut self.frames, 1.0),
            Charge::Bytes(len) => (&mut self.bytes, len as f32),
            Charge::Message => (&mut self.messages, 1.0),
            Charge::RoomOp => (&mut self.room_ops, 1.0),
        };
        if *bucket >= cost {
            *bucket -= cost;
            return Verdict::Allow;
        }
        if self.strikes >= 1.0 {
            self.strikes -= 1.0;
            Verdict::Refuse
        } else {
            Verdict::Close
        }
    }
}

/// Why a connection was refused before authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Every file descriptor is taken (a socket at accept), or `max_connections` WebSockets are
    /// open (an upgrade): 503.
    ServerFull,
    /// `max_connections_per_ip` connections from this address (or IPv6 /64): 429.
    TooManyConnections,
    /// `max_handshakes_per_ip` per second exceeded: 429.
    TooManyHandshakes,
}

impl Refusal {
    /// The HTTP status and reason phrase it is answered with.
    pub fn status(self) -> (u16, &'static str) {
        match self {
            Refusal::ServerFull => (503, "Service Unavailable"),
            Refusal::TooManyConnections | Refusal::TooManyHandshakes => (429, "Too Many Requests"),
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Refusal::ServerFull => "server full: too many connections",
            Refusal::TooManyConnections => "too many connections from this address",
            Refusal::TooManyHandshakes => "too many handshakes from this address: slow down",
        }
    }
}

/// The address per-IP limits count against: the IPv4 address, or the IPv6 /64 (one subscriber
/// usually holds a whole /64 and can rotate through it).
pub fn ip_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
}

struct PerIp {
    /// Open sockets from this address: plain HTTP and WebSocket alike.
    sockets: u32,
    handshakes: Bucket,
}

const STRIPES: usize = 64;
/// Refused sockets lingering at once: they are outside the socket count, so they live on the
/// descriptors held in reserve (64), and must not be able to take them all.
pub const MAX_LINGERING: usize = 16;
/// A stripe this big is swept of idle addresses.
const SWEEP_AT: usize = 4096;

/// Admission, shared by all shards, touched per connection (never per message). Two stages:
/// every accepted socket is admitted (per-address cap, and the process's file descriptors), and
/// a WebSocket upgrade is admitted again (per-address handshake rate, `max_connections`).
pub struct Admission {
    max_sockets: usize,
    max_websockets: usize,
    max_per_ip: u32,
    handshake_rate: f32,
    sockets: AtomicUsize,
    websockets: AtomicUsize,
    /// Refused sockets kept open for a moment so the client reads its answer.
    lingering: AtomicUsize,
    stripes: Box<[Mutex<HashMap<IpAddr, PerIp>>]>,
    epoch: Instant,
}

impl Admission {
    /// Admission for up to `max_sockets` open sockets, of which at most `max_connections`
    /// (from the configuration) WebSockets.
    pub fn new(config: &Config, max_sockets: usize) -> Self {
        Admission {
            max_sockets,
            max_websockets: config.max_connections,
            max_per_ip: config.max_connections_per_ip,
            handshake_rate: config.max_handshakes_per_ip,
            sockets: AtomicUsize::new(0),
            websockets: AtomicUsize::new(0),
            lingering: AtomicUsize::new(0),
            stripes: (0..STRIPES).map(|_| Mutex::default()).collect(),
            epoch: Instant::now(),
        }
    }

    fn stripe(&self, ip: &IpAddr) -> &Mutex<HashMap<IpAddr, PerIp>> {
        let mut h = DefaultHasher::new();
        ip.hash(&mut h);
        &self.stripes[h.finish() as usize % STRIPES]
    }

    fn now_ms(&self) -> u32 {
        self.epoch.elapsed().as_millis() as u32
    }

    /// Runs `f` on the entry of `ip`'s address, created (with a full handshake budget) if new.
    fn with_entry<R>(&self, ip: IpAddr, f: impl FnOnce(&mut PerIp, u32) -> R) -> R {
        let ip = ip_key(ip);
        let now_ms = self.now_ms();
        let burst = self.handshake_rate.max(1.0);
        let mut stripe = self.stripe(&ip).lock().unwrap_or_else(|e| e.into_inner());
        if stripe.len() > SWEEP_AT {
            // Addresses with no socket whose handshake budget is back to full are forgotten.
            stripe.retain(|_, e| {
                let mut probe = e.handshakes;
                e.sockets > 0 || !probe.take(burst, self.handshake_rate, burst, now_ms)
            });
        }
        let entry = stripe.entry(ip).or_insert_with(|| PerIp {
            sockets: 0,
            handshakes: Bucket::full(burst, now_ms),
        });
        f(entry, now_ms)
    }

    /// Admits a freshly accepted socket from `ip` (`None`: from a trusted proxy, whose client is
    /// not known yet and is counted by [`claim_ip`] once it is), or says why not. The caller must
    /// [`release_socket`] (or, for a proxy's socket never claimed, [`release_proxied_socket`])
    /// an admitted socket when it closes.
    ///
    /// [`claim_ip`]: Admission::claim_ip
    /// [`release_socket`]: Admission::release_socket
    /// [`release_proxied_socket`]: Admission::release_proxied_socket
    pub fn admit_socket(&self, ip: Option<IpAddr>) -> Result<(), Refusal> {
        self.admit_socket_within(ip, self.max_sockets)
    }

    /// Admits a socket in the place of one being closed to make room for it (an idle HTTP
    /// connection just evicted), which may not have given its place back yet.
    pub fn admit_socket_replacing(&self, ip: Option<IpAddr>) -> Result<(), Refusal> {
        self.admit_socket_within(ip, usize::MAX)
    }

    fn admit_socket_within(&self, ip: Option<IpAddr>, max_sockets: usize) -> Result<(), Refusal> {
        let Some(ip) = ip else {
            return self.take_socket(max_sockets);
        };
        self.with_entry(ip, |entry, _| {
            if entry.sockets >= self.max_per_ip {
                return Err(Refusal::TooManyConnections);
            }
            self.take_socket(max_sockets)?;
            entry.sockets += 1;
            Ok(())
        })
    }

    fn take_socket(&self, max_sockets: usize) -> Result<(), Refusal> {
        if self.sockets.fetch_add(1, Ordering::AcqRel) >= max_sockets {
            self.sockets.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::ServerFull);
        }
        Ok(())
    }

    /// Counts a proxy's admitted socket against its client's address, once known (the PROXY
    /// header, or a forwarded upgrade): `max_connections_per_ip` applies to the client. From
    /// then on the socket is released with [`release_socket`](Admission::release_socket) of
    /// that address.
    pub fn claim_ip(&self, ip: IpAddr) -> Result<(), Refusal> {
        self.with_entry(ip, |entry, _| {
            if entry.sockets >= self.max_per_ip {
                return Err(Refusal::TooManyConnections);
            }
            entry.sockets += 1;
            Ok(())
        })
    }

    /// Gives back the place of a proxy's socket that was never claimed for a client.
    pub fn release_proxied_socket(&self) {
        self.sockets.fetch_sub(1, Ordering::AcqRel);
    }

    /// Gives back an admitted socket's place.
    pub fn release_socket(&self, ip: IpAddr) {
        self.sockets.fetch_sub(1, Ordering::AcqRel);
        self.unclaim_ip(ip);
    }

    /// Takes back a [`claim_ip`](Admission::claim_ip) of a socket that stays the proxy's.
    pub fn unclaim_ip(&self, ip: IpAddr) {
        let ip = ip_key(ip);
        let mut stripe = self.stripe(&ip).lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = stripe.get_mut(&ip) {
            entry.sockets = entry.sockets.saturating_sub(1);
        }
    }

    /// Admits an admitted socket's WebSocket upgrade. The caller must [`release_upgrade`] an
    /// admitted upgrade when the WebSocket closes (or the upgrade does not happen).
    ///
    /// [`release_upgrade`]: Admission::release_upgrade
    pub fn admit_upgrade(&self, ip: IpAddr) -> Result<(), Refusal> {
        self.with_entry(ip, |entry, now_ms| {
            let burst = self.handshake_rate.max(1.0);
            if !entry
                .handshakes
                .take(1.0, self.handshake_rate, burst, now_ms)
            {
                return Err(Refusal::TooManyHandshakes);
            }
            if self.websockets.fetch_add(1, Ordering::AcqRel) >= self.max_websockets {
                self.websockets.fetch_sub(1, Ordering::AcqRel);
                return Err(Refusal::ServerFull);
            }
            Ok(())
        })
    }

    pub fn release_upgrade(&self) {
        self.websockets.fetch_sub(1, Ordering::AcqRel);
    }

    /// Takes one of the few places for a refused socket to linger (see [`MAX_LINGERING`]); the
    /// caller gives it back with [`end_linger`]. False when they are all taken.
    ///
    /// [`end_linger`]: Admission::end_linger
    pub fn start_linger(&self) -> bool {
        if self.lingering.fetch_add(1, Ordering::AcqRel) < MAX_LINGERING {
            return true;
        }
        self.lingering.fetch_sub(1, Ordering::AcqRel);
        false
    }

    pub fn end_linger(&self) {
        self.lingering.fetch_sub(1, Ordering::AcqRel);
    }

    /// Open sockets (plain HTTP and WebSocket).
    pub fn sockets(&self) -> usize {
        self.sockets.load(Ordering::Acquire)
    }
}

/// Who a new room is charged to: an authenticated user (across its connections and addresses),
/// or for anonymous connections the address they come from. Authenticated users are not charged
/// per address too: many users behind one NAT would share one budget.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Creator {
    User(Arc<str>),
    Address(IpAddr),
}

impl Creator {
    /// The user, or (`None`: anonymous) the address `ip`.
    pub fn of(user: Option<&Arc<str>>, ip: IpAddr) -> Self {
        match user {
            Some(user) => Creator::User(user.clone()),
            None => Creator::Address(ip_key(ip)),
        }
    }
}

/// How many new rooms each creator may make this node hold: a token bucket each
/// (`room_creation_burst`, refilled at `room_creation_rate` per second). A room is new when the
/// node holds nothing of it; joining a room the node holds costs nothing. One client cycling
/// connections through fresh room names thereby cannot fill `max_rooms` (or Redis) for everyone.
pub struct RoomCreation {
    rate: f32,
    burst: f32,
    stripes: Box<[Mutex<HashMap<Creator, Bucket>>]>,
    epoch: Instant,
}

impl RoomCreation {
    pub fn new(config: &Config) -> Self {
        RoomCreation {
            rate: config.room_creation_rate,
            burst: config.room_creation_burst as f32,
            stripes: (0..STRIPES).map(|_| Mutex::default()).collect(),
            epoch: Instant::now(),
        }
    }

    /// Takes one new room from `creator`'s budget; false when it is spent.
    pub fn take(&self, creator: &Creator) -> bool {
        let now_ms = self.epoch.elapsed().as_millis() as u32;
        self.take_one(creator, now_ms)
    }

    fn stripe(&self, creator: &Creator) -> MutexGuard<'_, HashMap<Creator, Bucket>> {
        let mut h = DefaultHasher::new();
        creator.hash(&mut h);
        self.stripes[h.finish() as usize % STRIPES]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn take_one(&self, creator: &Creator, now_ms: u32) -> bool {
        let (rate, burst) = (self.rate, self.burst);
        let mut stripe = self.stripe(creator);
        if stripe.len() > SWEEP_AT {
            // Budgets back to full are forgotten: a new entry starts full anyway.
            stripe.retain(|_, bucket| {
                let mut probe = *bucket;
                !probe.take(burst, rate, burst, now_ms)
            });
        }
        stripe
            .entry(creator.clone())
            .or_insert_with(|| Bucket::full(burst, now_ms))
            .take(1.0, rate, burst, now_ms)
    }

    /// Gives back a room taken for a join that was refused for another reason.
    pub fn give_back(&self, creator: &Creator) {
        if let Some(bucket) = self.stripe(creator).get_mut(creator) {
            bucket.tokens = (bucket.tokens + 1.0).min(self.burst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refills_at_its_rate_up_to_its_burst() {
        let mut b = Bucket::full(2.0, 0);
        assert!(b.take(1.0, 10.0, 2.0, 0));
        assert!(b.take(1.0, 10.0, 2.0, 0));
        assert!(!b.take(1.0, 10.0, 2.0, 50)); // 0.5 token after 50 ms
        assert!(b.take(1.0, 10.0, 2.0, 100));
        assert!(b.take(2.0, 10.0, 2.0, 10_000)); // capped at the burst
        assert!(!b.take(0.5, 10.0, 2.0, 10_000));
    }

    #[test]
    fn replays_are_budgeted_and_a_clock_reading_from_the_past_refills_nothing() {
        let config = Config {
            max_queued_bytes: 1000,
            rate_limit_bytes: 100,
            rate_limit_frame_burst: 1,
            rate_limit_strikes: 1,
            ..Config::default()
        };
        let limits = RateLimits::new(&config);
        let mut limiter = RateLimiter::new(&limits, 10_000);
        // A replay bigger than the whole budget is given when the budget is full, then repaid.
        assert!(limiter.take_replay(&limits, 5000, 10_000));
        assert!(!limiter.take_replay(&limits, 1, 10_000));
        assert!(
            !limiter.take_replay(&limits, 1, 50_000),
            "40 s repaid 4000 of 5000"
        );
        assert!(limiter.take_replay(&limits, 900, 70_000));
        // An older reading refills nothing (it is not a 49-day jump): the frame budget and the
        // strike spent stay spent.
        assert_eq!(
            limiter.check(&limits, Charge::Frame, 70_000),
            Verdict::Allow
        );
        assert_eq!(
            limiter.check(&limits, Charge::Frame, 69_000),
            Verdict::Refuse
        );
        assert_eq!(
            limiter.check(&limits, Charge::Frame, 69_000),
            Verdict::Close
        );
        assert!(!limiter.take_replay(&limits, 1000, 69_500));
    }

    #[test]
    fn every_frame_is_charged_and_room_operations_have_their_own_budget() {
        let config = Config {
            rate_limit_frames: 10.0,
            rate_limit_frame_burst: 3,
            rate_limit_messages: 1.0,
            rate_limit_burst: 1,
            rate_limit_strikes: 2,
            max_rooms_per_connection: 5,
            ..Config::default()
        };
        let limits = RateLimits::new(&config);
        let mut limiter = RateLimiter::new(&limits, 0);
        // Ten room operations (leave five, join five) pass at once beside the one message.
        assert_eq!(limiter.check(&limits, Charge::Message, 0), Verdict::Allow);
        for _ in 0..10 {
            assert_eq!(limiter.check(&limits, Charge::RoomOp, 0), Verdict::Allow);
        }
        // Frames: the burst, then strikes, then the close.
        for _ in 0..3 {
            assert_eq!(limiter.check(&limits, Charge::Frame, 0), Verdict::Allow);
        }
        assert_eq!(limiter.check(&limits, Charge::Frame, 0), Verdict::Refuse);
        assert_eq!(limiter.check(&limits, Charge::Frame, 0), Verdict::Refuse);
        assert_eq!(limiter.check(&limits, Charge::Frame, 0), Verdict::Close);
        // 100 ms later one frame (10/s) and a tenth of a strike are back.
        assert_eq!(limiter.check(&limits, Charge::Frame, 100), Verdict::Allow);
    }

    #[test]
    fn admission_caps_sockets_per_address_and_overall_and_websockets_apart() {
        let config = Config {
            max_connections: 2,
            max_connections_per_ip: 2,
            max_handshakes_per_ip: 1000.0,
            ..Config::default()
        };
        let admission = Admission::new(&config, 3);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        admission.admit_socket(Some(a)).unwrap();
        admission.admit_socket(Some(a)).unwrap();
        assert_eq!(
            admission.admit_socket(Some(a)),
            Err(Refusal::TooManyConnections)
        );
        admission.admit_socket(Some(b)).unwrap();
        assert_eq!(admission.admit_socket(Some(b)), Err(Refusal::ServerFull));
        // In the place of an evicted socket, even at the limit (the per-address cap holds).
        admission.admit_socket_replacing(Some(b)).unwrap();
        assert_eq!(
            admission.admit_socket_replacing(Some(a)),
            Err(Refusal::TooManyConnections)
        );
        admission.release_socket(a);
        admission.release_socket(b);
        assert!(admission.admit_socket(Some(a)).is_ok());
        // Upgrades: the WebSocket cap is separate.
        admission.admit_upgrade(a).unwrap();
        admission.admit_upgrade(b).unwrap();
        assert_eq!(admission.admit_upgrade(b), Err(Refusal::ServerFull));
        admission.release_upgrade();
        assert!(admission.admit_upgrade(b).is_ok());
    }

    #[test]
    fn ipv6_addresses_count_per_slash_64() {
        let one: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other_64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(ip_key(one), ip_key(same_64));
        assert_ne!(ip_key(one), ip_key(other_64));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(ip_key(mapped), "10.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn handshake_rate_is_per_address() {
        let config = Config {
            max_connections: 10,
            max_handshakes_per_ip: 2.0,
            ..Config::default()
        };
        let admission = Admission::new(&config, 100);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        admission.admit_upgrade(a).unwrap();
        admission.admit_upgrade(a).unwrap();
        assert_eq!(admission.admit_upgrade(a), Err(Refusal::TooManyHandshakes));
        assert!(admission.admit_upgrade("10.0.0.9".parse().unwrap()).is_ok());
    }
}
