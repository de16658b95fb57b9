//! Established connections and the close handshake.

use super::endpoint::{Endpoint, WireKey};
use super::rng::Rng;
use super::slab::{Slab, Slots};
use super::tombstone::Tomb;
use super::types::*;
use crate::time::Instant;
use crate::wire::{EthernetAddress, Message, Offer, ResetReason, SanHeader};
use std::collections::BTreeMap;
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
    flags: u8,
}

/// We started closing (the Close is retransmitted).
const CLOSING: u8 = 1;
/// An accepted connection whose client has not confirmed the accept yet
/// (the Accept is retransmitted).
const CONFIRMING: u8 = 2;
/// The application closed it while it was [`CONFIRMING`]: the Close waits
/// for the client's confirmation (no Close goes to an unproven source).
const CLOSE_PENDING: u8 = 4;

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
    /// attempt that ended without one).
    pub(super) fn release(&mut self, h: ConnHandle) {
        debug_assert!(self.get(&h).is_none());
        self.slots.give(h.slot() as u32);
    }
    pub(super) fn get(&self, h: &ConnHandle) -> Option<&Connection> {
        self.slab.get(h.slot()).filter(|c| c.my_token == h.0)
    }
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
    /// Removes the connection of `h` and frees its slot.
    pub(super) fn remove(&mut self, h: &ConnHandle) -> Option<Connection> {
        self.get(h)?;
        let c = self.slab.remove(h.slot()).expect("checked");
        let hash = self.hasher.hash_one(c.wire_key());
        if let Ok(e) = self.by_wire.find_entry(hash, |&s| s as usize == h.slot()) {
            e.remove();
        }
        self.slots.give(h.slot() as u32);
        Some(c)
    }
    /// The connection a frame names.
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
    give_up: Instant,
    next: Instant,
    rto: Duration,
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
    fn backed_off(self, now: Instant, max: Duration) -> Retry {
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
    pub fn is_closing(&self) -> bool {
        self.flags & (CLOSING | CLOSE_PENDING) != 0
    }

    /// Whether the peer is known to hold it (a client always; a server once
    /// its accept was confirmed).
    pub fn is_confirmed(&self) -> bool {
        self.flags & CONFIRMING == 0
    }
}

impl<R: Rng> Endpoint<R> {
    /// Closes a connection (a `Close` is retransmitted until acknowledged or
    /// the close budget runs out), or abandons a connect attempt in progress
    /// (nothing is sent; a late accept will be answered with a close).
    ///
    /// # Errors
    /// [`CloseError::Unknown`] for an unknown or already closing handle.
    pub fn close(&mut self, now: Instant, h: ConnHandle) -> Result<(), CloseError> {
        if self.abandon(h) {
            return Ok(());
        }
        let c = self.conns.get_mut(&h).ok_or(CloseError::Unknown)?;
        if c.is_closing() {
            return Err(CloseError::Unknown);
        }
        if c.flags & CONFIRMING != 0 {
            // Its client has not proven its address: the Close waits for
            // the confirmation (see `confirm_timers`), and goes nowhere if
            // none comes.
            c.flags |= CLOSE_PENDING;
            return Ok(());
        }
        self.start_close(now, h);
        Ok(())
    }

    /// Starts the close handshake of `h` (known, not closing yet).
    fn start_close(&mut self, now: Instant, h: ConnHandle) {
        let c = self.conns.get_mut(&h).expect("known");
        // The close handshake takes over from the confirmation.
        c.flags = CLOSING;
        let c = *c;
        self.confirming.remove(&h);
        self.closing.insert(
            h,
            Retry::start(now, self.cfg.close_budget, self.cfg.initial_rto),
        );
        self.send_close(&c);
    }

    /// A server connection starts waiting for its client's confirmation (an
    /// AcceptAck, or any stream frame with our token: only the client that
    /// got our Accept knows it). Until then the source is unproven (a
    /// request may carry a victim's forged addresses), so the Accept is sent
    /// again at most once ([`ACCEPT_SENDS`] in all) and nothing else goes to
    /// it: the stream waits (see [`Endpoint::is_unconfirmed`]), and a client
    /// that never confirms within the close budget is forgotten without a
    /// Close; the application is told the connection closed. A real client
    /// whose Accept was lost retransmits its request, and each request is
    /// answered with the Accept again (one frame per frame received).
    pub(super) fn await_confirmation(&mut self, now: Instant, h: ConnHandle, offer: Offer) {
        if let Some(c) = self.conns.get_mut(&h) {
            c.flags |= CONFIRMING;
            self.confirming.insert(
                h,
                (
                    Retry::start(now, self.cfg.close_budget, self.cfg.initial_rto),
                    offer,
                    1,
                ),
            );
        }
    }

    /// Whether `h` is a server connection whose client has not confirmed
    /// it yet: nothing but the Accept may be sent to it.
    pub fn is_unconfirmed(&self, h: ConnHandle) -> bool {
        self.conns
            .get(&h)
            .is_some_and(|c| c.flags & CONFIRMING != 0)
    }

    /// The client of server connection `ch` proved itself (an AcceptAck, or
    /// a stream frame carrying our token).
    fn confirmed(&mut self, ch: ConnHandle) {
        let Some(c) = self.conns.get_mut(&ch) else {
            return;
        };
        c.flags &= !CONFIRMING;
        if c.flags & CLOSE_PENDING != 0 {
            // Closed by its application meanwhile: the close handshake
            // starts at once (from the timers, which know the time).
            if let Some(e) = self.confirming.get_mut(&ch) {
                e.0.next = Instant(0);
            }
            return;
        }
        self.confirming.remove(&ch);
    }

    fn send_accept(&mut self, c: &Connection, offer: Offer) {
        self.emit(
            c.peer_mac,
            c.local,
            c.peer,
            Message::Accept {
                conn_id: c.conn_id,
                client_token: c.peer_token,
                server_token: c.my_token,
                offer,
            },
        );
    }

    pub(super) fn on_accept_ack(&mut self, h: &SanHeader, conn_id: u64, token: u64) {
        match self.conns.by_wire((h.src_ip, conn_id, Role::Server)) {
            Some(ch) if self.conns[&ch].my_token == token => self.confirmed(ch),
            Some(_) => self.stats.bad_token += 1,
            None => self.stats.late_replies += 1,
        }
    }

    /// The entries of `set` whose retransmission (picked by `which`) is due.
    fn due<T: Copy>(
        set: &BTreeMap<ConnHandle, T>,
        which: fn(&T) -> Retry,
        now: Instant,
    ) -> Vec<(ConnHandle, T)> {
        set.iter()
            .filter(|(_, v)| which(v).timer() <= now)
            .map(|(h, v)| (*h, *v))
            .collect()
    }

    /// Sends (or resends) the Close of a connection we are closing.
    fn send_close(&mut self, c: &Connection) {
        self.emit(
            c.peer_mac,
            c.local,
            c.peer,
            Message::Close {
                conn_id: c.conn_id,
                token: c.peer_token,
            },
        );
    }

    /// Accept retransmissions of unconfirmed server connections (at most
    /// [`ACCEPT_SENDS`] Accepts in all), and give-ups: a client that never
    /// confirmed is forgotten without a Close (its source was never proven;
    /// a late frame from a real one is answered by the tombstone or a Reset).
    pub(super) fn confirm_timers(&mut self, now: Instant) {
        for (h, (r, offer, sent)) in Self::due(&self.confirming, |e| e.0, now) {
            let flags = self.conns[&h].flags;
            if flags & CLOSE_PENDING != 0 && flags & CONFIRMING == 0 {
                // Confirmed after its application closed it: close now.
                self.confirming.remove(&h);
                self.start_close(now, h);
                continue;
            }
            if r.give_up <= now {
                self.stats.unconfirmed += 1;
                if flags & CLOSE_PENDING == 0 {
                    self.events.push_back(Event::Closed { conn: h });
                }
                self.remove_conn(now, h);
                continue;
            }
            if sent >= ACCEPT_SENDS {
                // Nothing more to send: wait for the give-up.
                let wait = Retry {
                    next: r.give_up,
                    ..r
                };
                self.confirming.insert(h, (wait, offer, sent));
                continue;
            }
            let c = self.conns[&h];
            self.confirming
                .insert(h, (r.backed_off(now, self.cfg.max_rto), offer, sent + 1));
            self.send_accept(&c, offer);
        }
    }

    pub(super) fn remove_conn(&mut self, now: Instant, h: ConnHandle) -> Option<Connection> {
        self.remove_conn_as(now, h, None)
    }

    /// [`remove_conn`](Self::remove_conn), for a connection that ended with
    /// a reset (`Some(reason)`): a client that retransmits its request later
    /// is told so, not that it closed.
    pub(super) fn remove_conn_as(
        &mut self,
        now: Instant,
        h: ConnHandle,
        reset: Option<ResetReason>,
    ) -> Option<Connection> {
        let c = self.conns.remove(&h)?;
        self.closing.remove(&h);
        self.confirming.remove(&h);
        if c.role == Role::Server {
            // The client may still be retransmitting its request (our accept
            // lost): it must learn "accepted, then closed", never a refusal.
            self.remember(
                now,
                RequestKey {
                    peer_ip: c.peer.0,
                    conn_id: c.conn_id,
                },
                Tomb::Closed {
                    client_token: c.peer_token,
                    server_token: c.my_token,
                    reset,
                    unconfirmed: c.flags & CONFIRMING != 0,
                },
            );
        }
        Some(c)
    }

    fn conn_for(&self, h: &SanHeader, conn_id: u64) -> Option<ConnHandle> {
        [Role::Server, Role::Client]
            .into_iter()
            .find_map(|r| self.conns.by_wire((h.src_ip, conn_id, r)))
    }

    pub(super) fn on_close(&mut self, now: Instant, h: &SanHeader, conn_id: u64, token: u64) {
        match self.conn_for(h, conn_id) {
            Some(ch) if self.conns[&ch].my_token == token => {
                let c = self
                    .remove_conn(now, ch)
                    .expect("indexed connection exists");
                if !c.is_closing() {
                    self.events.push_back(Event::Closed { conn: ch });
                }
            }
            Some(_) => {
                self.stats.bad_token += 1;
                return;
            }
            None => {
                if !self.accepted_then_closed(now, h, conn_id, token) {
                    return;
                }
            }
        }
        // Acknowledge (again, if our first ack was lost).
        self.reply(h, Message::CloseAck { conn_id, token });
    }

    pub(super) fn on_close_ack(&mut self, now: Instant, h: &SanHeader, conn_id: u64, token: u64) {
        match self.conn_for(h, conn_id) {
            Some(ch) if self.conns[&ch].is_closing() && self.conns[&ch].peer_token == token => {
                self.remove_conn(now, ch);
            }
            Some(_) => self.stats.bad_token += 1,
            None => self.stats.late_replies += 1,
        }
    }

    /// The connection a stream frame from `h` names, if its token is ours
    /// (a wrong token is counted). `None` also when unknown: the caller
    /// answers with [`Endpoint::reset_unknown`].
    ///
    /// # Errors
    /// `Err(false)` for an unknown connection (answer with a reset);
    /// `Err(true)` to drop the frame: a wrong token (counted), or a connect
    /// attempt to that peer still waiting for its Accept (the accepting side
    /// may send before its Accept arrives: its bytes come again).
    pub fn stream_conn(
        &mut self,
        h: &SanHeader,
        conn_id: u64,
        token: u64,
    ) -> Result<ConnHandle, bool> {
        // The token is our handle: its slot holds the connection (no hashing
        // on the data path).
        let ch = ConnHandle(token);
        if let Some(c) = self
            .conns
            .get(&ch)
            .filter(|c| c.conn_id == conn_id && c.peer.0 == h.src_ip)
        {
            if c.flags & CONFIRMING != 0 {
                self.confirmed(ch);
            }
            return Ok(ch);
        }
        let Some(ch) = self.conn_for(h, conn_id) else {
            let attempting = self
                .attempt_by_wire
                .get(&conn_id)
                .and_then(|a| self.attempts.get(a))
                .is_some_and(|a| a.peer.0 == h.src_ip && a.client_token == token);
            return Err(attempting);
        };
        if self.conns[&ch].my_token != token {
            self.stats.bad_token += 1;
            return Err(true);
        }
        if self.conns[&ch].flags & CONFIRMING != 0 {
            self.confirmed(ch);
        }
        Ok(ch)
    }

    /// The header and ids to send a stream frame on connection `c`:
    /// (header, conn_id, the peer's token).
    pub fn stream_route(&self, c: ConnHandle) -> Option<(SanHeader, u64, u64)> {
        let c = self.conns.get(&c)?;
        Some((
            SanHeader {
                dst_mac: c.peer_mac,
                src_mac: self.mac,
                src_ip: c.local.0,
                src_port: c.local.1,
                dst_ip: c.peer.0,
                dst_port: c.peer.1,
            },
            c.conn_id,
            c.peer_token,
        ))
    }

    /// Aborts a connection: a `Reset` goes to the peer (once; a lost one is
    /// answered again when the peer's next frame finds no connection), and
    /// the connection is gone. No event.
    pub fn reset(&mut self, now: Instant, h: ConnHandle, reason: ResetReason) {
        if self.abandon(h) {
            return;
        }
        if let Some(c) = self.remove_conn_as(now, h, Some(reason)) {
            self.stats.resets_sent += 1;
            self.emit(
                c.peer_mac,
                c.local,
                c.peer,
                Message::Reset {
                    conn_id: c.conn_id,
                    token: c.peer_token,
                    reason,
                },
            );
        }
    }

    /// Answers a stream frame for a connection this host does not have: a
    /// `Reset` echoing the frame's token (the sender checks it is the one it
    /// gave its peer).
    pub fn reset_unknown(&mut self, h: &SanHeader, conn_id: u64, token: u64) {
        self.stats.resets_sent += 1;
        self.reply(
            h,
            Message::Reset {
                conn_id,
                token,
                reason: ResetReason::NoConnection,
            },
        );
    }

    pub(super) fn on_reset(
        &mut self,
        now: Instant,
        h: &SanHeader,
        conn_id: u64,
        token: u64,
        reason: ResetReason,
    ) {
        let Some(ch) = self.conn_for(h, conn_id) else {
            return self.stats.late_replies += 1;
        };
        let c = self.conns[&ch];
        // A reset for a frame we sent echoes the peer's token; any other
        // carries ours.
        let ok = if reason == ResetReason::NoConnection {
            token == c.peer_token
        } else {
            token == c.my_token
        };
        if !ok {
            return self.stats.bad_token += 1;
        }
        self.stats.resets_received += 1;
        self.remove_conn_as(now, ch, Some(reason));
        self.events.push_back(Event::Reset { conn: ch, reason });
    }

    /// Close retransmissions and give-ups.
    pub(super) fn close_timers(&mut self, now: Instant) {
        for (h, r) in Self::due(&self.closing, |r| *r, now) {
            if r.give_up <= now {
                self.remove_conn(now, h);
                continue;
            }
            self.closing.insert(h, r.backed_off(now, self.cfg.max_rto));
            let c = self.conns[&h];
            self.send_close(&c);
        }
    }
}
