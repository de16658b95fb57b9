//! The connection state machines of one SAN host.
//!
//! An [`Endpoint`] holds the host's listeners with their bounded backlogs, the
//! connect attempts it makes, its established connections and its address
//! resolution cache. It does no I/O and reads no clock:
//!
//! * inputs: [`Endpoint::handle_frame`] (a parsed SAN frame),
//!   [`Endpoint::handle_timeout`], and the application's commands
//!   ([`listen`](Endpoint::listen), [`decide`](Endpoint::decide),
//!   [`connect`](Endpoint::connect), [`close`](Endpoint::close), ...), each
//!   with `now`;
//! * outputs, drained in this order after every input:
//!   [`poll_transmit`](Endpoint::poll_transmit) (frames to send),
//!   [`poll_event`](Endpoint::poll_event) (FD_ACCEPT / FD_CONNECT / closed),
//!   then [`poll_timeout`](Endpoint::poll_timeout) (when to call
//!   `handle_timeout` next).
//!
//! Behaviour (WSD, `docs/wire-protocol.md` "Connection protocol"):
//! * a connect request for no listener is answered `Reject(NoListener)` at
//!   once; for a full backlog `Reject(BacklogFull)` at once **and no event is
//!   raised**; otherwise it is queued and one [`Event::Incoming`] is raised;
//! * the accepting side resolves the request at the head of the backlog with
//!   [`Decision::Accept`] (an `Accept` frame; established on both sides),
//!   [`Decision::Reject`] (`Reject(Refused)`), or [`Decision::Defer`] (stays);
//! * the connecting side retransmits with exponential backoff and gives up with
//!   [`ConnectFailure::TimedOut`] after the connect budget;
//! * every request is answered consistently: a retransmission never creates a
//!   second backlog entry, one for an accepted connection replays the accept,
//!   one for a refused request replays the refusal, and one for an accepted
//!   connection that has since been closed replays the accept and the close
//!   (a tombstone remembers finished requests for longer than any client
//!   retries); late or duplicate replies for a
//!   finished attempt are ignored (a late accept is answered with a close, so
//!   the accepting side does not keep a connection nobody wants);
//! * frames whose token does not match are dropped and counted; all state is
//!   bounded (listeners, queued requests, attempts, tombstones).

use super::resolve::{Lookup, ResolveConfig, Resolver};
use super::rng::Rng;
use crate::backlog::MAX_BACKLOG;
use crate::time::Instant;
use crate::wire::{EthernetAddress, Ipv4, Message, RejectReason, Repr, SanHeader};
use std::collections::{HashMap, VecDeque};
use std::time::Duration;

/// A SAN subnet (address and prefix length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    /// Any address in the subnet.
    pub addr: Ipv4,
    /// Prefix length.
    pub prefix: u8,
}

impl Subnet {
    /// Whether `ip` is in the subnet.
    pub fn contains(&self, ip: Ipv4) -> bool {
        let mask = if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix.min(32)))
        };
        u32::from(ip) & mask == u32::from(self.addr) & mask
    }
}

/// Protocol parameters. The defaults are documented in `docs/wire-protocol.md`.
#[derive(Debug, Clone)]
pub struct ProtoConfig {
    /// Give up a connect attempt after this long: ETIMEDOUT (default 2 s).
    pub connect_budget: Duration,
    /// First retransmission timeout of a connect request (default 20 ms).
    pub initial_rto: Duration,
    /// Backoff ceiling (default 400 ms).
    pub max_rto: Duration,
    /// Requests queued in all backlogs together (default 65536).
    pub max_half_open: usize,
    /// Listeners (default 4096).
    pub max_listeners: usize,
    /// Connect attempts in progress (default 65536).
    pub max_attempts: usize,
    /// Established connections (default 1 << 20).
    pub max_connections: usize,
    /// How long a refusal is remembered to answer retransmissions the same way
    /// (default 2 x connect budget; must exceed any client's budget).
    pub tombstone_ttl: Duration,
    /// Finished requests (refused, or accepted and since closed) remembered at
    /// most (default 65536; the oldest go first).
    pub max_tombstones: usize,
    /// Give up retransmitting a close after this long (default 10 s: both ends
    /// agree on a connection's end as long as the fabric delivers one close
    /// and its acknowledgement within this time).
    pub close_budget: Duration,
    /// The SAN subnets; connecting elsewhere is EHOSTUNREACH.
    pub subnets: Vec<Subnet>,
    /// Address resolution timing.
    pub resolve: ResolveConfig,
}

impl Default for ProtoConfig {
    fn default() -> Self {
        Self {
            connect_budget: Duration::from_secs(2),
            initial_rto: Duration::from_millis(20),
            max_rto: Duration::from_millis(400),
            max_half_open: 65536,
            max_listeners: 4096,
            max_attempts: 65536,
            max_connections: 1 << 20,
            tombstone_ttl: Duration::from_secs(4),
            max_tombstones: 65536,
            close_budget: Duration::from_secs(10),
            subnets: Vec::new(),
            resolve: ResolveConfig::default(),
        }
    }
}

/// A listener, as the application names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerId(pub u64);

/// A connection or connect attempt, as the application names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnHandle(pub u64);

/// An IPv4 address and port.
pub type SockAddr = (Ipv4, u16);

/// The accepting side's answer to the request at the head of a backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Accept: the peer's connect succeeds.
    Accept,
    /// Refuse: the peer's connect fails with ECONNREFUSED.
    Reject,
    /// Leave the request at the head of the backlog.
    Defer,
}

/// Why a connect attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailure {
    /// Refused: backlog full, refused by the application, no resources, or the
    /// listener closed. ECONNREFUSED; the switch does not fall back.
    Refused(RejectReason),
    /// Nobody listens on that port. ECONNRESET (WSD's code); no fallback.
    Reset,
    /// No answer to resolution or to the request within the budget. ETIMEDOUT;
    /// the switch falls back to TCP.
    TimedOut,
}

impl ConnectFailure {
    /// The errno the provider reports.
    pub fn errno(&self) -> i32 {
        match self {
            ConnectFailure::Refused(_) => libc::ECONNREFUSED,
            ConnectFailure::Reset => libc::ECONNRESET,
            ConnectFailure::TimedOut => libc::ETIMEDOUT,
        }
    }
}

/// What the application learns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A request was queued on this listener (FD_ACCEPT).
    Incoming {
        /// The listener.
        listener: ListenerId,
        /// The request (now at the tail of the backlog).
        request: Incoming,
    },
    /// A connect attempt succeeded (FD_CONNECT, no error).
    Connected {
        /// The connection (same handle as the attempt).
        conn: ConnHandle,
    },
    /// A connect attempt failed (FD_CONNECT with an error).
    ConnectFailed {
        /// The attempt.
        conn: ConnHandle,
        /// Why.
        error: ConnectFailure,
    },
    /// The peer closed an established connection.
    Closed {
        /// The connection.
        conn: ConnHandle,
    },
}

/// Errors of [`Endpoint::listen`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ListenError {
    /// The port is already listened on for that address (or the wildcard).
    #[error("address in use")]
    AddrInUse,
    /// The address is neither one of this host's SAN addresses nor the wildcard.
    #[error("address not available on this host")]
    AddrNotAvailable,
    /// The listener limit is reached.
    #[error("too many listeners")]
    TooManyListeners,
}

/// Errors of [`Endpoint::decide`] and [`Endpoint::head`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AcceptError {
    /// No such listener (never created, or closed).
    #[error("unknown listener")]
    UnknownListener,
    /// Nothing is queued (EAGAIN).
    #[error("no pending connection request")]
    Empty,
    /// The connection limit is reached; the request stays queued.
    #[error("too many connections")]
    TooManyConnections,
    /// The request named is not at the head of the backlog.
    #[error("not the request at the head of the backlog")]
    NotHead,
}

/// Errors of [`Endpoint::connect`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The destination is in no SAN subnet (EHOSTUNREACH; no fallback).
    #[error("destination in no SAN subnet")]
    HostUnreachable,
    /// This host has no SAN address to connect from.
    #[error("no local SAN address")]
    NoLocalAddress,
    /// Too many attempts in progress.
    #[error("too many connect attempts in progress")]
    TooManyAttempts,
}

/// Errors of [`Endpoint::close`] and friends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CloseError {
    /// No such connection, attempt or listener.
    #[error("unknown handle")]
    Unknown,
}

/// Counters, every drop by its reason.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProtoStats {
    /// Connect requests received (duplicates included).
    pub requests_received: u64,
    /// Requests accepted by the application.
    pub accepted: u64,
    /// Requests refused, by reason: backlog full, no listener, refused, no resources, listener closed.
    pub rejected: [u64; 5],
    /// Attempts finished: connected, refused, reset, timed out.
    pub attempts: [u64; 4],
    /// Duplicate requests for a queued entry (ignored).
    pub duplicate_requests: u64,
    /// Accepts replayed for retransmitted requests.
    pub replayed_accepts: u64,
    /// Refusals replayed from tombstones.
    pub replayed_rejects: u64,
    /// Replies for attempts that had already finished (or never existed).
    pub late_replies: u64,
    /// Frames dropped because their token did not match.
    pub bad_token: u64,
    /// Frames for an address that is not this host's.
    pub not_ours: u64,
    /// Frames of a kind the endpoint does not handle (echo is the node's).
    pub unhandled: u64,
    /// Tombstones evicted early because the table was full.
    pub tombstones_evicted: u64,
    /// Durations of successful connects (connecting side), per bucket of
    /// [`CONNECT_BUCKETS_S`] (not cumulative; the last counts the overflow).
    pub connect_duration_buckets: [u64; CONNECT_BUCKETS_S.len() + 1],
    /// Sum of the durations above, nanoseconds.
    pub connect_duration_sum_ns: u64,
}

/// Upper bounds (seconds) of the connect-duration histogram buckets.
pub const CONNECT_BUCKETS_S: [f64; 18] = [
    5e-6, 10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3,
    0.1, 0.25, 0.5, 1.0, 2.5,
];

impl ProtoStats {
    /// Index of a reject reason in [`ProtoStats::rejected`].
    pub fn reason_index(r: RejectReason) -> usize {
        match r {
            RejectReason::BacklogFull => 0,
            RejectReason::NoListener => 1,
            RejectReason::Refused => 2,
            RejectReason::NoResources => 3,
            RejectReason::ListenerClosed | RejectReason::Unknown(_) => 4,
        }
    }
}

/// A request waiting in a backlog.
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
}

impl Incoming {
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
struct Listener {
    addr: SockAddr,
    capacity: usize,
    queue: VecDeque<Incoming>,
}

/// Which side opened a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// We connected.
    Client,
    /// We accepted.
    Server,
}

/// An established (or closing) connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connection {
    /// Who opened it.
    pub role: Role,
    /// Our address.
    pub local: SockAddr,
    /// The peer's address.
    pub peer: SockAddr,
    /// The peer's MAC.
    pub peer_mac: EthernetAddress,
    /// Wire connection id (chosen by the client).
    pub conn_id: u64,
    /// Our token (the peer echoes it).
    pub my_token: u64,
    /// The peer's token.
    pub peer_token: u64,
    /// Set once we started closing: (give up at, next retransmission, current rto).
    closing: Option<(Instant, Instant, Duration)>,
}

impl Connection {
    /// Whether we are closing it.
    pub fn is_closing(&self) -> bool {
        self.closing.is_some()
    }
}

/// What a finished request's retransmissions are answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tomb {
    /// It was refused: replay the refusal.
    Refused {
        client_token: u64,
        reason: RejectReason,
    },
    /// It was accepted and the connection has since ended: replay the accept
    /// and the close, so the client learns both.
    Closed {
        client_token: u64,
        server_token: u64,
    },
}

impl Tomb {
    fn client_token(&self) -> u64 {
        match *self {
            Tomb::Refused { client_token, .. } | Tomb::Closed { client_token, .. } => client_token,
        }
    }
}

#[derive(Debug)]
struct Attempt {
    local: SockAddr,
    peer: SockAddr,
    peer_mac: Option<EthernetAddress>,
    conn_id: u64,
    client_token: u64,
    started: Instant,
    deadline: Instant,
    next_send: Instant,
    rto: Duration,
}

/// The protocol state of one SAN host. See the module documentation.
pub struct Endpoint<R: Rng> {
    cfg: ProtoConfig,
    mac: EthernetAddress,
    addrs: Vec<Ipv4>,
    rng: R,
    resolver: Resolver,
    listeners: HashMap<ListenerId, Listener>,
    listener_by_addr: HashMap<SockAddr, ListenerId>,
    queued_total: usize,
    /// (peer ip, conn id) of queued requests -> listener.
    queued_index: HashMap<(Ipv4, u64), ListenerId>,
    conns: HashMap<ConnHandle, Connection>,
    /// The connections we are closing (their timers), so that timer scans do
    /// not walk every connection.
    closing: std::collections::BTreeSet<ConnHandle>,
    conn_by_wire: HashMap<(Ipv4, u64, Role), ConnHandle>,
    attempts: HashMap<ConnHandle, Attempt>,
    attempt_by_wire: HashMap<u64, ConnHandle>,
    /// (peer ip, conn id) -> what became of a request, and when to forget it.
    tombstones: HashMap<(Ipv4, u64), (Tomb, Instant)>,
    tomb_order: VecDeque<((Ipv4, u64), Instant)>,
    transmits: VecDeque<Repr>,
    events: VecDeque<Event>,
    next_id: u64,
    next_port: u16,
    stats: ProtoStats,
}

const EPHEMERAL: std::ops::RangeInclusive<u16> = 49152..=65535;

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
            listeners: HashMap::new(),
            listener_by_addr: HashMap::new(),
            queued_total: 0,
            queued_index: HashMap::new(),
            conns: HashMap::new(),
            closing: std::collections::BTreeSet::new(),
            conn_by_wire: HashMap::new(),
            attempts: HashMap::new(),
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
    /// The resolution cache (for static entries).
    pub fn resolver_mut(&mut self) -> &mut Resolver {
        &mut self.resolver
    }
    /// Requests queued on a listener, and its capacity.
    pub fn backlog(&self, l: ListenerId) -> Option<(usize, usize)> {
        self.listeners.get(&l).map(|x| (x.queue.len(), x.capacity))
    }
    /// Every listener: id, address, depth, capacity.
    pub fn listeners(&self) -> impl Iterator<Item = (ListenerId, SockAddr, usize, usize)> + '_ {
        self.listeners
            .iter()
            .map(|(id, l)| (*id, l.addr, l.queue.len(), l.capacity))
    }
    /// A connection.
    pub fn connection(&self, c: ConnHandle) -> Option<&Connection> {
        self.conns.get(&c)
    }
    /// Every connection.
    pub fn connections(&self) -> impl Iterator<Item = (ConnHandle, &Connection)> {
        self.conns.iter().map(|(h, c)| (*h, c))
    }
    /// A connect attempt in progress: (local address, peer address, wire connection id).
    pub fn attempt(&self, h: ConnHandle) -> Option<(SockAddr, SockAddr, u64)> {
        self.attempts.get(&h).map(|a| (a.local, a.peer, a.conn_id))
    }
    /// Connect attempts in progress.
    pub fn attempts_in_progress(&self) -> usize {
        self.attempts.len()
    }
    /// Requests queued in all backlogs.
    pub fn queued_total(&self) -> usize {
        self.queued_total
    }
    /// Remembered refusals.
    pub fn tombstones(&self) -> usize {
        self.tombstones.len()
    }
    /// Whether the endpoint holds no per-peer state at all (listeners,
    /// requests, attempts, connections, refusals, pending resolutions).
    pub fn is_quiescent(&self) -> bool {
        self.listeners.is_empty()
            && self.queued_total == 0
            && self.queued_index.is_empty()
            && self.conns.is_empty()
            && self.conn_by_wire.is_empty()
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
        let a = self.attempts.values().map(|a| {
            if a.peer_mac.is_some() {
                a.next_send.min(a.deadline)
            } else {
                a.deadline
            }
        });
        let c = self
            .closing
            .iter()
            .filter_map(|h| self.conns.get(h)?.closing.map(|(d, n, _)| d.min(n)));
        let t = self.tomb_order.front().map(|(_, e)| *e);
        a.chain(c)
            .chain(t)
            .chain(self.resolver.next_deadline())
            .min()
    }

    // ----- helpers ---------------------------------------------------------

    fn id(&mut self) -> u64 {
        let i = self.next_id;
        self.next_id += 1;
        i
    }

    fn emit(
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

    fn is_ours(&self, ip: Ipv4) -> bool {
        self.addrs.contains(&ip)
    }

    fn reject(
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
            (h.src_ip, conn_id),
            Tomb::Refused {
                client_token,
                reason,
            },
        );
        self.emit(
            h.src_mac,
            (h.dst_ip, h.dst_port),
            (h.src_ip, h.src_port),
            Message::Reject {
                conn_id,
                client_token,
                reason,
            },
        );
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

    /// Bookkeeping for a request that left its backlog.
    fn unqueue(&mut self, inc: &Incoming) {
        self.queued_total -= 1;
        self.queued_index.remove(&(inc.peer.0, inc.conn_id));
    }

    fn remember(&mut self, now: Instant, key: (Ipv4, u64), tomb: Tomb) {
        if self.tombstones.len() >= self.cfg.max_tombstones {
            if let Some((old, exp)) = self.tomb_order.pop_front() {
                if self.tombstones.get(&old).is_some_and(|t| t.1 == exp) {
                    self.tombstones.remove(&old);
                }
                self.stats.tombstones_evicted += 1;
            }
        }
        let exp = now + self.cfg.tombstone_ttl;
        self.tombstones.insert(key, (tomb, exp));
        self.tomb_order.push_back((key, exp));
    }

    fn finish_attempt(
        &mut self,
        now: Instant,
        h: ConnHandle,
        outcome: Result<(SanHeader, u64), ConnectFailure>,
    ) {
        let Some(a) = self.attempts.remove(&h) else {
            return;
        };
        self.attempt_by_wire.remove(&a.conn_id);
        match outcome {
            Ok((hdr, server_token)) => {
                self.stats.attempts[0] += 1;
                let d = now.saturating_since(a.started);
                let secs = d.as_secs_f64();
                let b = CONNECT_BUCKETS_S
                    .iter()
                    .position(|ub| secs <= *ub)
                    .unwrap_or(CONNECT_BUCKETS_S.len());
                self.stats.connect_duration_buckets[b] += 1;
                self.stats.connect_duration_sum_ns += d.as_nanos() as u64;
                let c = Connection {
                    role: Role::Client,
                    local: a.local,
                    peer: a.peer,
                    peer_mac: hdr.src_mac,
                    conn_id: a.conn_id,
                    my_token: a.client_token,
                    peer_token: server_token,
                    closing: None,
                };
                self.conn_by_wire
                    .insert((a.peer.0, a.conn_id, Role::Client), h);
                self.conns.insert(h, c);
                self.events.push_back(Event::Connected { conn: h });
            }
            Err(e) => {
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
            },
        );
        self.emit(mac, local, peer, m);
    }

    fn remove_conn(&mut self, now: Instant, h: ConnHandle) -> Option<Connection> {
        let c = self.conns.remove(&h)?;
        self.closing.remove(&h);
        self.conn_by_wire.remove(&(c.peer.0, c.conn_id, c.role));
        if c.role == Role::Server {
            // The client may still be retransmitting its request (our accept
            // lost): it must learn "accepted, then closed", never a refusal.
            self.remember(
                now,
                (c.peer.0, c.conn_id),
                Tomb::Closed {
                    client_token: c.peer_token,
                    server_token: c.my_token,
                },
            );
        }
        Some(c)
    }

    // ----- inputs: frames --------------------------------------------------

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
            } => self.on_request(now, &h, conn_id, client_token),
            Message::Accept {
                conn_id,
                client_token,
                server_token,
            } => {
                match self.attempt_by_wire.get(&conn_id).copied() {
                    Some(ah) => {
                        let a = &self.attempts[&ah];
                        if a.peer.0 != h.src_ip || a.client_token != client_token {
                            self.stats.bad_token += 1;
                            return;
                        }
                        self.finish_attempt(now, ah, Ok((h, server_token)));
                    }
                    None => {
                        let known = self
                            .conn_by_wire
                            .get(&(h.src_ip, conn_id, Role::Client))
                            .and_then(|c| self.conns.get(c));
                        match known {
                            Some(c)
                                if c.my_token == client_token && c.peer_token == server_token =>
                            {
                                self.stats.late_replies += 1; // duplicate accept
                            }
                            Some(_) => self.stats.bad_token += 1,
                            None => {
                                // The attempt is over (timed out, abandoned): tell the
                                // accepting side to drop the connection it made.
                                self.stats.late_replies += 1;
                                self.emit(
                                    h.src_mac,
                                    (h.dst_ip, h.dst_port),
                                    (h.src_ip, h.src_port),
                                    Message::Close {
                                        conn_id,
                                        token: server_token,
                                    },
                                );
                            }
                        }
                    }
                }
            }
            Message::Reject {
                conn_id,
                client_token,
                reason,
            } => match self.attempt_by_wire.get(&conn_id).copied() {
                Some(ah) => {
                    let a = &self.attempts[&ah];
                    if a.peer.0 != h.src_ip || a.client_token != client_token {
                        self.stats.bad_token += 1;
                        return;
                    }
                    let e = match reason {
                        RejectReason::NoListener => ConnectFailure::Reset,
                        r => ConnectFailure::Refused(r),
                    };
                    self.finish_attempt(now, ah, Err(e));
                }
                None => self.stats.late_replies += 1,
            },
            Message::Close { conn_id, token } => {
                let found = [Role::Server, Role::Client]
                    .into_iter()
                    .find_map(|r| self.conn_by_wire.get(&(h.src_ip, conn_id, r)).copied());
                match found {
                    Some(ch) if self.conns[&ch].my_token == token => {
                        let c = self
                            .remove_conn(now, ch)
                            .expect("indexed connection exists");
                        if c.closing.is_none() {
                            self.events.push_back(Event::Closed { conn: ch });
                        }
                        self.emit(
                            h.src_mac,
                            (h.dst_ip, h.dst_port),
                            (h.src_ip, h.src_port),
                            Message::CloseAck { conn_id, token },
                        );
                    }
                    Some(_) => self.stats.bad_token += 1,
                    None => {
                        // The accepting side accepted and closed before its accept
                        // reached us (lost or reordered): the attempt succeeded and
                        // the connection ended.
                        if let Some(ah) = self.attempt_by_wire.get(&conn_id).copied() {
                            let a = &self.attempts[&ah];
                            if a.peer.0 != h.src_ip || a.client_token != token {
                                self.stats.bad_token += 1;
                                return;
                            }
                            self.finish_attempt(now, ah, Ok((h, 0)));
                            self.remove_conn(now, ah);
                            self.events.push_back(Event::Closed { conn: ah });
                        }
                        // Acknowledge (again, if our first ack was lost).
                        self.emit(
                            h.src_mac,
                            (h.dst_ip, h.dst_port),
                            (h.src_ip, h.src_port),
                            Message::CloseAck { conn_id, token },
                        );
                    }
                }
            }
            Message::CloseAck { conn_id, token } => {
                let found = [Role::Server, Role::Client]
                    .into_iter()
                    .find_map(|r| self.conn_by_wire.get(&(h.src_ip, conn_id, r)).copied());
                match found {
                    Some(ch)
                        if self.conns[&ch].closing.is_some()
                            && self.conns[&ch].peer_token == token =>
                    {
                        self.remove_conn(now, ch);
                    }
                    Some(_) => self.stats.bad_token += 1,
                    None => self.stats.late_replies += 1,
                }
            }
            Message::ResolveRequest => {
                self.resolver.on_reply(now, h.src_ip, h.src_mac);
                self.emit(
                    h.src_mac,
                    (h.dst_ip, 0),
                    (h.src_ip, 0),
                    Message::ResolveReply { mac: self.mac },
                );
                self.resolved(h.src_ip, h.src_mac);
            }
            Message::ResolveReply { mac } => {
                if self.resolver.on_reply(now, h.src_ip, mac) {
                    self.resolved(h.src_ip, mac);
                } else {
                    self.stats.late_replies += 1;
                }
            }
            Message::EchoRequest { .. } | Message::EchoReply { .. } => self.stats.unhandled += 1,
        }
    }

    /// Attempts waiting for `ip`'s MAC send their request now.
    fn resolved(&mut self, ip: Ipv4, mac: EthernetAddress) {
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

    fn on_request(&mut self, now: Instant, h: &SanHeader, conn_id: u64, client_token: u64) {
        self.stats.requests_received += 1;
        let key = (h.src_ip, conn_id);
        // An accepted connection: replay the accept.
        if let Some(ch) = self
            .conn_by_wire
            .get(&(h.src_ip, conn_id, Role::Server))
            .copied()
        {
            let c = self.conns[&ch];
            if c.peer_token != client_token {
                self.stats.bad_token += 1;
                return;
            }
            // Replayed even while closing: the close retransmissions follow.
            self.stats.replayed_accepts += 1;
            self.emit(
                h.src_mac,
                c.local,
                c.peer,
                Message::Accept {
                    conn_id,
                    client_token,
                    server_token: c.my_token,
                },
            );
            return;
        }
        // Still queued: one entry only.
        if let Some(l) = self.queued_index.get(&key) {
            let same = self.listeners[l].queue.iter().any(|i| {
                i.conn_id == conn_id && i.peer.0 == h.src_ip && i.client_token == client_token
            });
            if same {
                self.stats.duplicate_requests += 1;
            } else {
                self.stats.bad_token += 1;
            }
            return;
        }
        // Refused before: the same answer.
        if let Some(&(tomb, _)) = self.tombstones.get(&key) {
            if tomb.client_token() != client_token {
                self.stats.bad_token += 1;
                return;
            }
            let (local, peer) = ((h.dst_ip, h.dst_port), (h.src_ip, h.src_port));
            match tomb {
                Tomb::Refused { reason, .. } => {
                    self.stats.replayed_rejects += 1;
                    self.emit(
                        h.src_mac,
                        local,
                        peer,
                        Message::Reject {
                            conn_id,
                            client_token,
                            reason,
                        },
                    );
                }
                Tomb::Closed { server_token, .. } => {
                    self.stats.replayed_accepts += 1;
                    self.emit(
                        h.src_mac,
                        local,
                        peer,
                        Message::Accept {
                            conn_id,
                            client_token,
                            server_token,
                        },
                    );
                    self.emit(
                        h.src_mac,
                        local,
                        peer,
                        Message::Close {
                            conn_id,
                            token: client_token,
                        },
                    );
                }
            }
            return;
        }
        let lid = self
            .listener_by_addr
            .get(&(h.dst_ip, h.dst_port))
            .or_else(|| self.listener_by_addr.get(&(Ipv4::UNSPECIFIED, h.dst_port)))
            .copied();
        let Some(lid) = lid else {
            return self.reject(now, h, conn_id, client_token, RejectReason::NoListener);
        };
        let l = &self.listeners[&lid];
        if l.queue.len() >= l.capacity {
            // [SEED] refused at once, and no event.
            return self.reject(now, h, conn_id, client_token, RejectReason::BacklogFull);
        }
        if self.queued_total >= self.cfg.max_half_open {
            return self.reject(now, h, conn_id, client_token, RejectReason::NoResources);
        }
        let inc = Incoming {
            peer: (h.src_ip, h.src_port),
            local: (h.dst_ip, h.dst_port),
            peer_mac: h.src_mac,
            conn_id,
            client_token,
            arrived: now,
        };
        self.listeners
            .get_mut(&lid)
            .expect("listener exists")
            .queue
            .push_back(inc);
        self.queued_total += 1;
        self.queued_index.insert(key, lid);
        self.events.push_back(Event::Incoming {
            listener: lid,
            request: inc,
        });
    }

    // ----- inputs: time ----------------------------------------------------

    /// Retransmissions, give-ups and expiries due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        // Resolution requests and failures.
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
        // Connect attempts.
        let mut due: Vec<ConnHandle> = self
            .attempts
            .iter()
            .filter(|(_, a)| a.deadline <= now || (a.peer_mac.is_some() && a.next_send <= now))
            .map(|(h, _)| *h)
            .collect();
        due.sort_unstable();
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
        // Closes.
        let due: Vec<ConnHandle> = self
            .closing
            .iter()
            .filter(|h| {
                self.conns
                    .get(h)
                    .and_then(|c| c.closing)
                    .is_some_and(|(d, n, _)| d <= now || n <= now)
            })
            .copied()
            .collect();
        for h in due {
            let c = self.conns.get_mut(&h).expect("listed");
            let (deadline, _, rto) = c.closing.expect("filtered");
            if deadline <= now {
                self.remove_conn(now, h);
                continue;
            }
            let rto = (rto * 2).min(self.cfg.max_rto);
            c.closing = Some((deadline, now + rto, rto));
            let c = *c;
            self.send_close(&c);
        }
        // Tombstones.
        while let Some(&(key, exp)) = self.tomb_order.front() {
            if exp > now {
                break;
            }
            self.tomb_order.pop_front();
            if self.tombstones.get(&key).is_some_and(|t| t.1 == exp) {
                self.tombstones.remove(&key);
            }
        }
    }

    // ----- inputs: the application ----------------------------------------

    /// Listens on `addr` (a SAN address of this host, or 0.0.0.0 for all) with
    /// a backlog of `backlog` requests (clamped to 1..=[`MAX_BACKLOG`]; a
    /// negative or huge value, SOMAXCONN-style, means the maximum).
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
        let capacity = crate::backlog::Backlog::<u8>::effective_capacity(backlog).min(MAX_BACKLOG);
        let id = ListenerId(self.id());
        self.listeners.insert(
            id,
            Listener {
                addr,
                capacity,
                queue: VecDeque::new(),
            },
        );
        self.listener_by_addr.insert(addr, id);
        Ok(id)
    }

    /// Closes a listener: every request still queued is refused to its peer
    /// (`ListenerClosed`, ECONNREFUSED there).
    ///
    /// # Errors
    /// [`CloseError::Unknown`] for an unknown listener.
    pub fn close_listener(&mut self, now: Instant, id: ListenerId) -> Result<(), CloseError> {
        let l = self.listeners.remove(&id).ok_or(CloseError::Unknown)?;
        self.listener_by_addr.remove(&l.addr);
        for inc in l.queue {
            self.unqueue(&inc);
            let h = inc.header(self.mac);
            self.reject(
                now,
                &h,
                inc.conn_id,
                inc.client_token,
                RejectReason::ListenerClosed,
            );
        }
        Ok(())
    }

    /// The request at the head of a listener's backlog (what a condition
    /// function is shown).
    ///
    /// # Errors
    /// [`AcceptError::UnknownListener`] or [`AcceptError::Empty`].
    pub fn head(&self, id: ListenerId) -> Result<Incoming, AcceptError> {
        let l = self
            .listeners
            .get(&id)
            .ok_or(AcceptError::UnknownListener)?;
        l.queue.front().copied().ok_or(AcceptError::Empty)
    }

    /// Like [`Endpoint::decide`], but only if the head is the request with this
    /// peer IP and connection id (the accept path names what it decided on).
    ///
    /// # Errors
    /// [`AcceptError::NotHead`] if another request is at the head, else as `decide`.
    pub fn decide_for(
        &mut self,
        now: Instant,
        id: ListenerId,
        peer_ip: Ipv4,
        conn_id: u64,
        d: Decision,
    ) -> Result<Option<ConnHandle>, AcceptError> {
        let head = self.head(id)?;
        if head.peer.0 != peer_ip || head.conn_id != conn_id {
            return Err(AcceptError::NotHead);
        }
        self.decide(now, id, d)
    }

    /// Resolves the request at the head of the backlog. Returns the new
    /// connection for [`Decision::Accept`], `None` otherwise.
    ///
    /// # Errors
    /// See [`AcceptError`]; on error nothing changes.
    pub fn decide(
        &mut self,
        now: Instant,
        id: ListenerId,
        d: Decision,
    ) -> Result<Option<ConnHandle>, AcceptError> {
        let l = self
            .listeners
            .get(&id)
            .ok_or(AcceptError::UnknownListener)?;
        if l.queue.is_empty() {
            return Err(AcceptError::Empty);
        }
        if d == Decision::Defer {
            return Ok(None);
        }
        if d == Decision::Accept && self.conns.len() >= self.cfg.max_connections {
            return Err(AcceptError::TooManyConnections);
        }
        let inc = self
            .listeners
            .get_mut(&id)
            .expect("checked")
            .queue
            .pop_front()
            .expect("checked");
        self.unqueue(&inc);
        let h = inc.header(self.mac);
        if d == Decision::Reject {
            self.reject(
                now,
                &h,
                inc.conn_id,
                inc.client_token,
                RejectReason::Refused,
            );
            return Ok(None);
        }
        self.stats.accepted += 1;
        let server_token = self.rng.next_u64();
        let ch = ConnHandle(self.id());
        let c = Connection {
            role: Role::Server,
            local: inc.local,
            peer: inc.peer,
            peer_mac: inc.peer_mac,
            conn_id: inc.conn_id,
            my_token: server_token,
            peer_token: inc.client_token,
            closing: None,
        };
        self.conns.insert(ch, c);
        self.conn_by_wire
            .insert((inc.peer.0, inc.conn_id, Role::Server), ch);
        self.emit(
            inc.peer_mac,
            inc.local,
            inc.peer,
            Message::Accept {
                conn_id: inc.conn_id,
                client_token: inc.client_token,
                server_token,
            },
        );
        Ok(Some(ch))
    }

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
        let mut conn_id = self.rng.next_u64();
        while self.attempt_by_wire.contains_key(&conn_id) {
            conn_id = self.rng.next_u64();
        }
        let client_token = self.rng.next_u64();
        let port = self.next_port;
        self.next_port = if self.next_port == *EPHEMERAL.end() {
            *EPHEMERAL.start()
        } else {
            self.next_port + 1
        };
        let h = ConnHandle(self.id());
        let peer_mac = match self.resolver.lookup(now, dst.0) {
            Lookup::Found(m) => Some(m),
            Lookup::Pending => None,
            Lookup::Failed => None,
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
            },
        );
        self.attempt_by_wire.insert(conn_id, h);
        if peer_mac.is_some() {
            self.send_request(h);
        } else {
            self.handle_timeout(now); // sends the resolution request now
        }
        Ok(h)
    }

    /// Closes a connection (a `Close` is retransmitted until acknowledged or
    /// the close budget runs out), or abandons a connect attempt in progress
    /// (nothing is sent; a late accept will be answered with a close).
    ///
    /// # Errors
    /// [`CloseError::Unknown`] for an unknown or already closing handle.
    pub fn close(&mut self, now: Instant, h: ConnHandle) -> Result<(), CloseError> {
        if let Some(a) = self.attempts.remove(&h) {
            self.attempt_by_wire.remove(&a.conn_id);
            return Ok(());
        }
        let c = self.conns.get_mut(&h).ok_or(CloseError::Unknown)?;
        if c.closing.is_some() {
            return Err(CloseError::Unknown);
        }
        let rto = self.cfg.initial_rto;
        c.closing = Some((now + self.cfg.close_budget, now + rto, rto));
        self.closing.insert(h);
        let c = *c;
        self.send_close(&c);
        Ok(())
    }
}
