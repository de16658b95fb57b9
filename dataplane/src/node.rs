//! The handler the daemon runs in the lcore loop: it parses every received frame,
//! answers address resolution and echo requests for the host's SAN addresses,
//! and carries out commands from the control thread (today: echo probes, the
//! dataplane round trip). The connection protocol core joins it in issue #3/#4.

use crate::device::Device;
use crate::engine::{Handler, Tx};
use crate::proto::resolve::{Lookup, ResolveConfig, Resolver};
use crate::time::Instant;
use crate::wire::{self, EthernetAddress, Ipv4, Message, Repr, SanHeader};
use crossbeam_queue::ArrayQueue;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, RwLock};
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

/// A command from the control thread.
#[derive(Debug)]
pub enum Command {
    /// Run an echo probe.
    Ping(PingRequest),
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
    /// Frames dropped: addressed to an IP that is not ours.
    pub drop_not_ours: AtomicU64,
    /// Frames dropped: replies nobody waited for.
    pub drop_unexpected: AtomicU64,
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
}

/// Node configuration.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The SAN EtherType.
    pub ethertype: u16,
    /// Resolution timing.
    pub resolve: ResolveConfig,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            ethertype: wire::DEFAULT_ETHERTYPE,
            resolve: ResolveConfig::default(),
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

/// The daemon's handler.
pub struct Node {
    cfg: NodeConfig,
    addrs: Arc<RwLock<Vec<Ipv4>>>,
    local_addrs: Vec<Ipv4>,
    addrs_seen: u64,
    addrs_version: Arc<AtomicU64>,
    resolver: Resolver,
    commands: Arc<ArrayQueue<Command>>,
    ping: Option<ActivePing>,
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
}

impl Node {
    /// A node answering for `addrs`.
    pub fn new(cfg: NodeConfig, addrs: Vec<Ipv4>) -> (Node, NodeHandle) {
        let h = NodeHandle {
            commands: Arc::new(ArrayQueue::new(64)),
            stats: Arc::new(NodeStats::default()),
            addrs: Arc::new(RwLock::new(addrs.clone())),
            addrs_version: Arc::new(AtomicU64::new(0)),
        };
        let n = Node {
            resolver: Resolver::new(cfg.resolve),
            cfg,
            addrs: h.addrs.clone(),
            local_addrs: addrs,
            addrs_seen: 0,
            addrs_version: h.addrs_version.clone(),
            commands: h.commands.clone(),
            ping: None,
            stats: h.stats.clone(),
            local: Local::default(),
        };
        (n, h)
    }

    fn is_ours(&self, ip: Ipv4) -> bool {
        self.local_addrs.contains(&ip)
    }

    fn send<D: Device>(&mut self, tx: &mut Tx<'_, D>, header: SanHeader, message: Message) {
        let repr = Repr { header, message };
        let et = self.cfg.ethertype;
        if tx.send_with(repr.buffer_len(), |b| {
            repr.emit(&mut wire::Frame::new_unchecked(b), et)
        }) {
            self.local.tx[kind_index(&message)] += 1;
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
            Message::ResolveRequest => {
                if !self.is_ours(h.dst_ip) {
                    return self.local.not_ours += 1;
                }
                // The asker is evidently at its source MAC.
                self.resolver.on_reply(now, h.src_ip, h.src_mac);
                let header = SanHeader {
                    dst_mac: h.src_mac,
                    src_mac: me,
                    src_ip: h.dst_ip,
                    src_port: 0,
                    dst_ip: h.src_ip,
                    dst_port: 0,
                };
                self.send(tx, header, Message::ResolveReply { mac: me });
            }
            Message::ResolveReply { mac } => {
                if !self.resolver.on_reply(now, h.src_ip, mac) {
                    self.local.unexpected += 1;
                }
            }
            Message::EchoRequest { seq, stamp } => {
                if !self.is_ours(h.dst_ip) {
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
                self.send(tx, header, Message::EchoReply { seq, stamp });
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
            // The connection protocol is not wired into the daemon yet.
            _ => self.local.unexpected += 1,
        }
    }

    fn drive_ping<D: Device>(&mut self, now: Instant, tx: &mut Tx<'_, D>) -> bool {
        let Some(mut p) = self.ping.take() else {
            return false;
        };
        let mut busy = false;
        if p.result.mac.is_none() {
            match self.resolver.lookup(now, p.req.dst) {
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
                        .local_addrs
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
                        header,
                        Message::EchoRequest {
                            seq,
                            stamp: now.as_nanos(),
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
}

impl<D: Device> Handler<D> for Node {
    fn on_rx(&mut self, now: Instant, rx: &mut Vec<D::Buf>, tx: &mut Tx<'_, D>) {
        for f in rx.drain(..) {
            self.handle_frame(now, f.as_ref(), tx);
        }
    }

    fn poll(&mut self, now: Instant, tx: &mut Tx<'_, D>) -> bool {
        let mut busy = false;
        if self.ping.is_none() {
            if let Some(Command::Ping(req)) = self.commands.pop() {
                self.ping = Some(ActivePing {
                    req,
                    started: now,
                    result: PingResult::default(),
                    in_flight: None,
                    next_at: now,
                });
                busy = true;
            }
        }
        busy |= self.drive_ping(now, tx);
        while let Some(ip) = self.resolver.poll_request(now) {
            let src_ip = self
                .local_addrs
                .first()
                .copied()
                .unwrap_or(Ipv4::UNSPECIFIED);
            let header = SanHeader {
                dst_mac: EthernetAddress::BROADCAST,
                src_mac: tx.mac(),
                src_ip,
                src_port: 0,
                dst_ip: ip,
                dst_port: 0,
            };
            self.send(tx, header, Message::ResolveRequest);
            busy = true;
        }
        while self.resolver.poll_failed().is_some() {}
        busy
    }

    fn on_tick(&mut self, _now: Instant) {
        let v = self.addrs_version.load(Ordering::Acquire);
        if v != self.addrs_seen {
            self.addrs_seen = v;
            if let Ok(a) = self.addrs.read() {
                self.local_addrs = a.clone();
            }
        }
        let s = &self.stats;
        for i in 0..KINDS {
            s.rx_by_kind[i].store(self.local.rx[i], Ordering::Relaxed);
            s.tx_by_kind[i].store(self.local.tx[i], Ordering::Relaxed);
        }
        s.drop_not_san.store(self.local.not_san, Ordering::Relaxed);
        s.drop_malformed
            .store(self.local.malformed, Ordering::Relaxed);
        s.drop_version.store(self.local.version, Ordering::Relaxed);
        s.drop_not_ours
            .store(self.local.not_ours, Ordering::Relaxed);
        s.drop_unexpected
            .store(self.local.unexpected, Ordering::Relaxed);
    }

    fn next_deadline(&self) -> Option<Instant> {
        let p = self.ping.as_ref().map(|p| match p.in_flight {
            Some((_, t)) => t + p.req.timeout,
            None => p.next_at,
        });
        match (p, self.resolver.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
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
        let (mut na, ha) = Node::new(NodeConfig::default(), vec![ipa]);
        let (mut nb, hb) = Node::new(NodeConfig::default(), vec![ipb]);
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
        let (mut n, h) = Node::new(NodeConfig::default(), vec![Ipv4::new(198, 18, 0, 1)]);
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
