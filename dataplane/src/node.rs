//! The handler the daemon runs in the lcore loop. It parses every received
//! frame, answers echo requests, and hands everything else to the protocol
//! core ([`Endpoint`]); it serves the command rings of attached processes
//! (listen, decide, connect, close) and turns the core's events into their
//! shared-memory event words, eventfds and futex wake-ups; and it runs echo
//! probes ordered by the control thread.

use crate::backlog::Backlog;
use crate::device::Device;
use crate::engine::{Handler, Tx};
use crate::proto::resolve::Lookup;
use crate::proto::rng::OsRng;
use crate::proto::{
    AcceptError, ConnHandle, ConnectError, Decision, Endpoint, Event, ListenError, ListenerId,
    ProtoConfig,
};
use crate::shm::{
    self, Cmd, PendingShm, Region, SockShm, FD_ACCEPT, FD_CONNECT, MAX_LISTENERS, MAX_SOCKETS,
};
use crate::time::Instant;
use crate::wire::{self, EthernetAddress, Ipv4, Message, Repr, SanHeader};
use crossbeam_queue::ArrayQueue;
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// An echo probe run by the lcore: resolve `dst`, then send `count` echo
/// requests one at a time (the next after the reply, or after `interval`).
#[derive(Debug)]
pub struct PingRequest {
    /// Destination SAN IP.
    pub dst: Ipv4,
    /// Number of probes.
    pub count: u32,
    /// Gap between a reply and the next probe.
    pub interval: Duration,
    /// How long to wait for each reply (and for resolution) before counting it lost.
    pub timeout: Duration,
    /// Where the result goes.
    pub reply: Sender<PingResult>,
}

/// What an echo probe measured.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PingResult {
    /// The MAC the destination resolved to (None if resolution failed).
    pub mac: Option<EthernetAddress>,
    /// Time to resolve, ns.
    pub resolve_ns: u64,
    /// Probes sent.
    pub sent: u32,
    /// Replies received.
    pub received: u32,
    /// Round-trip times of the replies, ns, in order.
    pub rtt_ns: Vec<u64>,
}

/// What the daemon and the lcore share about one attached process.
#[derive(Debug)]
pub struct AppShared {
    /// The daemon's id for the attachment.
    pub id: u64,
    /// The process (from SO_PEERCRED).
    pub pid: u32,
    /// Its shared region.
    pub region: Region,
    /// Registered eventfd per socket (-1: none); the fds are owned by `event_fds_owned`.
    pub event_fds: Vec<AtomicI32>,
    /// Owns the eventfds received from the process.
    pub event_fds_owned: Mutex<HashMap<u32, OwnedFd>>,
}

impl AppShared {
    /// A new attachment with a fresh region.
    ///
    /// # Errors
    /// If the region cannot be created.
    pub fn new(id: u64, pid: u32) -> std::io::Result<Arc<AppShared>> {
        Ok(Arc::new(AppShared {
            id,
            pid,
            region: Region::create(&format!("dsan-app-{pid}"))?,
            event_fds: (0..MAX_SOCKETS).map(|_| AtomicI32::new(-1)).collect(),
            event_fds_owned: Mutex::new(HashMap::new()),
        }))
    }

    /// Registers (or with `None`, removes) the eventfd of socket `sock`.
    pub fn set_event_fd(&self, sock: u32, fd: Option<OwnedFd>) {
        use std::os::fd::AsRawFd;
        let mut owned = self
            .event_fds_owned
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let raw = fd.as_ref().map_or(-1, |f| f.as_raw_fd());
        // The old fd stays open until replaced in the map, after the lcore sees the new one.
        self.event_fds[sock as usize].store(raw, Ordering::Release);
        match fd {
            Some(f) => owned.insert(sock, f),
            None => owned.remove(&sock),
        };
    }
}

/// A command from the control thread.
#[derive(Debug)]
pub enum Command {
    /// Run an echo probe.
    Ping(PingRequest),
    /// Start serving a process's command ring.
    Attach(Arc<AppShared>),
    /// A process went away (or detached): release everything it held. The
    /// sender is told when it is done.
    Detach(u64, Sender<()>),
    /// Report listeners (address, port, owner pid, capacity, depth).
    Listeners(Sender<Vec<ListenerInfo>>),
    /// Report established SAN connections.
    Connections(Sender<Vec<ConnInfo>>),
    /// The daemon stops: release every process (queued requests are refused
    /// to their peers) and mark their regions closed.
    Shutdown(Sender<()>),
}

/// One established SAN connection, for `dsanctl connections`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnInfo {
    /// "client" (connected from here) or "server" (accepted here).
    pub role: &'static str,
    /// Local address and port.
    pub local: (Ipv4, u16),
    /// Peer address and port.
    pub peer: (Ipv4, u16),
    /// Owning process (0 if none: closing after its process left).
    pub pid: u32,
    /// Whether a close is in progress.
    pub closing: bool,
}

/// One listener, for `dsanctl listeners`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerInfo {
    /// Bound address (0.0.0.0 for the wildcard).
    pub ip: Ipv4,
    /// Port.
    pub port: u16,
    /// Owning process.
    pub pid: u32,
    /// Backlog capacity.
    pub capacity: usize,
    /// Requests queued now.
    pub depth: usize,
}

/// Node counters (published on the drain tick).
#[derive(Debug, Default)]
pub struct NodeStats {
    /// SAN frames received, by kind index (see [`kind_index`]).
    pub rx_by_kind: [AtomicU64; KINDS],
    /// SAN frames sent, by kind index.
    pub tx_by_kind: [AtomicU64; KINDS],
    /// Frames dropped: not the SAN EtherType.
    pub drop_not_san: AtomicU64,
    /// Frames dropped: truncated or malformed.
    pub drop_malformed: AtomicU64,
    /// Frames dropped: unsupported version.
    pub drop_version: AtomicU64,
    /// Frames dropped: addressed to an IP or MAC that is not ours.
    pub drop_not_ours: AtomicU64,
    /// Frames dropped: replies nobody waited for (late or duplicate).
    pub drop_unexpected: AtomicU64,
    /// Frames dropped: wrong token.
    pub drop_bad_token: AtomicU64,
    /// Garbage commands from applications (dropped, counted).
    pub bad_commands: AtomicU64,
    /// Processes attached now.
    pub attached: AtomicU64,
    /// Connect requests received (the protocol core's count).
    pub requests_received: AtomicU64,
    /// Requests accepted.
    pub accepted: AtomicU64,
    /// Requests refused: backlog full, no listener, refused, no resources, listener closed.
    pub rejected: [AtomicU64; 5],
    /// Connect attempts finished: connected, refused, reset, timed out.
    pub attempts: [AtomicU64; 4],
    /// Successful connect durations per bucket of `proto::CONNECT_BUCKETS_S` (+ overflow).
    pub connect_buckets: [AtomicU64; 19],
    /// Their sum, ns.
    pub connect_sum_ns: AtomicU64,
}

/// Number of message kinds counted.
pub const KINDS: usize = 9;
/// Names of the kinds, by index.
pub const KIND_NAMES: [&str; KINDS] = [
    "connect_request",
    "accept",
    "reject",
    "close",
    "close_ack",
    "resolve_request",
    "resolve_reply",
    "echo_request",
    "echo_reply",
];

/// The counter index of a message.
pub fn kind_index(m: &Message) -> usize {
    match m {
        Message::ConnectRequest { .. } => 0,
        Message::Accept { .. } => 1,
        Message::Reject { .. } => 2,
        Message::Close { .. } => 3,
        Message::CloseAck { .. } => 4,
        Message::ResolveRequest => 5,
        Message::ResolveReply { .. } => 6,
        Message::EchoRequest { .. } => 7,
        Message::EchoReply { .. } => 8,
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Local {
    rx: [u64; KINDS],
    tx: [u64; KINDS],
    not_san: u64,
    malformed: u64,
    version: u64,
    not_ours: u64,
    unexpected: u64,
    bad_commands: u64,
}

/// Node configuration.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The SAN EtherType.
    pub ethertype: u16,
    /// Protocol parameters (SAN subnets, budgets, limits).
    pub proto: ProtoConfig,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            ethertype: wire::DEFAULT_ETHERTYPE,
            proto: ProtoConfig::default(),
        }
    }
}

struct ActivePing {
    req: PingRequest,
    started: Instant,
    result: PingResult,
    /// Sequence and send time of the probe in flight.
    in_flight: Option<(u64, Instant)>,
    next_at: Instant,
}

/// What a process's socket is in the dataplane.
#[derive(Debug, Clone, Copy)]
enum SockObj {
    Listener {
        id: ListenerId,
        area: usize,
    },
    Attempt {
        h: ConnHandle,
        blocking: bool,
        seq: u32,
    },
    Conn(ConnHandle),
    /// The peer closed it; the application has yet to.
    Ended,
}

struct Proc {
    // Views into the region first: dropped before `shared`.
    backlogs: HashMap<u32, Backlog<PendingShm>>,
    socks: HashMap<u32, SockObj>,
    shared: Arc<AppShared>,
}

/// The daemon's handler.
pub struct Node {
    cfg: NodeConfig,
    ep: Endpoint<OsRng>,
    addrs: Arc<RwLock<Vec<Ipv4>>>,
    addrs_seen: u64,
    addrs_version: Arc<AtomicU64>,
    subnets: Arc<RwLock<Vec<crate::proto::Subnet>>>,
    commands: Arc<ArrayQueue<Command>>,
    ping: Option<ActivePing>,
    procs: HashMap<u64, Proc>,
    /// The keys of `procs`, for the loop to walk without allocating.
    proc_ids: Vec<u64>,
    listener_owner: HashMap<ListenerId, (u64, u32)>,
    conn_owner: HashMap<ConnHandle, (u64, u32)>,
    stats: Arc<NodeStats>,
    local: Local,
}

/// The control side's handle to a running node.
#[derive(Clone)]
pub struct NodeHandle {
    /// Commands for the lcore (ring the engine's doorbell after pushing).
    pub commands: Arc<ArrayQueue<Command>>,
    /// Published counters.
    pub stats: Arc<NodeStats>,
    /// The host's SAN addresses; bump `addrs_version` after changing them.
    pub addrs: Arc<RwLock<Vec<Ipv4>>>,
    /// Incremented on every address change.
    pub addrs_version: Arc<AtomicU64>,
    /// The SAN subnets (updated with the addresses).
    pub subnets: Arc<RwLock<Vec<crate::proto::Subnet>>>,
}

impl NodeHandle {
    /// Replaces the host's SAN addresses and subnets; the lcore applies them on its next tick.
    pub fn set_addrs(&self, addrs: Vec<Ipv4>, subnets: Vec<crate::proto::Subnet>) {
        *self.addrs.write().unwrap_or_else(|e| e.into_inner()) = addrs;
        *self.subnets.write().unwrap_or_else(|e| e.into_inner()) = subnets;
        self.addrs_version.fetch_add(1, Ordering::Release);
    }
}

fn complete(s: &SockShm, seq: u32, result: i64) {
    s.result.store(result, Ordering::Relaxed);
    s.done_seq.store(seq, Ordering::Release);
    std::sync::atomic::fence(Ordering::SeqCst);
    if s.waiters.load(Ordering::Relaxed) != 0 {
        shm::futex_wake(&s.done_seq);
    }
}

fn raise(app: &AppShared, sock: u32, bit: u32) {
    let s = app.region.sock(sock as usize);
    s.events.fetch_or(bit, Ordering::AcqRel);
    s.arrivals.fetch_add(1, Ordering::Release);
    if s.event_mask.load(Ordering::Relaxed) & bit != 0 {
        let fd = app.event_fds[sock as usize].load(Ordering::Acquire);
        if fd >= 0 {
            shm::signal_eventfd(fd);
        }
    }
    std::sync::atomic::fence(Ordering::SeqCst);
    if s.waiters.load(Ordering::Relaxed) != 0 {
        shm::futex_wake(&s.arrivals);
    }
}

impl Node {
    /// A node with this MAC answering for `addrs`.
    pub fn new(cfg: NodeConfig, mac: EthernetAddress, addrs: Vec<Ipv4>) -> (Node, NodeHandle) {
        let h = NodeHandle {
            commands: Arc::new(ArrayQueue::new(256)),
            stats: Arc::new(NodeStats::default()),
            addrs: Arc::new(RwLock::new(addrs.clone())),
            addrs_version: Arc::new(AtomicU64::new(0)),
            subnets: Arc::new(RwLock::new(cfg.proto.subnets.clone())),
        };
        let n = Node {
            ep: Endpoint::new(cfg.proto.clone(), mac, addrs, OsRng::default()),
            cfg,
            addrs: h.addrs.clone(),
            addrs_seen: 0,
            addrs_version: h.addrs_version.clone(),
            subnets: h.subnets.clone(),
            commands: h.commands.clone(),
            ping: None,
            procs: HashMap::new(),
            proc_ids: Vec::new(),
            listener_owner: HashMap::new(),
            conn_owner: HashMap::new(),
            stats: h.stats.clone(),
            local: Local::default(),
        };
        (n, h)
    }

    /// The protocol core's counters.
    pub fn proto_stats(&self) -> &crate::proto::ProtoStats {
        self.ep.stats()
    }

    fn send<D: Device>(&mut self, tx: &mut Tx<'_, D>, repr: Repr) {
        let et = self.cfg.ethertype;
        if tx.send_with(repr.buffer_len(), |b| {
            repr.emit(&mut wire::Frame::new_unchecked(b), et)
        }) {
            self.local.tx[kind_index(&repr.message)] += 1;
        }
    }

    fn handle_frame<D: Device>(&mut self, now: Instant, bytes: &[u8], tx: &mut Tx<'_, D>) {
        let repr = match Repr::parse_bytes(bytes, self.cfg.ethertype) {
            Ok(r) => r,
            Err(wire::Error::EtherType) => return self.local.not_san += 1,
            Err(wire::Error::Version) => return self.local.version += 1,
            Err(_) => return self.local.malformed += 1,
        };
        self.local.rx[kind_index(&repr.message)] += 1;
        let h = repr.header;
        let me = tx.mac();
        if !h.dst_mac.is_multicast() && h.dst_mac != me {
            return self.local.not_ours += 1;
        }
        match repr.message {
            Message::EchoRequest { seq, stamp } => {
                if !self.ep.addrs().contains(&h.dst_ip) {
                    return self.local.not_ours += 1;
                }
                let header = SanHeader {
                    dst_mac: h.src_mac,
                    src_mac: me,
                    src_ip: h.dst_ip,
                    src_port: h.dst_port,
                    dst_ip: h.src_ip,
                    dst_port: h.src_port,
                };
                self.send(
                    tx,
                    Repr {
                        header,
                        message: Message::EchoReply { seq, stamp },
                    },
                );
            }
            Message::EchoReply { seq, .. } => {
                let Some(p) = self.ping.as_mut() else {
                    return self.local.unexpected += 1;
                };
                match p.in_flight {
                    Some((s, sent_at)) if s == seq && h.src_ip == p.req.dst => {
                        p.result.received += 1;
                        p.result
                            .rtt_ns
                            .push(now.saturating_since(sent_at).as_nanos() as u64);
                        p.in_flight = None;
                        p.next_at = now + p.req.interval;
                    }
                    _ => self.local.unexpected += 1,
                }
            }
            _ => self.ep.handle_frame(now, &repr),
        }
    }

    fn drive_ping<D: Device>(&mut self, now: Instant, tx: &mut Tx<'_, D>) -> bool {
        let Some(mut p) = self.ping.take() else {
            return false;
        };
        let mut busy = false;
        if p.result.mac.is_none() {
            match self.ep.resolver_mut().lookup(now, p.req.dst) {
                Lookup::Found(mac) => {
                    p.result.mac = Some(mac);
                    p.result.resolve_ns = now.saturating_since(p.started).as_nanos() as u64;
                    p.next_at = now;
                    busy = true;
                }
                Lookup::Pending if now.saturating_since(p.started) < p.req.timeout => {}
                _ => {
                    let _ = p.req.reply.send(p.result);
                    return true;
                }
            }
        }
        if let Some(mac) = p.result.mac {
            if let Some((_, sent_at)) = p.in_flight {
                if now.saturating_since(sent_at) >= p.req.timeout {
                    p.in_flight = None; // lost
                    p.next_at = now;
                }
            }
            if p.in_flight.is_none() {
                if p.result.sent >= p.req.count {
                    let _ = p.req.reply.send(p.result);
                    return true;
                }
                if now >= p.next_at {
                    let seq = u64::from(p.result.sent);
                    let src_ip = self
                        .ep
                        .addrs()
                        .first()
                        .copied()
                        .unwrap_or(Ipv4::UNSPECIFIED);
                    let header = SanHeader {
                        dst_mac: mac,
                        src_mac: tx.mac(),
                        src_ip,
                        src_port: 0,
                        dst_ip: p.req.dst,
                        dst_port: 0,
                    };
                    self.send(
                        tx,
                        Repr {
                            header,
                            message: Message::EchoRequest {
                                seq,
                                stamp: now.as_nanos(),
                            },
                        },
                    );
                    p.result.sent += 1;
                    p.in_flight = Some((seq, now));
                    busy = true;
                }
            }
        }
        self.ping = Some(p);
        busy
    }

    fn control(&mut self, now: Instant, c: Command) {
        match c {
            Command::Ping(req) => {
                if let Some(old) = self.ping.replace(ActivePing {
                    req,
                    started: now,
                    result: PingResult::default(),
                    in_flight: None,
                    next_at: now,
                }) {
                    // One probe at a time: the queue order serialises them, so this
                    // only happens if a caller bypassed it; finish the old one.
                    let _ = old.req.reply.send(old.result);
                }
            }
            Command::Attach(app) => {
                self.proc_ids.push(app.id);
                self.procs.insert(
                    app.id,
                    Proc {
                        backlogs: HashMap::new(),
                        socks: HashMap::new(),
                        shared: app,
                    },
                );
            }
            Command::Detach(id, done) => {
                self.detach(now, id);
                let _ = done.send(());
            }
            Command::Shutdown(done) => {
                for id in std::mem::take(&mut self.proc_ids) {
                    self.detach(now, id);
                }
                let _ = done.send(());
            }
            Command::Connections(reply) => {
                let mut v: Vec<ConnInfo> = self
                    .ep
                    .connections()
                    .map(|(h, c)| ConnInfo {
                        role: if c.role == crate::proto::Role::Client {
                            "client"
                        } else {
                            "server"
                        },
                        local: c.local,
                        peer: c.peer,
                        pid: self
                            .conn_owner
                            .get(&h)
                            .and_then(|(p, _)| self.procs.get(p))
                            .map_or(0, |p| p.shared.pid),
                        closing: c.is_closing(),
                    })
                    .collect();
                v.sort_by_key(|c| (c.local.1, c.peer));
                let _ = reply.send(v);
            }
            Command::Listeners(reply) => {
                let mut v: Vec<ListenerInfo> = self
                    .ep
                    .listeners()
                    .map(|(id, addr, depth, capacity)| {
                        let pid = self
                            .listener_owner
                            .get(&id)
                            .and_then(|(p, _)| self.procs.get(p))
                            .map_or(0, |p| p.shared.pid);
                        ListenerInfo {
                            ip: addr.0,
                            port: addr.1,
                            pid,
                            capacity,
                            depth,
                        }
                    })
                    .collect();
                v.sort_by_key(|l| (l.port, l.ip));
                let _ = reply.send(v);
            }
        }
    }

    /// A process leaves: everything it held is released (its listeners refuse
    /// their queues) and its region is marked closed.
    fn detach(&mut self, now: Instant, id: u64) {
        self.proc_ids.retain(|p| *p != id);
        if let Some(p) = self.procs.remove(&id) {
            for (_, obj) in p.socks {
                self.release(now, obj);
            }
            p.shared.region.header().closed.store(1, Ordering::Release);
        }
    }

    /// Releases what a socket holds in the core.
    fn release(&mut self, now: Instant, obj: SockObj) {
        match obj {
            SockObj::Listener { id, .. } => {
                self.listener_owner.remove(&id);
                let _ = self.ep.close_listener(now, id);
            }
            SockObj::Attempt { h, .. } | SockObj::Conn(h) => {
                self.conn_owner.remove(&h);
                let _ = self.ep.close(now, h);
            }
            SockObj::Ended => {}
        }
    }

    fn serve_app(&mut self, now: Instant, id: u64) -> bool {
        let mut busy = false;
        for _ in 0..crate::device::BURST {
            let Some(p) = self.procs.get(&id) else {
                return busy;
            };
            let Some(cmd) = p.shared.region.commands().pop() else {
                return busy;
            };
            busy = true;
            self.app_command(now, id, cmd);
        }
        busy
    }

    fn app_command(&mut self, now: Instant, id: u64, cmd: Cmd) {
        let sock = cmd.sock;
        if sock as usize >= MAX_SOCKETS {
            self.local.bad_commands += 1;
            if let Some(p) = self.procs.get(&id) {
                p.shared
                    .region
                    .header()
                    .bad_commands
                    .fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        let p = self.procs.get_mut(&id).expect("caller checked");
        let app = p.shared.clone();
        let s = app.region.sock(sock as usize);
        let existing = p.socks.get(&sock).copied();
        let result: Option<i64> = match cmd.op {
            shm::OP_LISTEN => {
                let (ip, port) = shm::unpack_addr(cmd.a);
                let area = cmd.c as usize;
                let area_used = p
                    .socks
                    .values()
                    .any(|o| matches!(o, SockObj::Listener { area: a, .. } if *a == area));
                if existing.is_some() || area >= MAX_LISTENERS || area_used || port == 0 {
                    Some(-i64::from(libc::EINVAL))
                } else {
                    match self.ep.listen((ip, port), cmd.b as i64) {
                        Ok(l) => {
                            let cap = self.ep.backlog(l).map_or(1, |b| b.1);
                            let ring = app.region.format_backlog(area, cap);
                            let p = self.procs.get_mut(&id).expect("present");
                            p.backlogs.insert(sock, ring);
                            p.socks.insert(sock, SockObj::Listener { id: l, area });
                            self.listener_owner.insert(l, (id, sock));
                            Some(cap as i64)
                        }
                        Err(ListenError::AddrInUse) => Some(-i64::from(libc::EADDRINUSE)),
                        Err(ListenError::AddrNotAvailable) => Some(-i64::from(libc::EADDRNOTAVAIL)),
                        Err(_) => Some(-i64::from(libc::EMFILE)),
                    }
                }
            }
            shm::OP_DECIDE => match existing {
                Some(SockObj::Listener { id: l, .. }) => {
                    let decision = if cmd.b & 0xff == 0 {
                        Decision::Accept
                    } else {
                        Decision::Reject
                    };
                    let new_sock = (cmd.b >> 8) as u32;
                    let (peer_ip, _) = shm::unpack_addr(cmd.c);
                    if decision == Decision::Accept
                        && (new_sock as usize >= MAX_SOCKETS || p.socks.contains_key(&new_sock))
                    {
                        Some(-i64::from(libc::EINVAL))
                    } else {
                        match self.ep.decide_for(now, l, peer_ip, cmd.a, decision) {
                            Ok(Some(h)) => {
                                let p = self.procs.get_mut(&id).expect("present");
                                p.socks.insert(new_sock, SockObj::Conn(h));
                                self.conn_owner.insert(h, (id, new_sock));
                                Some(0)
                            }
                            Ok(None) => Some(-i64::from(libc::ECONNREFUSED)),
                            Err(AcceptError::TooManyConnections) => Some(-i64::from(libc::ENOBUFS)),
                            Err(AcceptError::Empty) => Some(-i64::from(libc::EAGAIN)),
                            Err(_) => Some(-i64::from(libc::EINVAL)),
                        }
                    }
                }
                _ => Some(-i64::from(libc::EINVAL)),
            },
            shm::OP_CONNECT => match existing {
                Some(SockObj::Attempt { .. }) => Some(-i64::from(libc::EALREADY)),
                Some(SockObj::Conn(_)) => Some(-i64::from(libc::EISCONN)),
                Some(SockObj::Listener { .. }) => Some(-i64::from(libc::EINVAL)),
                _ => {
                    let dst = shm::unpack_addr(cmd.a);
                    let src = (cmd.b != 0).then(|| Ipv4::from(cmd.b as u32));
                    let nonblocking = cmd.c & 1 == 1;
                    match self.ep.connect(now, src, dst) {
                        Ok(h) => {
                            s.connect_state.store(0, Ordering::Relaxed);
                            if let Some((local, _, _)) = self.ep.attempt(h) {
                                s.result2
                                    .store(shm::pack_addr(local.0, local.1), Ordering::Relaxed);
                            }
                            let p = self.procs.get_mut(&id).expect("present");
                            p.socks.insert(
                                sock,
                                SockObj::Attempt {
                                    h,
                                    blocking: !nonblocking,
                                    seq: cmd.seq,
                                },
                            );
                            self.conn_owner.insert(h, (id, sock));
                            if nonblocking {
                                Some(-i64::from(libc::EINPROGRESS))
                            } else {
                                None // completes with the outcome
                            }
                        }
                        Err(ConnectError::HostUnreachable) => Some(-i64::from(libc::EHOSTUNREACH)),
                        Err(ConnectError::NoLocalAddress) => Some(-i64::from(libc::EADDRNOTAVAIL)),
                        Err(_) => Some(-i64::from(libc::EAGAIN)),
                    }
                }
            },
            shm::OP_CLOSE => {
                let p = self.procs.get_mut(&id).expect("present");
                p.backlogs.remove(&sock);
                match p.socks.remove(&sock) {
                    Some(obj) => {
                        self.release(now, obj);
                        Some(0)
                    }
                    None => Some(0),
                }
            }
            _ => {
                self.local.bad_commands += 1;
                app.region
                    .header()
                    .bad_commands
                    .fetch_add(1, Ordering::Relaxed);
                Some(-i64::from(libc::EINVAL))
            }
        };
        if let Some(r) = result {
            complete(s, cmd.seq, r);
        }
    }

    fn dispatch(&mut self, e: Event) {
        match e {
            Event::Incoming { listener, request } => {
                let Some(&(pid, sock)) = self.listener_owner.get(&listener) else {
                    return;
                };
                let Some(p) = self.procs.get(&pid) else {
                    return;
                };
                if let Some(ring) = p.backlogs.get(&sock) {
                    let entry = PendingShm {
                        conn_id: request.conn_id,
                        peer_ip: u32::from(request.peer.0),
                        peer_port: request.peer.1,
                        local_port: request.local.1,
                        local_ip: u32::from(request.local.0),
                        _pad: 0,
                    };
                    // Same capacity as the core's backlog, so this cannot be full.
                    if ring.push(entry).is_err() {
                        self.local.bad_commands += 1;
                    }
                }
                raise(&p.shared, sock, FD_ACCEPT);
            }
            Event::Connected { conn } | Event::ConnectFailed { conn, .. } => {
                let Some(&(pid, sock)) = self.conn_owner.get(&conn) else {
                    return;
                };
                let Some(p) = self.procs.get_mut(&pid) else {
                    return;
                };
                let Some(SockObj::Attempt { blocking, seq, .. }) = p.socks.get(&sock).copied()
                else {
                    return;
                };
                let err: i32 = match e {
                    Event::ConnectFailed { error, .. } => -error.errno(),
                    _ => 0,
                };
                if err == 0 {
                    p.socks.insert(sock, SockObj::Conn(conn));
                } else {
                    p.socks.remove(&sock);
                    self.conn_owner.remove(&conn);
                }
                let app = p.shared.clone();
                let s = app.region.sock(sock as usize);
                s.connect_state
                    .store(if err == 0 { 1 } else { err }, Ordering::Release);
                if blocking {
                    s.arrivals.fetch_add(1, Ordering::Release);
                    complete(s, seq, i64::from(err));
                } else {
                    s.connect_error.store(err, Ordering::Release);
                    raise(&app, sock, FD_CONNECT);
                }
            }
            Event::Closed { conn } => {
                if let Some((pid, sock)) = self.conn_owner.remove(&conn) {
                    if let Some(p) = self.procs.get_mut(&pid) {
                        p.socks.insert(sock, SockObj::Ended);
                    }
                }
            }
        }
    }

    fn flush_core<D: Device>(&mut self, tx: &mut Tx<'_, D>) -> bool {
        let mut busy = false;
        while let Some(r) = self.ep.poll_transmit() {
            self.send(tx, r);
            busy = true;
        }
        while let Some(e) = self.ep.poll_event() {
            self.dispatch(e);
            busy = true;
        }
        busy
    }
}

impl<D: Device> Handler<D> for Node {
    fn on_rx(&mut self, now: Instant, rx: &mut Vec<D::Buf>, tx: &mut Tx<'_, D>) {
        for f in rx.drain(..) {
            self.handle_frame(now, f.as_ref(), tx);
        }
        self.flush_core(tx);
    }

    fn poll(&mut self, now: Instant, tx: &mut Tx<'_, D>) -> bool {
        let mut busy = false;
        while let Some(c) = self.commands.pop() {
            // A ping waits for the one before it.
            if matches!(c, Command::Ping(_)) && self.ping.is_some() {
                let _ = self.commands.push(c);
                break;
            }
            self.control(now, c);
            busy = true;
        }
        // Serve every attached process's command ring (no allocation: the ids
        // are kept in a list maintained on attach and detach).
        for i in 0..self.proc_ids.len() {
            let id = self.proc_ids[i];
            busy |= self.serve_app(now, id);
        }
        if self.ep.poll_timeout().is_some_and(|t| t <= now) {
            self.ep.handle_timeout(now);
        }
        busy |= self.drive_ping(now, tx);
        busy |= self.flush_core(tx);
        busy
    }

    fn on_tick(&mut self, _now: Instant) {
        let v = self.addrs_version.load(Ordering::Acquire);
        if v != self.addrs_seen {
            self.addrs_seen = v;
            if let Ok(a) = self.addrs.read() {
                self.ep.set_addrs(a.clone());
            }
            if let Ok(sn) = self.subnets.read() {
                self.ep.set_subnets(sn.clone());
            }
        }
        let s = &self.stats;
        for i in 0..KINDS {
            s.rx_by_kind[i].store(self.local.rx[i], Ordering::Relaxed);
            s.tx_by_kind[i].store(self.local.tx[i], Ordering::Relaxed);
        }
        let ps = self.ep.stats();
        s.drop_not_san.store(self.local.not_san, Ordering::Relaxed);
        s.drop_malformed
            .store(self.local.malformed, Ordering::Relaxed);
        s.drop_version.store(self.local.version, Ordering::Relaxed);
        s.drop_not_ours
            .store(self.local.not_ours + ps.not_ours, Ordering::Relaxed);
        s.drop_unexpected
            .store(self.local.unexpected + ps.late_replies, Ordering::Relaxed);
        s.drop_bad_token.store(ps.bad_token, Ordering::Relaxed);
        s.bad_commands
            .store(self.local.bad_commands, Ordering::Relaxed);
        s.attached.store(self.procs.len() as u64, Ordering::Relaxed);
        s.requests_received
            .store(ps.requests_received, Ordering::Relaxed);
        s.accepted.store(ps.accepted, Ordering::Relaxed);
        for (a, v) in s.rejected.iter().zip(ps.rejected) {
            a.store(v, Ordering::Relaxed);
        }
        for (a, v) in s.attempts.iter().zip(ps.attempts) {
            a.store(v, Ordering::Relaxed);
        }
        for (a, v) in s.connect_buckets.iter().zip(ps.connect_duration_buckets) {
            a.store(v, Ordering::Relaxed);
        }
        s.connect_sum_ns
            .store(ps.connect_duration_sum_ns, Ordering::Relaxed);
    }

    fn next_deadline(&self) -> Option<Instant> {
        let p = self.ping.as_ref().map(|p| match p.in_flight {
            Some((_, t)) => t + p.req.timeout,
            None => p.next_at,
        });
        [p, self.ep.poll_timeout()].into_iter().flatten().min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Loopback;
    use crate::engine::{run, EngineConfig, EngineShared, IdlePolicy};
    use crate::time::Clock;

    fn two_nodes(policy: IdlePolicy) {
        let ma = EthernetAddress([2, 0, 0, 0, 0, 1]);
        let mb = EthernetAddress([2, 0, 0, 0, 0, 2]);
        let (mut da, mut db) = Loopback::pair(256, ma, mb);
        let ipa = Ipv4::new(198, 18, 0, 1);
        let ipb = Ipv4::new(198, 18, 0, 2);
        let (mut na, ha) = Node::new(NodeConfig::default(), ma, vec![ipa]);
        let (mut nb, hb) = Node::new(NodeConfig::default(), mb, vec![ipb]);
        let sa = EngineShared::new(policy).unwrap();
        let sb = EngineShared::new(policy).unwrap();
        let cfg = EngineConfig {
            idle: policy,
            ..Default::default()
        };
        let (sa2, sb2) = (sa.clone(), sb.clone());
        let ta = std::thread::spawn(move || run(&mut da, &mut na, &cfg, &sa2, Clock::new()));
        let tb = std::thread::spawn(move || run(&mut db, &mut nb, &cfg, &sb2, Clock::new()));

        let (txr, rxr) = std::sync::mpsc::channel();
        ha.commands
            .push(Command::Ping(PingRequest {
                dst: ipb,
                count: 50,
                interval: Duration::ZERO,
                timeout: Duration::from_secs(1),
                reply: txr,
            }))
            .unwrap();
        sa.doorbell.ring();
        let res = rxr.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(res.mac, Some(mb));
        assert_eq!((res.sent, res.received, res.rtt_ns.len()), (50, 50, 50));

        // Unknown destination: resolution fails, nothing sent.
        let (txr, rxr) = std::sync::mpsc::channel();
        ha.commands
            .push(Command::Ping(PingRequest {
                dst: Ipv4::new(198, 18, 0, 9),
                count: 1,
                interval: Duration::ZERO,
                timeout: Duration::from_millis(50),
                reply: txr,
            }))
            .unwrap();
        sa.doorbell.ring();
        let res = rxr.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!((res.mac, res.sent), (None, 0));

        sa.request_stop();
        sb.request_stop();
        ta.join().unwrap();
        tb.join().unwrap();
        assert_eq!(hb.stats.rx_by_kind[7].load(Ordering::Relaxed), 50);
        assert_eq!(hb.stats.tx_by_kind[8].load(Ordering::Relaxed), 50);
        assert_eq!(ha.stats.rx_by_kind[8].load(Ordering::Relaxed), 50);
        assert_eq!(
            hb.stats.tx_by_kind[6].load(Ordering::Relaxed),
            1,
            "one resolve reply"
        );
    }

    #[test]
    fn echo_between_two_nodes_poll() {
        two_nodes(IdlePolicy::Poll);
    }

    #[test]
    fn echo_between_two_nodes_adaptive() {
        two_nodes(IdlePolicy::ADAPTIVE_DEFAULT);
    }

    #[test]
    fn garbage_frames_are_counted_not_fatal() {
        let ma = EthernetAddress([2, 0, 0, 0, 0, 1]);
        let (mut dev, mut peer) = Loopback::pair(256, ma, EthernetAddress([2, 0, 0, 0, 0, 2]));
        let (mut n, h) = Node::new(NodeConfig::default(), ma, vec![Ipv4::new(198, 18, 0, 1)]);
        let shared = EngineShared::new(IdlePolicy::Poll).unwrap();
        let s2 = shared.clone();
        let t = std::thread::spawn(move || {
            run(
                &mut dev,
                &mut n,
                &EngineConfig {
                    idle: IdlePolicy::Poll,
                    ..Default::default()
                },
                &s2,
                Clock::new(),
            )
        });
        let mut frames = vec![vec![0u8; 3], vec![0xff; 60], {
            let mut v = vec![0u8; 60];
            v[12] = 0x88;
            v[13] = 0xb5;
            v[14] = 1;
            v[15] = 0x77;
            v
        }];
        peer.tx_burst(&mut frames);
        std::thread::sleep(Duration::from_millis(50));
        shared.request_stop();
        t.join().unwrap();
        assert_eq!(
            h.stats.drop_not_san.load(Ordering::Relaxed)
                + h.stats.drop_malformed.load(Ordering::Relaxed),
            3
        );
    }
}
