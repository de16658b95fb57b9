//! Established connections, their table and retransmission backoff (the
//! close handshake is in `endpoint`, "Established connections").

use super::slab::{Slab, Slots};
use super::types::*;
use crate::time::Instant;
use crate::wire::{EthernetAddress, Ipv4, Offer};
use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

/// Which side opened a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// We connected.
    Client,
    /// We accepted.
    Server,
}

/// How frames name a connection: (peer address, connection id, our role).
pub(super) type WireKey = (Ipv4, u64, Role);

/// An established (or closing) connection: 48 bytes. The close and
/// confirmation retransmissions, which few connections have at a time, are
/// kept by the endpoint beside its `closing` and `confirming` indexes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connection {
    /// Wire connection id (chosen by the client).
    pub conn_id: u64,
    /// Our token (the peer echoes it).
    pub my_token: u64,
    /// The peer's token.
    pub peer_token: u64,
    /// Our address.
    pub local: SockAddr,
    /// The peer's address.
    pub peer: SockAddr,
    /// The peer's MAC.
    pub peer_mac: EthernetAddress,
    /// Who opened it.
    pub role: Role,
    /// The largest Data payload both sides take (the smaller offer).
    pub mss: u16,
    /// The peer's offered receive window in KiB (our first credit; rings
    /// are whole KiB).
    peer_window_kib: u16,
    /// [`CLOSING`], [`CONFIRMING`] and [`CLOSE_PENDING`].
    pub(super) flags: u8,
}

/// We started closing (the Close is retransmitted).
pub(super) const CLOSING: u8 = 1;
/// An accepted connection whose client has not confirmed the accept yet
/// (the Accept is retransmitted).
pub(super) const CONFIRMING: u8 = 2;
/// The application closed it while it was [`CONFIRMING`]: the Close waits
/// for the client's confirmation (no Close goes to an unproven source).
pub(super) const CLOSE_PENDING: u8 = 4;

/// The connections of an endpoint: a [`Slab`] indexed by the handle's slot
/// (a handle is its connection's `my_token`, which the slot's entry must
/// match), and the wire index, (peer address, connection id, role) -> slot,
/// a hash table of bare slot numbers keyed through the slab's entries.
/// Connect attempts take their slot (and so their handle) when they start.
#[derive(Default)]
pub(super) struct ConnTable {
    slab: Slab<Connection>,
    slots: Slots,
    by_wire: hashbrown::HashTable<u32>,
    hasher: RandomState,
}

impl ConnTable {
    /// A new handle, its slot taken (`tag` is its random part).
    pub(super) fn new_handle(&mut self, tag: u32) -> ConnHandle {
        ConnHandle::new(self.slots.take(), tag)
    }
    /// Gives back the slot of a handle that holds no connection (a connect
    /// attempt that ended without one, or a stream that outlived its
    /// connection).
    pub(super) fn release(&mut self, h: ConnHandle) {
        debug_assert!(self.get(&h).is_none());
        self.slots.give(h.slot() as u32);
    }
    /// Takes the slot of `h`, whose connection is gone, for a stream that
    /// opens after it (see `HOLDS_SLOT`). False if another connection has
    /// the slot now.
    pub(super) fn hold(&mut self, h: ConnHandle) -> bool {
        self.get(&h).is_none() && self.slots.take_exact(h.slot() as u32)
    }
    #[inline]
    pub(super) fn get(&self, h: &ConnHandle) -> Option<&Connection> {
        self.slab.get(h.slot()).filter(|c| c.my_token == h.0)
    }
    #[inline]
    pub(super) fn get_mut(&mut self, h: &ConnHandle) -> Option<&mut Connection> {
        self.slab.get_mut(h.slot()).filter(|c| c.my_token == h.0)
    }
    /// Adds the connection of handle `h` (from [`ConnTable::new_handle`];
    /// `c.my_token` is `h`).
    pub(super) fn insert(&mut self, h: ConnHandle, c: Connection) {
        debug_assert_eq!(c.my_token, h.0);
        let hash = self.hasher.hash_one(c.wire_key());
        let old = self.slab.insert(h.slot(), c);
        debug_assert!(old.is_none());
        // (Growing the index re-hashes its entries from the slab, where
        // every indexed slot, this one included, is occupied.)
        let (slab, hasher) = (&self.slab, &self.hasher);
        self.by_wire.insert_unique(hash, h.slot() as u32, |&s| {
            let c = slab.get(s as usize).expect("indexed slot is occupied");
            hasher.hash_one(c.wire_key())
        });
    }
    /// Removes the connection of `h` and frees its slot, unless `keep_slot`
    /// (its stream still lives there: the slot is given back with
    /// [`ConnTable::release`] when the stream goes).
    pub(super) fn remove(&mut self, h: &ConnHandle, keep_slot: bool) -> Option<Connection> {
        self.get(h)?;
        let c = self.slab.remove(h.slot()).expect("checked");
        let hash = self.hasher.hash_one(c.wire_key());
        if let Ok(e) = self.by_wire.find_entry(hash, |&s| s as usize == h.slot()) {
            e.remove();
        }
        if !keep_slot {
            self.slots.give(h.slot() as u32);
        }
        Some(c)
    }
    /// The connection a frame names.
    #[inline]
    pub(super) fn by_wire(&self, key: WireKey) -> Option<ConnHandle> {
        let hash = self.hasher.hash_one(key);
        let s = self.by_wire.find(hash, |&s| {
            self.slab
                .get(s as usize)
                .is_some_and(|c| c.wire_key() == key)
        })?;
        Some(ConnHandle(self.slab.get(*s as usize)?.my_token))
    }
    pub(super) fn len(&self) -> usize {
        self.slab.len()
    }
    pub(super) fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }
    /// Slots taken by connections and connect attempts.
    pub(super) fn slots_taken(&self) -> usize {
        self.slots.taken()
    }
    pub(super) fn iter(&self) -> impl Iterator<Item = (ConnHandle, &Connection)> {
        self.slab.iter().map(|(_, c)| (ConnHandle(c.my_token), c))
    }
}

impl std::ops::Index<&ConnHandle> for ConnTable {
    type Output = Connection;
    fn index(&self, h: &ConnHandle) -> &Connection {
        self.get(h).expect("a known connection")
    }
}

/// Accepts sent to a client that has not confirmed yet, at most (the
/// first and one retransmission): a forged request makes this host send
/// no more than that toward the forged source.
pub const ACCEPT_SENDS: u8 = 2;

/// Retransmissions with exponential backoff until a budget runs out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Retry {
    pub(super) give_up: Instant,
    pub(super) next: Instant,
    pub(super) rto: Duration,
}

impl Retry {
    pub(super) fn start(now: Instant, budget: Duration, rto: Duration) -> Retry {
        Retry {
            give_up: now + budget,
            next: now + rto,
            rto,
        }
    }
    pub(super) fn timer(&self) -> Instant {
        self.give_up.min(self.next)
    }
    /// The next retransmission after one at `now`.
    pub(super) fn backed_off(self, now: Instant, max: Duration) -> Retry {
        let rto = (self.rto * 2).min(max);
        Retry {
            next: now + rto,
            rto,
            ..self
        }
    }
}

impl Connection {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        role: Role,
        local: SockAddr,
        peer: SockAddr,
        peer_mac: EthernetAddress,
        conn_id: u64,
        my_token: u64,
        peer_token: u64,
        (my_offer, peer_offer): (Offer, Offer),
    ) -> Connection {
        Connection {
            conn_id,
            my_token,
            peer_token,
            local,
            peer,
            peer_mac,
            role,
            mss: my_offer.mss.min(peer_offer.mss),
            peer_window_kib: (peer_offer.window >> 10).min(u32::from(u16::MAX)) as u16,
            flags: 0,
        }
    }

    /// How its frames name it: (peer address, connection id, our role).
    #[inline]
    pub(super) fn wire_key(&self) -> WireKey {
        (self.peer.0, self.conn_id, self.role)
    }

    /// The peer's receive window as offered at setup, rounded down to a
    /// KiB: our first credit.
    pub fn peer_window(&self) -> u32 {
        u32::from(self.peer_window_kib) << 10
    }

    /// What its byte stream starts from.
    pub fn stream_params(&self) -> super::StreamParams {
        super::StreamParams {
            mss: self.mss,
            peer_window: self.peer_window(),
        }
    }

    /// Whether we are closing it (or will, once its client confirms it).
    #[inline]
    pub fn is_closing(&self) -> bool {
        self.flags & (CLOSING | CLOSE_PENDING) != 0
    }

    /// Whether the peer is known to hold it (a client always; a server once
    /// its accept was confirmed).
    #[inline]
    pub fn is_confirmed(&self) -> bool {
        self.flags & CONFIRMING == 0
    }
}
