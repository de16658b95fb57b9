//! The connection state machines of one SAN host.
//!
//! An [`Endpoint`] holds the host's listeners, the connection requests that
//! wait for the application's answer, the connect attempts it makes, its
//! established connections and its address resolution cache. It does no I/O
//! and reads no clock:
//!
//! * inputs: [`Endpoint::handle_frame`] (a parsed SAN frame),
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
//! The parts, one file each: [`server`](super::server) (listeners, requests,
//! decisions), [`client`](super::client) (connect attempts),
//! [`connection`](super::connection) (established connections and the close
//! handshake), [`tombstone`](super::tombstone) (answers for finished
//! requests).
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
use super::config::{ProtoConfig, Subnet};
use super::connection::{ConnTable, Connection, Retry, Role};
use super::resolve::Resolver;
use super::rng::Rng;
use super::server::{Listener, Pending, SourceShare, Unsure};
use super::tombstone::Tomb;
use super::types::*;
use crate::time::Instant;
use crate::wire::{EthernetAddress, Ipv4, Message, Offer, RejectReason, Repr, SanHeader};
use std::collections::{BTreeMap, HashMap, VecDeque};

/// How frames name a connection: (peer address, connection id, our role).
pub(super) type WireKey = (Ipv4, u64, Role);

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
    pub(super) tombstones: HashMap<RequestKey, (Tomb, Instant)>,
    pub(super) tomb_order: VecDeque<(RequestKey, Instant)>,
    pub(super) transmits: VecDeque<Repr>,
    pub(super) events: VecDeque<Event>,
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
            tombstones: HashMap::new(),
            tomb_order: VecDeque::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
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
        let a = self.attempts.values().map(Attempt::next_timer);
        let c = self
            .closing
            .values()
            .map(Retry::timer)
            .chain(self.confirming.values().map(|e| e.0.timer()));
        let t = self.tomb_order.front().map(|(_, e)| *e);
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
    /// checked the destination MAC).
    pub fn handle_frame(&mut self, now: Instant, frame: &Repr) {
        let h = frame.header;
        if !self.is_ours(h.dst_ip) {
            self.stats.not_ours += 1;
            return;
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
                    return;
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
            // Stream frames are served by the I/O edge, which owns the
            // bytes (see `stream_conn`).
            Message::Data(_) | Message::Ack(_) => self.stats.unhandled += 1,
            Message::EchoRequest { .. } | Message::EchoReply { .. } => self.stats.unhandled += 1,
        }
    }

    /// Retransmissions, give-ups and expiries due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.resolution_timers(now);
        self.attempt_timers(now);
        self.close_timers(now);
        self.confirm_timers(now);
        self.expire_requests(now);
        self.settle_unsure(now);
        self.expire_tombstones(now);
    }
}
