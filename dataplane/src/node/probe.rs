//! Echo probes (`dsanctl ping`): resolve a SAN address, then send echo
//! requests one at a time and time the replies.

use crate::proto::resolve::Lookup;
use crate::proto::rng::OsRng;
use crate::proto::Endpoint;
use crate::time::Instant;
use crate::wire::{EthernetAddress, Ipv4, Message, Repr, SanHeader};
use std::sync::mpsc::Sender;
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
    /// Set by the requester when it no longer wants the answer (its
    /// connection closed): the probe ends at once, and the next one may start.
    pub cancel: std::sync::Arc<std::sync::atomic::AtomicBool>,
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

struct ActivePing {
    req: PingRequest,
    started: Instant,
    result: PingResult,
    /// Sequence and send time of the probe in flight.
    in_flight: Option<(u64, Instant)>,
    next_at: Instant,
}

impl ActivePing {
    /// A probe starting now.
    fn new(req: PingRequest, now: Instant) -> ActivePing {
        ActivePing {
            req,
            started: now,
            result: PingResult::default(),
            in_flight: None,
            next_at: now,
        }
    }

    /// When the probe next needs attention.
    fn next_timer(&self) -> Instant {
        match self.in_flight {
            Some((_, t)) => t + self.req.timeout,
            None => self.next_at,
        }
    }

    /// An echo reply from `src` with `seq` arrived at `now`; returns false if
    /// it was not the one awaited.
    fn on_reply(&mut self, now: Instant, src: Ipv4, seq: u64) -> bool {
        match self.in_flight {
            Some((s, sent_at)) if s == seq && src == self.req.dst => {
                self.result.received += 1;
                self.result
                    .rtt_ns
                    .push(now.saturating_since(sent_at).as_nanos() as u64);
                self.in_flight = None;
                self.next_at = now + self.req.interval;
                true
            }
            _ => false,
        }
    }
}

/// The lcore's echo probe: at most one runs at a time (the control
/// thread's queue order serialises them).
#[derive(Default)]
pub(super) struct Probe(Option<ActivePing>);

impl Probe {
    /// Whether a probe runs.
    pub(super) fn running(&self) -> bool {
        self.0.is_some()
    }

    /// Starts `req`; a probe still running is finished first (only a caller
    /// that bypassed the queue gets here with one).
    pub(super) fn start(&mut self, req: PingRequest, now: Instant) {
        if let Some(old) = self.0.replace(ActivePing::new(req, now)) {
            let _ = old.req.reply.send(old.result);
        }
    }

    /// When the running probe next needs attention.
    pub(super) fn next_timer(&self) -> Option<Instant> {
        self.0.as_ref().map(ActivePing::next_timer)
    }

    /// An echo reply from `src` with `seq` arrived; false if no probe
    /// awaited it.
    pub(super) fn on_reply(&mut self, now: Instant, src: Ipv4, seq: u64) -> bool {
        self.0.as_mut().is_some_and(|p| p.on_reply(now, src, seq))
    }

    /// Moves the running probe on: resolves its destination through the
    /// core's resolver, times out the probe in flight, finishes it, or
    /// returns the next echo request to send (from `mac`, this port's
    /// address). The bool: whether anything happened.
    pub(super) fn drive(
        &mut self,
        now: Instant,
        ep: &mut Endpoint<OsRng>,
        mac: EthernetAddress,
    ) -> (bool, Option<Repr>) {
        let Some(mut p) = self.0.take() else {
            return (false, None);
        };
        if p.req.cancel.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = p.req.reply.send(p.result);
            return (true, None);
        }
        let mut busy = false;
        let mut echo = None;
        if p.result.mac.is_none() {
            match ep.resolver_mut().lookup(now, p.req.dst) {
                Lookup::Found(mac) => {
                    p.result.mac = Some(mac);
                    p.result.resolve_ns = now.saturating_since(p.started).as_nanos() as u64;
                    p.next_at = now;
                    busy = true;
                }
                Lookup::Pending if now.saturating_since(p.started) < p.req.timeout => {}
                _ => {
                    let _ = p.req.reply.send(p.result);
                    return (true, None);
                }
            }
        }
        if let Some(dst_mac) = p.result.mac {
            if let Some((_, sent_at)) = p.in_flight {
                if now.saturating_since(sent_at) >= p.req.timeout {
                    p.in_flight = None; // lost
                    p.next_at = now;
                }
            }
            if p.in_flight.is_none() {
                if p.result.sent >= p.req.count {
                    let _ = p.req.reply.send(p.result);
                    return (true, None);
                }
                if now >= p.next_at {
                    let seq = u64::from(p.result.sent);
                    let src_ip = ep.addrs().first().copied().unwrap_or(Ipv4::UNSPECIFIED);
                    let header = SanHeader {
                        dst_mac,
                        src_mac: mac,
                        src_ip,
                        src_port: 0,
                        dst_ip: p.req.dst,
                        dst_port: 0,
                    };
                    echo = Some(Repr {
                        header,
                        message: Message::EchoRequest {
                            seq,
                            stamp: now.as_nanos(),
                        },
                    });
                    p.result.sent += 1;
                    p.in_flight = Some((seq, now));
                    busy = true;
                }
            }
        }
        self.0 = Some(p);
        (busy, echo)
    }
}
