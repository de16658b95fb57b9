//! One direction pair of a connection's byte stream: sequence numbers,
//! credit, go-back-N retransmission, FIN, keepalive. No bytes and no I/O:
//! the I/O edge owns the rings (in dsand, the process's send and receive
//! rings) and copies what this state machine says.
//!
//! Offsets are absolute stream positions (`u64`). The FIN takes the one
//! position after the last byte, so an acknowledgement above it says the
//! FIN arrived.
//!
//! * Send side: `una` (acknowledged: the ring's head) <= `nxt` (next to
//!   send) <= `max` (highest sent) <= `end` (written by the application)
//!   (+1 for the FIN). Bytes go out while below the peer's `limit` (its free
//!   receive space as an absolute offset). A NAK (the receiver saw a gap) or
//!   a retransmission timeout rewinds `nxt` to `una` (go-back-N); a NAK is
//!   honoured once per window (`recover`).
//! * Receive side: only in-order bytes are taken (`rcv_nxt`); anything else
//!   is dropped and answered with a NAK, so duplicates and reordering never
//!   reach the application. The credit advertised is `head + size`, where
//!   `head` is what the application consumed.
//! * Liveness: a peer not heard from for `keepalive_idle` is probed; one not
//!   heard from for `keepalive_timeout`, or unacknowledged bytes without
//!   progress for as long, end the connection ([`Timer::Dead`]).

use crate::time::Instant;
use crate::wire::{Segment, SEG_FIN, SEG_NAK, SEG_PROBE};
use std::time::Duration;

/// Stream timing.
#[derive(Debug, Clone, Copy)]
pub struct StreamTiming {
    /// First retransmission timeout.
    pub rto: Duration,
    /// Ceiling of the backed-off timeout.
    pub max_rto: Duration,
    /// Probe after this long without hearing from the peer.
    pub keepalive_idle: Duration,
    /// Give up after this long without hearing from the peer or without progress.
    pub keepalive_timeout: Duration,
    /// Hold the acknowledgement of a lone segment this long, so that a
    /// reply can carry it (every second segment, a gap, a FIN and a probe
    /// are acknowledged at once).
    pub ack_delay: Duration,
}

/// A segment to send: `len` bytes from `seq` of the send ring, then the FIN if `fin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outgoing {
    /// First byte.
    pub seq: u64,
    /// Bytes.
    pub len: u16,
    /// The FIN follows.
    pub fin: bool,
    /// Sent before (a retransmission).
    pub again: bool,
    /// Ask for an Ack at once: this segment ends a write of several
    /// segments, or fills half of our send ring (a receiver acknowledges
    /// every few segments otherwise).
    pub ack_now: bool,
}

impl Outgoing {
    /// The segment flags it is sent with (besides the acknowledgement's).
    pub fn flags(&self) -> u8 {
        (if self.fin { SEG_FIN } else { 0 }) | if self.ack_now { SEG_PROBE } else { 0 }
    }
}

/// What a timer pass asks of the I/O edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    /// Nothing.
    Idle,
    /// Send an Ack with the probe flag (keepalive or window probe).
    Probe,
    /// Bytes are to be sent again (from `una`).
    Retransmit,
    /// The peer is gone: reset the connection.
    Dead,
}

/// A violation of the stream protocol by the application (its ring indices).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadIndex;

/// The stream state of one connection (128 bytes: times and positions are
/// plain numbers, "none" is a sentinel, small fields share one word).
#[derive(Debug, Clone)]
pub struct Stream {
    // send side
    una: u64,
    nxt: u64,
    max: u64,
    end: u64,
    /// The FIN's position, or [`NO_FIN`].
    fin: u64,
    limit: u64,
    recover: u64,
    /// The retransmission (or window probe) timer, or [`NEVER`].
    rtx_at: Instant,
    progress_at: Instant,
    // receive side
    rcv_nxt: u64,
    rcv_head: u64,
    rcv_limit: u64,
    /// When a held acknowledgement goes out, or [`NEVER`].
    ack_at: Instant,
    // liveness
    heard_at: Instant,
    /// The current retransmission timeout (microseconds).
    rto_us: u32,
    rcv_size: u32,
    mss: u16,
    rcv_fin: bool,
    ack_due: bool,
    nak_due: bool,
    /// Segments taken since our last acknowledgement.
    unacked: u8,
    /// Keepalive probes sent since the peer was last heard from: the next
    /// one is due at `heard_at + idle + probes * idle / 2`.
    probes: u8,
    /// log2 of the send ring's size (as the application last reported it).
    snd_shift: u8,
}

const _: () = assert!(std::mem::size_of::<Stream>() == 128);

/// No FIN queued.
const NO_FIN: u64 = u64::MAX;
/// A timer that is not set.
const NEVER: Instant = Instant(u64::MAX);

fn micros(d: Duration) -> u32 {
    d.as_micros().min(u128::from(u32::MAX)) as u32
}

impl Stream {
    /// A new stream: the peer's first credit is `peer_window`, ours is
    /// `rcv_size`; segments carry at most `mss` bytes.
    pub fn new(now: Instant, t: StreamTiming, mss: u16, peer_window: u32, rcv_size: u32) -> Stream {
        Stream {
            una: 0,
            nxt: 0,
            max: 0,
            end: 0,
            fin: NO_FIN,
            limit: u64::from(peer_window),
            recover: 0,
            rtx_at: NEVER,
            progress_at: now,
            rcv_nxt: 0,
            rcv_head: 0,
            rcv_limit: u64::from(rcv_size),
            ack_at: NEVER,
            heard_at: now,
            rto_us: micros(t.rto),
            rcv_size,
            mss: mss.max(1),
            rcv_fin: false,
            ack_due: false,
            nak_due: false,
            unacked: 0,
            snd_shift: 0,
            probes: 0,
        }
    }

    fn rto(&self) -> Duration {
        Duration::from_micros(u64::from(self.rto_us))
    }
    fn rcv_size64(&self) -> u64 {
        u64::from(self.rcv_size)
    }
    /// When the next keepalive probe is due.
    fn probe_at(&self, t: &StreamTiming) -> Instant {
        self.heard_at + t.keepalive_idle + (t.keepalive_idle / 2) * u32::from(self.probes)
    }
    /// The receive ring's size (bytes).
    pub fn rcv_size(&self) -> u32 {
        self.rcv_size
    }

    /// Acknowledged bytes (the send ring's head).
    pub fn acked(&self) -> u64 {
        self.una.min(self.end)
    }
    /// Bytes the application wrote, ever.
    pub fn written(&self) -> u64 {
        self.end
    }
    /// In-order bytes received (the receive ring's tail).
    pub fn received(&self) -> u64 {
        self.rcv_nxt
    }
    /// Whether the peer's FIN arrived (after every byte).
    pub fn peer_finished(&self) -> bool {
        self.rcv_fin
    }
    /// Whether our FIN was acknowledged (so was every byte).
    pub fn finished(&self) -> bool {
        self.fin != NO_FIN && self.una > self.fin
    }
    /// Whether the application shut down writing.
    pub fn fin_queued(&self) -> bool {
        self.fin != NO_FIN
    }
    /// Bytes the application has consumed (as last reported).
    pub fn consumed(&self) -> u64 {
        self.rcv_head
    }
    /// Credit we advertised last.
    pub fn rcv_limit(&self) -> u64 {
        self.rcv_limit
    }
    /// Whether the peer's credit stops us (bytes wait, none may go).
    pub fn credit_stalled(&self) -> bool {
        self.nxt < self.end && self.nxt >= self.limit
    }
    /// Sent but not acknowledged.
    pub fn outstanding(&self) -> bool {
        self.una < self.nxt
    }

    /// The application wrote up to `tail` (and shut down writing if `fin`).
    ///
    /// # Errors
    /// If `tail` went backwards, past what the ring can hold (`size`), or
    /// moved after a shutdown.
    pub fn app_wrote(&mut self, tail: u64, size: u64, fin: bool) -> Result<(), BadIndex> {
        if tail < self.end || tail - self.acked() > size {
            return Err(BadIndex);
        }
        if self.fin != NO_FIN && tail != self.fin {
            return Err(BadIndex);
        }
        self.end = tail;
        self.snd_shift = (63 - size.max(1).leading_zeros()) as u8;
        if fin && self.fin == NO_FIN {
            self.fin = tail;
        }
        Ok(())
    }

    /// The application consumed received bytes up to `head`. Returns whether
    /// the credit grew enough to tell the peer now.
    ///
    /// # Errors
    /// If `head` went backwards or past what was delivered.
    pub fn app_read(&mut self, head: u64) -> Result<bool, BadIndex> {
        if head < self.rcv_head || head > self.rcv_nxt {
            return Err(BadIndex);
        }
        self.rcv_head = head;
        let limit = head + self.rcv_size64();
        // Worth a frame once a quarter of the ring (or the whole advertised
        // space) was freed since the last advertisement.
        let worth =
            limit >= self.rcv_limit + self.rcv_size64() / 4 || self.rcv_limit <= self.rcv_nxt;
        if worth && limit > self.rcv_limit {
            self.ack_due = true;
            return Ok(true);
        }
        Ok(false)
    }

    /// Full segments received before an acknowledgement is due: an eighth
    /// of the receive ring, from 2 to 16 segments (16 at 1500 bytes and
    /// 256 KiB; 3 with jumbo frames). The sender holds a window of many
    /// times that, so it never waits for these, and every Ack spared is a
    /// frame neither host handles.
    fn ack_every(&self) -> u8 {
        (self.rcv_size / 8 / u32::from(self.mss.max(1))).clamp(2, 16) as u8
    }

    /// Whether the advertised credit runs low (the application should say
    /// when it consumed bytes).
    pub fn credit_low(&self) -> bool {
        self.rcv_limit.saturating_sub(self.rcv_nxt) < self.rcv_size64() / 2
    }

    /// An acknowledgement (on any Data or Ack). Returns whether bytes were
    /// newly acknowledged.
    pub fn on_ack(&mut self, now: Instant, t: &StreamTiming, seg: &Segment) -> bool {
        self.heard_at = now;
        self.probes = 0;
        if seg.flags & SEG_PROBE != 0 {
            self.ack_due = true;
        }
        self.limit = self.limit.max(seg.limit);
        let mut progress = false;
        if seg.ack > self.una && seg.ack <= self.max {
            self.una = seg.ack;
            self.nxt = self.nxt.max(self.una);
            self.rto_us = micros(t.rto);
            self.progress_at = now;
            progress = true;
        }
        if self.outstanding() {
            if progress || self.rtx_at == NEVER {
                self.rtx_at = now + self.rto();
            }
        } else {
            self.rtx_at = NEVER;
            self.progress_at = now;
        }
        if seg.flags & SEG_NAK != 0
            && seg.ack == self.una
            && self.outstanding()
            && self.una >= self.recover
        {
            // The receiver saw a gap after `una`: go back at once.
            self.nxt = self.una;
            self.recover = self.max;
        }
        progress
    }

    /// Data arrived at `seg.seq` with `seg.len` bytes. Returns the range of
    /// the payload to append to the receive ring, as (skip, take): the bytes
    /// `payload[skip..skip + take]` go at [`received`](Self::received) (read
    /// before this call).
    pub fn on_data(&mut self, now: Instant, t: &StreamTiming, seg: &Segment) -> (usize, usize) {
        let len = u64::from(seg.len);
        if seg.seq > self.rcv_nxt {
            self.ack_due = true;
            self.nak_due = true;
            return (0, 0);
        }
        if self.rcv_fin {
            self.ack_due = true;
            return (0, 0); // everything arrived already: a duplicate
        }
        let skip = self.rcv_nxt - seg.seq;
        if skip > len || (skip == len && seg.flags & SEG_FIN == 0) {
            self.ack_due = true; // a duplicate: our acknowledgement was lost
            return (0, 0);
        }
        self.unacked = self.unacked.saturating_add(1);
        if self.unacked >= self.ack_every() || seg.flags & SEG_FIN != 0 || t.ack_delay.is_zero() {
            self.ack_due = true;
        } else if self.ack_at == NEVER {
            self.ack_at = now + t.ack_delay;
        }
        // Never beyond the credit we gave (the ring has room for that much).
        let room = (self.rcv_head + self.rcv_size64()).saturating_sub(self.rcv_nxt);
        let take = (len - skip).min(room);
        self.rcv_nxt += take;
        if seg.flags & SEG_FIN != 0 && seg.seq + len == self.rcv_nxt {
            self.rcv_fin = true;
        }
        if take < len - skip {
            self.ack_due = true;
            self.nak_due = true;
        }
        (skip as usize, take as usize)
    }

    /// The next segment to send, if any (call [`sent`](Self::sent) once it went out).
    pub fn next_segment(&self) -> Option<Outgoing> {
        let stop = self.end.min(self.limit);
        let again = self.nxt < self.max;
        if self.nxt < stop {
            let len = (stop - self.nxt).min(u64::from(self.mss)) as u16;
            let fin = self.fin == self.nxt + u64::from(len);
            let half = (1u64 << self.snd_shift) / 2;
            let before = self.nxt - self.una;
            let after = before + u64::from(len);
            // The last segment of a write of several asks for its Ack at
            // once (the writer may await an answer, and the Ack keeps the
            // peer's loop awake for it), as does the one that fills half of
            // the send ring (a small ring need not wait for the delayed
            // Ack); in a bulk stream the queue seldom empties. "Several":
            // a full segment's worth is unacknowledged before it, so that a
            // run of small writes asks once per segment's worth, not at
            // every write.
            let last = self.nxt + u64::from(len) == self.end && before >= u64::from(self.mss);
            return Some(Outgoing {
                seq: self.nxt,
                len,
                fin,
                again,
                ack_now: last || (before < half && after >= half),
            });
        }
        if self.fin == self.nxt {
            return Some(Outgoing {
                seq: self.nxt,
                len: 0,
                fin: true,
                again,
                ack_now: false,
            });
        }
        None
    }

    /// A segment from [`next_segment`](Self::next_segment) went out at `now`.
    /// It carried our acknowledgement, so none is due any more.
    pub fn sent(&mut self, now: Instant, o: Outgoing) {
        self.nxt = o.seq + u64::from(o.len) + u64::from(o.fin);
        self.max = self.max.max(self.nxt);
        if self.rtx_at == NEVER {
            self.rtx_at = now + self.rto();
        }
        self.ack_due = false;
        self.nak_due = false;
        self.unacked = 0;
        self.ack_at = NEVER;
        self.rcv_limit = self.rcv_head + self.rcv_size64();
    }

    /// Whether an acknowledgement should go now (nothing to piggy-back it on).
    pub fn ack_due(&self) -> bool {
        self.ack_due
    }

    /// The acknowledgement fields a frame sent now carries: (ack, limit,
    /// flags). Changes nothing ([`sent`](Self::sent) or
    /// [`take_ack`](Self::take_ack) records that they went).
    pub fn ack_fields(&self) -> (u64, u64, u8) {
        (
            self.rcv_nxt + u64::from(self.rcv_fin),
            self.rcv_head + self.rcv_size64(),
            if self.nak_due { SEG_NAK } else { 0 },
        )
    }

    /// The acknowledgement fields of the next frame: (ack, limit, NAK/FIN-free flags).
    /// Marks it sent.
    pub fn take_ack(&mut self) -> (u64, u64, u8) {
        self.ack_due = false;
        self.unacked = 0;
        self.ack_at = NEVER;
        let nak = std::mem::take(&mut self.nak_due);
        self.rcv_limit = self.rcv_head + self.rcv_size64();
        (
            self.rcv_nxt + u64::from(self.rcv_fin),
            self.rcv_limit,
            if nak { SEG_NAK } else { 0 },
        )
    }

    /// When [`on_timer`](Self::on_timer) is due next.
    pub fn next_timer(&self, timing: &StreamTiming) -> Instant {
        self.probe_at(timing)
            .min(self.rtx_at)
            .min(self.ack_at)
            .min(self.heard_at + timing.keepalive_timeout)
    }

    /// Timers due at `now`.
    pub fn on_timer(&mut self, now: Instant, t: &StreamTiming) -> Timer {
        if self.ack_at <= now {
            self.ack_at = NEVER;
            self.ack_due = true;
        }
        if now >= self.heard_at + t.keepalive_timeout {
            return Timer::Dead;
        }
        if self.outstanding() && now >= self.progress_at + t.keepalive_timeout {
            return Timer::Dead;
        }
        if now >= self.rtx_at {
            self.rto_us = micros((self.rto() * 2).min(t.max_rto));
            if self.outstanding() {
                self.rtx_at = now + self.rto();
                self.nxt = self.una;
                self.recover = self.max;
                return Timer::Retransmit;
            }
            self.rtx_at = NEVER;
        }
        if self.credit_stalled() && self.rtx_at == NEVER {
            // Our window probe: the credit update may have been lost.
            self.rtx_at = now + self.rto();
            return Timer::Probe;
        }
        if now >= self.probe_at(t) {
            self.probes = self.probes.saturating_add(1);
            return Timer::Probe;
        }
        Timer::Idle
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::rng::SeededRng;

    const T: StreamTiming = StreamTiming {
        rto: Duration::from_millis(5),
        max_rto: Duration::from_millis(400),
        keepalive_idle: Duration::from_secs(1),
        keepalive_timeout: Duration::from_secs(3),
        ack_delay: Duration::from_micros(200),
    };

    /// Two streams with byte rings, over a link that drops, duplicates and
    /// reorders: every byte arrives once, in order, then the FIN.
    fn transfer(seed: u64, loss: f64, dup: f64, reorder: f64, bytes: u64) {
        let mut rng = SeededRng::new(seed);
        let mut now = Instant::ZERO;
        let size = 16384u64;
        let mut a = Stream::new(now, T, 1000, size as u32, size as u32);
        let mut b = Stream::new(now, T, 1000, size as u32, size as u32);
        let mut written = 0u64;
        let mut got: Vec<u8> = Vec::new();
        let mut recv_ring = vec![0u8; size as usize];
        // (deliver_at, to_b, segment)
        let mut link: Vec<(Instant, bool, Segment)> = Vec::new();
        let data = |i: u64| (i.wrapping_mul(2654435761) >> 7) as u8;
        let mut steps = 0;
        while !(b.peer_finished() && a.finished() && got.len() as u64 == bytes) {
            steps += 1;
            assert!(steps < 2_000_000, "stuck: {a:?} {b:?}");
            // the application writes what fits, then shuts down
            let room = size - (written - a.acked());
            let n = room.min(bytes - written).min(3000);
            written += n;
            a.app_wrote(written, size, written == bytes).unwrap();
            // a sends
            while let Some(o) = a.next_segment() {
                a.sent(now, o);
                let (ack, limit, flags) = a.take_ack();
                let seg = Segment {
                    conn_id: 1,
                    token: 1,
                    seq: o.seq,
                    ack,
                    limit,
                    flags: flags | o.flags(),
                    len: o.len,
                };
                link.push((now, true, seg));
            }
            // b's application reads everything there
            let avail = b.received() - b.consumed();
            for i in 0..avail {
                got.push(recv_ring[((b.consumed() + i) % size) as usize]);
            }
            b.app_read(b.received()).unwrap();
            if b.ack_due() {
                let (ack, limit, flags) = b.take_ack();
                let seg = Segment {
                    conn_id: 1,
                    token: 1,
                    seq: 0,
                    ack,
                    limit,
                    flags,
                    len: 0,
                };
                link.push((now, false, seg));
            }
            if a.ack_due() {
                a.take_ack();
            }
            // the link delivers (or not) in random order
            let mut i = 0;
            while i < link.len() {
                if link[i].0 <= now && !(rng.chance(reorder)) {
                    let (_, to_b, seg) = link.swap_remove(i);
                    if rng.chance(loss) {
                        continue;
                    }
                    let copies = if rng.chance(dup) { 2 } else { 1 };
                    for _ in 0..copies {
                        if to_b {
                            let at = b.received();
                            let (skip, take) = b.on_data(now, &T, &seg);
                            for k in 0..take as u64 {
                                recv_ring[((at + k) % size) as usize] =
                                    data(seg.seq + skip as u64 + k);
                            }
                            b.on_ack(now, &T, &seg);
                        } else {
                            a.on_ack(now, &T, &seg);
                        }
                    }
                } else {
                    i += 1;
                }
            }
            now = now + Duration::from_micros(100 + rng.below(200));
            for s in [&mut a, &mut b] {
                if s.next_timer(&T) <= now {
                    assert_ne!(s.on_timer(now, &T), Timer::Dead, "seed {seed}");
                }
            }
        }
        assert_eq!(got.len() as u64, bytes);
        for (i, x) in got.iter().enumerate() {
            assert_eq!(*x, data(i as u64), "byte {i}, seed {seed}");
        }
    }

    /// Sends every segment `a` has, delivers it to `b` and counts the
    /// Acks `b` owes at once.
    fn send_all(now: Instant, a: &mut Stream, b: &mut Stream) -> (usize, usize) {
        let (mut segs, mut acks) = (0, 0);
        while let Some(o) = a.next_segment() {
            a.sent(now, o);
            let seg = Segment {
                conn_id: 1,
                token: 1,
                seq: o.seq,
                ack: 0,
                limit: 0,
                flags: o.flags(),
                len: o.len,
            };
            b.on_data(now, &T, &seg);
            b.on_ack(now, &T, &seg);
            segs += 1;
            if b.ack_due() {
                b.take_ack();
                acks += 1;
            }
        }
        (segs, acks)
    }

    #[test]
    fn acks_come_every_eighth_of_the_ring_and_at_the_end_of_a_write() {
        let now = Instant::ZERO;
        let ring = 1u64 << 18;
        let mut a = Stream::new(now, T, 1448, ring as u32, ring as u32);
        let mut b = Stream::new(now, T, 1448, ring as u32, ring as u32);
        assert_eq!(b.ack_every(), 16);
        // A bulk write of 100 segments: an Ack every 16, and one for the
        // last segment (the writer may be waiting for an answer).
        a.app_wrote(100 * 1448, ring, false).unwrap();
        assert_eq!(send_all(now, &mut a, &mut b), (100, 100 / 16 + 1));
        // A one-segment message: its Ack waits (for a reply to carry it).
        let mut a = Stream::new(now, T, 1448, ring as u32, ring as u32);
        let mut b = Stream::new(now, T, 1448, ring as u32, ring as u32);
        a.app_wrote(64, ring, false).unwrap();
        assert_eq!(send_all(now, &mut a, &mut b), (1, 0));
        assert!(b.next_timer(&T) <= now + T.ack_delay);
        // A run of small writes with bytes in flight: an Ack is asked for
        // once a full segment's worth is unacknowledged, not at each write.
        let mut a = Stream::new(now, T, 1448, ring as u32, ring as u32);
        let mut b = Stream::new(now, T, 1448, ring as u32, ring as u32);
        let mut asked = 0;
        for i in 1..=40u64 {
            a.app_wrote(i * 100, ring, false).unwrap();
            let (segs, acks) = send_all(now, &mut a, &mut b);
            assert_eq!(segs, 1);
            if acks > 0 {
                let ack = Segment {
                    conn_id: 1,
                    token: 1,
                    seq: 0,
                    ack: b.received(),
                    limit: b.received() + ring,
                    flags: 0,
                    len: 0,
                };
                a.on_ack(now, &T, &ack);
            }
            asked += acks;
        }
        // 40 writes of 100 bytes: asked at the 16th (1,500 bytes in
        // flight) and the 31st (1,500 more after that Ack).
        assert_eq!(asked, 2);
        // Jumbo frames: every 3 segments.
        let b = Stream::new(now, T, 8948, ring as u32, ring as u32);
        assert_eq!(b.ack_every(), 3);
        // A small send ring asks for its Ack when half of it is in flight,
        // although the receiver's ring would let it wait longer.
        let small = 8192u64;
        let mut a = Stream::new(now, T, 1448, ring as u32, ring as u32);
        a.app_wrote(small, small, false).unwrap();
        let o: Vec<Outgoing> = std::iter::from_fn(|| {
            let o = a.next_segment()?;
            a.sent(now, o);
            Some(o)
        })
        .collect();
        assert_eq!(o.len(), 6);
        let asks: Vec<usize> = (0..6).filter(|i| o[*i].ack_now).collect();
        assert_eq!(asks, vec![2, 5]); // 4,344 of 8,192 bytes, then the last
    }

    #[test]
    fn clean_link() {
        transfer(1, 0.0, 0.0, 0.0, 200_000);
    }

    #[test]
    fn lossy_duplicating_reordering_links() {
        for seed in 0..40 {
            transfer(seed, 0.05, 0.05, 0.2, 100_000);
        }
    }

    #[test]
    fn a_silent_peer_is_dead_after_the_timeout() {
        let mut s = Stream::new(Instant::ZERO, T, 1000, 4096, 4096);
        let mut probes = 0;
        let now = loop {
            let now = s.next_timer(&T);
            match s.on_timer(now, &T) {
                Timer::Dead => break now,
                Timer::Probe => probes += 1,
                _ => {}
            }
        };
        assert!(probes >= 2);
        assert_eq!(now, Instant::ZERO + T.keepalive_timeout);
    }

    #[test]
    fn bad_indices_are_refused() {
        let mut s = Stream::new(Instant::ZERO, T, 1000, 4096, 4096);
        assert_eq!(s.app_wrote(5000, 4096, false), Err(BadIndex));
        s.app_wrote(100, 4096, true).unwrap();
        assert_eq!(s.app_wrote(50, 4096, false), Err(BadIndex));
        assert_eq!(s.app_wrote(200, 4096, false), Err(BadIndex), "after FIN");
        assert_eq!(s.app_read(1), Err(BadIndex), "nothing delivered");
    }
}
