//! The accepting side: listeners, the requests pending on them, and the
//! application's decisions.
//!
//! A listener's queue belongs to the application (in dsand, the listener's
//! backlog ring in the process's shared region). The core keeps a count per
//! listener, which the capacity bounds, and each pending request by its
//! [`RequestKey`], so that an answer is matched by key and never by position.

use super::connection::{Connection, Role};
use super::endpoint::Endpoint;
use super::rng::Rng;
use super::tombstone::Tomb;
use super::types::*;
use crate::time::Instant;
use crate::wire::{EthernetAddress, Ipv4, Message, Offer, RejectReason, SanHeader};
use dsan_channel::region::{effective_backlog, MAX_BACKLOG};
use std::collections::VecDeque;

/// A request waiting for the application's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Incoming {
    /// The connecting peer.
    pub peer: SockAddr,
    /// The local address it asked for.
    pub local: SockAddr,
    /// Its MAC.
    pub peer_mac: EthernetAddress,
    /// Wire connection id.
    pub conn_id: u64,
    /// The client's token.
    pub client_token: u64,
    /// When it arrived.
    pub arrived: Instant,
    /// The client's receive window and frame size.
    pub offer: Offer,
}

impl Incoming {
    /// The key the application answers it by.
    pub fn key(&self) -> RequestKey {
        RequestKey {
            peer_ip: self.peer.0,
            conn_id: self.conn_id,
        }
    }

    /// The header the request arrived with (to answer it as `reject` does).
    fn header(&self, my_mac: EthernetAddress) -> SanHeader {
        SanHeader {
            dst_mac: my_mac,
            src_mac: self.peer_mac,
            src_ip: self.peer.0,
            src_port: self.peer.1,
            dst_ip: self.local.0,
            dst_port: self.local.1,
        }
    }
}

#[derive(Debug)]
pub(super) struct Listener {
    pub(super) addr: SockAddr,
    pub(super) capacity: usize,
    /// Requests pending on it (handed to the application, not yet answered
    /// or expired).
    pub(super) live: usize,
}

/// Requests for a port with no listener at all, waiting for a fresh scan of
/// the kernel's TCP listeners before their answer (at most this many; more
/// are answered `TcpOnly` at once).
pub(super) const MAX_UNSURE: usize = 4096;
/// How long a request waits for that scan before it is answered `TcpOnly`
/// (the scanner is stuck or gone: TCP decides).
pub(super) const UNSURE_WAIT: std::time::Duration = std::time::Duration::from_millis(20);
/// How often those requests are looked at while they wait (a scan takes
/// about 0.1 ms).
pub(super) const UNSURE_POLL: std::time::Duration = std::time::Duration::from_micros(50);

/// A request waiting for a fresh scan of the kernel's TCP listeners.
#[derive(Debug, Clone, Copy)]
pub(super) struct Unsure {
    pub(super) header: SanHeader,
    pub(super) key: RequestKey,
    pub(super) client_token: u64,
    /// From [`super::config::PortSet::ask`].
    pub(super) ticket: u64,
    pub(super) arrived: Instant,
}

/// One source address's pending requests: how many, and their connection
/// ids in arrival order (answered ones are skipped lazily).
#[derive(Debug, Default)]
pub(super) struct SourceShare {
    pub(super) live: usize,
    pub(super) order: VecDeque<(u64, Instant)>,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Pending {
    pub(super) listener: ListenerId,
    pub(super) inc: Incoming,
}

impl<R: Rng> Endpoint<R> {
    /// Listens on `addr` (a SAN address of this host, or 0.0.0.0 for all) with
    /// a backlog of `backlog` requests (see [`effective_backlog`]).
    ///
    /// # Errors
    /// See [`ListenError`].
    pub fn listen(&mut self, addr: SockAddr, backlog: i64) -> Result<ListenerId, ListenError> {
        if !addr.0.is_unspecified() && !self.is_ours(addr.0) {
            return Err(ListenError::AddrNotAvailable);
        }
        let clash = self.listener_by_addr.keys().any(|(ip, port)| {
            *port == addr.1 && (*ip == addr.0 || ip.is_unspecified() || addr.0.is_unspecified())
        });
        if clash {
            return Err(ListenError::AddrInUse);
        }
        if self.listeners.len() >= self.cfg.max_listeners {
            return Err(ListenError::TooManyListeners);
        }
        let capacity = effective_backlog(backlog).min(MAX_BACKLOG);
        let id = ListenerId(self.id());
        self.listeners.insert(
            id,
            Listener {
                addr,
                capacity,
                live: 0,
            },
        );
        self.listener_by_addr.insert(addr, id);
        Ok(id)
    }

    /// Listens on `addr` in place of listener `from`, which holds it: new
    /// requests for `addr` go to the new listener; `from` keeps what it has
    /// and gets nothing more (a forked worker taking its parent's SAN side).
    ///
    /// # Errors
    /// [`ListenError::AddrInUse`] if `from` is not the listener of `addr`;
    /// as [`listen`](Self::listen).
    pub fn listen_over(
        &mut self,
        addr: SockAddr,
        backlog: i64,
        from: ListenerId,
    ) -> Result<ListenerId, ListenError> {
        if self.listener_by_addr.get(&addr) != Some(&from) {
            return Err(ListenError::AddrInUse);
        }
        self.listener_by_addr.remove(&addr);
        self.listen(addr, backlog).inspect_err(|_| {
            self.listener_by_addr.insert(addr, from);
        })
    }

    /// The listener that requests for exactly `addr` go to.
    pub fn listener_at(&self, addr: SockAddr) -> Option<ListenerId> {
        self.listener_by_addr.get(&addr).copied()
    }

    /// Closes a listener: every request still pending on it is refused to its
    /// peer (`ListenerClosed`, ECONNREFUSED there), in arrival order.
    ///
    /// # Errors
    /// [`CloseError::Unknown`] for an unknown listener.
    pub fn close_listener(&mut self, now: Instant, id: ListenerId) -> Result<(), CloseError> {
        let l = self.listeners.remove(&id).ok_or(CloseError::Unknown)?;
        // (A listener whose address was taken over holds no index entry.)
        if self.listener_by_addr.get(&l.addr) == Some(&id) {
            self.listener_by_addr.remove(&l.addr);
        }
        if l.live == 0 {
            return Ok(());
        }
        let mine: Vec<RequestKey> = self
            .pending_order
            .iter()
            .filter(|(k, arrived)| {
                self.pending
                    .get(k)
                    .is_some_and(|p| p.listener == id && p.inc.arrived == *arrived)
            })
            .map(|(k, _)| *k)
            .collect();
        for k in mine {
            if let Some(p) = self.unpend(k) {
                let h = p.inc.header(self.mac);
                self.reject(
                    now,
                    &h,
                    p.inc.conn_id,
                    p.inc.client_token,
                    RejectReason::ListenerClosed,
                );
            }
        }
        Ok(())
    }

    /// A request arrived (or a retransmission of one).
    pub(super) fn on_request(
        &mut self,
        now: Instant,
        h: &SanHeader,
        conn_id: u64,
        client_token: u64,
        offer: Offer,
    ) {
        self.stats.requests_received += 1;
        let key = RequestKey {
            peer_ip: h.src_ip,
            conn_id,
        };
        // An accepted connection: replay the accept.
        if let Some(ch) = self.conns.by_wire((h.src_ip, conn_id, Role::Server)) {
            let c = self.conns[&ch];
            if c.peer_token != client_token {
                self.stats.bad_token += 1;
                return;
            }
            // Replayed even while closing: the close retransmissions follow.
            // Once confirmed the client holds the connection and ignores
            // the replay; until then the offer is kept with the retries.
            let offer = self.confirming.get(&ch).map_or(
                Offer {
                    window: 0,
                    mss: c.mss,
                },
                |e| e.1,
            );
            self.stats.replayed_accepts += 1;
            self.emit(
                h.src_mac,
                c.local,
                c.peer,
                Message::Accept {
                    conn_id,
                    client_token,
                    server_token: c.my_token,
                    offer,
                },
            );
            return;
        }
        // Still pending: one entry only.
        if let Some(p) = self.pending.get(&key) {
            if p.inc.client_token == client_token {
                self.stats.duplicate_requests += 1;
            } else {
                self.stats.bad_token += 1;
            }
            return;
        }
        // Answered before: the same answer.
        if self.replay(h, key, client_token) {
            return;
        }
        let lid = self
            .listener_by_addr
            .get(&(h.dst_ip, h.dst_port))
            .or_else(|| self.listener_by_addr.get(&(Ipv4::UNSPECIFIED, h.dst_port)))
            .copied();
        let Some(lid) = lid else {
            let why = match self.cfg.tcp_listening.clone() {
                Some(p) if p.contains(h.dst_port) => RejectReason::TcpOnly,
                // Nothing known to listen: "no listener" is final for the
                // client (no fallback to TCP), so it is said only when TCP
                // would surely fail too: after a scan of the kernel's
                // listeners that began after this request arrived (a
                // service may have started a moment ago).
                Some(p) => {
                    if self.unsure.iter().any(|u| u.key == key) {
                        self.stats.duplicate_requests += 1;
                        return;
                    }
                    if self.unsure.len() < MAX_UNSURE {
                        if self.unsure.is_empty() {
                            self.unsure_check = now + UNSURE_POLL;
                        }
                        self.unsure.push_back(Unsure {
                            header: *h,
                            key,
                            client_token,
                            ticket: p.ask(),
                            arrived: now,
                        });
                        return;
                    }
                    // Too many to check: the answer that lets TCP decide.
                    RejectReason::TcpOnly
                }
                None => RejectReason::NoListener,
            };
            return self.reject(now, h, conn_id, client_token, why);
        };
        let l = &self.listeners[&lid];
        if l.live >= l.capacity {
            // [SEED] refused at once, and no event.
            return self.reject(now, h, conn_id, client_token, RejectReason::BacklogFull);
        }
        // One source's share of the pending requests is full: its oldest
        // request makes room (forgotten without an answer, as a dropped
        // frame: its client retransmits and queues again). A forger using a
        // real client's address so cannot lock it out: each of the client's
        // requests is queued and stays until as many newer ones came from
        // that address.
        let from_source = self.pending_by_source.get(&h.src_ip).map_or(0, |s| s.live);
        if from_source >= self.cfg.max_half_open_per_source {
            self.displace_oldest(h.src_ip);
        }
        if self.pending.len() >= self.cfg.max_half_open {
            return self.reject(now, h, conn_id, client_token, RejectReason::NoResources);
        }
        let inc = Incoming {
            peer: (h.src_ip, h.src_port),
            local: (h.dst_ip, h.dst_port),
            peer_mac: h.src_mac,
            conn_id,
            client_token,
            arrived: now,
            offer,
        };
        self.listeners.get_mut(&lid).expect("listener exists").live += 1;
        let share = self.pending_by_source.entry(h.src_ip).or_default();
        share.live += 1;
        share.order.push_back((conn_id, now));
        self.pending.insert(key, Pending { listener: lid, inc });
        self.pending_order.push_back((key, now));
        self.events.push_back(Event::Incoming {
            listener: lid,
            request: inc,
        });
    }

    /// Takes a request out of the pending set (answered, expired or refused).
    fn unpend(&mut self, key: RequestKey) -> Option<Pending> {
        let p = self.pending.remove(&key)?;
        if let Some(share) = self.pending_by_source.get_mut(&key.peer_ip) {
            share.live -= 1;
            if share.live == 0 {
                self.pending_by_source.remove(&key.peer_ip);
            } else if share.order.len() > 2 * share.live + 8 {
                // Answered entries are skipped lazily; keep the queue near
                // the live count (amortised: at most once per `live` answers).
                let pending = &self.pending;
                share.order.retain(|&(conn_id, arrived)| {
                    pending
                        .get(&RequestKey {
                            peer_ip: key.peer_ip,
                            conn_id,
                        })
                        .is_some_and(|p| p.inc.arrived == arrived)
                });
            }
        }
        if let Some(l) = self.listeners.get_mut(&p.listener) {
            l.live -= 1;
        }
        // Answered requests at the head of the arrival order go now (so the
        // queue holds little more than the live requests).
        while let Some(&(k, arrived)) = self.pending_order.front() {
            if self
                .pending
                .get(&k)
                .is_some_and(|p| p.inc.arrived == arrived)
            {
                break;
            }
            self.pending_order.pop_front();
        }
        Some(p)
    }

    /// Forgets the oldest pending request from `src` (no answer, no
    /// tombstone: a retransmission is a new request).
    fn displace_oldest(&mut self, src: Ipv4) {
        let Some(share) = self.pending_by_source.get_mut(&src) else {
            return;
        };
        while let Some((conn_id, arrived)) = share.order.pop_front() {
            let key = RequestKey {
                peer_ip: src,
                conn_id,
            };
            if self
                .pending
                .get(&key)
                .is_some_and(|p| p.inc.arrived == arrived)
            {
                self.unpend(key);
                self.stats.displaced += 1;
                return;
            }
        }
    }

    /// Answers the pending request `key` that arrived on listener `id`.
    /// Returns the new connection for [`Decision::Accept`], `None` otherwise.
    ///
    /// # Errors
    /// See [`AcceptError`]; on error nothing changes.
    pub fn decide(
        &mut self,
        now: Instant,
        id: ListenerId,
        key: RequestKey,
        d: Decision,
    ) -> Result<Option<ConnHandle>, AcceptError> {
        self.decide_with(now, id, key, d, self.cfg.offer(Offer::DEFAULT.window))
    }

    /// [`decide`](Self::decide), offering the client `offer` on accept.
    ///
    /// # Errors
    /// See [`AcceptError`]; on error nothing changes.
    pub fn decide_with(
        &mut self,
        now: Instant,
        id: ListenerId,
        key: RequestKey,
        d: Decision,
        offer: Offer,
    ) -> Result<Option<ConnHandle>, AcceptError> {
        if !self.listeners.contains_key(&id) {
            return Err(AcceptError::UnknownListener);
        }
        if self.pending.get(&key).is_none_or(|p| p.listener != id) {
            self.stats.stale_decisions += 1;
            return Err(AcceptError::Stale);
        }
        match d {
            Decision::Defer => Ok(None),
            Decision::Accept if self.conns.len() >= self.cfg.max_connections => {
                Err(AcceptError::TooManyConnections)
            }
            Decision::Reject => {
                let inc = self.unpend(key).expect("checked").inc;
                let h = inc.header(self.mac);
                self.reject(
                    now,
                    &h,
                    inc.conn_id,
                    inc.client_token,
                    RejectReason::Refused,
                );
                Ok(None)
            }
            Decision::Accept => {
                let inc = self.unpend(key).expect("checked").inc;
                self.stats.accepted += 1;
                // The handle is our token (see `ConnTable`).
                let ch = self.conns.new_handle(self.rng.next_u64() as u32);
                let server_token = ch.0;
                let c = Connection::new(
                    Role::Server,
                    inc.local,
                    inc.peer,
                    inc.peer_mac,
                    inc.conn_id,
                    server_token,
                    inc.client_token,
                    (offer, inc.offer),
                );
                self.conns.insert(ch, c);
                self.await_confirmation(now, ch, offer);
                self.emit(
                    inc.peer_mac,
                    inc.local,
                    inc.peer,
                    Message::Accept {
                        conn_id: inc.conn_id,
                        client_token: inc.client_token,
                        server_token,
                        offer,
                    },
                );
                Ok(Some(ch))
            }
        }
    }

    /// Refuses a pending request whose place in the application's queue could
    /// not be taken (the I/O edge found the ring full or broken): the peer
    /// learns `reason` at once.
    pub fn refuse(&mut self, now: Instant, key: RequestKey, reason: RejectReason) {
        if let Some(p) = self.unpend(key) {
            let h = p.inc.header(self.mac);
            self.reject(now, &h, p.inc.conn_id, p.inc.client_token, reason);
        }
    }

    /// Answers the requests that waited for a scan of the kernel's TCP
    /// listeners: `TcpOnly` if the port has one now (or no scan came in
    /// time), `NoListener` if a scan that began after the request shows none.
    pub(super) fn settle_unsure(&mut self, now: Instant) {
        if self.unsure.is_empty() {
            return;
        }
        let Some(set) = self.cfg.tcp_listening.clone() else {
            return;
        };
        self.unsure_check = now + UNSURE_POLL;
        while let Some(u) = self.unsure.front().copied() {
            let fresh = set.fresh_since(u.ticket);
            if !fresh && u.arrived + UNSURE_WAIT > now {
                break;
            }
            self.unsure.pop_front();
            let why = if fresh && !set.contains(u.header.dst_port) {
                RejectReason::NoListener
            } else {
                self.stats.unsure_to_tcp += u64::from(!fresh);
                RejectReason::TcpOnly
            };
            self.reject(now, &u.header, u.key.conn_id, u.client_token, why);
        }
    }

    /// Drops requests pending longer than the connect budget: their clients
    /// have given up, so nothing is sent; a retransmission (from a client with
    /// a longer budget) is answered `Refused` from the tombstone.
    pub(super) fn expire_requests(&mut self, now: Instant) {
        while let Some(&(key, arrived)) = self.pending_order.front() {
            let live = self
                .pending
                .get(&key)
                .is_some_and(|p| p.inc.arrived == arrived);
            if live && arrived + self.cfg.connect_budget > now {
                break;
            }
            self.pending_order.pop_front();
            if !live {
                continue; // answered already
            }
            let p = self.unpend(key).expect("live");
            self.stats.expired += 1;
            self.remember(
                now,
                key,
                Tomb::Refused {
                    client_token: p.inc.client_token,
                    reason: RejectReason::Refused,
                },
            );
        }
    }
}
