//! A single-producer, single-consumer ring of 64-byte slots in shared memory.
//!
//! ## Who writes what
//!
//! | part | written by | read by |
//! |---|---|---|
//! | header (magic, capacity) | whoever formats the ring (the daemon), once | the attaching side, once |
//! | `head` (own cache line) | the consumer | the producer |
//! | `tail` (own cache line) | the producer | the consumer |
//! | slot `i % capacity` | the producer, while `tail - head < capacity` | the consumer, while `head < tail` |
//!
//! Each side keeps **its own copy** of the index it owns and of the capacity,
//! and only *reads* the other side's index, once per operation. An index that
//! cannot be right (the other side claims more than `capacity` entries, or
//! moved backwards) is reported as a [`Violation`], never retried: a process
//! that scribbles over the ring cannot make the daemon loop, and the daemon
//! never believes a value it owns when it is read back from shared memory.
//!
//! Slots are read and written as eight relaxed 64-bit atomics and handed out
//! as owned copies: a message is copied out of shared memory once and then
//! parsed (see [`crate::msg`]), so concurrent scribbling can only produce a
//! value that fails to parse.
//!
//! Ordering: the producer writes the slot, then stores `tail` with Release;
//! the consumer loads `tail` with Acquire, copies the slot, then stores `head`
//! with Release; the producer loads `head` with Acquire before it reuses a slot.
#![allow(unsafe_code)]

use crate::sys::Mapping;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Bytes in a slot.
pub const SLOT: usize = 64;
/// One slot's contents.
pub type Slot = [u8; SLOT];
/// Largest capacity of a ring.
pub const MAX_CAPACITY: usize = 1 << 16;
/// Marks a formatted ring ("dsanRING").
const MAGIC: u64 = 0x6473_616e_5249_4e47;
const HEAD_OFF: usize = 64;
const TAIL_OFF: usize = 128;
const SLOTS_OFF: usize = 192;

/// Bytes needed for a ring of `capacity` slots.
pub const fn region_size(capacity: usize) -> usize {
    SLOTS_OFF + capacity * SLOT
}

/// The other side broke the ring's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// The other side's index claims more entries than the ring holds, or went backwards.
    #[error("ring index out of range")]
    Index,
}

/// Why a push failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// The ring holds `capacity` entries.
    #[error("ring full")]
    Full,
    /// See [`Violation`].
    #[error(transparent)]
    Violation(#[from] Violation),
}

/// Why a ring could not be formatted or attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// Capacity 0 or above [`MAX_CAPACITY`], or larger than the area.
    #[error("ring capacity out of range")]
    Capacity,
    /// The area is misaligned or too small for a header.
    #[error("ring area too small or misaligned")]
    Area,
    /// Not formatted as a ring.
    #[error("not a formatted ring")]
    NotFormatted,
}

/// The raw view both ends share.
#[derive(Debug)]
struct Raw {
    base: NonNull<u8>,
    cap: u64,
}

// SAFETY: the ring is shared memory accessed only through atomics.
unsafe impl Send for Raw {}

impl Raw {
    fn word(&self, off: usize) -> &AtomicU64 {
        // SAFETY: `off` is one of the header offsets or inside the slots, all
        // inside the area the constructor checked, 8-byte aligned (the base is
        // 64-byte aligned), and the memory lives as long as the caller promised.
        unsafe { &*self.base.as_ptr().add(off).cast::<AtomicU64>() }
    }
    fn head(&self) -> &AtomicU64 {
        self.word(HEAD_OFF)
    }
    fn tail(&self) -> &AtomicU64 {
        self.word(TAIL_OFF)
    }
    fn slot_word(&self, index: u64, w: usize) -> &AtomicU64 {
        self.word(SLOTS_OFF + (index % self.cap) as usize * SLOT + w * 8)
    }
    fn write(&self, index: u64, s: &Slot) {
        for (w, chunk) in s.chunks_exact(8).enumerate() {
            let v = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            self.slot_word(index, w).store(v, Ordering::Relaxed);
        }
    }
    fn read(&self, index: u64) -> Slot {
        let mut s = [0u8; SLOT];
        for (w, chunk) in s.chunks_exact_mut(8).enumerate() {
            chunk.copy_from_slice(
                &self
                    .slot_word(index, w)
                    .load(Ordering::Relaxed)
                    .to_le_bytes(),
            );
        }
        s
    }

    /// # Safety
    /// `base..base+len` must be valid shared memory for as long as the result lives.
    unsafe fn check(base: NonNull<u8>, len: usize) -> Result<(), FormatError> {
        if !(base.as_ptr() as usize).is_multiple_of(64) || len < SLOTS_OFF {
            return Err(FormatError::Area);
        }
        Ok(())
    }
}

/// Formats `len` bytes at `base` as an empty ring of `capacity` slots.
///
/// # Safety
/// `base..base+len` must be valid, 64-byte aligned shared memory that nobody
/// else uses while it is formatted, and must outlive the returned ends.
///
/// # Errors
/// See [`FormatError`].
pub unsafe fn format(
    base: NonNull<u8>,
    len: usize,
    capacity: usize,
) -> Result<(Producer, Consumer), FormatError> {
    // SAFETY: forwarded from the caller.
    unsafe { Raw::check(base, len) }?;
    if capacity == 0 || capacity > MAX_CAPACITY || region_size(capacity) > len {
        return Err(FormatError::Capacity);
    }
    let raw = Raw {
        base,
        cap: capacity as u64,
    };
    raw.head().store(0, Ordering::Relaxed);
    raw.tail().store(0, Ordering::Relaxed);
    raw.word(8).store(capacity as u64, Ordering::Relaxed);
    raw.word(0).store(MAGIC, Ordering::Release);
    let raw2 = Raw {
        base,
        cap: capacity as u64,
    };
    Ok((
        Producer {
            raw,
            tail: 0,
            _keep: None,
        },
        Consumer {
            raw: raw2,
            head: 0,
            _keep: None,
        },
    ))
}

/// Reads the capacity of a ring formatted by the other side (trusted: the
/// daemon formats every ring an application attaches to).
///
/// # Safety
/// As [`format`], except that the area was formatted elsewhere.
unsafe fn attach_raw(base: NonNull<u8>, len: usize) -> Result<Raw, FormatError> {
    // SAFETY: forwarded from the caller.
    unsafe { Raw::check(base, len) }?;
    let probe = Raw { base, cap: 1 };
    if probe.word(0).load(Ordering::Acquire) != MAGIC {
        return Err(FormatError::NotFormatted);
    }
    let cap = probe.word(8).load(Ordering::Relaxed);
    if cap == 0 || cap > MAX_CAPACITY as u64 || region_size(cap as usize) > len {
        return Err(FormatError::Capacity);
    }
    Ok(Raw { base, cap })
}

/// Opens the producing end of a ring formatted elsewhere.
///
/// # Safety
/// As [`format()`]; nobody else may produce into this ring.
///
/// # Errors
/// See [`FormatError`].
pub unsafe fn attach_producer(base: NonNull<u8>, len: usize) -> Result<Producer, FormatError> {
    // SAFETY: forwarded from the caller.
    let raw = unsafe { attach_raw(base, len) }?;
    let tail = raw.tail().load(Ordering::Acquire);
    Ok(Producer {
        raw,
        tail,
        _keep: None,
    })
}

/// Opens the consuming end of a ring formatted elsewhere.
///
/// # Safety
/// As [`format()`]; nobody else may consume from this ring.
///
/// # Errors
/// See [`FormatError`].
pub unsafe fn attach_consumer(base: NonNull<u8>, len: usize) -> Result<Consumer, FormatError> {
    // SAFETY: forwarded from the caller.
    let raw = unsafe { attach_raw(base, len) }?;
    let head = raw.head().load(Ordering::Acquire);
    Ok(Consumer {
        raw,
        head,
        _keep: None,
    })
}

/// The producing end.
#[derive(Debug)]
pub struct Producer {
    raw: Raw,
    tail: u64,
    /// Keeps the mapping the ring lives in alive (ends made by [`crate::region::Region`]).
    _keep: Option<Arc<Mapping>>,
}

impl Producer {
    pub(crate) fn keeping(mut self, m: Arc<Mapping>) -> Self {
        self._keep = Some(m);
        self
    }

    /// Capacity in slots (this side's own copy).
    pub fn capacity(&self) -> usize {
        self.raw.cap as usize
    }

    /// Entries the consumer has not taken yet.
    ///
    /// # Errors
    /// [`Violation`] if the consumer's index is impossible.
    pub fn len(&self) -> Result<usize, Violation> {
        let head = self.raw.head().load(Ordering::Acquire);
        let used = self.tail.wrapping_sub(head);
        if used > self.raw.cap {
            return Err(Violation::Index);
        }
        Ok(used as usize)
    }

    /// Whether the consumer has taken everything.
    ///
    /// # Errors
    /// As [`Producer::len`].
    pub fn is_empty(&self) -> Result<bool, Violation> {
        self.len().map(|n| n == 0)
    }

    /// Appends one slot.
    ///
    /// # Errors
    /// [`PushError::Full`], or a violation of the consumer.
    pub fn push(&mut self, s: &Slot) -> Result<(), PushError> {
        if self.len()? as u64 == self.raw.cap {
            return Err(PushError::Full);
        }
        self.raw.write(self.tail, s);
        self.tail += 1;
        self.raw.tail().store(self.tail, Ordering::Release);
        Ok(())
    }
}

/// The consuming end.
#[derive(Debug)]
pub struct Consumer {
    raw: Raw,
    head: u64,
    /// Keeps the mapping the ring lives in alive (ends made by [`crate::region::Region`]).
    _keep: Option<Arc<Mapping>>,
}

impl Consumer {
    pub(crate) fn keeping(mut self, m: Arc<Mapping>) -> Self {
        self._keep = Some(m);
        self
    }

    /// Capacity in slots (this side's own copy).
    pub fn capacity(&self) -> usize {
        self.raw.cap as usize
    }

    /// Takes the oldest slot (a copy), or `None` if the ring is empty.
    ///
    /// # Errors
    /// [`Violation`] if the producer's index is impossible.
    pub fn pop(&mut self) -> Result<Option<Slot>, Violation> {
        let tail = self.raw.tail().load(Ordering::Acquire);
        let avail = tail.wrapping_sub(self.head);
        if avail > self.raw.cap {
            return Err(Violation::Index);
        }
        if avail == 0 {
            return Ok(None);
        }
        let s = self.raw.read(self.head);
        self.head += 1;
        self.raw.head().store(self.head, Ordering::Release);
        Ok(Some(s))
    }

    /// Whether a slot is waiting (a violation counts as "no").
    pub fn has_next(&self) -> bool {
        let avail = self
            .raw
            .tail()
            .load(Ordering::Acquire)
            .wrapping_sub(self.head);
        avail != 0 && avail <= self.raw.cap
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 64-byte aligned heap memory for a ring.
    struct Area(Vec<[u64; 8]>);
    impl Area {
        fn new(capacity: usize) -> Area {
            // Vec<[u64; 8]> is only 8-aligned: one spare line to align by hand.
            Area(vec![[0u64; 8]; region_size(capacity) / 64 + 2])
        }
        fn base(&mut self) -> (NonNull<u8>, usize) {
            let p = self.0.as_mut_ptr().cast::<u8>();
            let skip = p.align_offset(64);
            // SAFETY: skip < 64 and the vector has one spare line for it.
            let p = unsafe { p.add(skip) };
            (NonNull::new(p).unwrap(), self.0.len() * 64 - skip)
        }
    }

    fn slot(v: u8) -> Slot {
        [v; SLOT]
    }

    #[test]
    fn fifo_full_and_empty() {
        let mut a = Area::new(3);
        let (b, l) = a.base();
        // SAFETY: the area outlives the ends (same scope).
        let (mut p, mut c) = unsafe { format(b, l, 3) }.unwrap();
        assert_eq!(c.pop(), Ok(None));
        for i in 0..3 {
            p.push(&slot(i)).unwrap();
        }
        assert_eq!(p.push(&slot(9)), Err(PushError::Full));
        assert_eq!(p.len(), Ok(3));
        assert_eq!(c.pop(), Ok(Some(slot(0))));
        p.push(&slot(3)).unwrap();
        for i in 1..4 {
            assert_eq!(c.pop(), Ok(Some(slot(i))));
        }
        assert_eq!(c.pop(), Ok(None));
        assert!(!c.has_next());
    }

    #[test]
    fn impossible_indices_are_violations_not_loops() {
        let mut a = Area::new(4);
        let (b, l) = a.base();
        // SAFETY: as above.
        let (mut p, mut c) = unsafe { format(b, l, 4) }.unwrap();
        p.push(&slot(1)).unwrap();
        // A hostile consumer moves head past tail.
        p.raw.head().store(7, Ordering::Relaxed);
        assert_eq!(
            p.push(&slot(2)),
            Err(PushError::Violation(Violation::Index))
        );
        // A hostile producer claims more than the capacity.
        c.raw.tail().store(100, Ordering::Relaxed);
        assert_eq!(c.pop(), Err(Violation::Index));
        assert!(!c.has_next());
        // Our own copies are untouched: restoring the shared words restores the ring.
        p.raw.head().store(0, Ordering::Relaxed);
        c.raw.tail().store(1, Ordering::Relaxed);
        assert_eq!(c.pop(), Ok(Some(slot(1))));
    }

    #[test]
    fn attach_sees_the_same_ring() {
        let mut a = Area::new(8);
        let (b, l) = a.base();
        // SAFETY: as above; each end is used by one side only.
        let (mut p, _) = unsafe { format(b, l, 8) }.unwrap();
        p.push(&slot(5)).unwrap();
        // SAFETY: as above.
        let mut c = unsafe { attach_consumer(b, l) }.unwrap();
        assert_eq!(c.capacity(), 8);
        assert_eq!(c.pop(), Ok(Some(slot(5))));
        assert_eq!(p.len(), Ok(0));
        let mut bad = Area::new(1);
        let (bb, bl) = bad.base();
        // SAFETY: as above.
        let unformatted = unsafe { attach_producer(bb, bl) }.err();
        assert_eq!(unformatted, Some(FormatError::NotFormatted));
        // SAFETY: as above.
        let too_big = unsafe { format(b, l, MAX_CAPACITY + 1) }.err();
        assert_eq!(too_big, Some(FormatError::Capacity));
    }

    #[test]
    fn two_threads_pass_everything_in_order() {
        let mut a = Area::new(16);
        let (b, l) = a.base();
        // SAFETY: as above; the area outlives both threads (joined below).
        let (mut p, mut c) = unsafe { format(b, l, 16) }.unwrap();
        let n = if cfg!(miri) { 2_000u64 } else { 200_000u64 };
        let t = std::thread::spawn(move || {
            let mut i = 0u64;
            while i < n {
                let mut s = [0u8; SLOT];
                s[..8].copy_from_slice(&i.to_le_bytes());
                s[56..].copy_from_slice(&(!i).to_le_bytes());
                match p.push(&s) {
                    Ok(()) => i += 1,
                    Err(PushError::Full) => std::hint::spin_loop(),
                    Err(e) => panic!("{e}"),
                }
            }
        });
        let mut want = 0u64;
        while want < n {
            if let Some(s) = c.pop().unwrap() {
                let v = u64::from_le_bytes(s[..8].try_into().unwrap());
                let w = u64::from_le_bytes(s[56..].try_into().unwrap());
                assert_eq!((v, w), (want, !want));
                want += 1;
            }
        }
        t.join().unwrap();
    }
}
