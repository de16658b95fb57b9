//! The bounded lock-free backlog queue of a SAN listener.
//!
//! Dmitry Vyukov's bounded MPMC queue, used with several producers (the
//! dataplane's arrivals) and one consumer (the accept path). Capacity is fixed
//! at creation and need not be a power of two: it is exactly the listen
//! backlog. [`Backlog::push`] onto a full queue hands the value back, so the
//! caller can answer the peer with a reject at once.
//!
//! Every slot carries a sequence number (`stamp`). For a position `p` (head and
//! tail grow for ever; `p % capacity` is the slot):
//! * `stamp == 2p`: the slot is free for the producer whose tail is `p`;
//! * `stamp == 2p + 1`: the slot holds the value pushed at `p`, ready for the
//!   consumer whose head is `p`;
//! * after the pop the stamp becomes `2(p + capacity)`: free for the next lap.
//!
//! Doubling keeps "full at `p`" and "free at `p + capacity`" apart even for a
//! capacity of 1, without rounding the capacity up to a power of two.
//!
//! **Position independence.** The queue lives in one contiguous region: a
//! [`RingHeader`] (magic, capacity, head, tail, each counter on its own cache
//! line) followed by the slots. It holds only counters and `Copy` values,
//! never a pointer, so the same bytes work at any address and in memory
//! shared between processes: [`Backlog::new`] allocates a private region,
//! [`Backlog::init_in`] formats caller-provided memory (e.g. a memfd mapping)
//! and [`Backlog::attach`] opens a region formatted elsewhere.
#![allow(unsafe_code)]

use crossbeam_utils::CachePadded;
use std::alloc::Layout;
use std::cell::UnsafeCell;
use std::marker::PhantomData;
use std::mem::{align_of, size_of, MaybeUninit};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

/// The largest backlog a listener may ask for; a larger request (such as
/// SOMAXCONN-style "as many as you like") is clamped to this.
pub const MAX_BACKLOG: usize = 4096;

/// Marks a formatted region ("dsanBKLG").
const MAGIC: u64 = 0x6473_616e_424b_4c47;

/// The start of a backlog region.
#[repr(C)]
pub struct RingHeader {
    magic: AtomicU64,
    capacity: AtomicU64,
    /// Size of one slot, checked on attach (guards against a type mismatch).
    slot_size: AtomicU64,
    /// Next position to pop; written only by consumers (CAS).
    head: CachePadded<AtomicU64>,
    /// Next position to push; written only by producers (CAS).
    tail: CachePadded<AtomicU64>,
}

#[repr(C)]
struct Slot<T> {
    /// The sequence number described in the module doc.
    stamp: AtomicU64,
    value: UnsafeCell<MaybeUninit<T>>,
}

/// Why a region cannot hold or be opened as a backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegionError {
    /// Capacity 0 or above [`MAX_BACKLOG`].
    #[error("backlog capacity out of range")]
    Capacity,
    /// The region is smaller than [`Backlog::region_size`] or misaligned.
    #[error("backlog region too small or misaligned")]
    Region,
    /// The region was not formatted as a backlog of this type.
    #[error("not a backlog region")]
    NotFormatted,
}

/// A bounded multi-producer queue of `Copy` values in one position-independent region.
pub struct Backlog<T: Copy> {
    base: NonNull<RingHeader>,
    capacity: u64,
    /// Set when this value allocated the region and must free it.
    owned: Option<Layout>,
    _t: PhantomData<T>,
}

// SAFETY: values move between threads through the stamp protocol: a slot's value
// is written by exactly one producer before the Release store of its stamp and
// read by exactly one consumer after the Acquire load that observes it; T: Send
// makes handing it over sound. The region itself is only touched through atomics
// and those slot values.
unsafe impl<T: Copy + Send> Sync for Backlog<T> {}
// SAFETY: as above; an owned region is freed once, by whoever holds the value.
unsafe impl<T: Copy + Send> Send for Backlog<T> {}

impl<T: Copy> Backlog<T> {
    fn slots_offset() -> usize {
        size_of::<RingHeader>().next_multiple_of(align_of::<Slot<T>>())
    }

    /// Bytes a region for `capacity` values needs.
    pub fn region_size(capacity: usize) -> usize {
        Self::slots_offset() + capacity * size_of::<Slot<T>>()
    }

    /// Alignment a region needs.
    pub fn region_align() -> usize {
        align_of::<RingHeader>().max(align_of::<Slot<T>>())
    }

    /// A queue holding up to `capacity` values (1..=[`MAX_BACKLOG`]), in a
    /// region of its own.
    ///
    /// # Panics
    /// If `capacity` is 0 or above [`MAX_BACKLOG`]; see [`Backlog::effective_capacity`].
    pub fn new(capacity: usize) -> Self {
        assert!(
            (1..=MAX_BACKLOG).contains(&capacity),
            "backlog capacity {capacity} out of range"
        );
        let layout = Layout::from_size_align(Self::region_size(capacity), Self::region_align())
            .expect("valid layout");
        // SAFETY: the layout has a non-zero size (the header alone is non-empty).
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(p) = NonNull::new(p) else {
            std::alloc::handle_alloc_error(layout)
        };
        // SAFETY: a fresh, exclusively owned, suitably aligned region of the right size.
        let mut q = unsafe { Self::init_in(p, layout.size(), capacity) }
            .expect("checked capacity and size");
        q.owned = Some(layout);
        q
    }

    /// Formats `len` bytes at `region` as an empty queue of `capacity`.
    ///
    /// # Errors
    /// [`RegionError`] if the capacity or the region does not fit.
    ///
    /// # Safety
    /// `region` must be valid for reads and writes of `len` bytes for as long
    /// as the returned value (and any attached to the same region) lives, and
    /// nobody may use the region while it is being formatted.
    pub unsafe fn init_in(
        region: NonNull<u8>,
        len: usize,
        capacity: usize,
    ) -> Result<Self, RegionError> {
        if !(1..=MAX_BACKLOG).contains(&capacity) {
            return Err(RegionError::Capacity);
        }
        if len < Self::region_size(capacity)
            || !(region.as_ptr() as usize).is_multiple_of(Self::region_align())
        {
            return Err(RegionError::Region);
        }
        let base = region.cast::<RingHeader>();
        // SAFETY: the caller gives exclusive access to an aligned region large
        // enough for the header and `capacity` slots; we write each once.
        unsafe {
            base.as_ptr().write(RingHeader {
                magic: AtomicU64::new(0),
                capacity: AtomicU64::new(capacity as u64),
                slot_size: AtomicU64::new(size_of::<Slot<T>>() as u64),
                head: CachePadded::new(AtomicU64::new(0)),
                tail: CachePadded::new(AtomicU64::new(0)),
            });
            let slots = region.as_ptr().add(Self::slots_offset()).cast::<Slot<T>>();
            for i in 0..capacity {
                slots.add(i).write(Slot {
                    stamp: AtomicU64::new(2 * i as u64),
                    value: UnsafeCell::new(MaybeUninit::uninit()),
                });
            }
            // Published last: an attacher that sees the magic sees the rest.
            (*base.as_ptr()).magic.store(MAGIC, Ordering::Release);
        }
        Ok(Self {
            base,
            capacity: capacity as u64,
            owned: None,
            _t: PhantomData,
        })
    }

    /// Opens a region formatted by [`Backlog::init_in`] (possibly in another
    /// process, at another address).
    ///
    /// # Errors
    /// [`RegionError`] if the region is too small, misaligned, unformatted, or
    /// formatted for another slot type.
    ///
    /// # Safety
    /// `region` must be valid for reads and writes of `len` bytes for as long
    /// as the returned value lives, and every other user of the region must
    /// access it only through a [`Backlog<T>`] of the same `T`.
    pub unsafe fn attach(region: NonNull<u8>, len: usize) -> Result<Self, RegionError> {
        if len < size_of::<RingHeader>()
            || !(region.as_ptr() as usize).is_multiple_of(Self::region_align())
        {
            return Err(RegionError::Region);
        }
        let base = region.cast::<RingHeader>();
        // SAFETY: the region holds at least a header, aligned; its fields are atomics.
        let h = unsafe { base.as_ref() };
        if h.magic.load(Ordering::Acquire) != MAGIC
            || h.slot_size.load(Ordering::Relaxed) != size_of::<Slot<T>>() as u64
        {
            return Err(RegionError::NotFormatted);
        }
        let capacity = h.capacity.load(Ordering::Relaxed);
        if capacity == 0 || capacity > MAX_BACKLOG as u64 {
            return Err(RegionError::Capacity);
        }
        if len < Self::region_size(capacity as usize) {
            return Err(RegionError::Region);
        }
        Ok(Self {
            base,
            capacity,
            owned: None,
            _t: PhantomData,
        })
    }

    /// The capacity a listen backlog request gets: at least 1, at most
    /// [`MAX_BACKLOG`] (negative or huge requests, SOMAXCONN included, mean the maximum).
    pub fn effective_capacity(requested: i64) -> usize {
        match requested {
            0 => 1,
            r if r < 0 => MAX_BACKLOG,
            r => (r as u64).min(MAX_BACKLOG as u64) as usize,
        }
    }

    /// The fixed capacity.
    pub fn capacity(&self) -> usize {
        self.capacity as usize
    }

    fn header(&self) -> &RingHeader {
        // SAFETY: `base` points to a formatted header for the life of self.
        unsafe { self.base.as_ref() }
    }

    fn slot(&self, pos: u64) -> &Slot<T> {
        let i = (pos % self.capacity) as usize;
        debug_assert!(i < self.capacity as usize);
        // SAFETY: i < capacity, and the region holds `capacity` initialised
        // slots after the header (checked at init/attach).
        unsafe {
            &*self
                .base
                .as_ptr()
                .cast::<u8>()
                .add(Self::slots_offset())
                .cast::<Slot<T>>()
                .add(i)
        }
    }

    /// Appends `v`, or hands it back if the queue is full.
    ///
    /// # Errors
    /// `Err(v)` when full.
    pub fn push(&self, v: T) -> Result<(), T> {
        let tail = &self.header().tail;
        let mut pos = tail.load(Ordering::Relaxed);
        loop {
            let slot = self.slot(pos);
            let stamp = slot.stamp.load(Ordering::Acquire);
            let dif = stamp.wrapping_sub(2 * pos) as i64;
            if dif == 0 {
                // The slot is free for this position: claim the position.
                match tail.compare_exchange_weak(pos, pos + 1, Ordering::Relaxed, Ordering::Relaxed)
                {
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
                pos = tail.load(Ordering::Relaxed);
            }
        }
    }

    /// Takes the oldest value, if any.
    pub fn pop(&self) -> Option<T> {
        let head = &self.header().head;
        let mut pos = head.load(Ordering::Relaxed);
        loop {
            let slot = self.slot(pos);
            let stamp = slot.stamp.load(Ordering::Acquire);
            let dif = stamp.wrapping_sub(2 * pos + 1) as i64;
            if dif == 0 {
                match head.compare_exchange_weak(pos, pos + 1, Ordering::Relaxed, Ordering::Relaxed)
                {
                    Ok(_) => {
                        // SAFETY: the Acquire load saw stamp == 2 pos + 1, published
                        // after the value was written; winning the CAS makes this
                        // thread its only reader. T: Copy, so no drop is owed.
                        let v = unsafe { (*slot.value.get()).assume_init_read() };
                        slot.stamp
                            .store(2 * (pos + self.capacity), Ordering::Release);
                        return Some(v);
                    }
                    Err(cur) => pos = cur,
                }
            } else if dif < 0 {
                return None; // empty
            } else {
                pos = head.load(Ordering::Relaxed);
            }
        }
    }

    /// Looks at the oldest value without taking it (single consumer only: with
    /// one consumer the head cannot move under it).
    pub fn peek(&self) -> Option<T> {
        let pos = self.header().head.load(Ordering::Relaxed);
        let slot = self.slot(pos);
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
        let t = self.header().tail.load(Ordering::SeqCst);
        let h = self.header().head.load(Ordering::SeqCst);
        t.saturating_sub(h).min(self.capacity) as usize
    }

    /// Whether nothing is queued (a snapshot).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T: Copy> Drop for Backlog<T> {
    fn drop(&mut self) {
        if let Some(layout) = self.owned {
            // SAFETY: allocated in `new` with this layout and freed only here.
            unsafe { std::alloc::dealloc(self.base.as_ptr().cast(), layout) };
        }
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

    /// The region works at another address: format it, fill it, copy its bytes
    /// elsewhere (as a second mapping would show them), attach there and drain.
    #[test]
    fn region_is_position_independent() {
        type Q = Backlog<[u64; 2]>;
        let size = Q::region_size(5);
        // Room for the region after an aligning offset of up to `align - 1` bytes.
        let words = (size + Q::region_align()).div_ceil(8);
        let mut a = vec![0u64; words];
        let mut b = vec![0u64; words];
        let pa = NonNull::new(a.as_mut_ptr().cast::<u8>()).unwrap();
        let pb = NonNull::new(b.as_mut_ptr().cast::<u8>()).unwrap();
        // 64-byte alignment may be required (cache padding): find aligned offsets.
        let align = Q::region_align();
        let off = |p: NonNull<u8>| (align - p.as_ptr() as usize % align) % align;
        let (oa, ob) = (off(pa), off(pb));
        // SAFETY: both vectors outlive the queues and hold `size` bytes past the offsets.
        unsafe {
            let ra = NonNull::new_unchecked(pa.as_ptr().add(oa));
            let rb = NonNull::new_unchecked(pb.as_ptr().add(ob));
            let q = Q::init_in(ra, size, 5).unwrap();
            for i in 0..7u64 {
                let _ = q.push([i, !i]);
            }
            assert_eq!(q.pop(), Some([0, !0]));
            std::ptr::copy_nonoverlapping(ra.as_ptr(), rb.as_ptr(), size);
            let q2 = Q::attach(rb, size).unwrap();
            assert_eq!(q2.capacity(), 5);
            let rest: Vec<u64> = std::iter::from_fn(|| q2.pop()).map(|v| v[0]).collect();
            assert_eq!(rest, vec![1, 2, 3, 4]);
            assert_eq!(Q::attach(rb, size - 1).err(), Some(RegionError::Region));
            assert_eq!(
                Backlog::<u8>::attach(rb, size).err(),
                Some(RegionError::NotFormatted),
                "another slot type"
            );
            assert_eq!(Q::init_in(rb, size, 0).err(), Some(RegionError::Capacity));
        }
        let mut zero = vec![0u64; words];
        let pz = NonNull::new(zero.as_mut_ptr().cast::<u8>()).unwrap();
        // SAFETY: as above.
        let r = unsafe { Q::attach(NonNull::new_unchecked(pz.as_ptr().add(off(pz))), size) };
        assert_eq!(r.err(), Some(RegionError::NotFormatted));
    }

    /// Several producers, one consumer: every value arrives exactly once, each
    /// producer's values in order, and the queue never holds more than its capacity.
    #[test]
    fn stress_many_producers_one_consumer() {
        let producers = 4u64;
        let per = if cfg!(miri) { 50 } else { 200_000 };
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
                        std::thread::yield_now();
                    }
                }
                refused
            }));
        }
        let mut next = vec![0u64; producers as usize];
        let mut got = 0;
        while got < producers * per {
            assert!(q.len() <= 7);
            match q.pop() {
                Some(v) => {
                    let (p, i) = ((v >> 32) as usize, v & 0xffff_ffff);
                    assert_eq!(i, next[p], "producer {p} out of order");
                    next[p] += 1;
                    got += 1;
                }
                None => std::thread::yield_now(),
            }
        }
        let refused: u64 = hs.into_iter().map(|h| h.join().unwrap()).sum();
        assert!(q.pop().is_none());
        assert!(next.iter().all(|&n| n == per));
        // With capacity 7 and 4 producers the queue is full at times.
        assert!(refused > 0 || cfg!(miri));
    }
}
