//! The bounded lock-free backlog queue of a SAN listener.
//!
//! Dmitry Vyukov's bounded MPMC queue, used with several producers (the
//! dataplane's arrivals) and one consumer (the accept path). Capacity is fixed
//! at creation and need not be a power of two: it is exactly the listen
//! backlog. [`Backlog::push`] onto a full queue hands the value back, so the
//! caller can answer the peer with a reject at once.
//!
//! Every slot carries a sequence number (`stamp`). For a position `p` (head or
//! tail counters grow for ever; `p % capacity` is the slot):
//! * `stamp == 2p`: the slot is free for the producer whose tail is `p`;
//! * `stamp == 2p + 1`: the slot holds the value pushed at `p`, ready for the
//!   consumer whose head is `p`;
//! * after the pop the stamp becomes `2(p + capacity)`: free for the next lap.
//!
//! Doubling keeps "full at `p`" and "free at `p + capacity`" apart even for a
//! capacity of 1, without rounding the capacity up to a power of two.
//!
//! The queue holds only indices and `Copy` values, never pointers, so the same
//! layout can live in memory shared between processes.
#![allow(unsafe_code)]

use crossbeam_utils::CachePadded;
use std::cell::UnsafeCell;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU64, Ordering};

/// The largest backlog a listener may ask for; a larger request (such as
/// SOMAXCONN-style "as many as you like") is clamped to this.
pub const MAX_BACKLOG: usize = 4096;

struct Slot<T> {
    /// The sequence number described in the module doc.
    stamp: AtomicU64,
    value: UnsafeCell<MaybeUninit<T>>,
}

/// A bounded multi-producer queue of `Copy` values.
pub struct Backlog<T: Copy> {
    /// Next position to pop. Written only by consumers (CAS).
    head: CachePadded<AtomicU64>,
    /// Next position to push. Written only by producers (CAS).
    tail: CachePadded<AtomicU64>,
    slots: Box<[Slot<T>]>,
}

// SAFETY: values are moved between threads through the stamp protocol: a slot's
// value is written by exactly one producer before the Release store of its
// stamp, and read by exactly one consumer after the Acquire load that observes
// it; T: Send makes handing it over sound.
unsafe impl<T: Copy + Send> Sync for Backlog<T> {}
// SAFETY: as above; the queue owns its slots.
unsafe impl<T: Copy + Send> Send for Backlog<T> {}

impl<T: Copy> Backlog<T> {
    /// A queue holding up to `capacity` values (1..=[`MAX_BACKLOG`]).
    ///
    /// # Panics
    /// If `capacity` is 0 or above [`MAX_BACKLOG`]; use [`Backlog::effective_capacity`].
    pub fn new(capacity: usize) -> Self {
        assert!(
            (1..=MAX_BACKLOG).contains(&capacity),
            "backlog capacity {capacity} out of range"
        );
        let slots = (0..capacity)
            .map(|i| Slot {
                stamp: AtomicU64::new(2 * i as u64),
                value: UnsafeCell::new(MaybeUninit::uninit()),
            })
            .collect();
        Self {
            head: CachePadded::new(AtomicU64::new(0)),
            tail: CachePadded::new(AtomicU64::new(0)),
            slots,
        }
    }

    /// The capacity a listen backlog request gets: at least 1, at most
    /// [`MAX_BACKLOG`] (negative or huge requests, SOMAXCONN included, mean the maximum).
    pub fn effective_capacity(requested: i64) -> usize {
        if requested <= 0 {
            if requested == 0 {
                1
            } else {
                MAX_BACKLOG
            }
        } else {
            (requested as u64).min(MAX_BACKLOG as u64) as usize
        }
    }

    /// The fixed capacity.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Appends `v`, or hands it back if the queue is full.
    ///
    /// # Errors
    /// `Err(v)` when full.
    pub fn push(&self, v: T) -> Result<(), T> {
        let cap = self.slots.len() as u64;
        let mut pos = self.tail.load(Ordering::Relaxed);
        loop {
            let slot = &self.slots[(pos % cap) as usize];
            let stamp = slot.stamp.load(Ordering::Acquire);
            let dif = stamp.wrapping_sub(2 * pos) as i64;
            if dif == 0 {
                // The slot is free for this position: claim the position.
                match self.tail.compare_exchange_weak(
                    pos,
                    pos + 1,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        // SAFETY: winning the CAS for `pos` gives this thread sole
                        // write access to the slot until it publishes the stamp.
                        unsafe { (*slot.value.get()).write(v) };
                        slot.stamp.store(2 * pos + 1, Ordering::Release);
                        return Ok(());
                    }
                    Err(cur) => pos = cur,
                }
            } else if dif < 0 {
                // The slot still holds the value of the previous lap: full.
                return Err(v);
            } else {
                // Another producer took this position; catch up.
                pos = self.tail.load(Ordering::Relaxed);
            }
        }
    }

    /// Takes the oldest value, if any.
    pub fn pop(&self) -> Option<T> {
        let cap = self.slots.len() as u64;
        let mut pos = self.head.load(Ordering::Relaxed);
        loop {
            let slot = &self.slots[(pos % cap) as usize];
            let stamp = slot.stamp.load(Ordering::Acquire);
            let dif = stamp.wrapping_sub(2 * pos + 1) as i64;
            if dif == 0 {
                match self.head.compare_exchange_weak(
                    pos,
                    pos + 1,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        // SAFETY: the Acquire load saw stamp == 2 pos + 1, published
                        // after the value was written; winning the CAS makes this
                        // thread its only reader. T: Copy, so no drop is owed.
                        let v = unsafe { (*slot.value.get()).assume_init_read() };
                        slot.stamp.store(2 * (pos + cap), Ordering::Release);
                        return Some(v);
                    }
                    Err(cur) => pos = cur,
                }
            } else if dif < 0 {
                return None; // empty
            } else {
                pos = self.head.load(Ordering::Relaxed);
            }
        }
    }

    /// Looks at the oldest value without taking it (single consumer only: with
    /// one consumer the head cannot move under it).
    pub fn peek(&self) -> Option<T> {
        let cap = self.slots.len() as u64;
        let pos = self.head.load(Ordering::Relaxed);
        let slot = &self.slots[(pos % cap) as usize];
        if slot.stamp.load(Ordering::Acquire) == 2 * pos + 1 {
            // SAFETY: the value at `pos` is published and, with a single
            // consumer, cannot be popped concurrently; T: Copy.
            Some(unsafe { (*slot.value.get()).assume_init_read() })
        } else {
            None
        }
    }

    /// Values queued now (a snapshot; exact when nobody pushes or pops).
    pub fn len(&self) -> usize {
        let t = self.tail.load(Ordering::SeqCst);
        let h = self.head.load(Ordering::SeqCst);
        t.saturating_sub(h).min(self.slots.len() as u64) as usize
    }

    /// Whether nothing is queued (a snapshot).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T: Copy> std::fmt::Debug for Backlog<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backlog")
            .field("capacity", &self.capacity())
            .field("len", &self.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn fifo_full_hands_back_and_wraps() {
        let q = Backlog::new(3);
        assert_eq!(q.pop(), None);
        for lap in 0..5u32 {
            for i in 0..3 {
                q.push(lap * 10 + i).unwrap();
            }
            assert_eq!(q.push(99), Err(99), "full hands the value back");
            assert_eq!(q.len(), 3);
            assert_eq!(q.peek(), Some(lap * 10));
            for i in 0..3 {
                assert_eq!(q.pop(), Some(lap * 10 + i));
            }
            assert!(q.is_empty());
        }
    }

    #[test]
    fn capacity_one_and_limits() {
        let q = Backlog::new(1);
        q.push(1u8).unwrap();
        assert_eq!(q.push(2), Err(2));
        assert_eq!(q.pop(), Some(1));
        q.push(3).unwrap();
        assert_eq!(q.pop(), Some(3));
        assert_eq!(Backlog::<u8>::effective_capacity(0), 1);
        assert_eq!(Backlog::<u8>::effective_capacity(4), 4);
        assert_eq!(Backlog::<u8>::effective_capacity(0x7fff_ffff), MAX_BACKLOG);
        assert_eq!(Backlog::<u8>::effective_capacity(-1), MAX_BACKLOG);
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn zero_capacity_panics() {
        let _ = Backlog::<u8>::new(0);
    }

    /// Several producers, one consumer: every value arrives exactly once, each
    /// producer's values in order, and the queue never holds more than its capacity.
    #[test]
    fn stress_many_producers_one_consumer() {
        let producers = 4u64;
        let per = if cfg!(miri) { 200 } else { 200_000 };
        let q = Arc::new(Backlog::<u64>::new(7));
        let mut hs = Vec::new();
        for p in 0..producers {
            let q = q.clone();
            hs.push(std::thread::spawn(move || {
                let mut refused = 0u64;
                for i in 0..per {
                    let mut v = (p << 32) | i;
                    while let Err(back) = q.push(v) {
                        assert_eq!(back, v);
                        v = back;
                        refused += 1;
                        std::hint::spin_loop();
                    }
                }
                refused
            }));
        }
        let mut next = vec![0u64; producers as usize];
        let mut got = 0;
        while got < producers * per {
            assert!(q.len() <= 7);
            if let Some(v) = q.pop() {
                let (p, i) = ((v >> 32) as usize, v & 0xffff_ffff);
                assert_eq!(i, next[p], "producer {p} out of order");
                next[p] += 1;
                got += 1;
            }
        }
        let refused: u64 = hs.into_iter().map(|h| h.join().unwrap()).sum();
        assert!(q.pop().is_none());
        assert!(next.iter().all(|&n| n == per));
        // With capacity 7 and 4 producers the queue is full at times.
        assert!(refused > 0 || cfg!(miri));
    }
}
