//! The io_uring engine: a shard's ring, its provided receive buffers, and a WebSocket's socket on
//! it ([`UringSocket`]).
//!
//! Receives are multishot: armed once, they land in buffers the kernel picks from the shard's
//! provided-buffer ring, each completion naming its buffer. A connection's turn copies what its
//! buffers hold into the shard's read buffer (where its input decodes it) and gives them back.
//! Buffers a connection leaves unread at the end of a turn (it is pushed back, out of budget, or
//! closing) are copied aside and its receive is cancelled, so the ring never waits on one
//! connection; it re-arms when it reads again. A receive that finds the ring empty ends with
//! ENOBUFS: its bytes stay in the socket, in order, and the connection is given a turn (and
//! re-arms) once buffers are back.
//!
//! Sends are copied into the connection's send buffer, so everything a turn writes to one
//! connection leaves in one `send`, submitted at the end of the turn. One send per connection is
//! in flight; what is written meanwhile waits for it, up to `SEND_QUEUE_LIMIT`, and past that the
//! connection is told to wait (the write side's backpressure, as a full socket is with epoll).
//!
//! A turn's submissions go in one `io_uring_enter`; the loop waits for completions through the
//! ring's descriptor, registered with tokio like the epoll engine's.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use io_uring::{IoUring, Probe, cqueue, opcode, squeue, types};
use slab::Slab;

use crate::transport::Socket;

/// Submission entries; a full queue is submitted early.
const SQ_ENTRIES: u32 = 2048;
/// Completion entries: multishot receives post many per submission, and a broadcast one per
/// recipient. What overflows waits in the kernel, in order, until an entry that asks for
/// completions (`complete` makes one whenever the ring says so).
const CQ_ENTRIES: u32 = 32768;
/// The size of the provided receive buffers (`io_uring_buffers` of them per shard, touched at
/// start: a fixed cost of the shard, as uWebSockets' receive buffer is, not one that grows with
/// its connections).
const BUFFER_SIZE: usize = 4096;
const BUFFER_GROUP: u16 = 0;
/// Bytes waiting in user space for a connection's send in flight; past them a write waits.
const SEND_QUEUE_LIMIT: usize = 64 * 1024;
/// Entries into the ring a turn makes to run waiting completions, at most.
const ENTERS_PER_TURN: usize = 16;
/// Emptied send buffers kept for the next sends (up to `SPARE_CAPACITY` each).
const SPARE_BUFFERS: usize = 64;
const SPARE_CAPACITY: usize = 64 * 1024;
/// How long the bytes of a connection dropped with sends in flight may take to leave.
const LINGER: Duration = Duration::from_secs(10);
const NO_BUFFER: u16 = u16::MAX;
const NO_SLOT: u32 = u32::MAX;

/// What a submission was, in the top byte of its user data.
const OP_RECV: u8 = 1;
const OP_SEND: u8 = 2;
const OP_CANCEL: u8 = 3;

fn user_data(op: u8, serial: u32, index: u32) -> u64 {
    (u64::from(op) << 56) | (u64::from(serial & 0xFF_FFFF) << 32) | u64::from(index)
}

fn split_user_data(data: u64) -> (u8, u32, u32) {
    (
        (data >> 56) as u8,
        (data >> 32) as u32 & 0xFF_FFFF,
        data as u32,
    )
}

/// Builds a ring as the engine uses it. Single issuer: only the shard's thread submits, so the
/// kernel skips the locking. Cooperative task running: completions wait for the thread's next
/// entry into the kernel instead of interrupting it, and the flag in the submission ring says
/// when some wait. (Deferred task running, which batches them further, wakes no poller of the
/// ring nor its eventfd for receives on this kernel: the loop, which sleeps in tokio's epoll,
/// stalled until its next timer.)
fn build_ring() -> io::Result<IoUring> {
    IoUring::builder()
        .setup_cqsize(CQ_ENTRIES)
        .setup_single_issuer()
        .setup_coop_taskrun()
        .setup_taskrun_flag()
        .build(SQ_ENTRIES)
}

/// Whether this kernel and sandbox run the engine: a ring with its flags (single issuer needs
/// Linux 6.0, as multishot receive does), a provided-buffer ring of `buffers`, and the
/// operations it submits.
/// Container runtimes' default seccomp profiles refuse `io_uring_setup`: the error says so.
pub fn probe(buffers: u16) -> io::Result<()> {
    let ring = build_ring()?;
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for (code, name) in [
        (opcode::RecvMulti::CODE, "recv"),
        (opcode::Send::CODE, "send"),
        (opcode::AsyncCancel::CODE, "async cancel"),
    ] {
        if !probe.is_supported(code) {
            return Err(io::Error::other(format!(
                "io_uring has no {name} operation"
            )));
        }
    }
    BufRing::new(&ring, buffers).map(drop)
}

/// The shard's provided receive buffers: a ring of entries shared with the kernel (which picks
/// the next buffer for each receive) and the buffers' memory. Each buffer handed to a connection
/// is linked into that connection's list until it is read and given back.
struct BufRing {
    count: u16,
    entries: *mut types::BufRingEntry,
    entries_len: usize,
    memory: *mut u8,
    tail: u16,
    /// Buffers in the ring (the kernel's to fill).
    provided: u16,
    /// Per buffer: the bytes a receive put in it, and the next buffer of the same connection.
    len: Box<[u32]>,
    next: Box<[u16]>,
}

impl BufRing {
    /// `count` buffers (a power of two) registered with `ring`.
    fn new(ring: &IoUring, count: u16) -> io::Result<Self> {
        let entries_len = usize::from(count) * size_of::<types::BufRingEntry>();
        // SAFETY: a fresh anonymous mapping (page aligned, as the kernel requires), checked.
        let entries = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                entries_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if entries == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let memory = Box::into_raw(vec![0u8; usize::from(count) * BUFFER_SIZE].into_boxed_slice());
        let mut bufs = BufRing {
            count,
            entries: entries.cast(),
            entries_len,
            memory: memory.cast(),
            tail: 0,
            provided: 0,
            len: vec![0; usize::from(count)].into_boxed_slice(),
            next: vec![NO_BUFFER; usize::from(count)].into_boxed_slice(),
        };
        for bid in 0..count {
            bufs.give(bid);
        }
        bufs.publish();
        // SAFETY: the entries stay mapped until `drop`, which unregisters them first.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                entries as u64,
                count,
                BUFFER_GROUP,
                0,
            )?;
        }
        Ok(bufs)
    }

    /// Maps the buffers' pages now (a zeroed allocation's pages are only mapped when written):
    /// the shard's fixed cost is paid at start, not as its connections come.
    fn touch(&mut self) {
        for page in (0..usize::from(self.count) * BUFFER_SIZE).step_by(4096) {
            // SAFETY: within the buffers' memory, none of it the kernel's yet (nothing is armed).
            // Volatile: a plain write of zero may be elided.
            unsafe { std::ptr::write_volatile(self.memory.add(page), 0) };
        }
    }

    /// A buffer the kernel picked but filled with nothing (an end, an error, or a receive of a
    /// connection gone): straight back to the ring.
    fn give_unused(&mut self, bid: u16) {
        self.taken(bid, 0);
        self.give(bid);
    }

    /// Puts buffer `bid` back in the ring (seen by the kernel at the next `publish`).
    fn give(&mut self, bid: u16) {
        let slot = usize::from(self.tail & (self.count - 1));
        // SAFETY: `slot` < `count` entries, mapped; the kernel reads entries only up to the
        // published tail, and this one is past it.
        let entry = unsafe { &mut *self.entries.add(slot) };
        entry.set_addr(self.memory as u64 + u64::from(bid) * BUFFER_SIZE as u64);
        entry.set_len(BUFFER_SIZE as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        self.provided += 1;
        self.next[usize::from(bid)] = NO_BUFFER;
    }

    fn publish(&self) {
        // SAFETY: the ring's tail is the first entry's reserved field, as the kernel reads it.
        let tail = unsafe { &*types::BufRingEntry::tail(self.entries).cast::<AtomicU16>() };
        tail.store(self.tail, Ordering::Release);
    }

    /// A buffer the kernel filled with `len` bytes.
    fn taken(&mut self, bid: u16, len: u32) {
        self.provided -= 1;
        self.len[usize::from(bid)] = len;
    }

    fn bytes(&self, bid: u16, from: usize, to: usize) -> &[u8] {
        debug_assert!(to <= BUFFER_SIZE);
        // SAFETY: within buffer `bid`, which the kernel filled and no longer writes (it is out
        // of the ring until given back).
        unsafe {
            std::slice::from_raw_parts(
                self.memory.add(usize::from(bid) * BUFFER_SIZE + from),
                to - from,
            )
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: both were allocated in `new` with these sizes; the ring no longer uses them
        // (unregistered, or the ring is gone).
        unsafe {
            libc::munmap(self.entries.cast(), self.entries_len);
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.memory,
                usize::from(self.count) * BUFFER_SIZE,
            )));
        }
    }
}

/// A connection's bytes in user space, while it has any: its send in flight, what waits for it,
/// and what was set aside unread.
struct Slot {
    fd: RawFd,
    /// The descriptor, once its socket is gone with bytes still to send: closed when they are
    /// sent (or fail, or outstay `LINGER`), as the kernel sends what a closed socket held.
    orphan: Option<OwnedFd>,
    key: u32,
    serial: u32,
    in_flight: Vec<u8>,
    /// Of `in_flight`, sent so far (a short send is resubmitted from here).
    sent: usize,
    queued: Vec<u8>,
    spill: Vec<u8>,
    /// Of `spill`, read so far.
    spill_read: usize,
    sending: bool,
    /// Listed for submission at the end of the turn.
    listed: bool,
    /// The errno a send failed with; every later write fails with it.
    error: i32,
}

impl Slot {
    fn is_idle(&self) -> bool {
        !self.sending && self.queued.is_empty() && self.spill.is_empty() && self.error == 0
    }
}

#[derive(Default)]
struct Slots {
    slab: Slab<Slot>,
    spare: Vec<Vec<u8>>,
    to_submit: Vec<u32>,
}

impl Slots {
    fn recycle(&mut self, mut buf: Vec<u8>) {
        if buf.capacity() > 0
            && buf.capacity() <= SPARE_CAPACITY
            && self.spare.len() < SPARE_BUFFERS
        {
            buf.clear();
            self.spare.push(buf);
        }
    }

    fn remove(&mut self, index: u32) {
        let slot = self.slab.remove(index as usize);
        self.recycle(slot.in_flight);
        self.recycle(slot.queued);
    }
}

/// A shard's ring and what its sockets share.
pub struct Uring {
    ring: RefCell<IoUring>,
    buffers: RefCell<BufRing>,
    slots: RefCell<Slots>,
    /// Connections that received since the last turn ended (unread buffers are set aside).
    received: RefCell<Vec<(u32, u32)>>,
    /// Connections whose receive ended for want of buffers.
    starved: RefCell<Vec<(u32, u32)>>,
    /// Sockets closed this turn: closed after its submissions, so none names a reused number.
    closed: RefCell<Vec<OwnedFd>>,
    /// Slots whose sockets are gone with bytes still to send, by deadline (slot, serial).
    orphans: RefCell<VecDeque<(Instant, u32, u32)>>,
    completions: RefCell<Vec<(u64, i32, u32)>>,
    serial: Cell<u32>,
    /// Receives that found the ring empty, since the last `take_buffer_waits`.
    buffer_waits: Cell<u64>,
}

impl Uring {
    /// A ring with `buffers` receive buffers (a power of two).
    pub fn new(buffers: u16) -> io::Result<Self> {
        let ring = build_ring()?;
        let mut buffers = BufRing::new(&ring, buffers)?;
        buffers.touch();
        Ok(Uring {
            ring: RefCell::new(ring),
            buffers: RefCell::new(buffers),
            slots: RefCell::default(),
            received: RefCell::default(),
            starved: RefCell::default(),
            closed: RefCell::default(),
            orphans: RefCell::default(),
            completions: RefCell::default(),
            serial: Cell::new(0),
            buffer_waits: Cell::new(0),
        })
    }

    /// The descriptor the loop waits on: the ring's, readable when completions are posted.
    pub fn fd(&self) -> RawFd {
        self.ring.borrow().as_raw_fd()
    }

    /// Queues a submission; a full queue is submitted first.
    fn push(&self, entry: &squeue::Entry) {
        let mut ring = self.ring.borrow_mut();
        loop {
            // SAFETY: every buffer an entry names lives until its completion: receive buffers
            // are the ring's, send buffers are the slot's, kept while `sending`.
            if unsafe { ring.submission().push(entry) }.is_ok() {
                return;
            }
            // Re-armed receives must find the buffers given back so far.
            self.buffers.borrow().publish();
            if let Err(e) = ring.submit() {
                tracing::error!(error = %e, "io_uring_enter failed");
            }
        }
    }

    /// Takes the posted completions: each reaches its socket (by `socket`, which finds the open
    /// connection at a key) and `wake`s it. Returns whether there were any.
    pub fn complete<'a>(
        &self,
        socket: impl Fn(usize) -> Option<&'a UringSocket>,
        wake: impl Fn(usize),
    ) -> bool {
        let mut completions = self.completions.take();
        {
            let mut ring = self.ring.borrow_mut();
            // Completions that came since the last turn's submission wait for the thread to
            // enter the kernel, and those that overflowed the queue for an entry that asks for
            // them: entering runs (or moves) them, and the flags say when some are left.
            for _ in 0..ENTERS_PER_TURN {
                completions.extend(
                    ring.completion()
                        .map(|cqe| (cqe.user_data(), cqe.result(), cqe.flags())),
                );
                let sq = ring.submission();
                if !sq.taskrun() && !sq.cq_overflow() {
                    break;
                }
                drop(sq);
                if let Err(e) = ring.submit() {
                    // EBADR: the kernel dropped completions it could not keep (out of memory):
                    // the requests they ended look in flight for good.
                    tracing::error!(error = %e, "io_uring_enter failed");
                    break;
                }
            }
        }
        let any = !completions.is_empty();
        for &(data, result, flags) in &completions {
            let (op, serial, index) = split_user_data(data);
            match op {
                OP_RECV => {
                    let owner = socket(index as usize).filter(|s| s.serial == serial);
                    match owner {
                        Some(owner) => {
                            if owner.on_recv(result, flags) {
                                wake(index as usize);
                            }
                        }
                        // A receive of a connection gone: its buffer goes back.
                        None => {
                            if let Some(bid) = cqueue::buffer_select(flags) {
                                self.buffers.borrow_mut().give_unused(bid);
                            }
                        }
                    }
                }
                OP_SEND => {
                    if let Some((key, serial, freed)) = self.on_sent(index, result)
                        && let Some(owner) = socket(key as usize).filter(|s| s.serial == serial)
                    {
                        if freed {
                            owner.slot.set(NO_SLOT);
                        }
                        wake(key as usize);
                    }
                }
                _ => {}
            }
        }
        completions.clear();
        self.completions.replace(completions);
        any
    }

    /// A send of slot `index` completed with `result`: resubmits the rest of a short one, starts
    /// the next, and returns the owner to wake (and whether its slot was freed), if it has one.
    fn on_sent(&self, index: u32, result: i32) -> Option<(u32, u32, bool)> {
        let mut slots = self.slots.borrow_mut();
        let slot = slots.slab.get_mut(index as usize)?;
        match result {
            n if n > 0 => slot.sent += n as usize,
            0 => slot.error = libc::EPIPE,
            e => slot.error = -e,
        }
        let owner = (slot.orphan.is_none()).then_some((slot.key, slot.serial));
        if slot.error == 0 && slot.sent < slot.in_flight.len() {
            let entry = send_entry(slot, index);
            drop(slots);
            self.push(&entry);
            return None;
        }
        slot.sending = false;
        let done = std::mem::take(&mut slot.in_flight);
        if slot.error != 0 {
            let dropped = std::mem::take(&mut slot.queued);
            slots.recycle(dropped);
        }
        slots.recycle(done);
        let slot = &mut slots.slab[index as usize];
        if !slot.queued.is_empty() {
            let entry = start_send(slot, index);
            drop(slots);
            self.push(&entry);
            return owner.map(|(key, serial)| (key, serial, false));
        }
        let Some((key, serial)) = owner else {
            // An orphan's last byte left: its descriptor closes now.
            slots.remove(index);
            return None;
        };
        let freed = slot.is_idle();
        if freed {
            slots.remove(index);
        }
        Some((key, serial, freed))
    }

    /// The end of a turn: unread buffers set aside, starved receives given their turn back once
    /// buffers are, the turn's sends started, the buffers given back published, and all of it
    /// submitted at once. Returns whether completions wait for the next turn.
    pub fn end_turn<'a>(
        &self,
        now: Instant,
        socket: impl Fn(usize) -> Option<&'a UringSocket>,
        wake: impl Fn(usize),
    ) -> bool {
        self.expire_orphans(now);
        // Walked out of its cell (setting aside pushes cancellations, never to this list), then
        // put back empty to keep its allocation.
        let mut received = self.received.take();
        for &(key, serial) in &received {
            if let Some(owner) = socket(key as usize).filter(|s| s.serial == serial) {
                owner.set_aside();
            }
        }
        received.clear();
        self.received.replace(received);
        // Starved receives get their turn back once half the buffers are in the ring again.
        let buffers = self.buffers.borrow();
        let refilled = buffers.provided >= buffers.count / 2;
        drop(buffers);
        if refilled {
            for (key, serial) in self.starved.take() {
                if socket(key as usize).is_some_and(|s| s.serial == serial) {
                    wake(key as usize);
                }
            }
        }
        // The same for the sends listed this turn (starting one lists nothing).
        let mut to_submit = std::mem::take(&mut self.slots.borrow_mut().to_submit);
        for &index in &to_submit {
            let mut slots = self.slots.borrow_mut();
            let Some(slot) = slots.slab.get_mut(index as usize) else {
                continue;
            };
            slot.listed = false;
            if slot.sending || slot.queued.is_empty() || slot.error != 0 {
                continue;
            }
            let entry = start_send(slot, index);
            drop(slots);
            self.push(&entry);
        }
        to_submit.clear();
        self.slots.borrow_mut().to_submit = to_submit;
        self.buffers.borrow().publish();
        let mut ring = self.ring.borrow_mut();
        let pending = !ring.submission().is_empty() || ring.submission().taskrun();
        if pending && let Err(e) = ring.submit() {
            tracing::error!(error = %e, "io_uring_enter failed");
        }
        // Completions run by entering, or left waiting (or overflowed), are the next turn's.
        let sq = ring.submission();
        let waiting = sq.taskrun() || sq.cq_overflow();
        drop(sq);
        let completed = !ring.completion().is_empty() || waiting;
        drop(ring);
        self.closed.borrow_mut().clear();
        completed
    }

    /// Cancels the sends of orphans that outstayed `LINGER` (their peers stopped reading).
    fn expire_orphans(&self, now: Instant) {
        loop {
            let Some(&(deadline, index, serial)) = self.orphans.borrow().front() else {
                return;
            };
            if deadline > now {
                return;
            }
            self.orphans.borrow_mut().pop_front();
            let mut slots = self.slots.borrow_mut();
            let Some(slot) = slots.slab.get_mut(index as usize) else {
                continue;
            };
            if slot.serial != serial || slot.orphan.is_none() {
                continue;
            }
            // Expired: whatever completes now ends it, and nothing more is sent.
            slot.error = libc::ETIMEDOUT;
            let queued = std::mem::take(&mut slot.queued);
            let sending = slot.sending;
            slots.recycle(queued);
            if sending {
                drop(slots);
                self.cancel(user_data(OP_SEND, 0, index));
            } else {
                slots.remove(index);
            }
        }
    }

    fn cancel(&self, target: u64) {
        let cancel = opcode::AsyncCancel::new(target)
            .build()
            .user_data(user_data(OP_CANCEL, 0, 0));
        self.push(&cancel);
    }

    /// Receives that found the ring empty since the last call.
    pub fn take_buffer_waits(&self) -> u64 {
        self.buffer_waits.replace(0)
    }

    fn next_serial(&self) -> u32 {
        let serial = self.serial.get().wrapping_add(1) & 0xFF_FFFF;
        self.serial.set(serial);
        serial
    }
}

impl Drop for Uring {
    /// Every request still in flight is cancelled and the cancellation waited for, and the
    /// kernel stops picking buffers, before their memory goes. A send that still looks in flight
    /// after that keeps its buffer (leaked: the kernel may yet read it).
    fn drop(&mut self) {
        let cancel_all = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(user_data(OP_CANCEL, 0, 1));
        self.push(&cancel_all);
        let ring = self.ring.get_mut();
        let slots = self.slots.get_mut();
        let mut cancelled = false;
        for _ in 0..100 {
            if ring.submit_and_wait(1).is_err() {
                break;
            }
            for cqe in ring.completion() {
                let (op, _, index) = split_user_data(cqe.user_data());
                match op {
                    OP_SEND => {
                        if let Some(slot) = slots.slab.get_mut(index as usize) {
                            slot.sending = false;
                        }
                    }
                    OP_CANCEL if index == 1 => cancelled = true,
                    _ => {}
                }
            }
            if cancelled {
                break;
            }
        }
        for (_, slot) in slots.slab.iter_mut() {
            if slot.sending {
                std::mem::forget(std::mem::take(&mut slot.in_flight));
            }
        }
        let _ = ring.submitter().unregister_buf_ring(BUFFER_GROUP);
    }
}

/// The slot's queued bytes become its send in flight.
fn start_send(slot: &mut Slot, index: u32) -> squeue::Entry {
    std::mem::swap(&mut slot.in_flight, &mut slot.queued);
    slot.sent = 0;
    slot.sending = true;
    send_entry(slot, index)
}

fn send_entry(slot: &Slot, index: u32) -> squeue::Entry {
    let rest = &slot.in_flight[slot.sent..];
    opcode::Send::new(types::Fd(slot.fd), rest.as_ptr(), rest.len() as u32)
        .flags(libc::MSG_NOSIGNAL)
        .build()
        .user_data(user_data(OP_SEND, 0, index))
}

/// Receive states of a socket.
const ARMED: u8 = 1;
/// A cancel of the armed receive is submitted: not cancelled twice.
const CANCELLING: u8 = 2;
const EOF: u8 = 4;
/// It left bytes unread at the end of a turn: its receives take one buffer at a time (as a
/// `recv` would), until one finds the socket drained.
const PACED: u8 = 8;
/// It is closing: one buffer at a time for good (a peer streaming at a closing connection gets
/// no more of its memory than a `recv` would give it).
const PACED_FOR_GOOD: u8 = 16;
/// The armed receive is multishot.
const MULTISHOT: u8 = 32;

pub struct UringSocket {
    uring: Rc<Uring>,
    fd: ManuallyDrop<OwnedFd>,
    key: u32,
    serial: u32,
    state: Cell<u8>,
    /// The errno a receive failed with (0: none), reported after what was received before it.
    recv_error: Cell<i32>,
    /// Received buffers not yet read, oldest first, and how far the first was read.
    head: Cell<u16>,
    tail: Cell<u16>,
    head_read: Cell<u32>,
    /// Its slot, while it has bytes in user space.
    slot: Cell<u32>,
}

impl UringSocket {
    /// The socket of the connection at `key` (non-blocking; the ring waits for it).
    pub fn new(uring: Rc<Uring>, fd: OwnedFd, key: usize) -> Self {
        let serial = uring.next_serial();
        UringSocket {
            uring,
            fd: ManuallyDrop::new(fd),
            key: key as u32,
            serial,
            state: Cell::new(0),
            recv_error: Cell::new(0),
            head: Cell::new(NO_BUFFER),
            tail: Cell::new(NO_BUFFER),
            head_read: Cell::new(0),
            slot: Cell::new(NO_SLOT),
        }
    }

    fn is(&self, bits: u8) -> bool {
        self.state.get() & bits != 0
    }

    fn set(&self, bits: u8) {
        self.state.set(self.state.get() | bits);
    }

    fn clear(&self, bits: u8) {
        self.state.set(self.state.get() & !bits);
    }

    fn recv_data(&self) -> u64 {
        user_data(OP_RECV, self.serial, self.key)
    }

    /// Takes a receive's completion; returns whether the connection has something to read (a
    /// starved one waits for buffers instead: `end_turn` wakes it).
    fn on_recv(&self, result: i32, flags: u32) -> bool {
        if !cqueue::more(flags) {
            self.clear(ARMED | MULTISHOT | CANCELLING);
        }
        if let Some(bid) = cqueue::buffer_select(flags) {
            let mut buffers = self.uring.buffers.borrow_mut();
            if result > 0 && (result as usize) < BUFFER_SIZE {
                // The socket is drained: the peer is not ahead of us.
                self.clear(PACED);
            }
            if result > 0 {
                buffers.taken(bid, result as u32);
                match self.tail.get() {
                    NO_BUFFER => self.head.set(bid),
                    last => buffers.next[usize::from(last)] = bid,
                }
                self.tail.set(bid);
                self.uring
                    .received
                    .borrow_mut()
                    .push((self.key, self.serial));
                return true;
            }
            buffers.give_unused(bid);
        }
        match result {
            0 => self.set(EOF),
            e if e == -libc::ENOBUFS => {
                let waits = &self.uring.buffer_waits;
                waits.set(waits.get() + 1);
                self.uring
                    .starved
                    .borrow_mut()
                    .push((self.key, self.serial));
                return false;
            }
            e if e < 0 && e != -libc::ECANCELED => self.recv_error.set(-e),
            _ => {}
        }
        true
    }

    /// Copies what was received and not read into `out`: what was set aside first, then the
    /// buffers (given back as they empty).
    fn read_buffered(&self, out: &mut [u8]) -> usize {
        let mut n = 0;
        let index = self.slot.get();
        if index != NO_SLOT {
            let mut slots = self.uring.slots.borrow_mut();
            let slot = &mut slots.slab[index as usize];
            let spill = &slot.spill[slot.spill_read..];
            n = spill.len().min(out.len());
            out[..n].copy_from_slice(&spill[..n]);
            slot.spill_read += n;
            if slot.spill_read == slot.spill.len() {
                slot.spill = Vec::new();
                slot.spill_read = 0;
                if slot.is_idle() {
                    slots.remove(index);
                    self.slot.set(NO_SLOT);
                }
            }
        }
        self.drain_received(|bytes| {
            let take = bytes.len().min(out.len() - n);
            out[n..n + take].copy_from_slice(&bytes[..take]);
            n += take;
            take
        });
        n
    }

    /// Passes the bytes of its received buffers, oldest first, to `take`, which returns how many
    /// it took (fewer than offered: it is full). Buffers emptied go back to the ring.
    fn drain_received(&self, mut take: impl FnMut(&[u8]) -> usize) {
        let mut buffers = self.uring.buffers.borrow_mut();
        let mut head = self.head.get();
        while head != NO_BUFFER {
            let len = buffers.len[usize::from(head)] as usize;
            let from = self.head_read.get() as usize;
            let took = take(buffers.bytes(head, from, len));
            if from + took < len {
                self.head_read.set((from + took) as u32);
                break;
            }
            let next = buffers.next[usize::from(head)];
            buffers.give(head);
            head = next;
            self.head_read.set(0);
        }
        self.head.set(head);
        if head == NO_BUFFER {
            self.tail.set(NO_BUFFER);
        }
    }

    /// At the end of a turn, buffers it did not read are copied to its slot and given back, and
    /// its receive stops until it reads again (what arrives meanwhile waits in the socket).
    fn set_aside(&self) {
        if self.head.get() == NO_BUFFER {
            return;
        }
        let index = self.slot_index() as usize;
        let mut spill = std::mem::take(&mut self.uring.slots.borrow_mut().slab[index].spill);
        self.drain_received(|bytes| {
            spill.extend_from_slice(bytes);
            bytes.len()
        });
        self.uring.slots.borrow_mut().slab[index].spill = spill;
        self.stop_multishot();
        self.set(PACED);
    }

    /// Its slot, made if it has none.
    fn slot_index(&self) -> u32 {
        if self.slot.get() == NO_SLOT {
            let mut slots = self.uring.slots.borrow_mut();
            let index = slots.slab.insert(Slot {
                fd: self.fd.as_raw_fd(),
                orphan: None,
                key: self.key,
                serial: self.serial,
                in_flight: Vec::new(),
                sent: 0,
                queued: Vec::new(),
                spill: Vec::new(),
                spill_read: 0,
                sending: false,
                listed: false,
                error: 0,
            });
            self.slot.set(index as u32);
        }
        self.slot.get()
    }

    /// From now on its receives take one buffer at a time (it is closing).
    pub fn pace_for_good(&self) {
        self.set(PACED_FOR_GOOD);
        self.stop_multishot();
    }

    /// Cancels its receive if it is a multishot one (a paced one ends by itself).
    fn stop_multishot(&self) {
        if self.is(MULTISHOT) && !self.is(CANCELLING) {
            self.set(CANCELLING);
            self.uring.cancel(self.recv_data());
        }
    }

    /// Arms its receive: multishot, or one buffer when paced.
    fn arm(&self) {
        self.set(ARMED);
        let fd = types::Fd(self.fd.as_raw_fd());
        let recv = if self.is(PACED | PACED_FOR_GOOD) {
            opcode::Recv::new(fd, std::ptr::null_mut(), BUFFER_SIZE as u32)
                .buf_group(BUFFER_GROUP)
                .build()
                .flags(squeue::Flags::BUFFER_SELECT)
        } else {
            self.set(MULTISHOT);
            opcode::RecvMulti::new(fd, BUFFER_GROUP).build()
        };
        self.uring.push(&recv.user_data(self.recv_data()));
    }
}

impl Socket for UringSocket {
    fn poll_recv(&self, _: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let n = self.read_buffered(buf);
        if n > 0 {
            return Poll::Ready(Ok(n));
        }
        if self.recv_error.get() != 0 {
            return Poll::Ready(Err(io::Error::from_raw_os_error(self.recv_error.get())));
        }
        if self.is(EOF) {
            return Poll::Ready(Ok(0));
        }
        if !self.is(ARMED) {
            self.arm();
        }
        Poll::Pending
    }

    fn poll_send(&self, _: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let index = self.slot_index();
        let mut slots = self.uring.slots.borrow_mut();
        let Slots {
            slab,
            spare,
            to_submit,
        } = &mut *slots;
        let slot = &mut slab[index as usize];
        if slot.error != 0 {
            return Poll::Ready(Err(io::Error::from_raw_os_error(slot.error)));
        }
        let room = SEND_QUEUE_LIMIT.saturating_sub(slot.queued.len());
        if room == 0 {
            // Its send in flight completes and gives it a turn.
            return Poll::Pending;
        }
        if slot.queued.capacity() == 0
            && let Some(buf) = spare.pop()
        {
            slot.queued = buf;
        }
        let mut taken = 0;
        for buf in bufs {
            let take = buf.len().min(room - taken);
            slot.queued.extend_from_slice(&buf[..take]);
            taken += take;
            if taken == room {
                break;
            }
        }
        if !slot.sending && !slot.listed {
            slot.listed = true;
            to_submit.push(index);
        }
        Poll::Ready(Ok(taken))
    }

    fn poll_shutdown_send(&self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.slot.get() != NO_SLOT {
            let slots = self.uring.slots.borrow();
            let slot = &slots.slab[self.slot.get() as usize];
            if slot.error != 0 {
                return Poll::Ready(Err(io::Error::from_raw_os_error(slot.error)));
            }
            if slot.sending || !slot.queued.is_empty() {
                // What was written leaves first; its completion gives it a turn.
                return Poll::Pending;
            }
        }
        // SAFETY: a plain call on our open descriptor.
        let done = unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_WR) };
        Poll::Ready(if done == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        })
    }
}

impl Drop for UringSocket {
    /// Its receive is cancelled (else the kernel would keep the socket open for it) and its
    /// buffers go back. What it wrote and was not sent yet still leaves (for at most `LINGER`),
    /// as a closed socket's bytes would; its descriptor closes after that, or else after this
    /// turn's submissions (so none of them names a number reused meanwhile).
    fn drop(&mut self) {
        let uring = &*self.uring;
        if self.is(ARMED) && !self.is(CANCELLING) {
            uring.cancel(self.recv_data());
        }
        self.drain_received(|bytes| bytes.len());
        // SAFETY: taken once, here, and never used again.
        let fd = unsafe { ManuallyDrop::take(&mut self.fd) };
        let index = self.slot.get();
        if index != NO_SLOT {
            let mut slots = uring.slots.borrow_mut();
            let slot = &mut slots.slab[index as usize];
            if slot.error == 0 && (slot.sending || !slot.queued.is_empty()) {
                slot.orphan = Some(fd);
                slot.spill = Vec::new();
                let serial = slot.serial;
                drop(slots);
                let deadline = Instant::now() + LINGER;
                uring
                    .orphans
                    .borrow_mut()
                    .push_back((deadline, index, serial));
                return;
            }
            slots.remove(index);
        }
        uring.closed.borrow_mut().push(fd);
    }
}
