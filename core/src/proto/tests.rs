//! Unit tests of the protocol core: two endpoints joined by a hand-driven wire.

use super::rng::SeededRng;
use super::*;
use crate::time::Instant;
use crate::wire::{EthernetAddress, Ipv4, Message, RejectReason, Repr, ResetReason};
use std::collections::{HashMap, VecDeque};
use std::time::Duration;

const IA: Ipv4 = Ipv4::new(198, 18, 0, 1);
const IB: Ipv4 = Ipv4::new(198, 18, 0, 2);
const MA: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 1]);
const MB: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 2]);

fn cfg() -> ProtoConfig {
    ProtoConfig {
        subnets: vec![Subnet {
            addr: IA,
            prefix: 24,
        }],
        ..Default::default()
    }
}

struct Pair {
    a: Endpoint<SeededRng>,
    b: Endpoint<SeededRng>,
    now: Instant,
    ev_a: Vec<Event>,
    ev_b: Vec<Event>,
    /// Every frame that crossed the wire, (from_a, frame).
    log: Vec<(bool, Repr)>,
    /// b's application's backlog rings: requests handed over, in order.
    ring_b: HashMap<ListenerId, VecDeque<Incoming>>,
}

impl Pair {
    fn new(c: ProtoConfig) -> Pair {
        Pair {
            a: Endpoint::new(c.clone(), MA, vec![IA], SeededRng::new(1)),
            b: Endpoint::new(c, MB, vec![IB], SeededRng::new(2)),
            now: Instant(1_000_000),
            ev_a: vec![],
            ev_b: vec![],
            log: vec![],
            ring_b: HashMap::new(),
        }
    }

    /// The request at the head of b's ring for `l` (what the application sees).
    fn head(&self, l: ListenerId) -> Option<Incoming> {
        self.ring_b.get(&l).and_then(|q| q.front().copied())
    }

    /// b's application answers the head of its ring for `l`, by key.
    fn decide(&mut self, l: ListenerId, d: Decision) -> Result<Option<ConnHandle>, AcceptError> {
        let inc = self.head(l).ok_or(AcceptError::Stale)?;
        let r = self.b.decide(self.now, l, inc.key(), d);
        if d != Decision::Defer && r != Err(AcceptError::TooManyConnections) {
            self.ring_b.get_mut(&l).expect("head").pop_front();
        }
        r
    }

    /// Delivers frames both ways until nothing moves; `drop` filters frames out.
    fn run(&mut self, mut drop: impl FnMut(bool, &Repr) -> bool) {
        loop {
            let mut moved = false;
            while let Some(f) = self.a.poll_transmit() {
                moved = true;
                self.log.push((true, f));
                if !drop(true, &f) && (f.header.dst_mac == MB || f.header.dst_mac.is_multicast()) {
                    self.b.handle_frame(self.now, &f);
                }
            }
            while let Some(f) = self.b.poll_transmit() {
                moved = true;
                self.log.push((false, f));
                if !drop(false, &f) && (f.header.dst_mac == MA || f.header.dst_mac.is_multicast()) {
                    self.a.handle_frame(self.now, &f);
                }
            }
            while let Some(e) = self.a.poll_event() {
                self.ev_a.push(e);
            }
            while let Some(e) = self.b.poll_event() {
                if let Event::Incoming { listener, request } = e {
                    self.ring_b.entry(listener).or_default().push_back(request);
                }
                self.ev_b.push(e);
            }
            if !moved {
                return;
            }
        }
    }

    fn deliver(&mut self) {
        self.run(|_, _| false);
    }

    fn advance(&mut self, d: Duration, drop: impl FnMut(bool, &Repr) -> bool + Copy) {
        let end = self.now + d;
        loop {
            let next = [self.a.poll_timeout(), self.b.poll_timeout()]
                .into_iter()
                .flatten()
                .min();
            match next {
                Some(t) if t <= end => {
                    self.now = self.now.max(t);
                    self.a.handle_timeout(self.now);
                    self.b.handle_timeout(self.now);
                    self.run(drop);
                }
                _ => break,
            }
        }
        self.now = end;
        self.a.handle_timeout(self.now);
        self.b.handle_timeout(self.now);
        self.run(drop);
    }

    fn sent(&self, from_a: bool, pred: impl Fn(&Message) -> bool) -> usize {
        self.log
            .iter()
            .filter(|(f, r)| *f == from_a && pred(&r.message))
            .count()
    }
}

fn incoming(ev: &[Event]) -> usize {
    ev.iter()
        .filter(|e| matches!(e, Event::Incoming { .. }))
        .count()
}

fn failures(ev: &[Event]) -> Vec<ConnectFailure> {
    ev.iter()
        .filter_map(|e| match e {
            Event::ConnectFailed { error, .. } => Some(*error),
            _ => None,
        })
        .collect()
}

fn connected(ev: &[Event]) -> Vec<ConnHandle> {
    ev.iter()
        .filter_map(|e| match e {
            Event::Connected { conn, .. } => Some(*conn),
            _ => None,
        })
        .collect()
}

#[test]
fn connect_accept_establishes_both_sides() {
    let mut p = Pair::new(cfg());
    let l = p.b.listen((Ipv4::UNSPECIFIED, 5000), 4).unwrap();
    let c = p.a.connect(p.now, None, (IB, 5000)).unwrap();
    p.deliver();
    assert!(
        matches!(p.ev_b[..], [Event::Incoming { listener, request }] if listener == l && request.peer.0 == IA)
    );
    assert_eq!(p.head(l).unwrap().peer.0, IA);
    let s = p.decide(l, Decision::Accept).unwrap().unwrap();
    p.deliver();
    assert!(
        matches!(p.ev_a[..], [Event::Connected { conn, params }] if conn == c && params == p.a.connection(c).unwrap().stream_params())
    );
    let (ca, cb) = (p.a.connection(c).unwrap(), p.b.connection(s).unwrap());
    assert_eq!(
        (ca.conn_id, ca.my_token, ca.peer_token),
        (cb.conn_id, cb.peer_token, cb.my_token)
    );
    assert_eq!((ca.role, cb.role), (Role::Client, Role::Server));
    assert_eq!(ca.peer, (IB, 5000));
    assert_eq!(cb.peer, ca.local);
    assert_eq!(p.b.stats().accepted, 1);
    assert_eq!(p.a.stats().attempts[0], 1);
}

#[test]
fn a_connection_is_named_by_its_token_and_a_stale_handle_finds_nothing() {
    let mut p = Pair::new(cfg());
    let l = p.b.listen((Ipv4::UNSPECIFIED, 5000), 4).unwrap();
    let c1 = p.a.connect(p.now, None, (IB, 5000)).unwrap();
    p.deliver();
    let s1 = p.decide(l, Decision::Accept).unwrap().unwrap();
    p.deliver();
    let (ca, cb) = (*p.a.connection(c1).unwrap(), *p.b.connection(s1).unwrap());
    assert_eq!((ca.my_token, cb.my_token), (c1.0, s1.0));
    // A stream frame for it is found by its token, on either side.
    let from_b = crate::wire::SanHeader {
        dst_mac: MA,
        src_mac: MB,
        src_ip: IB,
        src_port: 5000,
        dst_ip: IA,
        dst_port: ca.local.1,
    };
    assert_eq!(p.a.stream_conn(&from_b, ca.conn_id, c1.0), Ok(c1));
    // Closed and forgotten: the slot goes to the next connection, whose
    // handle differs, and the old handle names nothing.
    p.a.close(p.now, c1).unwrap();
    p.deliver();
    assert!(p.a.connection(c1).is_none() && p.b.connection(s1).is_none());
    let c2 = p.a.connect(p.now, None, (IB, 5000)).unwrap();
    p.deliver();
    p.decide(l, Decision::Accept).unwrap().unwrap();
    p.deliver();
    assert_eq!(c2.slot(), c1.slot());
    assert_ne!(c2, c1);
    assert!(p.a.connection(c1).is_none() && p.a.connection(c2).is_some());
    let bad = p.a.stats().bad_token;
    assert_eq!(p.a.stream_conn(&from_b, ca.conn_id, c1.0), Err(false));
    assert_eq!(p.a.stats().bad_token, bad);
    // The wrong token for a live connection is counted.
    let id2 = p.a.connection(c2).unwrap().conn_id;
    assert_eq!(p.a.stream_conn(&from_b, id2, c1.0), Err(true));
    assert_eq!(p.a.stats().bad_token, bad + 1);
}

#[test]
fn full_backlog_refuses_at_once_without_an_event() {
    let mut p = Pair::new(cfg());
    let l = p.b.listen((IB, 7000), 4).unwrap();
    let hs: Vec<ConnHandle> = (0..10)
        .map(|_| p.a.connect(p.now, None, (IB, 7000)).unwrap())
        .collect();
    p.deliver();
    assert_eq!(incoming(&p.ev_b), 4, "only queued requests raise FD_ACCEPT");
    assert_eq!(p.b.backlog(l), Some((4, 4)));
    let f = failures(&p.ev_a);
    assert_eq!(
        f,
        vec![ConnectFailure::Refused(RejectReason::BacklogFull); 6]
    );
    assert!(f.iter().all(|e| e.errno() == libc::ECONNREFUSED));
    assert_eq!(p.b.stats().rejected[0], 6);
    // No time passed: the refusals are immediate.
    p.ev_a.clear();
    for d in [
        Decision::Accept,
        Decision::Accept,
        Decision::Reject,
        Decision::Reject,
    ] {
        p.decide(l, d).unwrap();
    }
    p.deliver();
    assert_eq!(connected(&p.ev_a).len(), 2);
    assert_eq!(
        failures(&p.ev_a),
        vec![ConnectFailure::Refused(RejectReason::Refused); 2]
    );
    assert_eq!(p.head(l), None, "the application's ring is drained");
    assert_eq!(p.b.backlog(l), Some((0, 4)));
    assert_eq!(p.a.attempts_in_progress(), 0);
    let _ = hs;
}

#[test]
fn answers_match_requests_by_key_in_any_order() {
    let mut p = Pair::new(cfg());
    let l = p.b.listen((IB, 7100), 3).unwrap();
    for _ in 0..3 {
        p.a.connect(p.now, None, (IB, 7100)).unwrap();
    }
    p.deliver();
    let q: Vec<Incoming> = p.ring_b[&l].iter().copied().collect();
    assert_eq!(q.len(), 3);
    // The last first, then the first, then the middle one.
    let c3 = p.b.decide(p.now, l, q[2].key(), Decision::Accept).unwrap();
    assert!(c3.is_some());
    assert_eq!(p.b.decide(p.now, l, q[0].key(), Decision::Reject), Ok(None));
    assert!(p
        .b
        .decide(p.now, l, q[1].key(), Decision::Accept)
        .unwrap()
        .is_some());
    p.deliver();
    assert_eq!(connected(&p.ev_a).len(), 2);
    assert_eq!(failures(&p.ev_a).len(), 1);
    // A stale answer fails and changes nothing.
    let before = p.b.stats().clone();
    assert_eq!(
        p.b.decide(p.now, l, q[1].key(), Decision::Reject),
        Err(AcceptError::Stale)
    );
    assert_eq!(
        p.b.decide(p.now, ListenerId(999), q[1].key(), Decision::Reject),
        Err(AcceptError::UnknownListener)
    );
    p.deliver();
    assert_eq!(p.b.stats().stale_decisions, before.stale_decisions + 1);
    assert_eq!(p.b.stats().rejected, before.rejected);
    assert_eq!(p.b.connections().count(), 2);
    assert_eq!(p.b.backlog(l), Some((0, 3)));
}

#[test]
fn requests_expire_after_the_connect_budget_and_free_their_place() {
    let mut p = Pair::new(cfg());
    let l = p.b.listen((IB, 7200), 2).unwrap();
    p.a.connect(p.now, None, (IB, 7200)).unwrap();
    p.a.connect(p.now, None, (IB, 7200)).unwrap();
    p.deliver();
    assert_eq!(p.b.backlog(l), Some((2, 2)));
    // Nobody answers: the clients give up, and so does the listener.
    p.advance(Duration::from_millis(2100), |_, _| false);
    assert_eq!(
        failures(&p.ev_a),
        vec![ConnectFailure::TimedOut; 2],
        "the clients timed out"
    );
    assert_eq!(p.b.backlog(l), Some((0, 2)));
    assert_eq!(p.b.stats().expired, 2);
    // An answer to an expired request is stale; a new request is queued.
    let old = p.head(l).unwrap();
    assert_eq!(
        p.b.decide(p.now, l, old.key(), Decision::Accept),
        Err(AcceptError::Stale)
    );
    p.ev_a.clear();
    p.a.connect(p.now, None, (IB, 7200)).unwrap();
    p.deliver();
    assert_eq!(p.b.backlog(l), Some((1, 2)));
    assert!(failures(&p.ev_a).is_empty());
}

#[test]
fn no_listener_is_reset() {
    let mut p = Pair::new(cfg());
    p.a.connect(p.now, None, (IB, 1)).unwrap();
    p.deliver();
    assert_eq!(failures(&p.ev_a), vec![ConnectFailure::Reset]);
    assert_eq!(ConnectFailure::Reset.errno(), libc::ECONNRESET);
    assert_eq!(p.b.stats().rejected[1], 1);
}

#[test]
fn defer_keeps_the_request_at_the_head() {
    let mut p = Pair::new(cfg());
    let l = p.b.listen((IB, 9), 2).unwrap();
    let c1 = p.a.connect(p.now, None, (IB, 9)).unwrap();
    p.deliver();
    p.a.connect(p.now, None, (IB, 9)).unwrap();
    p.deliver();
    let head = p.head(l).unwrap();
    assert_eq!(p.decide(l, Decision::Defer), Ok(None));
    assert_eq!(p.head(l).unwrap(), head);
    assert_eq!(p.b.backlog(l), Some((2, 2)));
    p.decide(l, Decision::Accept).unwrap();
    p.deliver();
    assert_eq!(
        connected(&p.ev_a),
        vec![c1],
        "the deferred (first) request was the one accepted"
    );
}

#[test]
fn silence_times_out_within_the_budget_with_backoff() {
    let mut p = Pair::new(cfg());
    // Nobody has 198.18.0.9: resolution never answers.
    let c =
        p.a.connect(p.now, None, (Ipv4::new(198, 18, 0, 9), 80))
            .unwrap();
    p.advance(Duration::from_secs(3), |_, _| false);
    assert_eq!(
        p.ev_a,
        vec![Event::ConnectFailed {
            conn: c,
            error: ConnectFailure::TimedOut
        }]
    );
    assert_eq!(ConnectFailure::TimedOut.errno(), libc::ETIMEDOUT);
    // A peer that resolves but never answers the request: retransmissions back off.
    let mut p = Pair::new(cfg());
    p.b.listen((IB, 80), 1).unwrap();
    let start = p.now;
    p.a.connect(p.now, None, (IB, 80)).unwrap();
    p.advance(Duration::from_secs(3), |from_a, f| {
        from_a && matches!(f.message, Message::ConnectRequest { .. })
    });
    assert_eq!(failures(&p.ev_a), vec![ConnectFailure::TimedOut]);
    let sends = p.sent(true, |m| matches!(m, Message::ConnectRequest { .. }));
    // 20 ms doubling to 400 ms over 2 s: 1 + 20,40,...,400 -> about 9 sends, far fewer than 2 s / 20 ms.
    assert!((5..=12).contains(&sends), "{sends} requests sent");
    assert!(p.now - start >= Duration::from_secs(2));
    assert_eq!(p.a.stats().attempts[3], 1);
}

#[test]
fn an_accept_nobody_confirms_ends_the_server_connection() {
    let mut p = Pair::new(cfg());
    let l = p.b.listen((IB, 6), 1).unwrap();
    p.a.connect(p.now, None, (IB, 6)).unwrap();
    p.deliver();
    // The client's side is gone for good: nothing from a reaches b any more.
    let s = p.decide(l, Decision::Accept).unwrap().unwrap();
    p.advance(Duration::from_secs(25), |from_a, _| from_a);
    assert!(p.ev_b.contains(&Event::Closed { conn: s }));
    assert_eq!(p.b.stats().unconfirmed, 1);
    assert_eq!(p.b.connections().count(), 0);
    // A source that never proved itself (a forged request names a victim)
    // gets the Accept and one retransmission, and nothing else: no Close.
    let accepts = p.sent(false, |m| matches!(m, Message::Accept { .. }));
    assert_eq!(accepts, usize::from(ACCEPT_SENDS), "{accepts} accepts sent");
    assert_eq!(
        p.sent(false, |m| !matches!(m, Message::ResolveReply { .. })),
        usize::from(ACCEPT_SENDS),
        "only the Accepts went to the unproven source"
    );
}

#[test]
fn a_stream_frame_confirms_an_accept_whose_ack_was_lost() {
    let mut p = Pair::new(cfg());
    let l = p.b.listen((IB, 6), 1).unwrap();
    let c = p.a.connect(p.now, None, (IB, 6)).unwrap();
    p.deliver();
    let s = p.decide(l, Decision::Accept).unwrap().unwrap();
    // Every AcceptAck is lost.
    p.advance(Duration::from_millis(50), |from_a, f| {
        from_a && matches!(f.message, Message::AcceptAck { .. })
    });
    assert!(p.b.is_unconfirmed(s));
    // The client's first stream frame carries the server's token: proof enough.
    let (hdr, conn_id, token) = p.a.stream_route(c).expect("connected");
    let f = Repr {
        header: hdr,
        message: Message::Ack(crate::wire::Segment {
            conn_id,
            token,
            seq: 0,
            ack: 0,
            limit: 4096,
            flags: 0,
            len: 0,
        }),
    };
    assert_eq!(p.b.stream_conn(&f.header, conn_id, token), Ok(s));
    assert!(!p.b.is_unconfirmed(s));
    p.advance(Duration::from_secs(25), |_, _| false);
    assert_eq!(p.b.stats().unconfirmed, 0);
    assert_eq!(p.b.connections().count(), 1);
}

#[test]
fn a_silent_destination_fails_at_once_for_a_while() {
    let mut p = Pair::new(cfg());
    let nobody = Ipv4::new(198, 18, 0, 99);
    p.a.connect(p.now, None, (nobody, 80)).unwrap();
    p.advance(Duration::from_millis(1500), |_, _| false);
    assert_eq!(failures(&p.ev_a), vec![ConnectFailure::TimedOut]);
    let asked = p.sent(true, |m| matches!(m, Message::ResolveRequest));
    // Again at once: fails on the next timer pass, without asking anyone.
    p.ev_a.clear();
    let t0 = p.now;
    p.a.connect(p.now, None, (nobody, 80)).unwrap();
    assert_eq!(p.a.poll_timeout(), Some(t0));
    p.advance(Duration::ZERO, |_, _| false);
    assert_eq!(failures(&p.ev_a), vec![ConnectFailure::TimedOut]);
    assert_eq!(
        p.sent(true, |m| matches!(m, Message::ResolveRequest)),
        asked
    );
    assert_eq!(p.a.stats().unresolved_fast, 1);
}

#[test]
fn outside_every_subnet_is_unreachable() {
    let mut p = Pair::new(cfg());
    assert_eq!(
        p.a.connect(p.now, None, (Ipv4::new(10, 0, 0, 1), 80)),
        Err(ConnectError::HostUnreachable)
    );
    assert_eq!(
        p.a.connect(p.now, Some(Ipv4::new(198, 18, 0, 77)), (IB, 80)),
        Err(ConnectError::NoLocalAddress)
    );
}

#[test]
fn retransmissions_never_duplicate_and_replay_the_answer() {
    let mut p = Pair::new(cfg());
    let l = p.b.listen((IB, 5), 4).unwrap();
    p.a.connect(p.now, None, (IB, 5)).unwrap();
    p.deliver();
    // The client retransmits while the request is queued: still one entry, one event.
    p.advance(Duration::from_millis(200), |_, _| false);
    assert_eq!(p.b.backlog(l), Some((1, 4)));
    assert_eq!(incoming(&p.ev_b), 1);
    assert!(p.b.stats().duplicate_requests >= 2);
    // The accept is lost; the server's own retransmission (or the replay for
    // the client's next request) gets through, and the client confirms it.
    p.decide(l, Decision::Accept).unwrap();
    p.run(|from_a, f| !from_a && matches!(f.message, Message::Accept { .. }));
    assert!(connected(&p.ev_a).is_empty());
    assert!(p.b.connections().all(|(_, c)| !c.is_confirmed()));
    p.advance(Duration::from_millis(500), |_, _| false);
    assert_eq!(connected(&p.ev_a).len(), 1);
    assert!(p.b.stats().replayed_accepts <= 1);
    assert_eq!(p.b.connections().count(), 1);
    assert!(p.b.connections().all(|(_, c)| c.is_confirmed()));
    assert_eq!(p.sent(true, |m| matches!(m, Message::AcceptAck { .. })), 1);

    // A refusal that is lost is replayed the same way, never queued anew.
    let mut p = Pair::new(cfg());
    let l = p.b.listen((IB, 5), 1).unwrap();
    p.a.connect(p.now, None, (IB, 5)).unwrap();
    p.deliver();
    p.decide(l, Decision::Reject).unwrap();
    p.run(|from_a, f| !from_a && matches!(f.message, Message::Reject { .. }));
    p.advance(Duration::from_millis(500), |_, _| false);
    assert_eq!(
        failures(&p.ev_a),
        vec![ConnectFailure::Refused(RejectReason::Refused)]
    );
    assert_eq!(p.b.stats().replayed_rejects, 1);
    assert_eq!(p.b.backlog(l), Some((0, 1)));
    assert_eq!(incoming(&p.ev_b), 1);
}

#[test]
fn a_reset_replayed_to_a_client_that_missed_it_stays_a_reset() {
    // The server accepts and resets at once (a close with SO_LINGER {1, 0});
    // its Accept and its Reset are both lost. The client's retransmitted
    // request finds the tombstone, which must say "accepted, then reset",
    // never "accepted, then closed" (a clean end of stream would hide the
    // bytes the server never sent).
    let mut p = Pair::new(cfg());
    let l = p.b.listen((IB, 5), 4).unwrap();
    let c = p.a.connect(p.now, None, (IB, 5)).unwrap();
    p.deliver();
    let s = p.decide(l, Decision::Accept).unwrap().unwrap();
    p.b.reset(p.now, s, crate::wire::ResetReason::Aborted);
    p.run(|from_a, f| {
        !from_a && matches!(f.message, Message::Accept { .. } | Message::Reset { .. })
    });
    assert!(p.ev_a.is_empty());
    p.advance(Duration::from_millis(500), |_, _| false);
    assert!(
        matches!(p.ev_a[..], [Event::Connected { conn, .. }, Event::Reset { conn: r, reason: crate::wire::ResetReason::Aborted }] if conn == c && r == c),
        "{:?}",
        p.ev_a
    );
    assert_eq!(p.a.connections().count(), 0);
    assert!(p.b.stats().replayed_accepts >= 1);
}

#[test]
fn a_late_accept_is_ignored_and_answered_with_a_close() {
    let mut p = Pair::new(cfg());
    // The accepting side keeps requests longer than this client waits (a
    // client with a shorter budget than the server's).
    p.b = Endpoint::new(
        ProtoConfig {
            connect_budget: Duration::from_secs(5),
            ..cfg()
        },
        MB,
        vec![IB],
        SeededRng::new(2),
    );
    let l = p.b.listen((IB, 5), 1).unwrap();
    let c = p.a.connect(p.now, None, (IB, 5)).unwrap();
    p.deliver();
    p.advance(Duration::from_secs(3), |from_a, f| {
        from_a && matches!(f.message, Message::ConnectRequest { .. })
    });
    assert_eq!(
        p.ev_a,
        vec![Event::ConnectFailed {
            conn: c,
            error: ConnectFailure::TimedOut
        }]
    );
    p.decide(l, Decision::Accept).unwrap();
    p.deliver();
    assert_eq!(p.ev_a.len(), 1, "the attempt ended exactly once");
    assert!(
        p.a.stats().late_replies >= 1,
        "the late accept (and the ack of our close) are counted"
    );
    assert_eq!(
        p.b.connections().count(),
        0,
        "the accepting side dropped the unwanted connection"
    );
    assert!(p.ev_b.iter().any(|e| matches!(e, Event::Closed { .. })));
}

#[test]
fn frames_with_wrong_tokens_are_dropped_and_counted() {
    let mut p = Pair::new(cfg());
    let l = p.b.listen((IB, 5), 1).unwrap();
    p.a.connect(p.now, None, (IB, 5)).unwrap();
    p.deliver();
    let inc = p.head(l).unwrap();
    let forged = |m| Repr {
        header: crate::wire::SanHeader {
            dst_mac: MA,
            src_mac: MB,
            src_ip: IB,
            src_port: 5,
            dst_ip: IA,
            dst_port: inc.peer.1,
        },
        message: m,
    };
    p.a.handle_frame(
        p.now,
        &forged(Message::Accept {
            conn_id: inc.conn_id,
            client_token: inc.client_token ^ 1,
            server_token: 3,
            offer: crate::wire::Offer::DEFAULT,
        }),
    );
    p.a.handle_frame(
        p.now,
        &forged(Message::Reject {
            conn_id: inc.conn_id,
            client_token: 0,
            reason: RejectReason::Refused,
        }),
    );
    assert_eq!(p.a.stats().bad_token, 2);
    assert_eq!(p.a.attempts_in_progress(), 1);
    let s = p.decide(l, Decision::Accept).unwrap().unwrap();
    p.deliver();
    let cb = *p.b.connection(s).unwrap();
    // A close with the wrong token does nothing.
    let bad_close = Repr {
        header: crate::wire::SanHeader {
            dst_mac: MB,
            src_mac: MA,
            src_ip: IA,
            src_port: cb.peer.1,
            dst_ip: IB,
            dst_port: 5,
        },
        message: Message::Close {
            conn_id: cb.conn_id,
            token: cb.my_token ^ 1,
        },
    };
    p.b.handle_frame(p.now, &bad_close);
    assert_eq!(p.b.stats().bad_token, 1);
    assert!(p.b.connection(s).is_some());
    // A request for an address that is not ours.
    let mut other = forged(Message::ConnectRequest {
        conn_id: 1,
        client_token: 1,
        offer: crate::wire::Offer::DEFAULT,
    });
    other.header.dst_ip = Ipv4::new(198, 18, 0, 99);
    p.a.handle_frame(p.now, &other);
    assert_eq!(p.a.stats().not_ours, 1);
}

#[test]
fn close_handshake_survives_loss_and_leaves_nothing() {
    let mut p = Pair::new(cfg());
    let l = p.b.listen((IB, 5), 1).unwrap();
    let c = p.a.connect(p.now, None, (IB, 5)).unwrap();
    p.deliver();
    let s = p.decide(l, Decision::Accept).unwrap().unwrap();
    p.deliver();
    p.a.close(p.now, c).unwrap();
    // The first close is lost.
    p.run(|from_a, f| from_a && matches!(f.message, Message::Close { .. }));
    assert!(p.b.connection(s).is_some());
    p.advance(Duration::from_millis(100), |_, _| false);
    assert_eq!(p.ev_b.last(), Some(&Event::Closed { conn: s }));
    assert!(p.a.connection(c).is_none() && p.b.connection(s).is_none());
    assert_eq!(p.a.close(p.now, c), Err(CloseError::Unknown));
    p.b.close_listener(p.now, l).unwrap();
    p.advance(Duration::from_secs(10), |_, _| false);
    assert!(p.a.is_quiescent(), "client state left");
    assert!(p.b.is_quiescent(), "server state left");
}

#[test]
fn closing_a_listener_refuses_what_it_queued() {
    let mut p = Pair::new(cfg());
    let l = p.b.listen((IB, 5), 3).unwrap();
    for _ in 0..3 {
        p.a.connect(p.now, None, (IB, 5)).unwrap();
    }
    p.deliver();
    p.b.close_listener(p.now, l).unwrap();
    p.deliver();
    assert_eq!(
        failures(&p.ev_a),
        vec![ConnectFailure::Refused(RejectReason::ListenerClosed); 3]
    );
    assert_eq!(p.b.queued_total(), 0);
    assert_eq!(p.b.close_listener(p.now, l), Err(CloseError::Unknown));
    // The port can be listened on again at once.
    p.b.listen((IB, 5), 3).unwrap();
}

#[test]
fn listen_rules() {
    let mut p = Pair::new(cfg());
    p.b.listen((Ipv4::UNSPECIFIED, 5), 1).unwrap();
    assert_eq!(p.b.listen((IB, 5), 1), Err(ListenError::AddrInUse));
    assert_eq!(p.b.listen((IA, 6), 1), Err(ListenError::AddrNotAvailable));
    let l = p.b.listen((IB, 6), i64::from(i32::MAX)).unwrap();
    assert_eq!(p.b.backlog(l), Some((0, crate::proto::MAX_BACKLOG)));
    let l = p.b.listen((IB, 7), 0).unwrap();
    assert_eq!(p.b.backlog(l), Some((0, 1)));
    assert_eq!(
        p.b.listen((Ipv4::UNSPECIFIED, 7), 1),
        Err(ListenError::AddrInUse)
    );
    let mut c = cfg();
    c.max_listeners = 1;
    let mut e = Endpoint::new(c, MB, vec![IB], SeededRng::new(3));
    e.listen((IB, 1), 1).unwrap();
    assert_eq!(e.listen((IB, 2), 1), Err(ListenError::TooManyListeners));
}

#[test]
fn one_source_holds_at_most_its_share_and_its_newest_request_gets_in() {
    let mut c = cfg();
    c.max_half_open_per_source = 3;
    let mut p = Pair::new(c);
    let l = p.b.listen((IB, 90), 8).unwrap();
    // A forger fills the share of the real client's address (its MAC too).
    for id in 0..3u64 {
        let f = Repr {
            header: crate::wire::SanHeader {
                dst_mac: MB,
                src_mac: MA,
                src_ip: IA,
                src_port: 4000 + id as u16,
                dst_ip: IB,
                dst_port: 90,
            },
            message: Message::ConnectRequest {
                conn_id: 0xf0f0 + id,
                client_token: 7,
                offer: crate::wire::Offer::DEFAULT,
            },
        };
        p.b.handle_frame(p.now, &f);
    }
    p.deliver();
    assert_eq!(p.b.backlog(l), Some((3, 8)));
    // The real client is not locked out: its request displaces the oldest
    // of its address's share, which stays at three.
    p.a.connect(p.now, None, (IB, 90)).unwrap();
    p.deliver();
    assert_eq!(p.b.backlog(l), Some((3, 8)));
    assert_eq!(p.b.stats().displaced, 1);
    assert!(failures(&p.ev_a).is_empty(), "no refusal");
    // The application meets the displaced request as stale, refuses the
    // other two forgeries and accepts the real one.
    assert_eq!(p.decide(l, Decision::Accept), Err(AcceptError::Stale));
    assert_eq!(p.decide(l, Decision::Reject), Ok(None));
    assert_eq!(p.decide(l, Decision::Reject), Ok(None));
    assert!(p.decide(l, Decision::Accept).unwrap().is_some());
    p.deliver();
    assert!(p.ev_a.iter().any(|e| matches!(e, Event::Connected { .. })));
    assert_eq!(p.b.backlog(l), Some((0, 8)));
}

#[test]
fn a_displaced_request_is_retransmitted_and_queued_again() {
    let mut c = cfg();
    c.max_half_open_per_source = 3;
    let mut p = Pair::new(c);
    let l = p.b.listen((IB, 90), 8).unwrap();
    for _ in 0..5 {
        p.a.connect(p.now, None, (IB, 90)).unwrap();
    }
    p.deliver();
    assert_eq!(p.b.backlog(l), Some((3, 8)));
    assert_eq!(p.b.stats().displaced, 2);
    assert!(failures(&p.ev_a).is_empty());
    // Answered one by one, every connect gets through (the displaced ones
    // come back with their retransmissions), none refused.
    let mut connected = 0;
    for _ in 0..50 {
        while let Some(inc) = p.head(l) {
            if p.b.decide(p.now, l, inc.key(), Decision::Accept).is_ok() {
                connected += 1;
            }
            p.ring_b.get_mut(&l).unwrap().pop_front();
        }
        p.advance(Duration::from_millis(20), |_, _| false);
    }
    assert_eq!(connected, 5);
    assert_eq!(
        p.ev_a
            .iter()
            .filter(|e| matches!(e, Event::Connected { .. }))
            .count(),
        5
    );
    assert!(failures(&p.ev_a).is_empty());
}

#[test]
fn a_forged_flood_cannot_grow_state() {
    let mut c = cfg();
    c.max_tombstones = 1000;
    c.max_half_open = 16;
    let mut b = Endpoint::new(c, MB, vec![IB], SeededRng::new(9));
    let l = b.listen((IB, 80), 8).unwrap();
    let l2 = b.listen((IB, 81), 4096).unwrap();
    let mut rng = SeededRng::new(4);
    use super::rng::Rng;
    for i in 0..100_000u32 {
        let src = Ipv4::from(rng.next_u64() as u32);
        let f = Repr {
            header: crate::wire::SanHeader {
                dst_mac: MB,
                src_mac: EthernetAddress([2, 1, 2, 3, 4, 5]),
                src_ip: src,
                src_port: 1234,
                dst_ip: IB,
                dst_port: 80 + (i % 3) as u16,
            },
            message: Message::ConnectRequest {
                conn_id: rng.next_u64(),
                client_token: rng.next_u64(),
                offer: crate::wire::Offer::DEFAULT,
            },
        };
        b.handle_frame(Instant(u64::from(i)), &f);
        while b.poll_transmit().is_some() {}
        while b.poll_event().is_some() {}
    }
    assert_eq!(b.backlog(l), Some((8, 8)));
    assert_eq!(
        b.backlog(l2).unwrap().0,
        8,
        "the half-open bound (16) caps the big backlog too"
    );
    assert!(b.tombstones() <= 1000);
    assert!(b.stats().tombstones_evicted > 0);
    assert!(b.stats().rejected[3] > 0, "no-resources refusals");
}

#[test]
fn resolution_answers_only_for_our_addresses_and_is_cached() {
    let mut p = Pair::new(cfg());
    p.b.listen((IB, 5), 8).unwrap();
    p.a.connect(p.now, None, (IB, 5)).unwrap();
    p.deliver();
    p.a.connect(p.now, None, (IB, 5)).unwrap();
    p.deliver();
    assert_eq!(
        p.sent(true, |m| matches!(m, Message::ResolveRequest)),
        1,
        "second connect used the cache"
    );
    assert_eq!(
        p.sent(false, |m| matches!(m, Message::ResolveReply { .. })),
        1
    );
}

#[test]
fn a_listener_taken_over_gets_nothing_more() {
    let mut p = Pair::new(cfg());
    let parent = p.b.listen((Ipv4::UNSPECIFIED, 5000), 4).unwrap();
    // Only the listener that holds the address can be taken over.
    let other = p.b.listen((IB, 5001), 4).unwrap();
    assert_eq!(
        p.b.listen_over((Ipv4::UNSPECIFIED, 5000), 4, other),
        Err(ListenError::AddrInUse)
    );
    let child =
        p.b.listen_over((Ipv4::UNSPECIFIED, 5000), 4, parent)
            .unwrap();
    assert_eq!(p.b.listener_at((Ipv4::UNSPECIFIED, 5000)), Some(child));
    p.a.connect(p.now, None, (IB, 5000)).unwrap();
    p.deliver();
    assert!(
        matches!(p.ev_b[..], [Event::Incoming { listener, .. }] if listener == child),
        "{:?}",
        p.ev_b
    );
    // Closing the parent's listener leaves the child's address alone.
    p.b.close_listener(p.now, parent).unwrap();
    assert_eq!(p.b.listener_at((Ipv4::UNSPECIFIED, 5000)), Some(child));
    // A second take-over from the parent's (now gone) listener fails.
    assert_eq!(
        p.b.listen_over((Ipv4::UNSPECIFIED, 5000), 4, parent),
        Err(ListenError::AddrInUse)
    );
}

#[test]
fn no_listener_is_said_only_after_a_scan_that_began_after_the_request() {
    use super::config::PortSet;
    use std::sync::Arc;
    let set = Arc::new(PortSet::default());
    let mut c = cfg();
    c.tcp_listening = Some(set.clone());
    let mut p = Pair::new(c);
    // A scan is under way when the request arrives.
    set.scan_started();
    // Nothing listens on 70 (as far as the last scan knew): no answer yet.
    p.a.connect(p.now, None, (IB, 70)).unwrap();
    p.deliver();
    assert!(failures(&p.ev_a).is_empty(), "answered before a fresh scan");
    // The scan that began before the request ends after it: it may have
    // read the table before a listener came, so it does not count.
    set.replace([]);
    p.advance(Duration::from_micros(100), |_, _| false);
    assert!(failures(&p.ev_a).is_empty());
    // ... the next one does: it shows nobody, so "no listener".
    set.replace([]);
    p.advance(Duration::from_micros(100), |_, _| false);
    assert_eq!(failures(&p.ev_a), vec![ConnectFailure::Reset]);
    // A service that started meanwhile: the fresh scan shows it, so
    // "TCP only" (the switch connects over TCP).
    p.a.connect(p.now, None, (IB, 71)).unwrap();
    p.deliver();
    set.replace([71]);
    p.advance(Duration::from_micros(100), |_, _| false);
    assert_eq!(
        failures(&p.ev_a)[1],
        ConnectFailure::Refused(RejectReason::TcpOnly)
    );
    // No scan in time (the scanner is stuck): "TCP only", counted.
    p.a.connect(p.now, None, (IB, 72)).unwrap();
    p.deliver();
    p.advance(Duration::from_millis(25), |_, _| false);
    assert_eq!(
        failures(&p.ev_a)[2],
        ConnectFailure::Refused(RejectReason::TcpOnly)
    );
    assert_eq!(p.b.stats().unsure_to_tcp, 1);
    // Without a listener set (the simulator's default): at once, as before.
    let mut q = Pair::new(cfg());
    q.a.connect(q.now, None, (IB, 70)).unwrap();
    q.deliver();
    assert_eq!(failures(&q.ev_a), vec![ConnectFailure::Reset]);
}

/// A client that reset its connection, whose Reset was lost, answers the
/// server's retransmitted Accept with a Reset again: the server's
/// application reads the reset, never a clean end (a Close would tell it the
/// client closed in order).
#[test]
fn a_client_that_reset_answers_a_late_accept_with_a_reset_again() {
    let mut p = Pair::new(cfg());
    let l = p.b.listen((IB, 6), 1).unwrap();
    let c = p.a.connect(p.now, None, (IB, 6)).unwrap();
    p.deliver();
    let s = p.decide(l, Decision::Accept).unwrap().unwrap();
    // The client's confirmation is lost.
    p.run(|from_a, f| from_a && matches!(f.message, Message::AcceptAck { .. }));
    assert!(p
        .ev_a
        .iter()
        .any(|e| matches!(e, Event::Connected { conn, .. } if *conn == c)));
    // Its application aborts the connection at once, and that Reset is lost.
    p.a.reset(p.now, c, ResetReason::Aborted);
    p.run(|from_a, f| from_a && matches!(f.message, Message::Reset { .. }));
    assert!(p.b.is_unconfirmed(s));
    // The server retransmits its Accept: the client answers with a Reset.
    p.advance(Duration::from_secs(5), |_, _| false);
    assert!(
        p.ev_b
            .iter()
            .any(|e| matches!(e, Event::Reset { conn, .. } if *conn == s)),
        "{:?}",
        p.ev_b
    );
    assert!(!p.ev_b.contains(&Event::Closed { conn: s }));
    assert_eq!(p.sent(true, |m| matches!(m, Message::Close { .. })), 0);
    // The client forgets it with its tombstones.
    p.advance(Duration::from_secs(10), |_, _| false);
    assert!(p.a.is_quiescent());
}

/// A server's stream whose client has not confirmed yet is held back, and
/// held once however often its application writes meanwhile (the held
/// list does not grow with every pass), then sent once the client confirms.
#[test]
fn a_stream_waiting_for_its_clients_confirmation_is_held_once() {
    let mut p = Pair::new(cfg());
    let l = p.b.listen((IB, 6), 1).unwrap();
    p.a.connect(p.now, None, (IB, 6)).unwrap();
    p.deliver();
    let s = p.decide(l, Decision::Accept).unwrap().unwrap();
    // The client's confirmation is lost.
    p.run(|from_a, f| from_a && matches!(f.message, Message::AcceptAck { .. }));
    assert!(p.b.is_unconfirmed(s));
    let params = p.b.connection(s).unwrap().stream_params();
    p.b.open_stream(p.now, s, params, 4096);
    for i in 1..=100u64 {
        p.b.stream_app(s, i * 10, false, 0, 4096).unwrap();
        assert_eq!(
            p.b.next_stream(),
            None,
            "nothing goes to an unconfirmed client"
        );
    }
    assert_eq!(p.b.streams.held.len(), 1);
    assert!(!p.b.release_held(), "still unconfirmed");
    assert_eq!(p.b.streams.held.len(), 1);
    // The Accept is retransmitted and confirmed this time.
    p.advance(Duration::from_secs(1), |_, _| false);
    assert!(!p.b.is_unconfirmed(s));
    assert!(p.b.release_held());
    assert!(p.b.streams.held.is_empty());
    assert_eq!(p.b.next_stream(), Some(s));
    assert!(p.b.stream_segment(s, 0).is_some());
}

/// A peer's Reset that crosses our Close ends the connection silently: the
/// application closed it and hears nothing more of it (as of a Close that
/// crosses ours).
#[test]
fn a_reset_that_crosses_our_close_is_not_reported() {
    let mut p = Pair::new(cfg());
    let l = p.b.listen((IB, 6), 1).unwrap();
    let c = p.a.connect(p.now, None, (IB, 6)).unwrap();
    p.deliver();
    let s = p.decide(l, Decision::Accept).unwrap().unwrap();
    p.deliver();
    assert!(p.a.connection(c).is_some() && !p.b.is_unconfirmed(s));
    // Both at once: a closes, b resets; each frame crosses the other's.
    p.a.close(p.now, c).unwrap();
    p.b.reset(p.now, s, ResetReason::Aborted);
    let resets = p.a.stats().resets_received;
    p.deliver();
    assert_eq!(p.a.stats().resets_received, resets + 1, "the Reset arrived");
    assert!(
        !p.ev_a.iter().any(|e| matches!(
            e,
            Event::Reset { conn, .. } | Event::Closed { conn } if *conn == c
        )),
        "{:?}",
        p.ev_a
    );
    p.b.close_listener(p.now, l).unwrap();
    p.advance(Duration::from_secs(15), |_, _| false);
    assert!(p.a.is_quiescent() && p.b.is_quiescent());
}
