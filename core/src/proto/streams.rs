//! The byte streams of a host's connections, as the core holds them: each
//! established connection's [`Stream`] (in the slot of its handle), its
//! timer, the transmit queue and the streams held back until their client
//! proves its address. [`Endpoint`](super::Endpoint)'s "Byte streams"
//! section is the interface; the rings the bytes live in are the I/O
//! edge's (it copies a segment's payload out of the send ring when it
//! builds the frame, and an arrival's into the receive ring).

use super::slab::Slab;
use super::stream::{Stream, StreamTiming};
use super::types::ConnHandle;
use crate::time::Instant;
use std::collections::{BTreeSet, VecDeque};

/// In the transmit queue.
pub(super) const QUEUED: u8 = 1;
/// A keepalive (or window) probe is due.
pub(super) const PROBE: u8 = 2;
/// The application closed its socket: the stream lingers until its last
/// bytes and FIN are acknowledged, and nothing more is read.
pub(super) const CLOSED: u8 = 4;
/// The peer's credit is exhausted (counted once per stall).
pub(super) const STALLED: u8 = 8;
/// The connection is gone and its slot is held for the stream: no other
/// connection may take the slot (and so find this stream's rings or
/// timers) until the stream is forgotten, which gives the slot back.
pub(super) const HOLDS_SLOT: u8 = 16;
/// In [`Streams::held`] (once: a stream queued again while its client is
/// unconfirmed is not added twice).
pub(super) const HELD: u8 = 32;

/// One connection's stream.
pub(super) struct StreamSlot {
    /// The random part of the connection's handle (a slot's next occupant
    /// has another).
    pub(super) tag: u32,
    pub(super) s: Stream,
    /// Its entry in the timer set ([`Instant::ZERO`]: none).
    pub(super) timer: Instant,
    /// [`QUEUED`], [`PROBE`], [`CLOSED`], [`STALLED`], [`HOLDS_SLOT`], [`HELD`].
    pub(super) flags: u8,
}

impl StreamSlot {
    pub(super) fn has(&self, f: u8) -> bool {
        self.flags & f != 0
    }
    pub(super) fn set(&mut self, f: u8, on: bool) {
        if on {
            self.flags |= f;
        } else {
            self.flags &= !f;
        }
    }
}

/// Bytes of one slot of the core's stream table (an empty slot is the same size).
pub const STREAM_SLOT_BYTES: usize = std::mem::size_of::<Option<StreamSlot>>();

const _: () = assert!(STREAM_SLOT_BYTES == std::mem::size_of::<StreamSlot>());

/// The streams, their timers and their transmit queue.
#[derive(Default)]
pub(super) struct Streams {
    slots: Slab<StreamSlot>,
    /// (deadline, stream), earliest first.
    timers: BTreeSet<(Instant, ConnHandle)>,
    /// Streams with something to send, in turn.
    pub(super) txq: VecDeque<ConnHandle>,
    /// Streams whose client has not confirmed yet (each once, flagged
    /// [`HELD`]): nothing but the Accept goes to it; they join the queue
    /// once it has.
    pub(super) held: Vec<ConnHandle>,
}

impl Streams {
    pub(super) fn get(&self, h: ConnHandle) -> Option<&StreamSlot> {
        self.slots.get(h.slot()).filter(|c| c.tag == h.tag())
    }
    pub(super) fn get_mut(&mut self, h: ConnHandle) -> Option<&mut StreamSlot> {
        self.slots.get_mut(h.slot()).filter(|c| c.tag == h.tag())
    }
    pub(super) fn len(&self) -> usize {
        self.slots.len()
    }

    /// Opens `h`'s stream (whatever stream held its slot is forgotten).
    pub(super) fn open(&mut self, h: ConnHandle, s: Stream, t: &StreamTiming) {
        if let Some(old) = self.slots.remove(h.slot()) {
            // Only a stream opened after its connection had gone holds no
            // slot and can be found here by the slot's next connection.
            debug_assert!(!old.has(HOLDS_SLOT), "a held slot was given away");
            let stale = ConnHandle::new(h.slot() as u32, old.tag);
            self.timers.remove(&(old.timer, stale));
        }
        let timer = s.next_timer(t);
        self.slots.insert(
            h.slot(),
            StreamSlot {
                tag: h.tag(),
                s,
                timer,
                flags: 0,
            },
        );
        self.timers.insert((timer, h));
    }

    /// Forgets `h`'s stream.
    pub(super) fn remove(&mut self, h: ConnHandle) -> Option<StreamSlot> {
        self.get(h)?;
        let slot = self.slots.remove(h.slot())?;
        self.timers.remove(&(slot.timer, h));
        Some(slot)
    }

    /// `h`'s timer follows its stream's next deadline.
    pub(super) fn reschedule(&mut self, h: ConnHandle, t: &StreamTiming) {
        if let Some(c) = self.slots.get_mut(h.slot()).filter(|c| c.tag == h.tag()) {
            let at = c.s.next_timer(t);
            if at != c.timer {
                self.timers.remove(&(c.timer, h));
                c.timer = at;
                self.timers.insert((at, h));
            }
        }
    }

    /// Queues `h` for transmission if it has something to send. Returns
    /// whether its peer's credit ran out just now (a stall begins).
    pub(super) fn enqueue(&mut self, h: ConnHandle) -> bool {
        let Some(c) = self.slots.get_mut(h.slot()).filter(|c| c.tag == h.tag()) else {
            return false;
        };
        let stalled = c.s.credit_stalled();
        let began = stalled && !c.has(STALLED);
        c.set(STALLED, stalled);
        if !c.has(QUEUED) && (c.has(PROBE) || c.s.ack_due() || c.s.next_segment().is_some()) {
            c.set(QUEUED, true);
            self.txq.push_back(h);
        }
        began
    }

    /// When the next stream timer is due.
    pub(super) fn next_timer(&self) -> Option<Instant> {
        self.timers.first().map(|(t, _)| *t)
    }

    /// The next stream whose timer is due at `now`, taken out of the set
    /// (its entry is [`Instant::ZERO`] until it is put back).
    pub(super) fn pop_due(&mut self, now: Instant) -> Option<ConnHandle> {
        loop {
            let &(t, h) = self.timers.first()?;
            if t > now {
                return None;
            }
            self.timers.pop_first();
            if let Some(c) = self.get_mut(h) {
                c.timer = Instant::ZERO;
                return Some(h);
            }
        }
    }

    /// Puts `h`'s timer back after [`Streams::pop_due`].
    pub(super) fn rearm(&mut self, h: ConnHandle, t: &StreamTiming) {
        if let Some(c) = self.get_mut(h) {
            let at = c.s.next_timer(t);
            c.timer = at;
            self.timers.insert((at, h));
        }
    }
}
