//! A connection shared across fork, in the daemon's node without a device:
//! a process accepts a connection, gives it a life, another process (its
//! "child") claims it with the key read in the first one's region; wrong
//! keys are refused; the holder that lets go hands the connection back;
//! the connection closes (a Close frame to the peer) only once no socket
//! and no life holds it. And a listener shared by forked workers: the
//! first takes it over from the parent, later siblings join, requests go
//! to the workers in turn, and it closes with its last worker.
//! (`docs/architecture.md`, "Sockets shared across fork".)

mod common;

use common::*;
use dataplane::node::{Command as NodeCommand, Lineage, NodeHandle};
use dataplane::wire::{EthernetAddress, Message, Offer, Repr, SanHeader};
use dsan_channel::msg::{Op, Verdict};
use dsan_channel::stream::{ST_LINGER, ST_MOVED, ST_OPEN};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Duration;

/// `x` claims into its socket `sock` the connection `from` names, with
/// `key`: the claim's result.
fn claim(host: &mut Host, x: &mut App, sock: u32, from: (u64, u32), key: u64) -> Option<i64> {
    let seq = x.send(
        sock,
        Op::Claim {
            from_app: from.0,
            from_sock: from.1,
            key,
        },
    );
    host.step(&[]);
    x.result(sock, seq)
}

/// `a` listens on port 80 (socket 1) and accepts a connection from the
/// peer into socket 5.
fn accepted(host: &mut Host, a: &mut App) {
    let seq = a.send(
        1,
        Op::Listen {
            addr: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 80),
            backlog: 8,
            area: 0,
            bufs: Default::default(),
            takeover: 0,
            reuse_port: false,
        },
    );
    host.step(&[]);
    assert!(a.result(1, seq).is_some_and(|r| r > 0), "listening");
    let req = Repr {
        header: SanHeader {
            dst_mac: EthernetAddress([2, 0, 0, 0, 0, 2]),
            src_mac: EthernetAddress([2, 0, 0, 0, 0, 1]),
            src_ip: PEER,
            src_port: 40000,
            dst_ip: ME,
            dst_port: 80,
        },
        message: Message::ConnectRequest {
            conn_id: 77,
            client_token: 7,
            offer: Offer::DEFAULT,
        },
    };
    host.step(&[req]);
    let mut backlog = a.region.open_backlog(0).unwrap();
    let r = dsan_channel::msg::Request::parse(&backlog.pop().unwrap().unwrap()).unwrap();
    let seq = a.send(
        1,
        Op::Decide {
            key: r.key(),
            peer_port: r.peer.port(),
            verdict: Verdict::Accept { new_sock: 5 },
        },
    );
    host.step(&[]);
    assert_eq!(a.result(1, seq), Some(0), "accepted");
    assert_eq!(a.state(5), ST_OPEN);
    // The peer confirms.
    let token = host
        .sent
        .iter()
        .find_map(|r| match r.message {
            Message::Accept { server_token, .. } => Some(server_token),
            _ => None,
        })
        .expect("an Accept");
    let mut ack = req;
    ack.message = Message::AcceptAck { conn_id: 77, token };
    host.step(&[ack]);
    host.sent.clear();
}

#[test]
fn a_claimed_connection_moves_and_comes_back_and_closes_with_its_last_holder() {
    let mut host = Host::new();
    let mut a = App::attach(&host.h, 1);
    let mut b = App::attach(&host.h, 2);
    host.step(&[]);
    accepted(&mut host, &mut a);

    // Without a life nobody may claim it, whatever the key.
    assert_eq!(
        claim(&mut host, &mut b, 7, (a.id, 5), a.key(5)),
        Some(-i64::from(libc::EBADF))
    );

    let w_a = host.life(&a, 5);
    // B stands for a forked child: it holds a copy of the life.
    // SAFETY: dup of a valid descriptor gives one we own.
    let w_b = unsafe { OwnedFd::from_raw_fd(libc::dup(std::os::fd::AsRawFd::as_raw_fd(&w_a))) };

    // A wrong key is refused and counted.
    assert_eq!(
        claim(&mut host, &mut b, 7, (a.id, 5), a.key(5) ^ 1),
        Some(-i64::from(libc::EBADF))
    );
    assert_eq!(host.counters().claims_refused, 2);

    // The right key: the connection moves to B's socket 7.
    assert_eq!(claim(&mut host, &mut b, 7, (a.id, 5), a.key(5)), Some(0));
    assert_eq!(b.state(7), ST_OPEN);
    assert_eq!(b.key(7), a.key(5));
    assert_ne!(a.state(5) & ST_MOVED, 0, "A's socket is away");
    assert_eq!(host.counters().handovers, 1);

    // A takes it back with its own next call (a claim of its own socket).
    let (from, key) = ((a.id, 5), a.key(5));
    assert_eq!(claim(&mut host, &mut a, 5, from, key), Some(0));
    assert_eq!(a.state(5), ST_OPEN);
    assert_ne!(b.state(7) & ST_MOVED, 0, "now B's is away");

    // B claims again, then A (away) closes: nothing goes to the peer.
    let (from, key) = ((b.id, 7), b.key(7));
    assert_eq!(claim(&mut host, &mut b, 7, from, key), Some(0));
    drop(w_a);
    let seq = a.send(5, Op::Close);
    host.step(&[]);
    assert_eq!(a.result(5, seq), Some(0));
    host.after(Duration::from_millis(50));
    assert_eq!(host.closes_sent(), 0, "B still holds it");

    // B's close while its life is still held elsewhere (another child):
    // an orphan, its slot lingering, no Close yet.
    // SAFETY: as above.
    let w_c = unsafe { OwnedFd::from_raw_fd(libc::dup(std::os::fd::AsRawFd::as_raw_fd(&w_b))) };
    drop(w_b);
    let seq = b.send(7, Op::Close);
    host.step(&[]);
    assert_eq!(b.result(7, seq), Some(0));
    assert_ne!(b.state(7) & ST_LINGER, 0, "the orphan's slot lingers");
    host.after(Duration::from_millis(50));
    assert_eq!(host.closes_sent(), 0, "a holder that never claimed it");

    // The last holder goes (exits without claiming): the connection closes.
    drop(w_c);
    host.after(Duration::from_millis(20));
    host.after(Duration::from_millis(20));
    let kinds: Vec<String> = host
        .sent
        .iter()
        .map(|r| format!("{:?}", r.message).chars().take(12).collect())
        .collect();
    assert!(host.closes_sent() >= 1, "a Close to the peer: {kinds:?}");
    assert!(
        kinds.iter().all(|k| !k.starts_with("Reset")),
        "a clean close, not a reset: {kinds:?}"
    );
    assert_eq!(b.state(7) & ST_LINGER, 0, "the slot is free again");
    assert_eq!(host.counters().handovers, 3);
}

#[test]
fn a_holder_that_leaves_hands_the_connection_to_the_other() {
    let mut host = Host::new();
    let mut a = App::attach(&host.h, 1);
    let mut b = App::attach(&host.h, 2);
    host.step(&[]);
    accepted(&mut host, &mut a);
    let _w = host.life(&a, 5);
    assert_eq!(claim(&mut host, &mut b, 9, (a.id, 5), a.key(5)), Some(0));
    // B's process goes away (a child that exits): A serves it again; the
    // peer sees nothing.
    let (done, _) = std::sync::mpsc::channel();
    assert!(host
        .h
        .commands
        .push(NodeCommand::Detach(b.id, done))
        .is_ok());
    host.step(&[]);
    assert_eq!(a.state(5), ST_OPEN, "back with A, not moved, not dead");
    assert_eq!(host.counters().resets, [0; 6]);
    assert_eq!(host.closes_sent(), 0);
}

#[test]
fn forked_workers_share_a_listener_in_turn_and_it_closes_with_the_last() {
    let mut host = Host::new();
    let parent = Lineage {
        ppid: 1,
        ino: Some(100),
        parent_ino: Some(1),
    };
    let child = Lineage {
        ppid: 10,
        ino: None,
        parent_ino: Some(100),
    };
    let mut master = App::attach_as(&host.h, 10, parent);
    let mut w1 = App::attach_as(&host.h, 11, child);
    let mut w2 = App::attach_as(&host.h, 12, child);
    let mut stranger = App::attach_as(
        &host.h,
        13,
        Lineage {
            ppid: 10,
            ino: None,
            parent_ino: Some(999),
        },
    );
    host.step(&[]);
    assert!(listen(&mut host, &mut master, 1, 0, 0) > 0);
    // The first worker takes the address over, the second joins it; a
    // process that is not their sibling may do neither.
    assert!(listen(&mut host, &mut w1, 1, 0, 10) > 0);
    assert!(listen(&mut host, &mut w2, 3, 1, 10) > 0);
    assert_eq!(
        listen(&mut host, &mut stranger, 1, 0, 10),
        -i64::from(libc::EADDRINUSE)
    );
    assert_eq!(host.counters().listener_joins, 1);
    // Four requests: two for each worker, none for the master.
    for i in 0..4u16 {
        host.step(&[request(41000 + i, 500 + u64::from(i))]);
    }
    assert_eq!(
        (queued(&w1, 0), queued(&w2, 1), queued(&master, 0)),
        (2, 2, 0)
    );
    // The first worker leaves: the second serves every request.
    let seq = w1.send(1, Op::Close);
    host.step(&[]);
    assert_eq!(w1.result(1, seq), Some(0));
    for i in 4..6u16 {
        host.step(&[request(41000 + i, 500 + u64::from(i))]);
    }
    assert_eq!(queued(&w2, 1), 2);
    // The last worker leaves: the listener is gone (the master's was taken
    // over), so a request is refused.
    let seq = w2.send(3, Op::Close);
    host.step(&[]);
    assert_eq!(w2.result(3, seq), Some(0));
    host.sent.clear();
    host.step(&[request(41010, 600)]);
    assert!(
        host.sent
            .iter()
            .any(|r| matches!(r.message, Message::Reject { .. })),
        "refused once no worker listens"
    );
}

#[test]
fn processes_of_one_user_with_so_reuseport_share_a_listener() {
    let mut host = Host::new();
    let attach_uid =
        |h: &NodeHandle, id: u64, uid: u32| App::attach_user(h, id, uid, Lineage::default());
    let mut a = attach_uid(&host.h, 20, 1000);
    let mut b = attach_uid(&host.h, 21, 1000);
    let mut plain = attach_uid(&host.h, 22, 1000);
    let mut other = attach_uid(&host.h, 23, 1001);
    host.step(&[]);
    assert!(listen_with(&mut host, &mut a, 1, 0, 0, true) > 0);
    // Without SO_REUSEPORT, or as another user: the address is in use.
    assert_eq!(
        listen_with(&mut host, &mut plain, 1, 0, 0, false),
        -i64::from(libc::EADDRINUSE)
    );
    assert_eq!(
        listen_with(&mut host, &mut other, 1, 0, 0, true),
        -i64::from(libc::EADDRINUSE)
    );
    // The same user with it: joins, and requests go to the two in turn.
    assert!(listen_with(&mut host, &mut b, 1, 0, 0, true) > 0);
    assert_eq!(host.counters().listener_joins, 1);
    for i in 0..4u16 {
        host.step(&[request(42000 + i, 700 + u64::from(i))]);
    }
    assert_eq!((queued(&a, 0), queued(&b, 0)), (2, 2));
    // The first one leaves: the second holds the listener alone.
    let seq = a.send(1, Op::Close);
    host.step(&[]);
    assert_eq!(a.result(1, seq), Some(0));
    host.step(&[request(42010, 710)]);
    assert_eq!(queued(&b, 0), 1);
}

/// The claim key `app` gets for the life whose pipe inode is `ino`.
fn life_key(host: &mut Host, app: &App, ino: u64) -> Result<u64, i32> {
    let (done, got) = std::sync::mpsc::channel();
    assert!(host
        .h
        .commands
        .push(NodeCommand::LifeKey {
            app: app.id,
            ino,
            done,
        })
        .is_ok());
    host.step(&[]);
    got.recv_timeout(Duration::from_secs(5)).unwrap()
}

#[test]
fn a_holder_of_the_life_learns_the_claim_key_and_claims_the_connection() {
    // A connection passed with SCM_RIGHTS travels with its life; the
    // receiver shows the life's write end, the daemon finds the connection
    // by the pipe's inode and names its claim key (same user or root).
    let mut host = Host::new();
    let mut a = App::attach_user(&host.h, 1, 2000, Lineage::default());
    let mut b = App::attach_user(&host.h, 2, 2000, Lineage::default());
    let c = App::attach_user(&host.h, 3, 3000, Lineage::default());
    host.step(&[]);
    accepted(&mut host, &mut a);
    assert_eq!(
        life_key(&mut host, &b, 1),
        Err(libc::ENOTCONN),
        "no such life"
    );
    let w = host.life(&a, 5);
    let ino = dsan_channel::sys::pipe_inode(std::os::fd::AsRawFd::as_raw_fd(&w)).unwrap();
    assert_eq!(life_key(&mut host, &c, ino), Err(libc::EACCES));
    assert_eq!(host.counters().claims_refused, 1);
    let key = life_key(&mut host, &b, ino).unwrap();
    assert_eq!(key, a.key(5));
    assert_eq!(claim(&mut host, &mut b, 9, (0, 0), key), Some(0));
    assert_eq!(b.state(9), ST_OPEN);
    assert_ne!(a.state(5) & ST_MOVED, 0, "the sender's socket is away");
    // B lets go (the sender's socket still holds it: it goes back there);
    // then the last holder goes: the life with it, and the inode names
    // nothing any more.
    let seq = b.send(9, Op::Abort);
    host.step(&[]);
    assert_eq!(b.result(9, seq), Some(0));
    assert_eq!(a.state(5), ST_OPEN, "back with the sender's socket");
    drop(w);
    let seq = a.send(5, Op::Abort);
    host.step(&[]);
    assert_eq!(a.result(5, seq), Some(0));
    assert_eq!(life_key(&mut host, &b, ino), Err(libc::ENOTCONN));
}
