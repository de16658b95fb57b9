//! The connection state machines of one SAN host.
//!
//! An [`Endpoint`] holds the host's listeners, the connection requests that
//! wait for the application's answer, the connect attempts it makes, its
//! established connections with their byte streams and its address
//! resolution cache. It does no I/O and reads no clock:
//!
//! * inputs: [`Endpoint::handle_frame`] (a parsed SAN frame of any kind; a
//!   Data or Ack frame returns the [`Arrival`] of its payload),
//!   [`Endpoint::handle_timeout`], and the application's commands
//!   ([`listen`](Endpoint::listen), [`decide`](Endpoint::decide),
//!   [`connect`](Endpoint::connect), [`close`](Endpoint::close), ...), each
//!   with `now`;
//! * outputs, drained after every input until both are empty:
//!   [`poll_transmit`](Endpoint::poll_transmit) (frames to send),
//!   [`poll_event`](Endpoint::poll_event) (FD_ACCEPT / FD_CONNECT / closed),
//!   then [`poll_timeout`](Endpoint::poll_timeout) (when to call
//!   `handle_timeout` next).
//!
//! The parts, one file each: `server` (listeners, requests,
//! decisions), `client` (connect attempts),
//! `connection` (established connections and the close
//! handshake), `tombstone` (answers for finished
//! requests), `streams` (the byte streams; their interface is the last
//! section here, "Byte streams").
//!
//! Behaviour (WSD, `docs/wire-protocol.md` "Connection protocol"):
//! * a connect request for no listener is answered `Reject(NoListener)` at
//!   once; for a full backlog `Reject(BacklogFull)` at once **and no event is
//!   raised**; otherwise it becomes pending and one [`Event::Incoming`] hands
//!   it to the application, which owns the queue it waits in (the
//!   listener's backlog ring). The core keeps only what it needs to match the
//!   application's answer, by [`RequestKey`], and a count per listener;
//! * the application answers a request by its key with [`Decision::Accept`]
//!   (an `Accept` frame; established on both sides), [`Decision::Reject`]
//!   (`Reject(Refused)`), or [`Decision::Defer`] (stays pending); an answer
//!   for a request that is no longer pending fails and changes nothing;
//! * a request pending longer than the connect budget expires (its client
//!   has given up) and frees its place in the backlog;
//! * the connecting side retransmits with exponential backoff and gives up with
//!   [`ConnectFailure::TimedOut`] after the connect budget; it confirms an
//!   accept with `AcceptAck` (again for every duplicate), and the accepting
//!   side retransmits its accept until confirmed, so that it never keeps a
//!   connection its client does not have (a client that never confirms
//!   within the close budget is presumed gone: [`Event::Closed`]);
//! * every request is answered consistently: a retransmission never creates a
//!   second pending entry, one for an accepted connection replays the accept,
//!   one for a refused request replays the refusal, and one for an accepted
//!   connection that has since been closed replays the accept and the close
//!   (a tombstone remembers finished requests for longer than any client
//!   retries); late or duplicate replies for a finished attempt are ignored
//!   (a late accept is answered with a close, so the accepting side does not
//!   keep a connection nobody wants);
//! * frames whose token does not match are dropped and counted; all state is
//!   bounded (listeners, pending requests, attempts, tombstones).
//!
//! Every map the core iterates is ordered (or its keys are sorted before
//! use), so a seeded simulation replays the same schedule in any process.

use super::client::Attempt;
use super::config::{effective_backlog, MAX_BACKLOG};
use super::config::{ProtoConfig, Subnet};
use super::connection::{
    ConnTable, Connection, Retry, Role, ACCEPT_SENDS, CLOSE_PENDING, CLOSING, CONFIRMING,
};
use super::resolve::{Lookup, Resolver};
use super::rng::Rng;
use super::server::{Listener, Pending, SourceShare, Unsure, MAX_UNSURE, UNSURE_POLL, UNSURE_WAIT};
use super::stream::{BadIndex, Outgoing, Stream, StreamTiming, Timer};
use super::streams::{Streams, CLOSED, HELD, HOLDS_SLOT, PROBE, QUEUED};
use super::tombstone::{Expiring, Tomb};
use super::types::*;
use crate::time::Instant;
use crate::wire::{
    EthernetAddress, Ipv4, Message, Offer, RejectReason, Repr, ResetReason, SanHeader, Segment,
    SEG_PROBE, SEG_URG,
};
use std::collections::{BTreeMap, HashMap, VecDeque};

/// Bytes of one entry of the wire index (a slot number and the hash
/// table's control byte).
pub const WIRE_INDEX_ENTRY_BYTES: usize = std::mem::size_of::<u32>() + 1;

/// The protocol state of one SAN host. See the module documentation.
pub struct Endpoint<R: Rng> {
    pub(super) cfg: ProtoConfig,
    pub(super) mac: EthernetAddress,
    pub(super) addrs: Vec<Ipv4>,
    pub(super) rng: R,
    pub(super) resolver: Resolver,
    pub(super) listeners: BTreeMap<ListenerId, Listener>,
    pub(super) listener_by_addr: HashMap<SockAddr, ListenerId>,
    /// Requests waiting for the application's answer, by key.
    pub(super) pending: HashMap<RequestKey, Pending>,
    /// The same requests in arrival order, with their arrival time (expiry);
    /// entries whose request has been answered are skipped lazily.
    pub(super) pending_order: VecDeque<(RequestKey, Instant)>,
    /// Requests for a port nobody is known to listen on, waiting for a scan
    /// of the kernel's TCP listeners (in arrival order).
    pub(super) unsure: VecDeque<Unsure>,
    /// When to look at `unsure` again (every `UNSURE_POLL` while any wait).
    pub(super) unsure_check: Instant,
    /// Requests pending per source address, with their arrival order
    /// (entries at zero are removed).
    pub(super) pending_by_source: HashMap<Ipv4, SourceShare>,
    pub(super) conns: ConnTable,
    /// The connections we are closing (their timers), so that timer scans do
    /// not walk every connection.
    pub(super) closing: BTreeMap<ConnHandle, Retry>,
    /// Accepted connections whose client has not confirmed yet: the Accept's
    /// retransmissions and the offer it carries.
    /// Unconfirmed server connections: retry timer, the offer their Accept
    /// carries, Accepts sent so far.
    pub(super) confirming: BTreeMap<ConnHandle, (Retry, Offer, u8)>,
    pub(super) attempts: BTreeMap<ConnHandle, Attempt>,
    pub(super) attempt_by_wire: HashMap<u64, ConnHandle>,
    /// (peer ip, conn id) -> what became of a request, and when to forget it.
    pub(super) tombstones: Expiring<RequestKey, Tomb>,
    /// (server ip, conn id) -> why we reset that connection as its client:
    /// a retransmitted Accept for it (our Reset was lost) is answered with a
    /// Reset again, never with a clean Close.
    pub(super) client_resets: Expiring<(Ipv4, u64), ResetReason>,
    pub(super) transmits: VecDeque<Repr>,
    pub(super) events: VecDeque<Event>,
    /// The connections' byte streams, their timers and transmit queue.
    pub(super) streams: Streams,
    pub(super) next_id: u64,
    pub(super) next_port: u16,
    pub(super) stats: ProtoStats,
}

pub(super) const EPHEMERAL: std::ops::RangeInclusive<u16> = 49152..=65535;

impl<R: Rng> Endpoint<R> {
    /// An endpoint for a host with this MAC and these SAN addresses.
    pub fn new(cfg: ProtoConfig, mac: EthernetAddress, addrs: Vec<Ipv4>, mut rng: R) -> Self {
        let next_port = *EPHEMERAL.start() + (rng.next_u64() % 16384) as u16;
        Self {
            resolver: Resolver::new(cfg.resolve),
            cfg,
            mac,
            addrs,
            rng,
            listeners: BTreeMap::new(),
            listener_by_addr: HashMap::new(),
            pending: HashMap::new(),
            pending_order: VecDeque::new(),
            pending_by_source: HashMap::new(),
            unsure: VecDeque::new(),
            unsure_check: Instant(0),
            conns: ConnTable::default(),
            closing: BTreeMap::new(),
            confirming: BTreeMap::new(),
            attempts: BTreeMap::new(),
            attempt_by_wire: HashMap::new(),
            tombstones: Expiring::default(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            streams: Streams::default(),
            client_resets: Expiring::default(),
            next_id: 1,
            next_port,
            stats: ProtoStats::default(),
        }
    }

    // ----- getters -------------------------------------------------------

    /// Counters.
    pub fn stats(&self) -> &ProtoStats {
        &self.stats
    }
    /// This host's SAN addresses.
    pub fn addrs(&self) -> &[Ipv4] {
        &self.addrs
    }
    /// Replaces this host's SAN addresses (address changes at run time).
    pub fn set_addrs(&mut self, addrs: Vec<Ipv4>) {
        self.addrs = addrs;
    }
    /// Replaces the SAN subnets (address changes at run time).
    pub fn set_subnets(&mut self, subnets: Vec<Subnet>) {
        self.cfg.subnets = subnets;
    }
    /// The resolution cache.
    pub fn resolver(&self) -> &Resolver {
        &self.resolver
    }
    /// The resolution cache (for static entries).
    pub fn resolver_mut(&mut self) -> &mut Resolver {
        &mut self.resolver
    }
    /// Requests pending on a listener, and its capacity.
    pub fn backlog(&self, l: ListenerId) -> Option<(usize, usize)> {
        self.listeners.get(&l).map(|x| (x.live, x.capacity))
    }
    /// Every listener, in id order: id, address, pending requests, capacity.
    pub fn listeners(&self) -> impl Iterator<Item = (ListenerId, SockAddr, usize, usize)> + '_ {
        self.listeners
            .iter()
            .map(|(id, l)| (*id, l.addr, l.live, l.capacity))
    }
    /// A connection.
    pub fn connection(&self, c: ConnHandle) -> Option<&Connection> {
        self.conns.get(&c)
    }
    /// Every connection (in no particular order).
    pub fn connections(&self) -> impl Iterator<Item = (ConnHandle, &Connection)> {
        self.conns.iter()
    }
    /// A connect attempt in progress: (local address, peer address, wire connection id).
    pub fn attempt(&self, h: ConnHandle) -> Option<(SockAddr, SockAddr, u64)> {
        self.attempts.get(&h).map(|a| (a.local, a.peer, a.conn_id))
    }
    /// Connect attempts in progress.
    pub fn attempts_in_progress(&self) -> usize {
        self.attempts.len()
    }
    /// Requests pending on all listeners.
    pub fn queued_total(&self) -> usize {
        self.pending.len()
    }
    /// Whether an answer from a peer or from a local application is due
    /// shortly: a connect attempt, a request waiting for its application's
    /// decision, a close or an accept confirmation in flight.
    pub fn awaiting_answer(&self) -> bool {
        !(self.attempts.is_empty()
            && self.pending.is_empty()
            && self.closing.is_empty()
            && self.confirming.is_empty())
    }
    /// Remembered refusals.
    pub fn tombstones(&self) -> usize {
        self.tombstones.len()
    }
    /// Whether the endpoint holds no per-peer state at all (listeners,
    /// requests, attempts, connections, refusals, pending resolutions).
    pub fn is_quiescent(&self) -> bool {
        self.listeners.is_empty()
            && self.pending.is_empty()
            && self.pending_order.is_empty()
            && self.pending_by_source.is_empty()
            && self.unsure.is_empty()
            && self.conns.is_empty()
            && self.conns.slots_taken() == 0
            && self.attempts.is_empty()
            && self.attempt_by_wire.is_empty()
            && self.tombstones.is_empty()
            && self.client_resets.is_empty()
            && self.resolver.pending_len() == 0
    }

    // ----- outputs ---------------------------------------------------------

    /// The next frame to send.
    pub fn poll_transmit(&mut self) -> Option<Repr> {
        self.transmits.pop_front()
    }
    /// The next event for the application.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
    /// When [`Endpoint::handle_timeout`] must next be called, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [self.setup_timeout(), self.streams.next_timer()]
            .into_iter()
            .flatten()
            .min()
    }

    /// The next deadline of connection set-up and teardown (every timer
    /// but the streams').
    fn setup_timeout(&self) -> Option<Instant> {
        let a = self.attempts.values().map(Attempt::next_timer);
        let c = self
            .closing
            .values()
            .map(Retry::timer)
            .chain(self.confirming.values().map(|e| e.0.timer()));
        let t = [
            self.tombstones.next_expiry(),
            self.client_resets.next_expiry(),
        ]
        .into_iter()
        .flatten()
        .min();
        let p = self
            .pending_order
            .front()
            .map(|(_, arrived)| *arrived + self.cfg.connect_budget);
        // Requests waiting for a scan are looked at again shortly (their
        // answer is due as soon as the scan completes).
        let u = self.unsure.front().map(|_| self.unsure_check);
        a.chain(c)
            .chain(t)
            .chain(p)
            .chain(u)
            .chain(self.resolver.next_deadline())
            .min()
    }

    // ----- helpers ---------------------------------------------------------

    pub(super) fn id(&mut self) -> u64 {
        let i = self.next_id;
        self.next_id += 1;
        i
    }

    pub(super) fn emit(
        &mut self,
        dst_mac: EthernetAddress,
        local: SockAddr,
        peer: SockAddr,
        message: Message,
    ) {
        self.transmits.push_back(Repr {
            header: SanHeader {
                dst_mac,
                src_mac: self.mac,
                src_ip: local.0,
                src_port: local.1,
                dst_ip: peer.0,
                dst_port: peer.1,
            },
            message,
        });
    }

    /// Sends a frame back the way `h` came.
    pub(super) fn reply(&mut self, h: &SanHeader, message: Message) {
        self.emit(
            h.src_mac,
            (h.dst_ip, h.dst_port),
            (h.src_ip, h.src_port),
            message,
        );
    }

    pub(super) fn is_ours(&self, ip: Ipv4) -> bool {
        self.addrs.contains(&ip)
    }

    /// Refuses a request (arriving now, or pending until now) and remembers it.
    pub(super) fn reject(
        &mut self,
        now: Instant,
        h: &SanHeader,
        conn_id: u64,
        client_token: u64,
        reason: RejectReason,
    ) {
        self.stats.rejected[ProtoStats::reason_index(reason)] += 1;
        self.remember(
            now,
            RequestKey {
                peer_ip: h.src_ip,
                conn_id,
            },
            Tomb::Refused {
                client_token,
                reason,
            },
        );
        self.reply(
            h,
            Message::Reject {
                conn_id,
                client_token,
                reason,
            },
        );
    }

    // ----- inputs ----------------------------------------------------------

    /// A SAN frame addressed to this host (the caller has parsed it and
    /// checked the destination MAC). A Data or Ack frame that brings bytes
    /// or an acknowledgement to a stream returns what the edge does with
    /// its payload (see [`Arrival`]).
    pub fn handle_frame(&mut self, now: Instant, frame: &Repr) -> Option<Arrival> {
        let h = frame.header;
        if !self.is_ours(h.dst_ip) {
            self.stats.not_ours += 1;
            return None;
        }
        match frame.message {
            Message::ConnectRequest {
                conn_id,
                client_token,
                offer,
            } => self.on_request(now, &h, conn_id, client_token, offer),
            Message::Accept {
                conn_id,
                client_token,
                server_token,
                offer,
            } => self.on_accept(now, &h, conn_id, client_token, server_token, offer),
            Message::Reject {
                conn_id,
                client_token,
                reason,
            } => self.on_reject(now, &h, conn_id, client_token, reason),
            Message::Close { conn_id, token } => self.on_close(now, &h, conn_id, token),
            Message::CloseAck { conn_id, token } => self.on_close_ack(now, &h, conn_id, token),
            Message::AcceptAck { conn_id, token } => self.on_accept_ack(&h, conn_id, token),
            Message::ResolveRequest => {
                // A request teaches nothing unless we were asking for its
                // sender ourselves (then it answers our lookup).
                if self.resolver.on_reply(now, h.src_ip, h.src_mac) {
                    self.resolved(h.src_ip, h.src_mac);
                }
                if h.src_mac.is_multicast() {
                    self.stats.not_ours += 1; // never answer a multicast source
                    return None;
                }
                self.emit(
                    h.src_mac,
                    (h.dst_ip, 0),
                    (h.src_ip, 0),
                    Message::ResolveReply { mac: self.mac },
                );
            }
            Message::ResolveReply { mac } => {
                if self.resolver.on_reply(now, h.src_ip, mac) {
                    self.resolved(h.src_ip, mac);
                } else if !self.resolver.on_unsolicited(h.src_ip, mac) {
                    self.stats.late_replies += 1;
                }
            }
            Message::Reset {
                conn_id,
                token,
                reason,
            } => self.on_reset(now, &h, conn_id, token, reason),
            Message::Data(seg) => return self.on_segment(now, &h, &seg, true),
            Message::Ack(seg) => return self.on_segment(now, &h, &seg, false),
            Message::EchoRequest { .. } | Message::EchoReply { .. } => self.stats.unhandled += 1,
        }
        None
    }

    /// Retransmissions, give-ups and expiries due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.setup_timeout().is_some_and(|t| t <= now) {
            self.resolution_timers(now);
            self.attempt_timers(now);
            self.close_timers(now);
            self.confirm_timers(now);
            self.expire_requests(now);
            self.settle_unsure(now);
            self.expire_tombstones(now);
        }
        self.stream_timers(now);
    }
}

// ----------------------------------------------------------------------
// The client side: connect attempts, their answers and timers. (the types: `client.rs`)

impl<R: Rng> Endpoint<R> {
    /// Starts connecting to `dst` from `local_ip` (or this host's first
    /// address in the destination's subnet). The result arrives as
    /// [`Event::Connected`] or [`Event::ConnectFailed`].
    ///
    /// # Errors
    /// See [`ConnectError`].
    pub fn connect(
        &mut self,
        now: Instant,
        local_ip: Option<Ipv4>,
        dst: SockAddr,
    ) -> Result<ConnHandle, ConnectError> {
        self.connect_with(now, local_ip, dst, self.cfg.offer(Offer::DEFAULT.window))
    }

    /// [`connect`](Self::connect), offering the peer `offer` (our receive
    /// window and frame size).
    ///
    /// # Errors
    /// See [`ConnectError`].
    pub fn connect_with(
        &mut self,
        now: Instant,
        local_ip: Option<Ipv4>,
        dst: SockAddr,
        offer: Offer,
    ) -> Result<ConnHandle, ConnectError> {
        self.connect_from(now, local_ip, 0, dst, offer)
    }

    /// [`Endpoint::connect_with`] from local port `local_port` (0: one of
    /// the ephemeral range, in turn). The port names the connection only
    /// (the connection id identifies it on the wire); the application's
    /// kernel bind keeps two sockets of a host from sharing one.
    ///
    /// # Errors
    /// As [`Endpoint::connect_with`].
    pub fn connect_from(
        &mut self,
        now: Instant,
        local_ip: Option<Ipv4>,
        local_port: u16,
        dst: SockAddr,
        offer: Offer,
    ) -> Result<ConnHandle, ConnectError> {
        self.connect_for(now, 0, local_ip, local_port, dst, offer)
    }

    /// [`Endpoint::connect_from`] on behalf of `owner` (a user; 0 for
    /// none): if the destination must be resolved, the resolution counts in
    /// the owner's share of the resolver's table.
    ///
    /// # Errors
    /// As [`Endpoint::connect_with`], and [`ConnectError::ResolutionShare`]
    /// when that share is used up.
    pub fn connect_for(
        &mut self,
        now: Instant,
        owner: u32,
        local_ip: Option<Ipv4>,
        local_port: u16,
        dst: SockAddr,
        offer: Offer,
    ) -> Result<ConnHandle, ConnectError> {
        let subnet = self
            .cfg
            .subnets
            .iter()
            .find(|s| s.contains(dst.0))
            .copied()
            .ok_or(ConnectError::HostUnreachable)?;
        let src = match local_ip {
            Some(ip) if self.is_ours(ip) => ip,
            Some(_) => return Err(ConnectError::NoLocalAddress),
            None => self
                .addrs
                .iter()
                .copied()
                .find(|a| subnet.contains(*a))
                .or(self.addrs.first().copied())
                .ok_or(ConnectError::NoLocalAddress)?,
        };
        if self.attempts.len() >= self.cfg.max_attempts {
            return Err(ConnectError::TooManyAttempts);
        }
        if self.resolver.over_share(now, dst.0, owner) {
            return Err(ConnectError::ResolutionShare);
        }
        let mut conn_id = self.rng.next_u64();
        while self.attempt_by_wire.contains_key(&conn_id) {
            conn_id = self.rng.next_u64();
        }
        let port = if local_port != 0 {
            local_port
        } else {
            let p = self.next_port;
            self.next_port = if self.next_port == *EPHEMERAL.end() {
                *EPHEMERAL.start()
            } else {
                self.next_port + 1
            };
            p
        };
        // The handle is our token: the peer echoes it, and it names the
        // slot the connection will take.
        let h = self.conns.new_handle(self.rng.next_u64() as u32);
        let client_token = h.0;
        let lookup = self.resolver.lookup_for(now, dst.0, owner);
        let peer_mac = match lookup {
            Lookup::Found(m) => Some(m),
            Lookup::Pending | Lookup::Failed => None,
        };
        let rto = self.cfg.initial_rto;
        self.attempts.insert(
            h,
            Attempt {
                local: (src, port),
                peer: dst,
                peer_mac,
                conn_id,
                client_token,
                started: now,
                deadline: now + self.cfg.connect_budget,
                next_send: now + rto,
                rto,
                offer,
            },
        );
        self.attempt_by_wire.insert(conn_id, h);
        match lookup {
            Lookup::Found(_) => self.send_request(h),
            Lookup::Pending => self.resolution_timers(now), // sends the resolution request now
            Lookup::Failed => {
                // Nobody answered for this address a moment ago (or the
                // resolver is full): due at once, the next timer pass ends
                // it as the timeout would.
                self.stats.unresolved_fast += 1;
                if let Some(a) = self.attempts.get_mut(&h) {
                    a.deadline = now;
                }
            }
        }
        Ok(h)
    }

    /// Abandons a connect attempt in progress (nothing is sent; a late accept
    /// will be answered with a close). Returns whether `h` was an attempt.
    pub(super) fn abandon(&mut self, h: ConnHandle) -> bool {
        match self.attempts.remove(&h) {
            Some(a) => {
                self.attempt_by_wire.remove(&a.conn_id);
                self.conns.release(h);
                true
            }
            None => false,
        }
    }

    pub(super) fn finish_attempt(
        &mut self,
        now: Instant,
        h: ConnHandle,
        outcome: Result<(SanHeader, u64, Offer), ConnectFailure>,
    ) {
        let Some(a) = self.attempts.remove(&h) else {
            return;
        };
        self.attempt_by_wire.remove(&a.conn_id);
        match outcome {
            Ok((hdr, server_token, peer_offer)) => {
                self.stats.attempts[0] += 1;
                let d = now.saturating_since(a.started);
                let secs = d.as_secs_f64();
                let b = CONNECT_BUCKETS_S
                    .iter()
                    .position(|ub| secs <= *ub)
                    .unwrap_or(CONNECT_BUCKETS_S.len());
                self.stats.connect_duration_buckets[b] += 1;
                self.stats.connect_duration_sum_ns += d.as_nanos() as u64;
                let c = Connection::new(
                    Role::Client,
                    a.local,
                    a.peer,
                    hdr.src_mac,
                    a.conn_id,
                    a.client_token,
                    server_token,
                    (a.offer, peer_offer),
                );
                let params = c.stream_params();
                self.conns.insert(h, c);
                self.events.push_back(Event::Connected { conn: h, params });
            }
            Err(e) => {
                self.conns.release(h);
                self.stats.attempts[match e {
                    ConnectFailure::Refused(_) => 1,
                    ConnectFailure::Reset => 2,
                    ConnectFailure::TimedOut => 3,
                }] += 1;
                self.events
                    .push_back(Event::ConnectFailed { conn: h, error: e });
            }
        }
    }

    fn send_request(&mut self, h: ConnHandle) {
        let Some(a) = self.attempts.get(&h) else {
            return;
        };
        let Some(mac) = a.peer_mac else { return };
        let (local, peer, m) = (
            a.local,
            a.peer,
            Message::ConnectRequest {
                conn_id: a.conn_id,
                client_token: a.client_token,
                offer: a.offer,
            },
        );
        self.emit(mac, local, peer, m);
    }

    /// The attempt matching a reply from `src` with `conn_id` and `client_token`
    /// (a wrong token is counted).
    fn attempt_for(&mut self, src: Ipv4, conn_id: u64, client_token: u64) -> Option<ConnHandle> {
        let ah = self.attempt_by_wire.get(&conn_id).copied()?;
        let a = &self.attempts[&ah];
        if a.peer.0 != src || a.client_token != client_token {
            self.stats.bad_token += 1;
            return None;
        }
        Some(ah)
    }

    pub(super) fn on_accept(
        &mut self,
        now: Instant,
        h: &SanHeader,
        conn_id: u64,
        client_token: u64,
        server_token: u64,
        offer: Offer,
    ) {
        let confirm = Message::AcceptAck {
            conn_id,
            token: server_token,
        };
        if self.attempt_by_wire.contains_key(&conn_id) {
            if let Some(ah) = self.attempt_for(h.src_ip, conn_id, client_token) {
                self.finish_attempt(now, ah, Ok((*h, server_token, offer)));
                self.reply(h, confirm);
            }
            return;
        }
        let known = self
            .conns
            .by_wire((h.src_ip, conn_id, Role::Client))
            .and_then(|c| self.conns.get(&c));
        match known {
            Some(c) if c.my_token == client_token && c.peer_token == server_token => {
                // A duplicate: our confirmation was lost; confirm again.
                self.stats.late_replies += 1;
                if !c.is_closing() {
                    self.reply(h, confirm);
                }
            }
            Some(_) => self.stats.bad_token += 1,
            None => {
                self.stats.late_replies += 1;
                let message = match self.client_resets.get(&(h.src_ip, conn_id)) {
                    // We reset that connection and the Reset was lost: again.
                    Some(&reason) => Message::Reset {
                        conn_id,
                        token: server_token,
                        reason,
                    },
                    // The attempt is over (timed out, abandoned): tell the
                    // accepting side to drop the connection it made.
                    None => Message::Close {
                        conn_id,
                        token: server_token,
                    },
                };
                self.reply(h, message);
            }
        }
    }

    pub(super) fn on_reject(
        &mut self,
        now: Instant,
        h: &SanHeader,
        conn_id: u64,
        client_token: u64,
        reason: RejectReason,
    ) {
        if !self.attempt_by_wire.contains_key(&conn_id) {
            self.stats.late_replies += 1;
            return;
        }
        if let Some(ah) = self.attempt_for(h.src_ip, conn_id, client_token) {
            let e = match reason {
                RejectReason::NoListener => ConnectFailure::Reset,
                r => ConnectFailure::Refused(r),
            };
            self.finish_attempt(now, ah, Err(e));
        }
    }

    /// The accepting side accepted and closed before its accept reached us
    /// (lost or reordered): the attempt succeeded and the connection ended.
    /// Returns false only for a frame with a wrong token (not to be acknowledged).
    pub(super) fn accepted_then_closed(
        &mut self,
        now: Instant,
        h: &SanHeader,
        conn_id: u64,
        token: u64,
    ) -> bool {
        if !self.attempt_by_wire.contains_key(&conn_id) {
            return true;
        }
        let Some(ah) = self.attempt_for(h.src_ip, conn_id, token) else {
            return false;
        };
        self.finish_attempt(now, ah, Ok((*h, 0, crate::wire::Offer::MIN)));
        self.remove_conn(now, ah);
        self.events.push_back(Event::Closed { conn: ah });
        true
    }

    /// Attempts waiting for `ip`'s MAC send their request now (in handle order).
    pub(super) fn resolved(&mut self, ip: Ipv4, mac: EthernetAddress) {
        let waiting: Vec<ConnHandle> = self
            .attempts
            .iter()
            .filter(|(_, a)| a.peer.0 == ip && a.peer_mac.is_none())
            .map(|(h, _)| *h)
            .collect();
        for h in waiting {
            if let Some(a) = self.attempts.get_mut(&h) {
                a.peer_mac = Some(mac);
            }
            self.send_request(h);
        }
    }

    /// Resolution requests due, and attempts whose resolution failed.
    pub(super) fn resolution_timers(&mut self, now: Instant) {
        while let Some(ip) = self.resolver.poll_request(now) {
            let src = self.addrs.first().copied().unwrap_or(Ipv4::UNSPECIFIED);
            self.emit(
                EthernetAddress::BROADCAST,
                (src, 0),
                (ip, 0),
                Message::ResolveRequest,
            );
        }
        while let Some(ip) = self.resolver.poll_failed() {
            let failed: Vec<ConnHandle> = self
                .attempts
                .iter()
                .filter(|(_, a)| a.peer.0 == ip && a.peer_mac.is_none())
                .map(|(h, _)| *h)
                .collect();
            for h in failed {
                self.finish_attempt(now, h, Err(ConnectFailure::TimedOut));
            }
        }
    }

    /// Retransmissions and give-ups of connect attempts (in handle order).
    pub(super) fn attempt_timers(&mut self, now: Instant) {
        let due: Vec<ConnHandle> = self
            .attempts
            .iter()
            .filter(|(_, a)| a.deadline <= now || (a.peer_mac.is_some() && a.next_send <= now))
            .map(|(h, _)| *h)
            .collect();
        for h in due {
            let a = self.attempts.get_mut(&h).expect("listed");
            if a.deadline <= now {
                self.finish_attempt(now, h, Err(ConnectFailure::TimedOut));
                continue;
            }
            a.rto = (a.rto * 2).min(self.cfg.max_rto);
            a.next_send = now + a.rto;
            self.send_request(h);
        }
    }
}

// ----------------------------------------------------------------------
// The server side: listeners, incoming requests, decisions. (the types: `server.rs`)

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

// ----------------------------------------------------------------------
// Established connections: close handshakes, retransmissions, resets. (the types: `connection.rs`)

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
        self.conns.get(&h)?;
        // A stream that outlives its connection keeps the slot (see
        // `HOLDS_SLOT`).
        let keep = match self.streams.get_mut(h) {
            Some(s) => {
                s.set(HOLDS_SLOT, true);
                true
            }
            None => false,
        };
        let c = self.conns.remove(&h, keep)?;
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
        } else if let Some(reason) = reset {
            self.remember_client_reset(now, (c.peer.0, c.conn_id), reason);
        }
        Some(c)
    }

    /// Remembers, for a tombstone's life, that we reset our connection
    /// `key` as its client (see `client_resets`).
    fn remember_client_reset(&mut self, now: Instant, key: (Ipv4, u64), reason: ResetReason) {
        let exp = now + self.cfg.tombstone_ttl;
        if self
            .client_resets
            .remember(key, reason, exp, self.cfg.max_tombstones)
        {
            self.stats.tombstones_evicted += 1;
        }
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
        // A connection we are closing is no longer the application's: it
        // hears nothing more of it (as of a Close that crosses ours). The
        // peer's reset only ends the handshake early (it answers a frame of
        // ours that arrived after its end, say).
        if !c.is_closing() {
            self.events.push_back(Event::Reset { conn: ch, reason });
        }
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

// ----------------------------------------------------------------------
// Tombstones: answering frames of connections that ended. (the types: `tombstone.rs`)

impl<R: Rng> Endpoint<R> {
    pub(super) fn remember(&mut self, now: Instant, key: RequestKey, tomb: Tomb) {
        let exp = now + self.cfg.tombstone_ttl;
        if self
            .tombstones
            .remember(key, tomb, exp, self.cfg.max_tombstones)
        {
            self.stats.tombstones_evicted += 1;
        }
    }

    /// Answers a retransmitted request from its tombstone. Returns whether
    /// there was one (a wrong token is counted and answered with nothing).
    pub(super) fn replay(&mut self, h: &SanHeader, key: RequestKey, client_token: u64) -> bool {
        let Some(&tomb) = self.tombstones.get(&key) else {
            return false;
        };
        if tomb.client_token() != client_token {
            self.stats.bad_token += 1;
            return true;
        }
        let conn_id = key.conn_id;
        match tomb {
            Tomb::Refused { reason, .. } => {
                self.stats.replayed_rejects += 1;
                self.reply(
                    h,
                    Message::Reject {
                        conn_id,
                        client_token,
                        reason,
                    },
                );
            }
            Tomb::Closed {
                server_token,
                reset,
                ..
            } => {
                self.stats.replayed_accepts += 1;
                self.reply(
                    h,
                    Message::Accept {
                        conn_id,
                        client_token,
                        server_token,
                        // Closed already: the close that follows ends it.
                        offer: crate::wire::Offer::MIN,
                    },
                );
                self.reply(
                    h,
                    match reset {
                        None => Message::Close {
                            conn_id,
                            token: client_token,
                        },
                        Some(reason) => Message::Reset {
                            conn_id,
                            token: client_token,
                            reason,
                        },
                    },
                );
            }
        }
        true
    }

    /// Whether the server connection of request `key` ended because its
    /// client never confirmed it (so the client, if it exists, may still
    /// hold it until its keepalive or its next frame learns otherwise).
    pub fn forgot_unconfirmed(&self, key: RequestKey) -> bool {
        matches!(
            self.tombstones.get(&key),
            Some(Tomb::Closed {
                unconfirmed: true,
                ..
            })
        )
    }

    pub(super) fn expire_tombstones(&mut self, now: Instant) {
        self.tombstones.expire(now);
        self.client_resets.expire(now);
    }
}

// ----------------------------------------------------------------------
// Byte streams: each established connection's bytes, timers and transmit
// turn. (the state: `streams.rs`; the arithmetic of one stream: `stream.rs`)
//
// The rings are the I/O edge's: it reports what the application wrote and
// consumed (`stream_app`, `close_stream`), copies an [`Arrival`]'s payload
// into the receive ring, and copies a segment's payload out of the send
// ring when it sends the frame `stream_segment` describes.

impl<R: Rng> Endpoint<R> {
    fn stream_timing(&self) -> StreamTiming {
        StreamTiming {
            rto: self.cfg.stream_rto,
            max_rto: self.cfg.max_rto,
            keepalive_idle: self.cfg.keepalive_idle,
            keepalive_timeout: self.cfg.keepalive_timeout,
            ack_delay: self.cfg.ack_delay,
        }
    }

    /// Opens connection `h`'s byte stream from `params` (its `Connected`
    /// event's, or the accepted connection's) with a receive ring of
    /// `rcv_size` bytes. Opened even when the connection is already gone
    /// (the peer's Close or Reset came in the same burst as its Accept):
    /// the event that follows ends it.
    pub fn open_stream(
        &mut self,
        now: Instant,
        h: ConnHandle,
        params: StreamParams,
        rcv_size: u32,
    ) {
        // A connection that is gone left its slot: the stream holds it
        // until it is forgotten (if no connection took it since, which the
        // order of events rules out; else the stream does not open).
        let orphaned = self.conns.get(&h).is_none();
        if orphaned && !self.conns.hold(h) {
            return;
        }
        let t = self.stream_timing();
        let s = Stream::new(now, t, params.mss, params.peer_window, rcv_size);
        self.streams.open(h, s, &t);
        if orphaned {
            if let Some(c) = self.streams.get_mut(h) {
                c.set(HOLDS_SLOT, true);
            }
        }
    }

    /// Forgets `h`'s stream (the edge let go of its rings).
    pub fn forget_stream(&mut self, h: ConnHandle) {
        self.end_stream(h);
    }

    /// Forgets `h`'s stream, and gives back the slot it held if its
    /// connection went before it.
    fn end_stream(&mut self, h: ConnHandle) {
        if self.streams.remove(h).is_some_and(|s| s.has(HOLDS_SLOT)) {
            self.conns.release(h);
        }
    }

    /// Connection `h`'s stream, for its positions.
    pub fn stream(&self, h: ConnHandle) -> Option<&Stream> {
        self.streams.get(h).map(|c| &c.s)
    }

    /// Whether `h`'s application closed its socket (the stream lingers).
    pub fn stream_lingers(&self, h: ConnHandle) -> bool {
        self.streams.get(h).is_some_and(|c| c.has(CLOSED))
    }

    /// Streams open.
    pub fn streams_open(&self) -> usize {
        self.streams.len()
    }

    /// Whether `h`'s stream ended cleanly as far as its bytes go: every
    /// byte the peer sent arrived (its FIN came, or it never wrote: it
    /// closes without a FIN only then) and ours were acknowledged.
    pub fn stream_clean(&self, h: ConnHandle) -> bool {
        self.stream(h)
            .is_some_and(|s| (s.peer_finished() || s.received() == 0) && !s.outstanding())
    }

    /// What `h`'s application wrote (the send ring's `tail`, and `fin` once
    /// it shut down sending) and consumed (the receive ring's `head`), its
    /// send ring being `snd_size` bytes. The stream joins the transmit
    /// queue if that gives it something to send.
    ///
    /// # Errors
    /// [`BadIndex`] for indices no honest application writes (the caller
    /// deals with the application).
    pub fn stream_app(
        &mut self,
        h: ConnHandle,
        tail: u64,
        fin: bool,
        head: u64,
        snd_size: u64,
    ) -> Result<(), BadIndex> {
        let Some(c) = self.streams.get_mut(h) else {
            return Ok(());
        };
        c.s.app_wrote(tail, snd_size, fin)?;
        if !c.has(CLOSED) {
            c.s.app_read(head)?;
        }
        self.stream_queue(h);
        Ok(())
    }

    /// `h`'s application closed its socket, having written up to `tail`
    /// and consumed up to `head`: its last bytes and FIN still go, unless
    /// it left received bytes unread (then the connection is reset, as TCP
    /// does).
    pub fn close_stream(
        &mut self,
        now: Instant,
        h: ConnHandle,
        tail: u64,
        head: u64,
        snd_size: u64,
    ) -> StreamClose {
        let Some(c) = self.streams.get_mut(h) else {
            return StreamClose::Unknown;
        };
        let honest = c.s.app_wrote(tail, snd_size, true).is_ok() && c.s.app_read(head).is_ok();
        c.set(CLOSED, true);
        if !honest || head < c.s.received() {
            self.abort_stream(now, h, ResetReason::Aborted);
            return StreamClose::Reset;
        }
        if c.s.written() == 0 || c.s.finished() {
            // Nothing (more) to deliver: the Close handshake alone ends it
            // (the peer reads the end of the stream: no byte can be missing).
            let _ = self.close(now, h);
            self.end_stream(h);
            return StreamClose::Closed;
        }
        self.stream_queue(h);
        StreamClose::Lingering
    }

    /// Resets connection `h` (a Reset goes to the peer) and forgets its
    /// stream.
    pub fn abort_stream(&mut self, now: Instant, h: ConnHandle, reason: ResetReason) {
        self.reset(now, h, reason);
        self.end_stream(h);
    }

    /// A Data (`data`) or Ack frame.
    fn on_segment(
        &mut self,
        now: Instant,
        hdr: &SanHeader,
        seg: &Segment,
        data: bool,
    ) -> Option<Arrival> {
        let h = match self.stream_conn(hdr, seg.conn_id, seg.token) {
            Ok(h) => h,
            Err(false) => {
                self.reset_unknown(hdr, seg.conn_id, seg.token);
                return None;
            }
            Err(true) => return None, // wrong token: counted
        };
        let t = self.stream_timing();
        let Some(c) = self.streams.get_mut(h) else {
            self.stats.no_stream += 1;
            return None;
        };
        let acked = c.s.on_ack(now, &t, seg);
        let mut a = Arrival {
            conn: h,
            at: c.s.received(),
            skip: 0,
            take: 0,
            acked,
            eof: false,
        };
        if data {
            let was_fin = c.s.peer_finished();
            (a.skip, a.take) = c.s.on_data(now, &t, seg);
            a.eof = !was_fin && c.s.peer_finished();
        }
        if c.has(CLOSED) {
            if a.take > 0 {
                // Nobody will read these: as TCP does, reset.
                self.abort_stream(now, h, ResetReason::Aborted);
                self.events.push_back(Event::Aborted {
                    conn: h,
                    reason: ResetReason::Aborted,
                });
                return None;
            }
            if c.s.finished() {
                // Its last bytes and FIN are acknowledged: the Close
                // handshake takes over.
                let _ = self.close(now, h);
                self.end_stream(h);
                self.events.push_back(Event::StreamDone { conn: h });
                return Some(a);
            }
        }
        self.stream_queue(h);
        Some(a)
    }

    /// `h` joins the transmit queue if it has something to send, and its
    /// timer follows its next deadline.
    fn stream_queue(&mut self, h: ConnHandle) {
        self.stream_enqueue(h);
        let t = self.stream_timing();
        self.streams.reschedule(h, &t);
    }

    /// `h` joins the transmit queue if it has something to send (a stall of
    /// its peer's credit that begins now is counted).
    fn stream_enqueue(&mut self, h: ConnHandle) {
        if self.streams.enqueue(h) {
            self.stats.credit_stalls += 1;
        }
    }

    /// Stream timers due at `now`: retransmissions and probes (the stream
    /// joins the transmit queue), and peers given up on (the connection is
    /// reset: [`Event::Aborted`]).
    fn stream_timers(&mut self, now: Instant) {
        let t = self.stream_timing();
        while let Some(h) = self.streams.pop_due(now) {
            let c = self.streams.get_mut(h).expect("due");
            match c.s.on_timer(now, &t) {
                Timer::Dead => {
                    self.abort_stream(now, h, ResetReason::TimedOut);
                    self.events.push_back(Event::Aborted {
                        conn: h,
                        reason: ResetReason::TimedOut,
                    });
                    continue;
                }
                Timer::Probe => c.set(PROBE, true),
                Timer::Retransmit | Timer::Idle => {}
            }
            self.streams.rearm(h, &t);
            self.stream_enqueue(h);
        }
    }

    /// Streams held back while their client was unconfirmed: those now
    /// confirmed join the transmit queue (those gone are dropped). Returns
    /// whether any did.
    pub fn release_held(&mut self) -> bool {
        if self.streams.held.is_empty() {
            return false;
        }
        let mut held = std::mem::take(&mut self.streams.held);
        let mut ready = Vec::new();
        held.retain(|h| {
            if self.streams.get(*h).is_none() {
                return false;
            }
            if self.is_unconfirmed(*h) {
                return true;
            }
            ready.push(*h);
            false
        });
        self.streams.held = held;
        let any = !ready.is_empty();
        for h in ready {
            if let Some(c) = self.streams.get_mut(h) {
                c.set(HELD, false);
            }
            self.stream_enqueue(h);
        }
        any
    }

    /// Streams in the transmit queue now (a pass serves at most these).
    pub fn streams_queued(&self) -> usize {
        self.streams.txq.len()
    }

    /// The next stream in the transmit queue, taken out of it. A stream
    /// whose client has not proven its address yet (the request may be
    /// forged) is held back instead: nothing goes to it but the Accept
    /// until it is confirmed ([`Endpoint::release_held`]).
    pub fn next_stream(&mut self) -> Option<ConnHandle> {
        loop {
            let h = self.streams.txq.pop_front()?;
            let Some(c) = self.streams.get_mut(h) else {
                continue;
            };
            c.set(QUEUED, false);
            if self.is_unconfirmed(h) {
                if let Some(c) = self.streams.get_mut(h).filter(|c| !c.has(HELD)) {
                    c.set(HELD, true);
                    self.streams.held.push(h);
                }
                continue;
            }
            return Some(h);
        }
    }

    /// The next Data segment of `h` and the frame that carries it (with
    /// the acknowledgement and credit of the other direction), cut at the
    /// urgent mark `urgent` if the segment spans it (0: none). The edge
    /// appends the payload (`len` bytes from `seq` of the send ring) and
    /// reports the segment sent with [`Endpoint::stream_sent`]. None:
    /// nothing to send now, or the connection is gone.
    pub fn stream_segment(&self, h: ConnHandle, urgent: u64) -> Option<(Repr, Outgoing)> {
        let c = self.streams.get(h)?;
        let mut o = c.s.next_segment()?;
        let (header, conn_id, token) = self.stream_route(h)?;
        let urg = urgent > o.seq && urgent <= o.seq + u64::from(o.len);
        if urg {
            o.fin &= urgent == o.seq + u64::from(o.len);
            o.len = (urgent - o.seq) as u16;
        }
        let (ack, limit, flags) = c.s.ack_fields();
        let seg = Segment {
            conn_id,
            token,
            seq: o.seq,
            ack,
            limit,
            flags: flags | o.flags() | if urg { SEG_URG } else { 0 },
            len: o.len,
        };
        Some((
            Repr {
                header,
                message: Message::Data(seg),
            },
            o,
        ))
    }

    /// Segment `o` of `h` went out.
    pub fn stream_sent(&mut self, now: Instant, h: ConnHandle, o: Outgoing) {
        if let Some(c) = self.streams.get_mut(h) {
            c.s.sent(now, o);
        }
    }

    /// An Ack frame for `h`, if one is due (or a keepalive or window probe).
    pub fn stream_ack(&self, h: ConnHandle) -> Option<Repr> {
        let c = self.streams.get(h)?;
        if !c.s.ack_due() && !c.has(PROBE) {
            return None;
        }
        let (header, conn_id, token) = self.stream_route(h)?;
        let (ack, limit, flags) = c.s.ack_fields();
        let seg = Segment {
            conn_id,
            token,
            seq: 0,
            ack,
            limit,
            flags: flags | if c.has(PROBE) { SEG_PROBE } else { 0 },
            len: 0,
        };
        Some(Repr {
            header,
            message: Message::Ack(seg),
        })
    }

    /// The Ack of [`Endpoint::stream_ack`] went out.
    pub fn stream_ack_sent(&mut self, h: ConnHandle) {
        if let Some(c) = self.streams.get_mut(h) {
            c.s.take_ack();
            c.set(PROBE, false);
        }
    }

    /// The edge served `h` for this pass: it goes back in the queue if it
    /// has more to send, and its timer follows. Returns whether the peer's
    /// credit for it runs low (the edge asks the application for a kick
    /// once it has consumed).
    pub fn stream_served(&mut self, h: ConnHandle) -> bool {
        let low = self
            .streams
            .get(h)
            .is_some_and(|c| !c.has(CLOSED) && c.s.credit_low());
        self.stream_queue(h);
        low
    }

    /// The application's receive head, as fresh as the edge can read it
    /// before it serves `h` (the credit advertised follows it; a bad value
    /// is ignored: the next report checks it).
    pub fn stream_read(&mut self, h: ConnHandle, head: u64) {
        if let Some(c) = self.streams.get_mut(h).filter(|c| !c.has(CLOSED)) {
            let _ = c.s.app_read(head);
        }
    }
}
