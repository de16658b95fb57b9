//! The daemon's node without a device, driven by hand: processes attached
//! through their real regions and rings, frames in and out as
//! [`Repr`]s. Shared by the node-level tests (`handover.rs`, `quotas.rs`).
#![allow(dead_code)] // each test file uses its own part

use dataplane::node::{
    AppShared, Command as NodeCommand, Counters, Lineage, Node, NodeConfig, NodeHandle,
};
use dataplane::proto::{ProtoConfig, Subnet};
use dataplane::time::Instant;
use dataplane::wire::{EthernetAddress, Ipv4, Message, Offer, Repr, SanHeader};
use dsan_channel::msg::{Command, Op};
use dsan_channel::region::{layout, Region};
use dsan_channel::ring::Producer;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::time::Duration;

pub(crate) const ME: Ipv4 = Ipv4::new(198, 18, 0, 2);
pub(crate) const PEER: Ipv4 = Ipv4::new(198, 18, 0, 1);

pub(crate) struct App {
    pub(crate) id: u64,
    pub(crate) region: Region,
    pub(crate) tx: Producer,
    pub(crate) seq: u32,
}

impl App {
    pub(crate) fn attach(h: &NodeHandle, id: u64) -> App {
        App::attach_as(h, id, Lineage::default())
    }
    /// A process (pid = id) of root's, whose parent is as `lineage` says.
    pub(crate) fn attach_as(h: &NodeHandle, id: u64, lineage: Lineage) -> App {
        App::attach_user(h, id, 0, lineage)
    }
    /// A process (pid = id) of user `uid` (allowed ports below 1024).
    pub(crate) fn attach_user(h: &NodeHandle, id: u64, uid: u32, lineage: Lineage) -> App {
        let (app, cmds) = AppShared::new_as(id, id as u32, uid, true, lineage).unwrap();
        assert!(h
            .commands
            .push(NodeCommand::Attach(app.clone(), cmds))
            .is_ok());
        // SAFETY: dup of a valid descriptor gives one we own.
        let dup = unsafe { OwnedFd::from_raw_fd(libc::dup(app.region.fd())) };
        let (region, tx) = Region::open(dup, layout::size()).unwrap();
        App {
            id,
            region,
            tx,
            seq: 0,
        }
    }
    /// Sends a command; returns its sequence number.
    pub(crate) fn send(&mut self, sock: u32, op: Op) -> u32 {
        self.seq += 1;
        let seq = self.seq;
        self.tx.push(&Command { sock, seq, op }.to_slot()).unwrap();
        seq
    }
    /// The result of the last completed command of `sock`, if it is `seq`'s.
    pub(crate) fn result(&self, sock: u32, seq: u32) -> Option<i64> {
        let s = self.region.sock(sock as usize);
        (s.done_seq.load(Ordering::Acquire) == seq).then(|| s.result.load(Ordering::Acquire))
    }
    pub(crate) fn state(&self, sock: u32) -> u32 {
        self.region.stream(sock as usize).state()
    }
    pub(crate) fn key(&self, sock: u32) -> u64 {
        self.region.stream(sock as usize).claim_key()
    }
}

pub(crate) struct Host {
    pub(crate) n: Node,
    pub(crate) h: NodeHandle,
    pub(crate) now: Instant,
    pub(crate) sent: Vec<Repr>,
}

impl Host {
    /// A host at [`ME`] on 198.18.0.0/24.
    pub(crate) fn new() -> Host {
        Host::with(|_| {})
    }
    /// [`Host::new`] with its configuration changed by `f` first.
    pub(crate) fn with(f: impl FnOnce(&mut NodeConfig)) -> Host {
        let mut cfg = NodeConfig {
            proto: ProtoConfig {
                subnets: vec![Subnet {
                    addr: ME,
                    prefix: 24,
                }],
                ..Default::default()
            },
            ..Default::default()
        };
        f(&mut cfg);
        let (n, h) = Node::new(cfg, EthernetAddress([2, 0, 0, 0, 0, 2]), vec![ME]);
        Host {
            n,
            h,
            now: Instant(1_000_000),
            sent: Vec::new(),
        }
    }
    pub(crate) fn step(&mut self, rx: &[Repr]) {
        let out = self.n.step_without_device(self.now, rx);
        self.sent.extend(out);
    }
    pub(crate) fn after(&mut self, d: Duration) {
        self.now = self.now + d;
        self.step(&[]);
    }
    pub(crate) fn counters(&mut self) -> Counters {
        let (tx, rx) = std::sync::mpsc::channel();
        assert!(self.h.commands.push(NodeCommand::Publish(tx)).is_ok());
        self.step(&[]);
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        self.h.stats.snapshot()
    }
    pub(crate) fn closes_sent(&self) -> usize {
        self.sent
            .iter()
            .filter(|r| matches!(r.message, Message::Close { .. }))
            .count()
    }
    /// Registers a life for `app`'s socket `sock`; the write end.
    pub(crate) fn life(&mut self, app: &App, sock: u32) -> OwnedFd {
        let (r, w) = dsan_channel::sys::pipe_cloexec().unwrap();
        let (done, got) = std::sync::mpsc::channel();
        assert!(self
            .h
            .commands
            .push(NodeCommand::Life {
                app: app.id,
                sock,
                fd: r,
                done,
            })
            .is_ok());
        self.step(&[]);
        assert_eq!(got.recv_timeout(Duration::from_secs(5)).unwrap(), Ok(()));
        w
    }
}

/// A connect request from the peer's port `src_port` to port 80.
pub(crate) fn request(src_port: u16, conn_id: u64) -> Repr {
    Repr {
        header: SanHeader {
            dst_mac: EthernetAddress([2, 0, 0, 0, 0, 2]),
            src_mac: EthernetAddress([2, 0, 0, 0, 0, 1]),
            src_ip: PEER,
            src_port,
            dst_ip: ME,
            dst_port: 80,
        },
        message: Message::ConnectRequest {
            conn_id,
            client_token: 7,
            offer: Offer::DEFAULT,
        },
    }
}

pub(crate) fn listen(host: &mut Host, a: &mut App, sock: u32, area: u16, takeover: u32) -> i64 {
    listen_with(host, a, sock, area, takeover, false)
}

pub(crate) fn listen_with(
    host: &mut Host,
    a: &mut App,
    sock: u32,
    area: u16,
    takeover: u32,
    reuse_port: bool,
) -> i64 {
    listen_on(host, a, (sock, area), 80, takeover, reuse_port)
}

/// `a`'s socket `sock` listens on `port` with backlog ring `area`: the
/// listen's result.
pub(crate) fn listen_on(
    host: &mut Host,
    a: &mut App,
    (sock, area): (u32, u16),
    port: u16,
    takeover: u32,
    reuse_port: bool,
) -> i64 {
    let seq = a.send(
        sock,
        Op::Listen {
            addr: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port),
            backlog: 8,
            area,
            bufs: Default::default(),
            takeover,
            reuse_port,
        },
    );
    host.step(&[]);
    a.result(sock, seq).expect("completed")
}

/// Requests waiting in `a`'s backlog ring `area`.
pub(crate) fn queued(a: &App, area: usize) -> usize {
    let Ok(mut ring) = a.region.open_backlog(area) else {
        return 0;
    };
    let mut n = 0;
    while let Ok(Some(_)) = ring.pop() {
        n += 1;
    }
    n
}
