//! The daemon's side of the application channel, against a hostile process:
//! arbitrary slots pushed into the command ring, arbitrary bytes written over
//! the ring's indices and over a listener's backlog ring, forged connect
//! requests arriving from the wire, and time passing. The node must never
//! panic or loop; a broken ring detaches the process (its region is marked
//! closed), and the protocol core's bounds hold.
#![no_main]

use arbitrary::Arbitrary;
use dataplane::node::{AppShared, Command as NodeCommand, Node, NodeConfig, NodeHandle};
use dataplane::proto::{ProtoConfig, Subnet};
use dataplane::time::Instant;
use dataplane::wire::{EthernetAddress, Ipv4, Message, Repr, SanHeader};
use dsan_channel::msg::{Command, Op as AppOp, RequestKey, Verdict};
use dsan_channel::region::layout;
use dsan_channel::ring::{Slot, SLOT};
use libfuzzer_sys::fuzz_target;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::time::Duration;

#[derive(Debug, Arbitrary)]
enum Op {
    /// Raw bytes as one command slot.
    Raw(Vec<u8>),
    /// A well-formed command with arbitrary fields.
    Listen {
        sock: u16,
        port: u8,
        backlog: i16,
        area: u8,
    },
    Decide {
        sock: u16,
        which: u8,
        accept: bool,
        new_sock: u16,
    },
    Connect {
        sock: u16,
        port: u8,
        nonblocking: bool,
    },
    Close {
        sock: u16,
    },
    EventSelect {
        sock: u16,
        mask: u32,
    },
    /// A kick for a socket's stream, after writing `value` into one of the
    /// words of its stream control block the process owns (send tail, FIN,
    /// receive head).
    Kick {
        sock: u16,
        word: u8,
        value: u64,
    },
    /// Bytes written over the region at one of its ring headers or indices.
    Scribble {
        target: u8,
        offset: u8,
        value: u64,
    },
    /// A connect request from the wire for a port.
    Request {
        conn_id: u64,
        port: u8,
    },
    /// The application takes a request out of a backlog ring.
    Take {
        area: u8,
    },
    Advance {
        millis: u16,
    },
}

fn node() -> (Node, NodeHandle) {
    let me = Ipv4::new(198, 18, 0, 2);
    let cfg = NodeConfig {
        proto: ProtoConfig {
            subnets: vec![Subnet {
                addr: me,
                prefix: 24,
            }],
            max_half_open: 64,
            max_listeners: 16,
            ..Default::default()
        },
        ..Default::default()
    };
    Node::new(cfg, EthernetAddress([2, 0, 0, 0, 0, 2]), vec![me])
}

fuzz_target!(|ops: Vec<Op>| {
    let (mut n, h) = node();
    let (app, cmds) = AppShared::new(1, 1).unwrap();
    // Attached through the control queue, as dsand does.
    assert!(h
        .commands
        .push(NodeCommand::Attach(app.clone(), cmds))
        .is_ok());
    // The process's view of its region.
    // SAFETY: dup of a valid fd gives a new fd we own.
    let dup = unsafe { OwnedFd::from_raw_fd(libc::dup(app.region.fd())) };
    let (mine, mut tx) = dsan_channel::region::Region::open(dup, layout::size()).unwrap();
    let mut now = Instant(1_000_000);
    let mut seq = 0u32;
    let mut handed: Vec<RequestKey> = Vec::new();
    let mut backlogs: Vec<Option<dsan_channel::ring::Consumer>> = (0..4).map(|_| None).collect();
    for op in ops.into_iter().take(200) {
        seq = seq.wrapping_add(1);
        let mut rx = Vec::new();
        let slot: Option<Slot> = match op {
            Op::Raw(b) => {
                let mut s = [0u8; SLOT];
                let k = b.len().min(SLOT);
                s[..k].copy_from_slice(&b[..k]);
                Some(s)
            }
            Op::Listen {
                sock,
                port,
                backlog,
                area,
            } => Some(
                Command {
                    sock: u32::from(sock % 1100),
                    seq,
                    op: AppOp::Listen {
                        addr: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, u16::from(port % 4) + 1),
                        backlog: i32::from(backlog),
                        area: u16::from(area % 4),
                        bufs: Default::default(),
                        // Now and then a take-over claim (by a pid that is
                        // nobody's parent here): refused, as a plain listen.
                        takeover: u32::from(backlog % 5 == 0),
                    },
                }
                .to_slot(),
            ),
            Op::Decide {
                sock,
                which,
                accept,
                new_sock,
            } => {
                let key = handed
                    .get(which as usize % handed.len().max(1))
                    .copied()
                    .unwrap_or(RequestKey {
                        peer_ip: Ipv4Addr::new(198, 18, 0, 1),
                        conn_id: u64::from(which),
                    });
                Some(
                    Command {
                        sock: u32::from(sock % 1100).min(1023),
                        seq,
                        op: AppOp::Decide {
                            key,
                            peer_port: 1,
                            verdict: if accept {
                                Verdict::Accept {
                                    new_sock: u32::from(new_sock % 1024),
                                }
                            } else {
                                Verdict::Reject
                            },
                        },
                    }
                    .to_slot(),
                )
            }
            Op::Connect {
                sock,
                port,
                nonblocking,
            } => Some(
                Command {
                    sock: u32::from(sock % 1024),
                    seq,
                    op: AppOp::Connect {
                        dst: SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), u16::from(port) + 1),
                        src: None,
                        nonblocking,
                        bufs: Default::default(),
                    },
                }
                .to_slot(),
            ),
            Op::Close { sock } => Some(
                Command {
                    sock: u32::from(sock % 1024),
                    seq,
                    op: AppOp::Close,
                }
                .to_slot(),
            ),
            Op::EventSelect { sock, mask } => {
                let mut s = Command {
                    sock: u32::from(sock % 1024),
                    seq,
                    op: AppOp::EventSelect { mask: 0 },
                }
                .to_slot();
                s[16..20].copy_from_slice(&mask.to_le_bytes());
                Some(s)
            }
            Op::Kick { sock, word, value } => {
                let i = usize::from(sock % 1024);
                let st = mine.stream(i);
                match word % 4 {
                    0 => st.snd_p.tail.store(value, Ordering::Relaxed),
                    1 => st.snd_p.fin.store(value as u32, Ordering::Relaxed),
                    2 => st.rcv_c.head.store(value, Ordering::Relaxed),
                    _ => {}
                }
                Some(
                    Command {
                        sock: i as u32,
                        seq,
                        op: AppOp::Kick,
                    }
                    .to_slot(),
                )
            }
            Op::Scribble {
                target,
                offset,
                value,
            } => {
                // The command ring's header and indices, or a backlog ring's.
                let base = match target % 5 {
                    0 => layout::cmd_off(),
                    k => layout::backlog_off(usize::from(k - 1)),
                };
                let off = base + (usize::from(offset) % 24) * 8;
                let w: &std::sync::atomic::AtomicU64 = mine.mapping().at(off);
                w.store(value, Ordering::Relaxed);
                None
            }
            Op::Request { conn_id, port } => {
                rx.push(Repr {
                    header: SanHeader {
                        dst_mac: EthernetAddress([2, 0, 0, 0, 0, 2]),
                        src_mac: EthernetAddress([2, 0, 0, 0, 0, 1]),
                        src_ip: Ipv4::new(198, 18, 0, 1),
                        src_port: 40000,
                        dst_ip: Ipv4::new(198, 18, 0, 2),
                        dst_port: u16::from(port % 4) + 1,
                    },
                    message: Message::ConnectRequest {
                        conn_id,
                        client_token: 7,
                        offer: dataplane::wire::Offer::DEFAULT,
                    },
                });
                None
            }
            Op::Take { area } => {
                let k = usize::from(area % 4);
                if backlogs[k].is_none() {
                    backlogs[k] = mine.open_backlog(k).ok();
                }
                if let Some(Ok(Some(s))) = backlogs[k].as_mut().map(|c| c.pop()) {
                    if let Ok(r) = dsan_channel::msg::Request::parse(&s) {
                        handed.push(r.key());
                    }
                }
                None
            }
            Op::Advance { millis } => {
                now = now + Duration::from_millis(u64::from(millis));
                None
            }
        };
        if let Some(s) = slot {
            let _ = tx.push(&s);
        }
        let _ = n.step_without_device(now, &rx);
        if mine.header().closed.load(Ordering::Acquire) != 0 {
            // Detached for breaking the protocol: the rest is ignored, and
            // the node carries on.
            let _ = n.step_without_device(now + Duration::from_secs(3), &[]);
            return;
        }
    }
});
