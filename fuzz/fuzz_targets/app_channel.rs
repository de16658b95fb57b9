//! The daemon's side of the application channel, against hostile processes:
//! up to three attached at once, each pushing arbitrary slots into its
//! command ring and writing arbitrary bytes over its ring's indices and its
//! listeners' backlog rings, attaching, breaking the protocol, detaching and
//! attaching again in any interleaving, giving connections lives and
//! claiming each other's connections (with real or guessed keys), with
//! forged connect requests
//! arriving from the wire and time passing. The node must never panic or
//! loop; a broken ring detaches its process only (its region is marked
//! closed), and the protocol core's bounds hold.
#![no_main]
#![deny(unsafe_code)]

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
    /// The process gives a socket's connection a life (a pipe's read end
    /// to the daemon), keeping the write end or dropping it at once.
    Life {
        sock: u16,
        keep: bool,
    },
    /// The process lets go of the write end of one of its lives.
    DropLife {
        which: u8,
    },
    /// The process claims into `sock` the connection that process
    /// `from_proc`'s socket `from_sock` holds, with that socket's real
    /// claim key (read in its region, as a forked child does) or a guess.
    Claim {
        sock: u16,
        from_proc: u8,
        from_sock: u16,
        real_key: bool,
        guess: u64,
    },
    /// The process attaches (again, if it was detached).
    Attach,
    /// The process goes away (its control connection closes).
    Detach,
}

/// One step: which process acts, and what it does.
#[derive(Debug, Arbitrary)]
struct Step {
    proc: u8,
    op: Op,
}

/// An attached process as it sees itself.
struct Proc {
    id: u64,
    region: dsan_channel::region::Region,
    tx: dsan_channel::ring::Producer,
    handed: Vec<RequestKey>,
    backlogs: Vec<Option<dsan_channel::ring::Consumer>>,
    seq: u32,
    /// The write ends of the lives it registered.
    lives: Vec<OwnedFd>,
}

const PROCS: usize = 3;

/// Attaches a new process (id `id`) through the control queue, as dsand does.
fn attach(h: &NodeHandle, id: u64) -> Proc {
    let (app, cmds) = AppShared::new(id, id as u32).unwrap();
    assert!(h
        .commands
        .push(NodeCommand::Attach(app.clone(), cmds))
        .is_ok());
    // The process's view of its region.
    #[allow(unsafe_code)] // the one descriptor taken over by number
    // SAFETY: dup of a valid fd gives a new fd we own.
    let dup = unsafe { OwnedFd::from_raw_fd(libc::dup(app.region.fd())) };
    let (region, tx) = dsan_channel::region::Region::open(dup, layout::size()).unwrap();
    Proc {
        id,
        region,
        tx,
        handed: Vec::new(),
        backlogs: (0..4).map(|_| None).collect(),
        seq: 0,
        lives: Vec::new(),
    }
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

fuzz_target!(|steps: Vec<Step>| {
    let (mut n, h) = node();
    let mut procs: Vec<Option<Proc>> = (0..PROCS).map(|_| None).collect();
    let mut next_id = 1u64;
    let mut now = Instant(1_000_000);
    for step in steps.into_iter().take(200) {
        let k = usize::from(step.proc) % PROCS;
        let op = step.op;
        match op {
            Op::Attach if procs[k].is_some() => continue,
            Op::Detach => {
                // Its control connection closed: the control thread asks the
                // lcore to release it (and waits for nothing here).
                if let Some(p) = procs[k].take() {
                    let (done, _) = std::sync::mpsc::channel();
                    let _ = h.commands.push(NodeCommand::Detach(p.id, done));
                }
                let _ = n.step_without_device(now, &[]);
                continue;
            }
            _ => {}
        }
        if procs[k].is_none() {
            procs[k] = Some(attach(&h, next_id));
            next_id += 1;
        }
        // What a claim names, read before this process is borrowed.
        let claimed = match &op {
            Op::Claim {
                from_proc,
                from_sock,
                real_key,
                guess,
                ..
            } => {
                let j = usize::from(*from_proc) % PROCS;
                let from_sock = u32::from(*from_sock % 1024);
                Some(match procs[j].as_ref() {
                    Some(q) => {
                        let key = if *real_key {
                            q.region.stream(from_sock as usize).claim_key()
                        } else {
                            *guess
                        };
                        (q.id, from_sock, key)
                    }
                    None => (*guess, from_sock, *guess),
                })
            }
            _ => None,
        };
        let p = procs[k].as_mut().expect("attached");
        p.seq = p.seq.wrapping_add(1);
        let seq = p.seq;
        let mut rx = Vec::new();
        let slot: Option<Slot> = match op {
            Op::Attach | Op::Detach => None,
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
                        reuse_port: backlog % 3 == 0,
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
                let key = p
                    .handed
                    .get(which as usize % p.handed.len().max(1))
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
                        // Sometimes a chosen source port (below 1024 too).
                        src_port: if port % 3 == 0 {
                            u16::from(port) * 7
                        } else {
                            0
                        },
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
                p.region.stream(i).scribble_app_word(word % 4, value);
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
                let w: &std::sync::atomic::AtomicU64 = p.region.mapping().at(off);
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
                if p.backlogs[k].is_none() {
                    p.backlogs[k] = p.region.open_backlog(k).ok();
                }
                if let Some(Ok(Some(s))) = p.backlogs[k].as_mut().map(|c| c.pop()) {
                    if let Ok(r) = dsan_channel::msg::Request::parse(&s) {
                        p.handed.push(r.key());
                    }
                }
                None
            }
            Op::Advance { millis } => {
                now = now + Duration::from_millis(u64::from(millis));
                None
            }
            Op::Life { sock, keep } => {
                let (r, w) = dsan_channel::sys::pipe_cloexec().unwrap();
                let (done, _) = std::sync::mpsc::channel();
                let _ = h.commands.push(NodeCommand::Life {
                    app: p.id,
                    sock: u32::from(sock % 1024),
                    fd: r,
                    done,
                });
                if keep {
                    p.lives.push(w);
                }
                None
            }
            Op::DropLife { which } => {
                if !p.lives.is_empty() {
                    let i = usize::from(which) % p.lives.len();
                    drop(p.lives.swap_remove(i));
                }
                None
            }
            Op::Claim { sock, .. } => {
                let (from_app, from_sock, key) = claimed.expect("a claim");
                Some(
                    Command {
                        sock: u32::from(sock % 1024),
                        seq,
                        op: AppOp::Claim {
                            from_app,
                            from_sock,
                            key,
                        },
                    }
                    .to_slot(),
                )
            }
        };
        if let Some(s) = slot {
            let _ = p.tx.push(&s);
        }
        let _ = n.step_without_device(now, &rx);
        // A process detached for breaking the protocol is gone; the node
        // carries on with the others (and the slot may attach anew).
        for q in &mut procs {
            if q.as_ref()
                .is_some_and(|q| q.region.header().closed.load(Ordering::Acquire) != 0)
            {
                *q = None;
            }
        }
    }
    let _ = n.step_without_device(now + Duration::from_secs(3), &[]);
});
