//! Per-connection byte streams: one send ring and one receive ring per
//! connected socket, in the process's region.
//!
//! Each ring is a single-producer, single-consumer byte ring of a power-of-two
//! size between [`MIN_RING`] and [`MAX_RING`]. Positions are absolute byte
//! counts (`u64`, never wrapping in practice); a ring holds the bytes from
//! its head (consumed) to its tail (produced). Who owns which word:
//!
//! | ring | producer (writes `tail`) | consumer (writes `head`) |
//! |---|---|---|
//! | send | the process (`dsan_send`) | the daemon, once the peer acknowledged the bytes |
//! | receive | the daemon (in-order bytes from the peer) | the process (`dsan_recv`) |
//!
//! The send ring is the retransmission buffer: the daemon frees bytes only
//! when the peer has acknowledged them. The receive ring is the credit: the
//! daemon advertises `head + size` as the last byte the peer may send.
//!
//! A block belongs to one socket slot and outlives the sockets in it, so
//! it carries a generation: the process stamps each new socket of the slot
//! with a fresh one (`snd_p.gen`) before asking for a connection, the
//! daemon echoes it (`st.gen`) when it opens the stream (after resetting
//! every word it owns), and the process uses the block only while the two
//! agree. A slot gets a new socket only once both sides are done with the
//! old one: the daemon has completed the socket's close and no longer
//! lingers on it (`ST_LINGER` clear), and no call of the process still
//! uses it.
//!
//! Notifications are coalesced:
//! * the process pushes a `kick` command only when the `kick` word
//!   (`snd_p.kick`) was clear (the daemon clears it before it looks at the
//!   stream), so a busy stream costs one ring message per burst, not one
//!   per send;
//! * after consuming received bytes the process kicks only when the daemon
//!   asked for it (`rcv_p.credit_wanted`: the advertised credit ran low);
//! * the daemon bumps the futex words `rcv_p.seq` / `snd_c.seq` on progress
//!   and makes a system call (futex wake) only when the process said it
//!   sleeps (`rcv_c.waiting` / `snd_p.waiting`);
//! * FD_READ / FD_WRITE are posted only when the process asked for the next
//!   one (`rcv_c.want` / `snd_p.want`: it found the ring empty or full).
//!
//! The wait / wake handshake is written once, here, for both sides:
//! the daemon publishes with [`StreamShm::publish_received`],
//! [`StreamShm::publish_acked`], [`StreamShm::wake_waiters`] and
//! [`StreamShm::mark_dead`]; a process asks and sleeps with
//! [`StreamShm::want_room`] / [`StreamShm::sleep_for_room`] and
//! [`StreamShm::want_bytes`] / [`StreamShm::sleep_for_bytes`].
//!
//! Every word the process writes is untrusted: the daemon keeps its own copy
//! of the indices it owns and checks the others (a tail behind the last one
//! seen, or further ahead than the ring size, is a protocol violation).

#![allow(unsafe_code)]

use crate::sys::{Mapping, Shared};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Smallest ring (bytes).
pub const MIN_RING: usize = 4096;
/// Largest ring (bytes).
pub const MAX_RING: usize = 1 << 20;
/// Ring size unless SO_SNDBUF / SO_RCVBUF say otherwise.
pub const DEFAULT_RING: usize = 256 << 10;

/// The stream is set up: sizes are valid (daemon).
pub const ST_OPEN: u32 = 1;
/// The peer finished sending: after the bytes up to `rcv_tail`, end of stream.
pub const ST_RX_EOF: u32 = 1 << 1;
/// The connection is gone (reset, peer closed, process detached):
/// `close_error` says how; receives drain what is there, sends fail.
pub const ST_DEAD: u32 = 1 << 2;
/// The application closed the socket and the daemon still sends its last
/// bytes (and FIN): the socket slot is not free for reuse yet.
pub const ST_LINGER: u32 = 1 << 3;
/// The connection is served through another socket now (a forked child
/// claimed it); this socket still holds it: its next call claims it back
/// (`claim` key below), its close only lets go of it.
pub const ST_MOVED: u32 = 1 << 4;

/// The ring size for a requested buffer size: a power of two in
/// [`MIN_RING`]..=[`MAX_RING`] (0 means the default).
pub fn ring_size(requested: usize) -> usize {
    if requested == 0 {
        return DEFAULT_RING;
    }
    requested
        .clamp(MIN_RING, MAX_RING)
        .checked_next_power_of_two()
        .unwrap_or(MAX_RING)
        .min(MAX_RING)
}

/// log2 of a ring size (as commands carry it); 0 for the default.
pub fn size_log2(size: usize) -> u8 {
    if size == 0 {
        0
    } else {
        ring_size(size).trailing_zeros() as u8
    }
}

/// The ring size a command's log2 byte names, if valid (0: the default).
pub fn size_from_log2(l: u8) -> Option<usize> {
    match l {
        0 => Some(DEFAULT_RING),
        l if (MIN_RING.trailing_zeros() as u8..=MAX_RING.trailing_zeros() as u8).contains(&l) => {
            Some(1usize << l)
        }
        _ => None,
    }
}

/// Written by the daemon: how the stream is.
#[repr(C, align(64))]
#[derive(Default)]
pub struct StreamState {
    /// `ST_*` bits.
    pub(crate) state: AtomicU32,
    /// Why the connection ended: 0 (the peer closed) or a negative errno.
    pub(crate) close_error: AtomicI32,
    /// Send ring size (bytes).
    pub(crate) snd_size: AtomicU32,
    /// Receive ring size (bytes).
    pub(crate) rcv_size: AtomicU32,
    /// The generation of the socket this stream was opened for: the
    /// daemon copies [`SendProducer::gen`] here when it opens the stream
    /// (before it sets [`ST_OPEN`]). A process trusts the block only while
    /// this equals the generation it gave the socket.
    pub(crate) gen: AtomicU32,
    /// The largest payload of one segment (the connection's mss).
    pub(crate) mss: AtomicU32,
    /// The connection's claim key: a process that can read it (this
    /// process, or a child forked with this region mapped) may move the
    /// connection to a socket of its own (`Op::Claim`).
    pub(crate) claim: AtomicU64,
}

/// Written by the process: the send ring's producer side.
#[repr(C, align(64))]
#[derive(Default)]
pub struct SendProducer {
    /// Bytes written into the send ring, ever.
    pub(crate) tail: AtomicU64,
    /// 1 once the process shut down writing: `tail` is final (FIN after it).
    pub(crate) fin: AtomicU32,
    /// 1 while a kick is queued (the process sets it, the daemon clears it).
    pub(crate) kick: AtomicU32,
    /// Threads of the process waiting for send space.
    pub(crate) waiting: AtomicU32,
    /// 1: the process found the ring full; the daemon raises FD_WRITE (and
    /// clears this) when space is freed.
    pub(crate) want: AtomicU32,
    /// The socket's generation (nonzero), set by the process each time the
    /// slot gets a new socket, before it asks for a connection on it.
    pub(crate) gen: AtomicU32,
    /// The stream position just past the last urgent byte written (a send
    /// with MSG_OOB: its last byte), or 0. The daemon ends a segment there
    /// and flags it urgent (any value is harmless: it only cuts segments).
    pub(crate) urgent: AtomicU64,
}

/// Written by the daemon: the send ring's consumer side.
#[repr(C, align(64))]
#[derive(Default)]
pub struct SendConsumer {
    /// Bytes acknowledged by the peer (freed), ever.
    pub(crate) head: AtomicU64,
    /// Futex word, bumped when `head` or the state changes.
    pub(crate) seq: AtomicU32,
}

/// Written by the daemon: the receive ring's producer side.
#[repr(C, align(64))]
#[derive(Default)]
pub struct RecvProducer {
    /// Bytes delivered into the receive ring, ever.
    pub(crate) tail: AtomicU64,
    /// Futex word, bumped when `tail` or the state changes.
    pub(crate) seq: AtomicU32,
    /// 1: the daemon wants a kick after the process consumes (credit ran low).
    pub(crate) credit_wanted: AtomicU32,
    /// The urgent byte the peer sent last (0x100 | the byte), written
    /// before [`RecvProducer::urgent`].
    pub(crate) urgent_byte: AtomicU32,
    /// The stream position just past that urgent byte (it is in the ring
    /// at `urgent - 1`), or 0: TCP's urgent mark.
    pub(crate) urgent: AtomicU64,
}

/// Written by the process: the receive ring's consumer side.
#[repr(C, align(64))]
#[derive(Default)]
pub struct RecvConsumer {
    /// Bytes consumed by the process, ever.
    pub(crate) head: AtomicU64,
    /// Threads of the process waiting for data.
    pub(crate) waiting: AtomicU32,
    /// 1: the process found the ring empty; the daemon raises FD_READ (and
    /// clears this) when bytes or the end of stream arrive.
    pub(crate) want: AtomicU32,
}

/// One socket's stream control block: five cache lines, each written by one
/// side. Its words are the contract crate's alone: the daemon and the
/// process reach them only through the methods below, which hold the
/// orders and the wait / wake handshake.
#[repr(C, align(64))]
#[derive(Default)]
pub struct StreamShm {
    /// Daemon.
    pub(crate) st: StreamState,
    /// Process.
    pub(crate) snd_p: SendProducer,
    /// Daemon.
    pub(crate) snd_c: SendConsumer,
    /// Daemon.
    pub(crate) rcv_p: RecvProducer,
    /// Process.
    pub(crate) rcv_c: RecvConsumer,
}
// SAFETY: repr(C), atomics only (and alignment padding).
unsafe impl Shared for StreamShm {}

/// The daemon's end of the wait / wake handshake: publishing progress on a
/// ring, then waking the process's threads that said they sleep on it
/// (futex) and reporting whether the process asked for the next event.
/// One place for the order that makes a sleeping reader or writer never
/// miss a wake-up: the index, then the futex word, then a full fence, then
/// the process's `waiting` word (which the process raises before its last
/// look at the index).
impl StreamShm {
    /// Received bytes up to `tail` are in the receive ring, and with `eof`
    /// nothing comes after them; with `credit_low` the process is asked to
    /// kick once it has consumed (before the tail, so that a reader that
    /// sees the bytes sees the request). Returns whether the process asked
    /// for FD_READ (the request is taken).
    #[inline]
    pub fn publish_received(&self, tail: u64, eof: bool, credit_low: bool) -> bool {
        if credit_low {
            self.rcv_p.credit_wanted.store(1, Ordering::Relaxed);
        }
        self.rcv_p.tail.store(tail, Ordering::Release);
        if eof {
            self.st.state.fetch_or(ST_RX_EOF, Ordering::Release);
        }
        self.rcv_p.seq.fetch_add(1, Ordering::Release);
        fence(Ordering::SeqCst);
        wake_if_waiting(&self.rcv_p.seq, &self.rcv_c.waiting);
        self.rcv_c.want.swap(0, Ordering::AcqRel) != 0
    }

    /// The peer acknowledged the send ring up to `head`: its room is free
    /// again. Returns whether the process asked for FD_WRITE (taken).
    #[inline]
    pub fn publish_acked(&self, head: u64) -> bool {
        self.snd_c.head.store(head, Ordering::Release);
        self.snd_c.seq.fetch_add(1, Ordering::Release);
        fence(Ordering::SeqCst);
        wake_if_waiting(&self.snd_c.seq, &self.snd_p.waiting);
        self.snd_p.want.swap(0, Ordering::AcqRel) != 0
    }

    /// Both rings' futex words move on, and the process's threads that
    /// wait on them are woken to look again (the stream's state changed).
    pub fn wake_waiters(&self) {
        self.rcv_p.seq.fetch_add(1, Ordering::Release);
        self.snd_c.seq.fetch_add(1, Ordering::Release);
        fence(Ordering::SeqCst);
        wake_if_waiting(&self.rcv_p.seq, &self.rcv_c.waiting);
        wake_if_waiting(&self.snd_c.seq, &self.snd_p.waiting);
    }

    /// The connection is gone (`close_error`: 0 when the peer closed, or a
    /// negative errno): receives drain what is there, sends fail; waiters
    /// are woken.
    pub fn mark_dead(&self, close_error: i32) {
        self.st.close_error.store(close_error, Ordering::Relaxed);
        self.st.state.fetch_or(ST_DEAD, Ordering::Release);
        self.wake_waiters();
    }
}

/// What the process has written and consumed, as the daemon reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppIndices {
    /// The send ring's tail (bytes written, absolute).
    pub tail: u64,
    /// The process shut down sending (SHUT_WR or close).
    pub fin: bool,
    /// The receive ring's head (bytes consumed, absolute).
    pub head: u64,
}

/// Where a connection's two rings stand (absolute positions), for moving
/// it from one block to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingMarks {
    /// Sent bytes the peer acknowledged (the send ring's head).
    pub acked: u64,
    /// Bytes the process wrote (the send ring's tail).
    pub written: u64,
    /// Received bytes the process consumed (the receive ring's head).
    pub consumed: u64,
    /// Bytes received (the receive ring's tail).
    pub received: u64,
}

/// The daemon's other dealings with a block: opening it for a connection,
/// reading what the process wrote, the states of a closing socket, the
/// urgent byte, and moving a connection to another block. The process's
/// words are only read here, and every value read is checked by the
/// caller before it is used (a process may write anything).
impl StreamShm {
    /// Hands the block to a new connection: every word the daemon owns is
    /// reset, the sizes and the segment size are set, the process's
    /// generation stamp (`snd_p.gen`, any value) is echoed in `st.gen` and
    /// the state published as open. The first bytes to arrive are an
    /// FD_READ (the receive ring starts empty, as if a receive had found
    /// it so).
    pub fn open(&self, snd_size: u32, rcv_size: u32, mss: u32, claim: u64) {
        self.snd_c.head.store(0, Ordering::Relaxed);
        self.rcv_p.tail.store(0, Ordering::Relaxed);
        self.rcv_p.credit_wanted.store(0, Ordering::Relaxed);
        self.rcv_p.urgent.store(0, Ordering::Relaxed);
        self.rcv_p.urgent_byte.store(0, Ordering::Relaxed);
        self.st.close_error.store(0, Ordering::Relaxed);
        self.st.snd_size.store(snd_size, Ordering::Relaxed);
        self.st.rcv_size.store(rcv_size, Ordering::Relaxed);
        self.st.mss.store(mss, Ordering::Relaxed);
        self.rcv_c.want.store(1, Ordering::Relaxed);
        let gen = self.snd_p.gen.load(Ordering::Acquire);
        self.st.gen.store(gen, Ordering::Relaxed);
        self.st.claim.store(claim, Ordering::Relaxed);
        self.st.state.store(ST_OPEN, Ordering::Release);
    }

    /// The process's indices, after taking its kick (cleared first, so
    /// that a kick the process raises after this read is not lost).
    #[inline]
    pub fn take_kick(&self) -> AppIndices {
        self.snd_p.kick.store(0, Ordering::SeqCst);
        AppIndices {
            tail: self.snd_p.tail.load(Ordering::Acquire),
            fin: self.snd_p.fin.load(Ordering::Acquire) != 0,
            head: self.rcv_c.head.load(Ordering::Acquire),
        }
    }

    /// The receive ring's head as the process left it (unchecked).
    #[inline]
    pub fn read_head(&self) -> u64 {
        self.rcv_c.head.load(Ordering::Acquire)
    }

    /// Where the process put its urgent byte's mark (unchecked; 0: none).
    #[inline]
    pub fn send_urgent_mark(&self) -> u64 {
        self.snd_p.urgent.load(Ordering::Acquire)
    }

    /// The process is asked to kick once it has consumed (the credit the
    /// daemon can give runs low).
    #[inline]
    pub fn ask_for_credit(&self) {
        self.rcv_p.credit_wanted.store(1, Ordering::Relaxed);
    }

    /// An urgent byte `byte` arrived, ending at absolute position `mark`:
    /// published for the process (TCP's out-of-band byte, POLLPRI until
    /// read), which is asked for the next FD_READ too, so that a process
    /// waiting only for the exceptional condition learns it.
    pub fn publish_urgent(&self, mark: u64, byte: u8) {
        self.rcv_p
            .urgent_byte
            .store(0x100 | u32::from(byte), Ordering::Relaxed);
        self.rcv_p.urgent.store(mark, Ordering::Release);
        self.rcv_c.want.store(1, Ordering::Relaxed);
    }

    /// The socket closed and the daemon still sends its last bytes: the
    /// slot is not free for reuse yet.
    #[inline]
    pub fn linger(&self) {
        self.st.state.fetch_or(ST_LINGER, Ordering::Release);
    }

    /// Nothing in the daemon uses the block any more: the process may
    /// reuse the slot.
    #[inline]
    pub fn release(&self) {
        self.st.state.store(0, Ordering::Release);
    }

    /// Takes over the connection that block `from` served, standing at
    /// `at` (its ring bytes already copied to the same absolute positions
    /// of this block's rings): every word of both sides, the process's own
    /// generation stamp and the claim key `claim`; published open (with
    /// the end of stream if `from` had it). The process waits for the
    /// claim's completion before it touches the block. `from` is released
    /// if `orphan` (no socket holds it), else marked [`ST_MOVED`]. Returns
    /// whether bytes or the end of the stream wait to be read.
    pub fn take_over(
        &self,
        from: &StreamShm,
        at: RingMarks,
        snd_size: u32,
        rcv_size: u32,
        claim: u64,
        orphan: bool,
    ) -> bool {
        self.snd_p.tail.store(at.written, Ordering::Relaxed);
        self.snd_p.fin.store(
            from.snd_p.fin.load(Ordering::Acquire).min(1),
            Ordering::Relaxed,
        );
        self.snd_p.kick.store(0, Ordering::Relaxed);
        self.rcv_c.head.store(at.consumed, Ordering::Relaxed);
        self.rcv_c.want.store(1, Ordering::Relaxed);
        self.snd_c.head.store(at.acked, Ordering::Relaxed);
        self.rcv_p.tail.store(at.received, Ordering::Relaxed);
        for (to, fr) in [
            (&self.rcv_p.credit_wanted, &from.rcv_p.credit_wanted),
            (&self.rcv_p.urgent_byte, &from.rcv_p.urgent_byte),
            (&self.st.mss, &from.st.mss),
        ] {
            to.store(fr.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        for (to, fr) in [
            (&self.rcv_p.urgent, &from.rcv_p.urgent),
            (&self.snd_p.urgent, &from.snd_p.urgent),
        ] {
            to.store(fr.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        self.st.close_error.store(0, Ordering::Relaxed);
        self.st.snd_size.store(snd_size, Ordering::Relaxed);
        self.st.rcv_size.store(rcv_size, Ordering::Relaxed);
        self.st
            .gen
            .store(self.snd_p.gen.load(Ordering::Acquire), Ordering::Relaxed);
        self.st.claim.store(claim, Ordering::Relaxed);
        let state = from.st.state.load(Ordering::Acquire) & (ST_OPEN | ST_RX_EOF);
        self.st.state.store(state | ST_OPEN, Ordering::Release);
        if orphan {
            from.release();
        } else {
            from.st.state.fetch_or(ST_MOVED, Ordering::Release);
        }
        // Threads of this block's process that wait on it (a holder taking
        // the connection back after the other let go) look again.
        self.wake_waiters();
        let readable = at.received > at.consumed || state & ST_RX_EOF != 0;
        if readable {
            // The FD_READ goes now: the request is taken.
            self.rcv_c.want.store(0, Ordering::Relaxed);
        }
        readable
    }

    /// The connection this block held from afar ([`ST_MOVED`]) ended
    /// (`close_error` as [`Self::mark_dead`]): nothing is left to read
    /// here (its bytes went with the connection).
    pub fn end_moved(&self, close_error: i32) {
        self.rcv_p
            .tail
            .store(self.rcv_c.head.load(Ordering::Acquire), Ordering::Relaxed);
        self.st.state.fetch_and(!ST_MOVED, Ordering::Relaxed);
        self.mark_dead(close_error);
    }
}

/// After a futex word moved on (and a full fence): wakes the threads
/// sleeping on it, with a system call only if the process said some do.
fn wake_if_waiting(seq: &AtomicU32, waiting: &AtomicU32) {
    if waiting.load(Ordering::Relaxed) != 0 {
        crate::sys::futex_wake(seq);
    }
}

/// The process's end of the same handshake: ask for the next event, look
/// again, and only then sleep on the futex word, with `waiting` raised
/// around the sleep so that the daemon's publish wakes it.
impl StreamShm {
    /// The send ring was full at `head`: asks for FD_WRITE (and a wake-up).
    /// Returns whether it is still full (else: look again).
    #[inline]
    pub fn want_room(&self, head: u64) -> bool {
        self.snd_p.want.store(1, Ordering::SeqCst);
        self.snd_c.head.load(Ordering::SeqCst) == head
    }

    /// Sleeps at most `nap` while the send ring's head is still `head` and
    /// its futex word still `seq` (read before [`Self::want_room`]), unless
    /// `closing()` says the socket is being closed.
    pub fn sleep_for_room(
        &self,
        head: u64,
        seq: u32,
        nap: Duration,
        closing: impl FnOnce() -> bool,
    ) {
        self.snd_p.waiting.fetch_add(1, Ordering::SeqCst);
        if self.snd_c.head.load(Ordering::SeqCst) == head && !closing() {
            crate::sys::futex_wait(&self.snd_c.seq, seq, nap);
        }
        self.snd_p.waiting.fetch_sub(1, Ordering::SeqCst);
    }

    /// The receive ring was empty at `tail`: asks for FD_READ (and a
    /// wake-up). Returns whether it is still empty (else: look again).
    #[inline]
    pub fn want_bytes(&self, tail: u64) -> bool {
        self.rcv_c.want.store(1, Ordering::SeqCst);
        self.rcv_p.tail.load(Ordering::SeqCst) == tail
    }

    /// Sleeps at most `nap` while the receive ring's tail is still `tail`,
    /// the stream's state still `state` and the futex word still `seq`
    /// (read before the tail), unless `closing()`.
    pub fn sleep_for_bytes(
        &self,
        tail: u64,
        state: u32,
        seq: u32,
        nap: Duration,
        closing: impl FnOnce() -> bool,
    ) {
        self.rcv_c.waiting.fetch_add(1, Ordering::SeqCst);
        if self.rcv_p.tail.load(Ordering::SeqCst) == tail
            && self.st.state.load(Ordering::SeqCst) == state
            && !closing()
        {
            crate::sys::futex_wait(&self.rcv_p.seq, seq, nap);
        }
        self.rcv_c.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The process's other dealings with its block: its own words (a fresh
/// socket's reset, the send ring's tail and FIN, the receive ring's head,
/// the kick, the requests for events) and what it reads of the daemon's.
/// Every value read of the daemon's words is checked by the caller against
/// the ring sizes before it is used.
impl StreamShm {
    /// A fresh socket in a slot used before: the words this process writes
    /// are zeroed and stamped with the new socket's generation `gen`, which
    /// the daemon echoes in `st.gen` when it opens the block for it.
    pub fn reset_app_words(&self, gen: u32) {
        self.snd_p.gen.store(gen, Ordering::Relaxed);
        self.snd_p.tail.store(0, Ordering::Relaxed);
        self.snd_p.fin.store(0, Ordering::Relaxed);
        self.snd_p.kick.store(0, Ordering::Relaxed);
        self.snd_p.waiting.store(0, Ordering::Relaxed);
        self.snd_p.want.store(0, Ordering::Relaxed);
        self.snd_p.urgent.store(0, Ordering::Relaxed);
        self.rcv_c.head.store(0, Ordering::Relaxed);
        self.rcv_c.waiting.store(0, Ordering::Relaxed);
        self.rcv_c.want.store(0, Ordering::Release);
    }

    /// The stream's state ([`ST_OPEN`] and the other bits).
    #[inline]
    pub fn state(&self) -> u32 {
        self.st.state.load(Ordering::Acquire)
    }

    /// The generation the daemon echoed when it opened the block.
    #[inline]
    pub fn stamp(&self) -> u32 {
        self.st.gen.load(Ordering::Acquire)
    }

    /// The send and receive rings' sizes the daemon set (unchecked).
    #[inline]
    pub fn ring_sizes(&self) -> (u32, u32) {
        (
            self.st.snd_size.load(Ordering::Relaxed),
            self.st.rcv_size.load(Ordering::Relaxed),
        )
    }

    /// How the connection ended (with [`ST_DEAD`]): 0 or a negative errno.
    #[inline]
    pub fn close_error(&self) -> i32 {
        self.st.close_error.load(Ordering::Acquire)
    }

    /// The connection's segment size.
    #[inline]
    pub fn mss(&self) -> u32 {
        self.st.mss.load(Ordering::Relaxed)
    }

    /// Raises the kick word. True if it was clear: the process owes the
    /// daemon a Kick command (else one is pending and covers this news).
    #[inline]
    pub fn raise_kick(&self) -> bool {
        self.snd_p.kick.swap(1, Ordering::SeqCst) == 0
    }

    /// Whether this process shut down sending on the block.
    #[inline]
    pub fn fin_sent(&self) -> bool {
        self.snd_p.fin.load(Ordering::Relaxed) != 0
    }

    /// Shuts down sending: the peer reads the end of the stream after the
    /// bytes written.
    #[inline]
    pub fn send_fin(&self) {
        self.snd_p.fin.store(1, Ordering::Release);
    }

    /// The send ring's tail (this process's) and head (acknowledged).
    #[inline]
    pub fn send_marks(&self) -> (u64, u64) {
        (
            self.snd_p.tail.load(Ordering::Relaxed),
            self.snd_c.head.load(Ordering::Acquire),
        )
    }

    /// The send ring's head: bytes the peer acknowledged.
    #[inline]
    pub fn acked_head(&self) -> u64 {
        self.snd_c.head.load(Ordering::Acquire)
    }

    /// The send ring's futex word (read before [`Self::want_room`]).
    #[inline]
    pub fn room_seq(&self) -> u32 {
        self.snd_c.seq.load(Ordering::Acquire)
    }

    /// Bytes up to `tail` are in the send ring; with `urgent` the last of
    /// them is the urgent byte (MSG_OOB).
    #[inline]
    pub fn publish_written(&self, tail: u64, urgent: bool) {
        if urgent {
            self.snd_p.urgent.store(tail, Ordering::Release);
        }
        self.snd_p.tail.store(tail, Ordering::Release);
    }

    /// The receive ring's futex word (read before the tail).
    #[inline]
    pub fn bytes_seq(&self) -> u32 {
        self.rcv_p.seq.load(Ordering::Acquire)
    }

    /// The receive ring's tail: bytes received.
    #[inline]
    pub fn received_tail(&self) -> u64 {
        self.rcv_p.tail.load(Ordering::Acquire)
    }

    /// Where the last urgent byte received ends (0: none came).
    #[inline]
    pub fn urgent_mark(&self) -> u64 {
        self.rcv_p.urgent.load(Ordering::Acquire)
    }

    /// The urgent byte's value, with bit 8 set once one came.
    #[inline]
    pub fn urgent_byte(&self) -> u32 {
        self.rcv_p.urgent_byte.load(Ordering::Relaxed)
    }

    /// The process consumed the receive ring up to `head`. True if the
    /// daemon asked for a kick after consuming (its credit runs low): the
    /// request is taken.
    #[inline]
    pub fn consume(&self, head: u64) -> bool {
        self.rcv_c.head.store(head, Ordering::Release);
        self.rcv_p.credit_wanted.swap(0, Ordering::AcqRel) != 0
    }

    /// Asks for the next FD_READ (before a look at the tail and the state:
    /// [`Self::unread`], [`Self::state_now`]).
    #[inline]
    pub fn arm_read(&self) {
        self.rcv_c.want.store(1, Ordering::SeqCst);
    }

    /// Asks for the next FD_WRITE (before a look at the head: [`Self::unacked`]).
    #[inline]
    pub fn arm_write(&self) {
        self.snd_p.want.store(1, Ordering::SeqCst);
    }

    /// Writes `value` into one of the words a process owns (0: the send
    /// ring's tail, 1: its FIN word, 2: the receive ring's head), as a
    /// broken or hostile process may: for the fuzz targets and tests that
    /// play one. Nothing else calls it.
    #[doc(hidden)]
    pub fn scribble_app_word(&self, word: u8, value: u64) {
        match word {
            0 => self.snd_p.tail.store(value, Ordering::Relaxed),
            1 => self.snd_p.fin.store(value as u32, Ordering::Relaxed),
            2 => self.rcv_c.head.store(value, Ordering::Relaxed),
            _ => {}
        }
    }

    /// The claim key the daemon gave the connection (proof of holding it).
    #[inline]
    pub fn claim_key(&self) -> u64 {
        self.st.claim.load(Ordering::Acquire)
    }

    /// The process is closing the socket: its own threads asleep on the
    /// block wake and look again (they see the closing flag raised before
    /// this call, as they look at it after they announced their sleep).
    pub fn wake_sleepers(&self) {
        if self.rcv_c.waiting.load(Ordering::SeqCst) != 0 {
            crate::sys::futex_wake(&self.rcv_p.seq);
        }
        if self.snd_p.waiting.load(Ordering::SeqCst) != 0 {
            crate::sys::futex_wake(&self.snd_c.seq);
        }
    }

    /// The stream's state, ordered after an arming store.
    #[inline]
    pub fn state_now(&self) -> u32 {
        self.st.state.load(Ordering::SeqCst)
    }

    /// Bytes received and not read yet (ordered after [`Self::arm_read`]).
    #[inline]
    pub fn unread(&self) -> u64 {
        self.rcv_p
            .tail
            .load(Ordering::SeqCst)
            .wrapping_sub(self.rcv_c.head.load(Ordering::Relaxed))
    }

    /// Bytes written and not yet acknowledged (ordered after
    /// [`Self::arm_write`]).
    #[inline]
    pub fn unacked(&self) -> u64 {
        self.snd_p
            .tail
            .load(Ordering::Relaxed)
            .wrapping_sub(self.snd_c.head.load(Ordering::SeqCst))
    }
}

/// The two byte rings of one socket, as mapped by one side. Holds the
/// mapping alive.
#[derive(Debug, Clone)]
pub struct StreamArea {
    _map: Arc<Mapping>,
    snd: NonNull<u8>,
    rcv: NonNull<u8>,
    snd_size: usize,
    rcv_size: usize,
}

// SAFETY: the area is shared memory; the copies below are the only accesses.
unsafe impl Send for StreamArea {}
// SAFETY: as above.
unsafe impl Sync for StreamArea {}

impl StreamArea {
    /// The rings at `snd_off` / `rcv_off` of `map`, each with room for
    /// [`MAX_RING`] bytes, used with the given sizes.
    ///
    /// # Panics
    /// If a size is not a power of two in range or an area is out of the mapping.
    pub(crate) fn new(
        map: Arc<Mapping>,
        snd_off: usize,
        rcv_off: usize,
        snd_size: usize,
        rcv_size: usize,
    ) -> StreamArea {
        for s in [snd_size, rcv_size] {
            assert!(s.is_power_of_two() && (MIN_RING..=MAX_RING).contains(&s));
        }
        assert!(snd_off + MAX_RING <= map.len() && rcv_off + MAX_RING <= map.len());
        StreamArea {
            snd: map.ptr_at(snd_off),
            rcv: map.ptr_at(rcv_off),
            _map: map,
            snd_size,
            rcv_size,
        }
    }

    /// Send ring size.
    pub fn snd_size(&self) -> usize {
        self.snd_size
    }

    /// Receive ring size.
    pub fn rcv_size(&self) -> usize {
        self.rcv_size
    }

    /// Copies `src` into `ring` (of `size` bytes) from absolute position `pos`, wrapping.
    ///
    /// # Panics
    /// If `src` is longer than the ring (checked in every build: the copy
    /// below relies on it).
    fn put(ring: NonNull<u8>, size: usize, pos: u64, src: &[u8]) {
        assert!(
            src.len() <= size,
            "{} bytes into a {size}-byte ring",
            src.len()
        );
        let off = (pos as usize) & (size - 1);
        let first = src.len().min(size - off);
        // SAFETY: `ring..ring+size` lies inside the mapping (checked in `new`,
        // kept alive by `_map`); off + first <= size and the rest starts at 0.
        // The protocol gives this side the byte range it writes; a hostile
        // peer racing on it can only corrupt bytes of its own stream.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), ring.as_ptr().add(off), first);
            std::ptr::copy_nonoverlapping(
                src.as_ptr().add(first),
                ring.as_ptr(),
                src.len() - first,
            );
        }
    }

    /// Copies from `ring` at absolute position `pos` into `dst`, wrapping.
    ///
    /// # Panics
    /// If `dst` is longer than the ring (checked in every build).
    fn get(ring: NonNull<u8>, size: usize, pos: u64, dst: &mut [u8]) {
        assert!(
            dst.len() <= size,
            "{} bytes out of a {size}-byte ring",
            dst.len()
        );
        let off = (pos as usize) & (size - 1);
        let first = dst.len().min(size - off);
        // SAFETY: as in `put`, reading instead of writing.
        unsafe {
            std::ptr::copy_nonoverlapping(ring.as_ptr().add(off), dst.as_mut_ptr(), first);
            std::ptr::copy_nonoverlapping(
                ring.as_ptr(),
                dst.as_mut_ptr().add(first),
                dst.len() - first,
            );
        }
    }

    /// Process: writes bytes into the send ring at `pos` (at most the ring's
    /// size: longer panics; callers copy what the ring has room for).
    pub fn write_send(&self, pos: u64, src: &[u8]) {
        Self::put(self.snd, self.snd_size, pos, src)
    }
    /// Daemon: reads bytes of the send ring at `pos` (to transmit them).
    pub fn read_send(&self, pos: u64, dst: &mut [u8]) {
        Self::get(self.snd, self.snd_size, pos, dst)
    }
    /// Daemon: writes received bytes into the receive ring at `pos`.
    pub fn write_recv(&self, pos: u64, src: &[u8]) {
        Self::put(self.rcv, self.rcv_size, pos, src)
    }
    /// Process: reads bytes of the receive ring at `pos`.
    pub fn read_recv(&self, pos: u64, dst: &mut [u8]) {
        Self::get(self.rcv, self.rcv_size, pos, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(ring_size(0), DEFAULT_RING);
        assert_eq!(ring_size(1), MIN_RING);
        assert_eq!(ring_size(5000), 8192);
        assert_eq!(ring_size(usize::MAX), MAX_RING);
        assert_eq!(size_from_log2(size_log2(65536)), Some(65536));
        assert_eq!(size_from_log2(0), Some(DEFAULT_RING));
        assert_eq!(size_from_log2(11), None);
        assert_eq!(size_from_log2(21), None);
        assert_eq!(std::mem::size_of::<StreamShm>(), 5 * 64);
    }

    #[test]
    fn wraps() {
        let map = Arc::new(Mapping::create("dsan-stream-test", 2 * MAX_RING).unwrap());
        let a = StreamArea::new(map, 0, MAX_RING, MIN_RING, MIN_RING);
        let src: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        a.write_send(3000, &src); // crosses the end of the 4 KiB ring
        let mut dst = vec![0u8; 3000];
        a.read_send(3000, &mut dst);
        assert_eq!(src, dst);
        a.write_recv(4095, &src[..2]);
        let mut two = [0u8; 2];
        a.read_recv(4095, &mut two);
        assert_eq!(two, [0, 1]);
    }
}
