//! The handler the daemon runs in the lcore loop: an adapter between the
//! device, the processes' channel and the protocol core.
//!
//! | file | job | owns |
//! |---|---|---|
//! | `mod.rs` | the [`Node`]: frames in and out, commands from the control thread, the core's events handed to the part they concern, the pass | the core and the parts below |
//! | `procs` | the process table: each attached process's region, command ring, sockets and event descriptors, and signals to its sockets | `Procs` |
//! | `apps` | the application side: the commands processes send, the requests and connect outcomes the core delivers to them, processes coming and going, claims and hand-backs of shared connections | `Apps` (with `Procs`, `Groups` and `Quotas`) |
//! | `streams` | byte streams at the edge: each connection's rings and stream block in the process's region, joined to the core's streams (state, timers, transmit queue, resets: `proto::streams`): payloads out of and into the rings, the process signalled, rings moved between sockets | `Streams` (with `Shares` below) |
//! | `handover` | who else holds a connection shared across fork: lives, claim keys, sockets holding it from afar, orphans | `Shares` |
//! | `groups` | listeners shared by forked workers and by SO_REUSEPORT | `Groups` |
//! | `quotas` | one user's shares of listeners, attempts and connections | `Quotas` |
//! | `faults` | the lab's fault injector on received frames | `FaultInjector` |
//! | `signal` | completing a socket's command and raising its event bits | - |
//! | `notify` | wake-ups at the end of a pass: wake sockets signalled by the lcore itself (a pass with more than `DIRECT_WAKES` through the daemon's waker thread), eventfds by the process's notifier thread | the pass's wake list, the waker |
//! | `probe` | echo probes (`dsanctl ping`) | `Probe` |
//! | `trace` | connection-setup tracing (`dsanctl trace`) | `Trace` |
//! | `counters` | counters, published as one [`Counters`] snapshot | `Local`, `Publisher` |
//!
//! Each part has its state and its methods in its own file, and no struct
//! is implemented in more than one. A part gets what else it works with as
//! arguments: the application side gets the rest of the node lent in a
//! `Ctx` (the core, the streams, the counters, the tracer, the
//! configuration); the streams get the core, the process table (to signal
//! a socket) and the counters.

mod apps;
mod counters;
mod faults;
mod groups;
mod handover;
mod notify;
mod probe;
mod procs;
mod quotas;
mod signal;
mod streams;
mod trace;

pub use counters::{
    kind_index, Counters, NodeStats, Quota, APP_REJECT_REASONS, ATTEMPT_RESULTS, KINDS, KIND_NAMES,
    LISTEN_DENIALS, QUOTAS, REJECT_REASONS, RESET_REASONS,
};
pub use faults::Faults;
pub use notify::{start_waker, Notifier, DIRECT_WAKES};
pub use probe::{PingRequest, PingResult};
pub use procs::{AppShared, Lineage};
pub use quotas::{UID_ATTEMPTS, UID_LISTENERS};
pub use streams::{STREAM_ENTRY_BYTES, STREAM_STATE_BYTES};
pub use trace::{Hop, TraceAction, TraceEvent, TRACE_CAPACITY};

use crate::device::Device;
use crate::engine::{Handler, Tx};
use crate::proto::rng::OsRng;
use crate::proto::{Endpoint, Event, ProtoConfig};
use crate::time::Instant;
use crate::wire::{self, EthernetAddress, Ipv4, Message, Repr, SanHeader};
use counters::Local;
use crossbeam_queue::ArrayQueue;
use dsan_channel::ring::Consumer;
use probe::Probe;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, RwLock};

/// A command from the control thread.
#[derive(Debug)]
pub enum Command {
    /// Run an echo probe.
    Ping(PingRequest),
    /// Start serving a process's command ring (the lcore owns its consuming end).
    Attach(Arc<AppShared>, Consumer),
    /// Register the event descriptor of a process's socket (an eventfd, or
    /// the sender of a wake socket, that the control thread received and
    /// checked). The lcore owns and closes it. The sender is told whether
    /// the process is still attached.
    EventFd {
        /// The attachment.
        app: u64,
        /// The socket.
        sock: u32,
        /// The eventfd, or the wake socket's sender.
        fd: OwnedFd,
        /// The socket's FD_WRITE descriptor (of the same kind), registered with it.
        wfd: Option<OwnedFd>,
        /// Both are wake socket senders (`dsan_channel::wake`), which the
        /// lcore signals itself; else eventfds, which the process's
        /// notifier thread writes.
        direct: bool,
        /// Done: or the errno (ESRCH: not attached; EMFILE: its user's
        /// share of event descriptors is used up).
        done: Sender<Result<(), i32>>,
    },
    /// Register the life of a process's connection (the read end of a pipe
    /// whose write end the process holds beside the socket, so that every
    /// process that inherits the socket holds it too; see
    /// `node::handover`). The lcore owns and closes it.
    Life {
        /// The attachment.
        app: u64,
        /// The socket.
        sock: u32,
        /// The pipe's read end.
        fd: OwnedFd,
        /// Done: or the errno (ESRCH, ENOTCONN, EMFILE).
        done: Sender<Result<(), i32>>,
    },
    /// The claim key of the connection whose life is the pipe with inode
    /// `ino`, for process `app` (which holds a write end of it: it received
    /// the socket in an `SCM_RIGHTS` message with the life beside it).
    LifeKey {
        /// The attachment asking.
        app: u64,
        /// The pipe's inode.
        ino: u64,
        /// The key, or the errno (ESRCH, ENOTCONN: no such life, EACCES:
        /// another user's connection).
        done: Sender<Result<u64, i32>>,
    },
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
    /// Publish the counters now (a report wants them current, not as of the
    /// last drain tick).
    Publish(Sender<()>),
    /// Start or stop tracing connection setups; a stop answers with the
    /// stamps and how many did not fit.
    Trace(TraceAction, Sender<(Vec<TraceEvent>, u64)>),
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
    /// Requests queued now (in the SAN backlog: not yet answered).
    pub depth: usize,
    /// Connections accepted on the application's behalf (by the switch),
    /// waiting for its accept; as the process reports it.
    pub accepted_waiting: usize,
}

/// Node configuration.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The SAN EtherType.
    pub ethertype: u16,
    /// Protocol parameters (SAN subnets, budgets, limits).
    pub proto: ProtoConfig,
    /// Fault injection on received SAN frames (the lab's stand-in for netem).
    pub faults: Faults,
    /// Event descriptors one user (other than root) may register in the
    /// daemon, in all its processes (dsand sets a quarter of its descriptor
    /// limit).
    pub uid_event_fds: u32,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            ethertype: wire::DEFAULT_ETHERTYPE,
            proto: ProtoConfig::default(),
            faults: Faults::default(),
            uid_event_fds: 16384,
        }
    }
}

/// The daemon's handler.
pub struct Node {
    cfg: NodeConfig,
    /// The protocol core.
    ep: Endpoint<OsRng>,
    addrs: Arc<RwLock<Vec<Ipv4>>>,
    addrs_seen: u64,
    addrs_version: Arc<AtomicU64>,
    subnets: Arc<RwLock<Vec<crate::proto::Subnet>>>,
    commands: Arc<ArrayQueue<Command>>,
    /// The attached processes, their listeners' groups, the users' quotas.
    apps: apps::Apps,
    /// The connections' rings, and who holds each connection.
    streams: streams::Streams,
    local: Local,
    published: counters::Publisher,
    probe: Probe,
    faults: faults::FaultInjector,
    /// Connection-setup stamps, while tracing.
    trace: trace::Trace,
}

/// What the application side ([`apps::Apps`]) works with besides its own
/// state: the rest of the node, lent for one call.
pub(super) struct Ctx<'a> {
    ep: &'a mut Endpoint<OsRng>,
    streams: &'a mut streams::Streams,
    local: &'a mut Local,
    trace: &'a mut trace::Trace,
    cfg: &'a NodeConfig,
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
    /// Replaces the host's SAN addresses and subnets; the lcore applies them
    /// on its next tick, or at once when asked to publish its counters.
    pub fn set_addrs(&self, addrs: Vec<Ipv4>, subnets: Vec<crate::proto::Subnet>) {
        *self.addrs.write().unwrap_or_else(|e| e.into_inner()) = addrs;
        *self.subnets.write().unwrap_or_else(|e| e.into_inner()) = subnets;
        self.addrs_version.fetch_add(1, Ordering::Release);
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
        let faults = faults::FaultInjector::new(cfg.faults);
        let n = Node {
            ep: Endpoint::new(cfg.proto.clone(), mac, addrs, OsRng::default()),
            cfg,
            addrs: h.addrs.clone(),
            addrs_seen: 0,
            addrs_version: h.addrs_version.clone(),
            subnets: h.subnets.clone(),
            commands: h.commands.clone(),
            apps: apps::Apps::default(),
            streams: streams::Streams::default(),
            local: Local::default(),
            published: counters::Publisher::new(h.stats.clone()),
            probe: Probe::default(),
            faults,
            trace: trace::Trace::default(),
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
            self.trace.frame(&repr.message, true);
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
        self.trace.frame(&repr.message, false);
        let h = repr.header;
        let me = tx.mac();
        if h.src_mac.is_multicast() {
            // No station sends from a group address: forged, and never answered.
            return self.local.malformed += 1;
        }
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
                if !self.probe.on_reply(now, h.src_ip, seq) {
                    self.local.unexpected += 1;
                }
            }
            _ => {
                if let Some(a) = self.ep.handle_frame(now, &repr) {
                    self.streams.arrival(
                        &repr.message,
                        a,
                        wire::payload(bytes),
                        &self.ep,
                        &self.apps.procs,
                        &mut self.local,
                    );
                }
            }
        }
    }

    fn control(&mut self, now: Instant, c: Command) {
        match c {
            Command::Ping(req) => self.probe.start(req, now),
            Command::Attach(app, cmds) => self.apps.attach(app, cmds, self.addrs_seen),
            Command::EventFd {
                app,
                sock,
                fd,
                wfd,
                direct,
                done,
            } => {
                let max = self.cfg.uid_event_fds;
                let r = self
                    .apps
                    .set_event_fd(app, sock, fd, wfd, direct, max, &mut self.local);
                let _ = done.send(r);
            }
            Command::Life {
                app,
                sock,
                fd,
                done,
            } => {
                let (apps, mut cx) = self.split();
                let _ = done.send(apps.set_life(app, sock, fd, &mut cx));
            }
            Command::LifeKey { app, ino, done } => {
                let (apps, mut cx) = self.split();
                let _ = done.send(apps.life_key(app, ino, &mut cx));
            }
            Command::Detach(id, done) => {
                self.detach(now, id, wire::ResetReason::ProcessGone);
                let _ = done.send(());
            }
            Command::Publish(done) => {
                self.apply_addrs();
                self.publish();
                let _ = done.send(());
            }
            Command::Shutdown(done) => {
                for id in self.apps.procs.ids().to_vec() {
                    self.detach(now, id, wire::ResetReason::Shutdown);
                }
                let _ = done.send(());
            }
            Command::Trace(a, reply) => {
                let _ = reply.send(self.trace.control(a));
            }
            Command::Connections(reply) => {
                let v: Vec<ConnInfo> = self
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
                            .streams
                            .owner(h)
                            .and_then(|(p, _)| self.apps.procs.get(p))
                            .map_or(0, |p| p.shared.pid),
                        closing: c.is_closing(),
                    })
                    .collect();
                // Sorted by the asker (never on the lcore).
                let _ = reply.send(v);
            }
            Command::Listeners(reply) => {
                let v: Vec<ListenerInfo> = self
                    .ep
                    .listeners()
                    .map(|(id, addr, depth, capacity)| {
                        let owner = self
                            .apps
                            .groups
                            .owner(id)
                            .and_then(|(p, s)| Some((self.apps.procs.get(p)?, s)));
                        let pid = owner.map_or(0, |(p, _)| p.shared.pid);
                        let accepted_waiting = owner.map_or(0, |(p, s)| {
                            let v = p
                                .shared
                                .region
                                .sock(s as usize)
                                .accepted_waiting
                                .load(Ordering::Relaxed);
                            (v as usize).min(capacity)
                        });
                        ListenerInfo {
                            ip: addr.0,
                            port: addr.1,
                            pid,
                            capacity,
                            depth,
                            accepted_waiting,
                        }
                    })
                    .collect();
                // Sorted by the asker (never on the lcore).
                let _ = reply.send(v);
            }
        }
    }
}

impl Node {
    /// The application side and the rest of the node, lent to it.
    fn split(&mut self) -> (&mut apps::Apps, Ctx<'_>) {
        let cx = Ctx {
            ep: &mut self.ep,
            streams: &mut self.streams,
            local: &mut self.local,
            trace: &mut self.trace,
            cfg: &self.cfg,
        };
        (&mut self.apps, cx)
    }

    /// A process leaves (see [`apps::Apps::detach`]).
    fn detach(&mut self, now: Instant, id: u64, reason: wire::ResetReason) {
        let (apps, mut cx) = self.split();
        apps.detach(now, id, reason, &mut cx);
    }

    /// Detaches the processes that broke the channel's protocol.
    fn reap(&mut self, now: Instant) -> bool {
        let (apps, mut cx) = self.split();
        apps.reap(now, &mut cx)
    }

    /// Orphans whose last holder went close.
    fn check_orphans(&mut self, now: Instant) {
        self.streams
            .close_orphans(now, &mut self.ep, &mut self.apps.procs, &mut self.local);
    }

    /// Delivers one of the protocol core's events: a request to the
    /// listener's sockets, a connect outcome to its socket, the end of a
    /// connection to its stream and socket.
    fn dispatch(&mut self, now: Instant, e: Event) {
        let (apps, mut cx) = self.split();
        match e {
            Event::Incoming { listener, request } => {
                apps.deliver_request(now, listener, request, &mut cx)
            }
            Event::Connected { conn, params } => {
                apps.connect_outcome(now, conn, Ok(params), &mut cx)
            }
            Event::ConnectFailed { conn, error } => {
                apps.connect_outcome(now, conn, Err(-error.errno()), &mut cx)
            }
            Event::Aborted { conn, reason } => {
                cx.local.resets[streams::reset_index(reason)] += 1;
                cx.streams.aborted(conn, cx.ep, &mut apps.procs, cx.local);
            }
            Event::StreamDone { conn } => cx.streams.done(conn, cx.ep, &mut apps.procs, cx.local),
            Event::Closed { conn } => apps.connection_ended(conn, false, &mut cx),
            Event::Reset { conn, .. } => apps.connection_ended(conn, true, &mut cx),
        }
    }

    /// Serves the core's transmit queue (see [`streams::Streams::transmit`]).
    fn stream_tx<D: Device>(&mut self, now: Instant, tx: &mut Tx<'_, D>) -> bool {
        let et = self.cfg.ethertype;
        self.streams
            .transmit(now, tx, et, &mut self.ep, &mut self.local)
    }

    /// A received frame through the fault injector.
    fn inject<D: Device>(&mut self, now: Instant, bytes: &[u8], tx: &mut Tx<'_, D>) {
        let mut lost = false;
        for _ in 0..self.faults.admit(now, bytes, &mut lost) {
            self.handle_frame(now, bytes, tx);
        }
        if lost {
            self.local.injected += 1;
        }
    }

    /// Delivers held-back frames that are due.
    fn release_delayed<D: Device>(&mut self, now: Instant, tx: &mut Tx<'_, D>) -> bool {
        let due = self.faults.take_due(now);
        for b in &due {
            self.handle_frame(now, b, tx);
        }
        !due.is_empty()
    }

    /// Hands what the core has to send to `send` and delivers its events,
    /// until both are empty (delivering an event may make the core send, e.g.
    /// a refusal).
    fn flush_core(&mut self, now: Instant, mut send: impl FnMut(&mut Self, Repr)) -> bool {
        let mut busy = false;
        loop {
            let mut any = false;
            while let Some(r) = self.ep.poll_transmit() {
                send(self, r);
                any = true;
            }
            while let Some(e) = self.ep.poll_event() {
                self.dispatch(now, e);
                any = true;
            }
            if !any {
                return busy;
            }
            busy = true;
        }
    }

    /// Control commands and the attached processes' command rings.
    fn serve_inputs(&mut self, now: Instant) -> bool {
        let mut busy = false;
        while let Some(c) = self.commands.pop() {
            // A ping waits for the one before it.
            if matches!(c, Command::Ping(_)) && self.probe.running() {
                let _ = self.commands.push(c);
                break;
            }
            self.control(now, c);
            busy = true;
        }
        // Serve every attached process's command ring (no allocation: the ids
        // are kept in a list maintained on attach and detach). Nothing in the
        // walk changes the list: a process that breaks the protocol is only
        // condemned here, and detached after the walk.
        for i in 0..self.apps.procs.ids().len() {
            let id = self.apps.procs.ids()[i];
            let (apps, mut cx) = self.split();
            busy |= apps.serve(now, id, &mut cx);
        }
        busy |= self.reap(now);
        if self.ep.poll_timeout().is_some_and(|t| t <= now) {
            self.ep.handle_timeout(now);
        }
        busy
    }

    /// One pass of the handler without a device (for fuzzing and tests): the
    /// frames in `rx` go to the protocol core, control commands and the
    /// processes' command rings are served, timers run and events are
    /// delivered; the frames the node would send are returned.
    pub fn step_without_device(&mut self, now: Instant, rx: &[Repr]) -> Vec<Repr> {
        for r in rx {
            if let Some(a) = self.ep.handle_frame(now, r) {
                self.streams.arrival(
                    &r.message,
                    a,
                    &[],
                    &self.ep,
                    &self.apps.procs,
                    &mut self.local,
                );
            }
        }
        self.serve_inputs(now);
        self.check_orphans(now);
        let mut out = Vec::new();
        self.flush_core(now, |_, r| out.push(r));
        self.reap(now);
        self.flush_core(now, |_, r| out.push(r));
        notify::wake_due();
        out
    }
}

impl<D: Device> Handler<D> for Node {
    fn on_rx(&mut self, now: Instant, rx: &mut Vec<D::Buf>, tx: &mut Tx<'_, D>) {
        for f in rx.drain(..) {
            if self.faults.active() {
                self.inject(now, f.as_ref(), tx);
            } else {
                self.handle_frame(now, f.as_ref(), tx);
            }
        }
        self.flush_core(now, |n, r| n.send(tx, r));
        self.ep.release_held();
        self.stream_tx(now, tx);
        self.reap(now);
    }

    fn poll(&mut self, now: Instant, tx: &mut Tx<'_, D>) -> bool {
        let mut busy = self.serve_inputs(now);
        busy |= self.release_delayed(now, tx);
        let (pinged, echo) = self.probe.drive(now, &mut self.ep, tx.mac());
        busy |= pinged;
        if let Some(r) = echo {
            self.send(tx, r);
        }
        busy |= self.flush_core(now, |n, r| n.send(tx, r));
        busy |= self.ep.release_held();
        busy |= self.stream_tx(now, tx);
        busy |= self.flush_core(now, |n, r| n.send(tx, r));
        busy |= self.reap(now);
        // The pass ends (the frames of `on_rx` were this pass's too): each
        // process whose sockets it made ready is signalled once.
        notify::wake_due();
        busy
    }

    fn on_tick(&mut self, now: Instant) {
        self.check_orphans(now);
        self.apply_addrs();
        self.apps
            .revoke_foreign_listeners(now, &mut self.ep, &mut self.local, &self.cfg);
        self.publish();
        notify::wake_due();
    }
    fn awaiting(&self) -> bool {
        self.ep.awaiting_answer() || self.probe.running()
    }
    fn next_deadline(&self) -> Option<Instant> {
        let p = self.probe.next_timer();
        let d = self.faults.next_due();
        let o = self.streams.shares.next_orphan_check();
        [p, self.ep.poll_timeout(), d, o]
            .into_iter()
            .flatten()
            .min()
    }
}

impl Node {
    /// Publishes the counters (on the drain tick, or when a report asks).
    fn publish(&mut self) {
        let more = counters::Contributions {
            resolve_conflicts: self.ep.resolver().conflicts(),
            notifier_skipped: self
                .apps
                .procs
                .values()
                .filter_map(|p| p.shared.notifier.get())
                .map(|n| n.skipped())
                .sum(),
            attached: self.apps.procs.len() as u64,
            connections: self.streams.len() as u64,
        };
        self.published
            .publish(&mut self.local, self.ep.stats(), more);
    }

    /// Takes the host's SAN addresses and subnets if they changed (on the
    /// tick, and before counters are published on request: a caller that
    /// saw the new addresses in `status` and then asks for counters knows
    /// the lcore uses them).
    fn apply_addrs(&mut self) {
        let v = self.addrs_version.load(Ordering::Acquire);
        if v != self.addrs_seen {
            self.addrs_seen = v;
            if let Ok(a) = self.addrs.read() {
                self.ep.set_addrs(a.clone());
            }
            if let Ok(sn) = self.subnets.read() {
                self.ep.set_subnets(sn.clone());
            }
            // Attached processes learn that the addresses changed.
            self.apps.subnets_changed(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Loopback;
    use crate::engine::{run, EngineConfig, EngineShared, IdlePolicy};
    use crate::time::Clock;
    use std::time::Duration;

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
                cancel: Default::default(),
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
                cancel: Default::default(),
            }))
            .unwrap();
        sa.doorbell.ring();
        let res = rxr.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!((res.mac, res.sent), (None, 0));

        sa.request_stop();
        sb.request_stop();
        ta.join().unwrap();
        tb.join().unwrap();
        let (a, b) = (ha.stats.snapshot(), hb.stats.snapshot());
        let at = |k: crate::wire::Kind| k.index().expect("declared");
        use crate::wire::Kind::{EchoReply, EchoRequest, ResolveReply};
        assert_eq!(b.rx_by_kind[at(EchoRequest)], 50);
        assert_eq!(b.tx_by_kind[at(EchoReply)], 50);
        assert_eq!(a.rx_by_kind[at(EchoReply)], 50);
        assert_eq!(b.tx_by_kind[at(ResolveReply)], 1, "one resolve reply");
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
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let dropped = || {
            let c = h.stats.snapshot();
            c.drop_not_san + c.drop_malformed
        };
        while dropped() < 3 && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        shared.request_stop();
        t.join().unwrap();
        assert_eq!(dropped(), 3);
    }
}
