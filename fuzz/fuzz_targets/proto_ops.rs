//! Model-based fuzzing of the protocol core: arbitrary sequences of
//! application operations, timer ticks, frame deliveries and drops, and
//! forged frames (arbitrary bytes) against three endpoints. Nothing may panic,
//! and the core's bounds hold after every operation.
#![no_main]
#![deny(unsafe_code)]

use arbitrary::Arbitrary;
use dataplane::proto::rng::SeededRng;
use dataplane::proto::*;
use dataplane::time::Instant;
use dataplane::wire::{EthernetAddress, Ipv4, Repr, DEFAULT_ETHERTYPE};
use libfuzzer_sys::fuzz_target;
use std::time::Duration;

#[derive(Debug, Arbitrary)]
enum Op {
    Listen {
        host: u8,
        wildcard: bool,
        port: u8,
        backlog: i16,
    },
    CloseListener {
        host: u8,
        which: u8,
    },
    Connect {
        host: u8,
        dst: u8,
        port: u8,
    },
    Decide {
        host: u8,
        which: u8,
        decision: u8,
    },
    Close {
        host: u8,
        which: u16,
    },
    /// Deliver queued frames; drop those whose index matches the mask.
    Deliver {
        drop_mask: u8,
    },
    Advance {
        micros: u32,
    },
    /// A frame from nowhere: arbitrary bytes after a valid Ethernet header.
    Forge {
        host: u8,
        bytes: Vec<u8>,
    },
    /// A well-formed frame with a mutated field, replayed from the wire log.
    Replay {
        index: u16,
        host: u8,
        flip: u8,
    },
}

const N: usize = 3;

fn mac(i: usize) -> EthernetAddress {
    EthernetAddress([2, 0, 0, 0, 0, i as u8 + 1])
}
fn ip(i: usize) -> Ipv4 {
    Ipv4::new(198, 18, 0, i as u8 + 1)
}

fuzz_target!(|ops: Vec<Op>| {
    let cfg = ProtoConfig {
        subnets: vec![Subnet {
            addr: ip(0),
            prefix: 24,
        }],
        max_tombstones: 64,
        max_half_open: 16,
        max_listeners: 8,
        max_attempts: 32,
        ..Default::default()
    };
    let mut eps: Vec<Endpoint<SeededRng>> = (0..N)
        .map(|i| Endpoint::new(cfg.clone(), mac(i), vec![ip(i)], SeededRng::new(i as u64)))
        .collect();
    let mut listeners: Vec<Vec<ListenerId>> = vec![vec![]; N];
    let mut handles: Vec<Vec<ConnHandle>> = vec![vec![]; N];
    // The requests handed to each host's application (its backlog rings),
    // answered by key in any order: stale and repeated answers included.
    let mut handed: Vec<Vec<(ListenerId, Incoming)>> = vec![vec![]; N];
    let mut wire: Vec<(usize, Repr)> = Vec::new();
    let mut log: Vec<Repr> = Vec::new();
    let mut now = Instant(1);

    for op in ops.into_iter().take(256) {
        match op {
            Op::Listen {
                host,
                wildcard,
                port,
                backlog,
            } => {
                let h = host as usize % N;
                let addr = if wildcard { Ipv4::UNSPECIFIED } else { ip(h) };
                if let Ok(l) = eps[h].listen((addr, u16::from(port % 4)), i64::from(backlog)) {
                    listeners[h].push(l);
                }
            }
            Op::CloseListener { host, which } => {
                let h = host as usize % N;
                if !listeners[h].is_empty() {
                    let k = which as usize % listeners[h].len();
                    let l = listeners[h].remove(k);
                    eps[h].close_listener(now, l).unwrap();
                    assert!(eps[h].close_listener(now, l).is_err());
                }
            }
            Op::Connect { host, dst, port } => {
                let h = host as usize % N;
                let d = if dst as usize % (N + 1) == N {
                    Ipv4::new(198, 18, 0, 99)
                } else {
                    ip(dst as usize % N)
                };
                if let Ok(c) = eps[h].connect(now, None, (d, u16::from(port % 4))) {
                    handles[h].push(c);
                }
            }
            Op::Decide {
                host,
                which,
                decision,
            } => {
                let h = host as usize % N;
                if !handed[h].is_empty() {
                    let k = which as usize % handed[h].len();
                    let (l, inc) = handed[h][k];
                    let d = [Decision::Accept, Decision::Reject, Decision::Defer]
                        [decision as usize % 3];
                    let before = eps[h].queued_total();
                    match eps[h].decide(now, l, inc.key(), d) {
                        Ok(Some(c)) => handles[h].push(c),
                        Ok(None) => {}
                        Err(_) => assert_eq!(
                            eps[h].queued_total(),
                            before,
                            "a failed answer changed nothing"
                        ),
                    }
                    // Keep some answered ones around to answer again (stale).
                    if d != Decision::Defer && decision & 0x80 == 0 {
                        handed[h].remove(k);
                    }
                }
            }
            Op::Close { host, which } => {
                let h = host as usize % N;
                if !handles[h].is_empty() {
                    let k = which as usize % handles[h].len();
                    let c = handles[h].remove(k);
                    let _ = eps[h].close(now, c);
                }
            }
            Op::Deliver { drop_mask } => {
                for (k, (dst, f)) in std::mem::take(&mut wire).into_iter().enumerate() {
                    if drop_mask & (1 << (k % 8)) == 0 {
                        eps[dst].handle_frame(now, &f);
                    }
                }
            }
            Op::Advance { micros } => {
                now = now + Duration::from_micros(u64::from(micros));
                for e in &mut eps {
                    e.handle_timeout(now);
                }
            }
            Op::Forge { host, mut bytes } => {
                let h = host as usize % N;
                let mut frame = mac(h).0.to_vec();
                frame.extend_from_slice(&[2, 9, 9, 9, 9, 9, 0x88, 0xb5]);
                frame.append(&mut bytes);
                if let Ok(r) = Repr::parse_bytes(&frame, DEFAULT_ETHERTYPE) {
                    eps[h].handle_frame(now, &r);
                }
            }
            Op::Replay { index, host, flip } => {
                if !log.is_empty() {
                    let mut bytes = log[index as usize % log.len()].to_bytes(DEFAULT_ETHERTYPE);
                    let i = 32 + flip as usize % (bytes.len() - 32).max(1);
                    if i < bytes.len() {
                        bytes[i] ^= 1 << (flip % 8);
                    }
                    if let Ok(r) = Repr::parse_bytes(&bytes, DEFAULT_ETHERTYPE) {
                        eps[host as usize % N].handle_frame(now, &r);
                    }
                }
            }
        }
        // Collect output; check the bounds.
        for (i, e) in eps.iter_mut().enumerate() {
            while let Some(f) = e.poll_transmit() {
                assert_eq!(f.header.src_mac, mac(i));
                if log.len() < 1024 {
                    log.push(f);
                }
                for j in 0..N {
                    if j != i
                        && (f.header.dst_mac == mac(j) || f.header.dst_mac.is_multicast())
                        && wire.len() < 4096
                    {
                        wire.push((j, f));
                    }
                }
            }
            while let Some(ev) = e.poll_event() {
                if let Event::Incoming { listener, request } = ev {
                    if handed[i].len() < 64 {
                        handed[i].push((listener, request));
                    }
                }
            }
            let mut total = 0;
            for (_, _, depth, cap) in e.listeners() {
                assert!(depth <= cap);
                total += depth;
            }
            assert_eq!(total, e.queued_total());
            assert!(e.queued_total() <= 16);
            assert!(e.tombstones() <= 64);
            assert!(e.attempts_in_progress() <= 32);
        }
    }
});
