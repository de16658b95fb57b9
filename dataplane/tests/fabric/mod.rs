//! The simulated fabric the simulator (`sim.rs`: connection set-up and
//! byte streams among up to 64 hosts) runs its hosts' protocol cores on:
//! hosts numbered from 0 with their MAC and IP derived from the number, a
//! wire that loses, duplicates and delays (hence reorders) each frame as
//! the schedule's seed says, and one loop that moves time forward to the
//! next arrival or the next timer of any host's [`Endpoint`].
//!
//! Everything random comes from the simulator's own [`SeededRng`], drawn
//! in a fixed order, so a seed replays the same schedule frame for frame.

use dataplane::proto::rng::SeededRng;
use dataplane::proto::{Endpoint, ProtoConfig, Subnet};
use dataplane::time::Instant;
use dataplane::wire::{EthernetAddress, Ipv4};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::Duration;

/// Host `i`'s MAC address.
pub(crate) fn mac_of(i: usize) -> EthernetAddress {
    EthernetAddress([2, 0xd5, 0, 0, (i >> 8) as u8, i as u8])
}

/// Host `i`'s IP address, in 198.18.0.0/15.
pub(crate) fn ip_of(i: usize) -> Ipv4 {
    Ipv4::new(198, 18, (i / 250) as u8, (i % 250 + 1) as u8)
}

/// The first instant of every schedule.
pub(crate) const START: Instant = Instant(1_000_000_000);

/// Host `i`'s protocol core: the SAN is 198.18.0.0/15, its random numbers
/// come from the schedule's seed and `salt`.
pub(crate) fn endpoint(i: usize, seed: u64, salt: u64) -> Endpoint<SeededRng> {
    let cfg = ProtoConfig {
        subnets: vec![Subnet {
            addr: Ipv4::new(198, 18, 0, 0),
            prefix: 15,
        }],
        ..Default::default()
    };
    Endpoint::new(
        cfg,
        mac_of(i),
        vec![ip_of(i)],
        SeededRng::new(seed ^ (i as u64 + salt).wrapping_mul(0x9E37)),
    )
}

/// Frames in flight among `hosts` hosts, each with its arrival time.
pub(crate) struct Fabric<F> {
    hosts: usize,
    /// Chance that one copy of a frame is lost.
    pub(crate) loss: f64,
    /// Chance that a frame is sent twice.
    pub(crate) dup: f64,
    /// Each copy arrives 1 us to this many us after it was sent.
    pub(crate) max_delay_us: u64,
    /// (arrival, sequence number), earliest first; the sequence number
    /// orders frames that arrive at the same instant as they were sent.
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    in_flight: HashMap<u64, (usize, F)>,
    seq: u64,
    /// FNV-1a over every frame delivered (its bytes and its host), in
    /// order: the schedule's fingerprint (see [`Fabric::record`]).
    pub(crate) digest: u64,
}

impl<F: Clone> Fabric<F> {
    pub(crate) fn new(hosts: usize, loss: f64, dup: f64, max_delay_us: u64) -> Fabric<F> {
        Fabric {
            hosts,
            loss,
            dup,
            max_delay_us,
            queue: BinaryHeap::new(),
            in_flight: HashMap::new(),
            seq: 0,
            digest: 0xcbf2_9ce4_8422_2325,
        }
    }

    /// Adds a delivered frame's bytes (and its host) to the fingerprint:
    /// two runs of one seed must deliver the same frames in the same order.
    pub(crate) fn record(&mut self, dst: usize, bytes: &[u8]) {
        for &b in bytes.iter().chain(&(dst as u64).to_le_bytes()) {
            self.digest = (self.digest ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }

    /// Host `src` sends `f` at `now` to `dst`: the host with that MAC, or
    /// every other host for a multicast address (nobody for an unknown one).
    pub(crate) fn send(
        &mut self,
        rng: &mut SeededRng,
        now: Instant,
        src: usize,
        dst: EthernetAddress,
        f: F,
    ) {
        for j in 0..self.hosts {
            if j != src && (dst.is_multicast() || mac_of(j) == dst) {
                self.put(rng, now, j, f.clone());
            }
        }
    }

    /// One frame for host `dst`: lost, duplicated and delayed as the
    /// fabric's chances say.
    fn put(&mut self, rng: &mut SeededRng, now: Instant, dst: usize, f: F) {
        let copies = if rng.chance(self.dup) { 2 } else { 1 };
        for _ in 0..copies {
            if rng.chance(self.loss) {
                continue;
            }
            let delay = Duration::from_micros(1 + rng.below(self.max_delay_us));
            self.seq += 1;
            self.queue.push(Reverse((now + delay, self.seq)));
            self.in_flight.insert(self.seq, (dst, f.clone()));
        }
    }

    /// When the next frame arrives.
    pub(crate) fn next_arrival(&self) -> Option<Instant> {
        self.queue.peek().map(|Reverse((t, _))| *t)
    }

    /// The next frame to arrive, and its host.
    pub(crate) fn arrive(&mut self) -> Option<(usize, F)> {
        let Reverse((_, seq)) = self.queue.pop()?;
        self.in_flight.remove(&seq)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.in_flight.is_empty()
    }
}

/// A simulator's hosts on a fabric, as [`advance`] drives them.
pub(crate) trait World {
    type Frame: Clone;
    fn fabric(&mut self) -> &mut Fabric<Self::Frame>;
    fn clock(&mut self) -> &mut Instant;
    /// Every host's protocol core, in host order.
    fn endpoints(&mut self) -> impl Iterator<Item = &mut Endpoint<SeededRng>>;
    /// Frame `f` arrives at host `dst`. True: the edge handles what it
    /// caused now; false: more of a burst comes first.
    fn deliver(&mut self, dst: usize, f: Self::Frame) -> bool;
    /// The edges take every host's transmits and events.
    fn pump(&mut self);
}

/// Moves time to `until`: each frame arrives and each timer fires in order
/// of time, the edges taking what they caused after each.
pub(crate) fn advance<W: World>(w: &mut W, until: Instant) {
    loop {
        let next_frame = w.fabric().next_arrival();
        let next_timer = w.endpoints().filter_map(|e| e.poll_timeout()).min();
        let Some(t) = [next_frame, next_timer]
            .into_iter()
            .flatten()
            .min()
            .filter(|t| *t <= until)
        else {
            break;
        };
        let now = (*w.clock()).max(t);
        *w.clock() = now;
        if next_frame == Some(t) {
            let (dst, f) = w.fabric().arrive().expect("a frame due");
            if !w.deliver(dst, f) {
                continue;
            }
        } else {
            for e in w.endpoints() {
                if e.poll_timeout().is_some_and(|x| x <= now) {
                    e.handle_timeout(now);
                }
            }
        }
        w.pump();
    }
    w.pump();
    let now = (*w.clock()).max(until);
    *w.clock() = now;
}
