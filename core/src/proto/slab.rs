//! Connection tables without hash-table slack.
//!
//! A [`ConnHandle`] names a slot: its low 32 bits are the slot's index, its
//! high 32 bits are random and nonzero, so that a handle kept after its
//! connection ended (in a queue, a timer, an event not yet read) does not
//! find the slot's next occupant. The handle is also the connection's own
//! token (`Connection::my_token`, the value its peer echoes), so the core's
//! table checks a handle against what the slot holds without storing it
//! twice.
//!
//! A [`Slab`] keeps its entries in fixed chunks of [`CHUNK`] slots: it
//! grows by one chunk at a time (never doubling, never moving entries), so
//! its unused room is less than one chunk at any size.

use super::types::ConnHandle;

/// Slots per chunk of a [`Slab`].
pub const CHUNK: usize = 64;

impl ConnHandle {
    /// The handle of slot `slot`, with `tag` (made nonzero) as its random
    /// part.
    pub fn new(slot: u32, tag: u32) -> Self {
        Self((u64::from(tag.max(1)) << 32) | u64::from(slot))
    }
    /// Its random part.
    pub fn tag(self) -> u32 {
        (self.0 >> 32) as u32
    }
    /// The slot it names.
    pub fn slot(self) -> usize {
        (self.0 & 0xffff_ffff) as usize
    }
}

/// Slot indices: the lowest never used, then the ones given back (the most
/// recently freed first, whose memory is warm).
#[derive(Debug, Default)]
pub struct Slots {
    next: u32,
    free: Vec<u32>,
}

impl Slots {
    /// A free slot, now taken.
    pub fn take(&mut self) -> u32 {
        self.free.pop().unwrap_or_else(|| {
            let s = self.next;
            self.next += 1;
            s
        })
    }
    /// Takes slot `slot` if it is free (it was given back, or never used).
    /// Linear in the free slots: for rare cases only.
    pub fn take_exact(&mut self, slot: u32) -> bool {
        if slot >= self.next {
            // Never used: the slots between become free ones.
            self.free.extend(self.next..slot);
            self.next = slot + 1;
            return true;
        }
        match self.free.iter().position(|s| *s == slot) {
            Some(i) => {
                self.free.swap_remove(i);
                true
            }
            None => false,
        }
    }
    /// Gives a taken slot back.
    pub fn give(&mut self, slot: u32) {
        debug_assert!(slot < self.next && !self.free.contains(&slot));
        self.free.push(slot);
    }
    /// Slots taken now.
    pub fn taken(&self) -> usize {
        self.next as usize - self.free.len()
    }
}

/// Entries by slot index, in chunks of [`CHUNK`].
pub struct Slab<T> {
    chunks: Vec<Box<[Option<T>]>>,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Self {
            chunks: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Slab<T> {
    /// The entry in slot `i`.
    pub fn get(&self, i: usize) -> Option<&T> {
        self.chunks.get(i / CHUNK)?[i % CHUNK].as_ref()
    }
    /// The entry in slot `i`, to change.
    pub fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        self.chunks.get_mut(i / CHUNK)?[i % CHUNK].as_mut()
    }
    /// Puts `v` in slot `i`; returns what was there.
    pub fn insert(&mut self, i: usize, v: T) -> Option<T> {
        while self.chunks.len() <= i / CHUNK {
            self.chunks.push(
                (0..CHUNK)
                    .map(|_| None)
                    .collect::<Vec<_>>()
                    .into_boxed_slice(),
            );
        }
        let old = self.chunks[i / CHUNK][i % CHUNK].replace(v);
        if old.is_none() {
            self.len += 1;
        }
        old
    }
    /// Empties slot `i`; returns what was there.
    pub fn remove(&mut self, i: usize) -> Option<T> {
        let old = self.chunks.get_mut(i / CHUNK)?[i % CHUNK].take();
        if old.is_some() {
            self.len -= 1;
        }
        old
    }
    /// Occupied slots.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether no slot is occupied.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The occupied slots, in index order.
    pub fn iter(&self) -> impl Iterator<Item = (usize, &T)> {
        self.chunks
            .iter()
            .flat_map(|c| c.iter())
            .enumerate()
            .filter_map(|(i, e)| e.as_ref().map(|v| (i, v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_reused_and_entries_found_by_index() {
        let mut slots = Slots::default();
        let mut slab = Slab::default();
        let a: Vec<u32> = (0..200).map(|_| slots.take()).collect();
        for &s in &a {
            assert!(slab.insert(s as usize, s * 10).is_none());
        }
        assert_eq!(
            (slab.len(), slab.chunks.len()),
            (200, 200usize.div_ceil(CHUNK))
        );
        assert_eq!(slab.remove(70), Some(700));
        assert_eq!(slab.remove(70), None);
        slots.give(70);
        assert_eq!(slots.take(), 70);
        assert_eq!(slots.take(), 200);
        assert_eq!(slab.get(71), Some(&710));
        assert_eq!(slab.get(70), None);
        assert_eq!(slab.get(100_000), None);
        assert_eq!(slab.iter().count(), 199);
        assert_eq!(slots.taken(), 201);
    }

    #[test]
    fn a_handle_names_its_slot_and_is_never_zero() {
        let h = ConnHandle::new(7, 0);
        assert_eq!(h.slot(), 7);
        assert_ne!(h.0 >> 32, 0);
        assert_ne!(ConnHandle::new(7, 5), ConnHandle::new(7, 6));
    }
}
