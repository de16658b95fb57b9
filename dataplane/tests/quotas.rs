//! One user's shares of what the host has a limited number of (issue #27,
//! "quotas, not host-wide exhaustion"), in the daemon's node without a
//! device: connections (with connect attempts) and address resolutions in
//! progress. Root has no share; another user is never refused because one
//! user took its share. (`docs/threat-model.md`, "Open".)

mod common;

use common::*;
use dataplane::node::{Lineage, Quota};
use dataplane::wire::{Ipv4, Repr};
use dsan_channel::msg::{Op, Request, Verdict};
use std::net::SocketAddrV4;

const USER: u32 = 2000;

fn errno(e: i32) -> Option<i64> {
    Some(-i64::from(e))
}

/// `a` listens on `port` with its socket 1 (backlog area 0).
fn listen(host: &mut Host, a: &mut App, port: u16) {
    assert!(
        listen_on(host, a, (1, 0), port, 0, false) > 0,
        "listening on {port}"
    );
}

/// A connect request from the peer to `port`.
fn request_to(port: u16, conn_id: u64) -> Repr {
    let mut r = request(40000 + conn_id as u16, conn_id);
    r.header.dst_port = port;
    r
}

/// The requests waiting in `a`'s backlog (area 0), in order.
fn pending(a: &App) -> Vec<Request> {
    let mut ring = a.region.open_backlog(0).unwrap();
    let mut v = Vec::new();
    while let Ok(Some(slot)) = ring.pop() {
        v.push(Request::parse(&slot).unwrap());
    }
    v
}

/// `a` accepts request `r` into socket `new_sock`: the decision's result.
fn accept(host: &mut Host, a: &mut App, r: &Request, new_sock: u32) -> Option<i64> {
    let seq = a.send(
        1,
        Op::Decide {
            key: r.key(),
            peer_port: r.peer.port(),
            verdict: Verdict::Accept { new_sock },
        },
    );
    host.step(&[]);
    a.result(1, seq)
}

/// `a` connects its socket `sock` to `ip`:80 without blocking.
fn connect(host: &mut Host, a: &mut App, sock: u32, ip: Ipv4) -> Option<i64> {
    let seq = a.send(
        sock,
        Op::Connect {
            dst: SocketAddrV4::new(ip, 80),
            src: None,
            src_port: 0,
            nonblocking: true,
            bufs: Default::default(),
        },
    );
    host.step(&[]);
    a.result(sock, seq)
}

fn refusals(host: &mut Host, q: Quota) -> u64 {
    host.counters().quota_refusals[q as usize]
}

#[test]
fn one_user_serves_at_most_its_share_of_the_hosts_connections() {
    // A host of 8 connections: one user's share is 2.
    let mut host = Host::with(|c| c.proto.max_connections = 8);
    let mut user = App::attach_user(&host.h, 1, USER, Lineage::default());
    let mut root = App::attach(&host.h, 2);
    host.step(&[]);
    listen(&mut host, &mut user, 80);
    host.step(&[request_to(80, 1), request_to(80, 2), request_to(80, 3)]);
    let reqs = pending(&user);
    assert_eq!(reqs.len(), 3);
    assert_eq!(accept(&mut host, &mut user, &reqs[0], 10), Some(0));
    assert_eq!(accept(&mut host, &mut user, &reqs[1], 11), Some(0));
    // The third is over the share: ENOBUFS, as the host's own limit
    // answers, and the request stays queued.
    assert_eq!(
        accept(&mut host, &mut user, &reqs[2], 12),
        errno(libc::ENOBUFS)
    );
    assert_eq!(refusals(&mut host, Quota::Connections), 1);
    // Connecting out counts in the same share (attempts and connections
    // together): EAGAIN, before anything is sent.
    let sent = host.sent.len();
    assert_eq!(connect(&mut host, &mut user, 20, PEER), errno(libc::EAGAIN));
    assert_eq!(host.sent.len(), sent, "nothing sent for a refused connect");
    assert_eq!(refusals(&mut host, Quota::Connections), 2);

    // Root has no share: its service is still served.
    listen(&mut host, &mut root, 81);
    host.step(&[request_to(81, 9)]);
    let r = pending(&root);
    assert_eq!(accept(&mut host, &mut root, &r[0], 10), Some(0));

    // The user resets one connection: its share has room again, and the
    // request that waited is accepted.
    let seq = user.send(10, Op::Abort);
    host.step(&[]);
    assert_eq!(user.result(10, seq), Some(0));
    assert_eq!(accept(&mut host, &mut user, &reqs[2], 12), Some(0));
    assert_eq!(refusals(&mut host, Quota::Connections), 2);
}

#[test]
fn one_user_starts_at_most_its_share_of_the_resolvers_requests() {
    let mut host = Host::with(|c| {
        c.proto.resolve.max_pending = 8;
        c.proto.resolve.max_pending_per_owner = 2;
    });
    let mut user = App::attach_user(&host.h, 1, USER, Lineage::default());
    let mut root = App::attach(&host.h, 2);
    host.step(&[]);
    let unknown = |i: u8| Ipv4::new(198, 18, 0, i);
    // Addresses nobody answers for: each connect starts a resolution.
    for (sock, i) in [(10, 10), (11, 11)] {
        assert_eq!(
            connect(&mut host, &mut user, sock, unknown(i)),
            errno(libc::EINPROGRESS)
        );
    }
    // A third would take more than the user's share of the table.
    assert_eq!(
        connect(&mut host, &mut user, 12, unknown(12)),
        errno(libc::EAGAIN)
    );
    assert_eq!(refusals(&mut host, Quota::Resolutions), 1);
    // An address already being resolved costs nothing more.
    assert_eq!(
        connect(&mut host, &mut user, 13, unknown(11)),
        errno(libc::EINPROGRESS)
    );
    // Root (and any other user) still resolves.
    assert_eq!(
        connect(&mut host, &mut root, 10, unknown(12)),
        errno(libc::EINPROGRESS)
    );
    assert_eq!(refusals(&mut host, Quota::Resolutions), 1);
}
