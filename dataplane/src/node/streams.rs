//! Connection byte streams at the I/O edge: the protocol core's
//! [`Stream`] state machines, the processes' send and receive rings, and the
//! Data / Ack frames between them.
//!
//! * A process's `kick` (a command, sent only when its `kick` word was clear)
//!   says a stream has news: its ring indices are read once, checked, and
//!   the connection joins the transmit queue. The lcore never scans idle
//!   connections: it serves the queue, the frames that arrive and a timer
//!   set ordered by deadline.
//! * Bytes go from the send ring straight into the frame buffer, and from a
//!   received frame straight into the receive ring (one copy each way at the
//!   edge; the application copies once more into or out of the ring).
//! * A closed socket lingers until its last bytes and FIN are acknowledged,
//!   then the connection's Close handshake runs; bytes arriving after the
//!   close, unread bytes at close, a dead peer and a process that goes away
//!   reset the connection.

use super::apps::SockObj;
use super::signal::raise;
use super::{AppShared, Node};
use crate::device::Device;
use crate::engine::Tx;
use crate::proto::slab::Slab;
use crate::proto::stream::{Outgoing, Stream, StreamTiming, Timer};
use crate::proto::{ConnHandle, StreamParams};
use crate::time::Instant;
use crate::wire::{
    self, Message, Repr, ResetReason, SanHeader, Segment, PAYLOAD_OFFSET, SEG_PROBE, SEG_URG,
};
use dsan_channel::msg::Bufs;
use dsan_channel::region::{FD_CLOSE, FD_READ, FD_WRITE};
use dsan_channel::stream::{RingMarks, StreamArea, StreamShm};
use std::collections::HashMap;
use std::sync::Arc;

/// The daemon's state per established connection, not counting the rings
/// (which live in the process's region): the stream context and the
/// protocol core's connection, each in its slot of a slab indexed by the
/// connection's handle, the core's wire index entry (a slot number in a
/// hash table) and the timer entry. The process, socket and ring view are
/// found through `app`, so there is no owner entry.
pub const STREAM_STATE_BYTES: usize = STREAM_ENTRY_BYTES
    + std::mem::size_of::<crate::proto::Connection>()
    + crate::proto::WIRE_INDEX_ENTRY_BYTES
    + std::mem::size_of::<(Instant, ConnHandle)>();

// Issue #13's budget, checked when the crate compiles.
const _: () = assert!(STREAM_STATE_BYTES <= 256);

/// Bytes of one slot of the stream table (an empty slot is the same size).
pub const STREAM_ENTRY_BYTES: usize = std::mem::size_of::<Option<StreamCtx>>();

const _: () = assert!(STREAM_ENTRY_BYTES == std::mem::size_of::<StreamCtx>());

/// Frames one pass of the transmit queue may send (the rest wait for the next pass).
const TX_BUDGET: usize = 64;

/// The lcore's streams, in the slots of their connections' handles (the
/// protocol core's slots: no hashing, and no spare room beyond a chunk),
/// and how many each user (other than root) serves: every established
/// connection has a stream until it ends, so this is the user's count of
/// connections, kept where streams come and go.
#[derive(Default)]
pub(super) struct StreamTable(Slab<StreamCtx>, HashMap<u32, u32>);

impl StreamTable {
    pub(super) fn get(&self, h: &ConnHandle) -> Option<&StreamCtx> {
        self.0.get(h.slot()).filter(|c| c.tag == h.tag())
    }
    fn get_mut(&mut self, h: &ConnHandle) -> Option<&mut StreamCtx> {
        self.0.get_mut(h.slot()).filter(|c| c.tag == h.tag())
    }
    /// Connections that processes of user `uid` serve (0 for root).
    pub(super) fn of_user(&self, uid: u32) -> u32 {
        self.1.get(&uid).copied().unwrap_or(0)
    }
    fn count(&mut self, uid: u32, up: bool) {
        if uid == 0 {
            return;
        }
        if up {
            *self.1.entry(uid).or_insert(0) += 1;
        } else if let Some(n) = self.1.get_mut(&uid) {
            *n -= 1;
            if *n == 0 {
                self.1.remove(&uid);
            }
        }
    }
    /// The handle of whatever stream holds `h`'s slot.
    fn occupant(&self, h: ConnHandle) -> Option<ConnHandle> {
        self.0
            .get(h.slot())
            .map(|c| ConnHandle::new(h.slot() as u32, c.tag))
    }
    fn insert(&mut self, h: ConnHandle, ctx: StreamCtx) {
        debug_assert_eq!(ctx.tag, h.tag());
        self.count(ctx.app.uid, true);
        let old = self.0.insert(h.slot(), ctx);
        debug_assert!(old.is_none());
    }
    fn remove(&mut self, h: &ConnHandle) -> Option<StreamCtx> {
        self.get(h)?;
        let ctx = self.0.remove(h.slot())?;
        self.count(ctx.app.uid, false);
        Some(ctx)
    }
    /// Stream `h` is served by `to` from now on.
    fn rehome(&mut self, h: ConnHandle, to: Arc<AppShared>) {
        let (from, uid) = (self.get(&h).map(|c| c.app.uid), to.uid);
        if let Some(ctx) = self.get_mut(&h) {
            ctx.app = to;
        }
        if let Some(from) = from.filter(|f| *f != uid) {
            self.count(from, false);
            self.count(uid, true);
        }
    }
    pub(super) fn len(&self) -> usize {
        self.0.len()
    }
    fn iter(&self) -> impl Iterator<Item = (ConnHandle, &StreamCtx)> {
        self.0
            .iter()
            .map(|(i, c)| (ConnHandle::new(i as u32, c.tag), c))
    }
}

/// The lcore's state for one connection's stream (152 bytes).
pub(super) struct StreamCtx {
    app: Arc<AppShared>,
    /// The random part of the connection's handle (the slot is its index
    /// in the table; a slot's next occupant has another tag).
    tag: u32,
    s: Stream,
    timer: Instant,
    /// The socket (< `MAX_SOCKETS`, 1,024).
    sock: u16,
    /// log2 of the send ring's size (the rings are found from `app` and
    /// `sock` when needed; the receive ring's size is the stream's).
    snd_shift: u8,
    /// [`QUEUED`], [`PROBE`], [`APP_CLOSED`], [`STALLED`].
    flags: u8,
}

/// In the transmit queue.
const QUEUED: u8 = 1;
/// A keepalive probe is due.
const PROBE: u8 = 2;
/// The application closed its socket (the stream lingers).
const APP_CLOSED: u8 = 4;
/// The peer's credit is exhausted (counted once per stall).
const STALLED: u8 = 8;
/// No socket holds it, a process that may claim it still does (its slot
/// lingers; see [`super::handover`]).
const ORPHAN: u8 = 16;

impl StreamCtx {
    fn has(&self, f: u8) -> bool {
        self.flags & f != 0
    }
    fn set(&mut self, f: u8, on: bool) {
        if on {
            self.flags |= f;
        } else {
            self.flags &= !f;
        }
    }
    fn shm(&self) -> &StreamShm {
        self.app.region.stream(usize::from(self.sock))
    }
    fn snd_size(&self) -> usize {
        1 << self.snd_shift
    }
    fn area(&self) -> StreamArea {
        self.app.region.stream_area(
            usize::from(self.sock),
            self.snd_size(),
            self.s.rcv_size() as usize,
        )
    }
    fn pid(&self) -> u64 {
        self.app.id
    }
    fn sock(&self) -> u32 {
        u32::from(self.sock)
    }
}

/// Counter indices of the stream's frame kinds.
const DATA_INDEX: usize = match wire::Kind::Data.index() {
    Some(i) => i,
    None => 0,
};
const ACK_INDEX: usize = match wire::Kind::Ack.index() {
    Some(i) => i,
    None => 0,
};

/// Index of a reason in [`super::RESET_REASONS`].
fn reset_index(r: ResetReason) -> usize {
    match r {
        ResetReason::ProcessGone => 0,
        ResetReason::Aborted => 1,
        ResetReason::TimedOut => 2,
        ResetReason::Shutdown => 3,
        _ => 4,
    }
}

impl Node {
    fn timing(&self) -> StreamTiming {
        let c = &self.cfg.proto;
        StreamTiming {
            rto: c.stream_rto,
            max_rto: c.max_rto,
            keepalive_idle: c.keepalive_idle,
            keepalive_timeout: c.keepalive_timeout,
            ack_delay: c.ack_delay,
        }
    }

    /// Sets up the stream of a connection that was just established for
    /// socket `sock` of process `pid`, with ring sizes `bufs`, and hands the
    /// socket's stream block to it: every word the daemon writes is reset,
    /// and the block is stamped with the generation the process gave the
    /// socket (`snd_p.gen`), so that the process can tell this connection's
    /// block from what an earlier socket in the same slot left there.
    ///
    /// The stream opens even when the core has already forgotten the
    /// connection (the peer's Close or Reset came in the same burst as its
    /// Accept): the event that follows ends it, and the process reads the
    /// end of the stream (or the reset) on a block of its own, never the
    /// previous occupant's words. Returns false if the process is gone.
    pub(super) fn open_stream(
        &mut self,
        now: Instant,
        h: ConnHandle,
        pid: u64,
        sock: u32,
        bufs: Bufs,
        params: StreamParams,
    ) -> bool {
        if let Some(stale) = self.streams.occupant(h).filter(|o| *o != h) {
            // The core gave the slot to a new connection while the old one's
            // stream was still here (it must not): end the old one.
            debug_assert!(false, "stream slot {} still held", h.slot());
            self.drop_stream(stale, -libc::ECONNRESET);
        } else if let Some(old) = self.streams.remove(&h) {
            self.stream_timers.remove(&(old.timer, h));
        }
        let Some(p) = self.procs.get(&pid) else {
            return false;
        };
        let app = p.shared.clone();
        // The process's stamp is echoed (any value: a process that
        // scribbles on it only confuses itself).
        app.region.stream(sock as usize).open(
            bufs.snd as u32,
            bufs.rcv as u32,
            u32::from(params.mss),
            self.claim_key(h),
        );
        let timing = self.timing();
        let s = Stream::new(now, timing, params.mss, params.peer_window, bufs.rcv as u32);
        let timer = s.next_timer(&timing);
        self.streams.insert(
            h,
            StreamCtx {
                app,
                tag: h.tag(),
                sock: sock as u16,
                snd_shift: bufs.snd.trailing_zeros() as u8,
                s,
                timer,
                flags: 0,
            },
        );
        self.stream_timers.insert((timer, h));
        // The stream names its owner from now on.
        self.conn_owner.remove(&h);
        true
    }

    /// The process and socket holding connection `h`, if any (a connect in
    /// progress, or a stream whose socket is still open).
    pub(super) fn owner(&self, h: ConnHandle) -> Option<(u64, u32)> {
        if let Some(o) = self.conn_owner.get(&h) {
            return Some(*o);
        }
        self.streams
            .get(&h)
            .filter(|c| !c.has(APP_CLOSED))
            .map(|c| (c.pid(), c.sock()))
    }

    fn reschedule(&mut self, h: ConnHandle) {
        let timing = self.timing();
        if let Some(ctx) = self.streams.get_mut(&h) {
            let t = ctx.s.next_timer(&timing);
            if t != ctx.timer {
                self.stream_timers.remove(&(ctx.timer, h));
                ctx.timer = t;
                self.stream_timers.insert((t, h));
            }
        }
    }

    fn enqueue(&mut self, h: ConnHandle) {
        if let Some(ctx) = self.streams.get_mut(&h) {
            let stalled = ctx.s.credit_stalled();
            if stalled && !ctx.has(STALLED) {
                self.local.credit_stalls += 1;
            }
            ctx.set(STALLED, stalled);
            if !ctx.has(QUEUED)
                && (ctx.has(PROBE) || ctx.s.ack_due() || ctx.s.next_segment().is_some())
            {
                ctx.set(QUEUED, true);
                self.txq.push_back(h);
            }
        }
    }

    /// Reads what the application wrote and consumed. Err: it broke the protocol.
    fn sync_from_app(ctx: &mut StreamCtx, force_fin: bool) -> Result<(), ()> {
        let at = ctx.shm().take_kick();
        let snd_size = ctx.snd_size() as u64;
        ctx.s
            .app_wrote(at.tail, snd_size, force_fin || at.fin)
            .map_err(|_| ())?;
        if !ctx.has(APP_CLOSED) {
            ctx.s.app_read(at.head).map_err(|_| ())?;
        }
        Ok(())
    }

    /// A process's kick for its socket `sock`.
    pub(super) fn kick(&mut self, now: Instant, pid: u64, sock: u32) {
        let Some(SockObj::Conn(h)) = self.procs.get(&pid).and_then(|p| p.socks.get(&sock)) else {
            return;
        };
        let h = *h;
        let Some(ctx) = self.streams.get_mut(&h) else {
            return;
        };
        if Self::sync_from_app(ctx, false).is_err() {
            self.local.resets[reset_index(ResetReason::Protocol)] += 1;
            self.violation(now, pid);
            return;
        }
        self.enqueue(h);
        self.reschedule(h);
    }

    /// The application closed socket `sock` holding connection `h`: its last
    /// bytes and FIN still go (the slot lingers), unless it left received
    /// bytes unread (then the connection is reset, as TCP does).
    pub(super) fn close_stream(&mut self, now: Instant, h: ConnHandle) -> bool {
        let Some(ctx) = self.streams.get_mut(&h) else {
            return false;
        };
        let shm_head = ctx.shm().read_head();
        let synced = Self::sync_from_app(ctx, true).is_ok();
        ctx.set(APP_CLOSED, true);
        let unread = shm_head < ctx.s.received();
        if !synced || unread {
            self.reset_stream(now, h, ResetReason::Aborted);
            return true;
        }
        self.conn_owner.remove(&h);
        if ctx.s.written() == 0 {
            // Nothing was ever written: no bytes and no FIN to deliver; the
            // Close handshake alone ends it (the peer reads it as the end of
            // the stream, since no byte can be missing).
            let _ = self.ep.close(now, h);
            self.drop_stream(h, 0);
            return true;
        }
        ctx.shm().linger();
        self.finish_if_done(now, h);
        self.enqueue(h);
        self.reschedule(h);
        true
    }

    /// The application closed socket `sock` holding connection `h` with
    /// SO_LINGER {1, 0}: the connection is reset at once (unsent bytes are
    /// dropped, the peer reads ECONNRESET) and the socket slot is free.
    pub(super) fn abort_stream(&mut self, now: Instant, h: ConnHandle) -> bool {
        let Some(ctx) = self.streams.get_mut(&h) else {
            return false;
        };
        ctx.set(APP_CLOSED, true);
        self.conn_owner.remove(&h);
        self.reset_stream(now, h, ResetReason::Aborted);
        true
    }

    /// A lingering stream whose FIN was acknowledged: the Close handshake
    /// takes over and the socket slot is free.
    fn finish_if_done(&mut self, now: Instant, h: ConnHandle) {
        if self
            .streams
            .get(&h)
            .is_some_and(|c| c.has(APP_CLOSED) && c.s.finished())
        {
            let _ = self.ep.close(now, h);
            self.drop_stream(h, 0);
        }
    }

    /// Forgets a stream; tells its socket how the connection ended (a closed
    /// socket's slot is freed instead).
    fn drop_stream(&mut self, h: ConnHandle, close_error: i32) {
        let Some(ctx) = self.streams.remove(&h) else {
            return;
        };
        self.stream_timers.remove(&(ctx.timer, h));
        self.end_away_holders(h, close_error);
        self.forget_shared(h);
        let shm = ctx.shm();
        if ctx.has(APP_CLOSED) || ctx.has(ORPHAN) {
            shm.release();
            return;
        }
        shm.mark_dead(close_error);
        if let Some(p) = self.procs.get(&ctx.pid()) {
            let ok = raise(
                p.shared.region.sock(usize::from(ctx.sock)),
                p.events.get(&ctx.sock()),
                FD_CLOSE,
            );
            if !ok {
                self.local.event_signal_failed += 1;
            }
        }
    }

    /// Aborts connection `h` (a Reset goes to the peer) and ends its stream.
    pub(super) fn reset_stream(&mut self, now: Instant, h: ConnHandle, reason: ResetReason) {
        self.local.resets[reset_index(reason)] += 1;
        self.ep.reset(now, h, reason);
        let owner = self.owner(h);
        self.conn_owner.remove(&h);
        if let Some((pid, sock)) = owner {
            if let Some(p) = self.procs.get_mut(&pid) {
                p.socks.insert(sock, SockObj::Ended);
            }
        }
        self.drop_stream(h, -libc::ECONNRESET);
    }

    /// The core ended connection `h` (the peer closed or reset it).
    pub(super) fn stream_ended(&mut self, h: ConnHandle, reset: bool) {
        if reset {
            self.local.resets[5] += 1;
        }
        // A close is clean when every byte the peer sent arrived (its FIN
        // came, or it never wrote: it closes without a FIN only then) and
        // ours were acknowledged.
        let clean = !reset
            && self.streams.get(&h).is_some_and(|c| {
                (c.s.peer_finished() || c.s.received() == 0) && !c.s.outstanding()
            });
        self.drop_stream(h, if clean { 0 } else { -libc::ECONNRESET });
    }

    /// A process goes away: the connections it still holds are reset at once.
    pub(super) fn reset_streams_of(&mut self, now: Instant, pid: u64, reason: ResetReason) {
        let mut mine: Vec<ConnHandle> = self
            .streams
            .iter()
            // Sockets it closed keep sending their last bytes (as TCP does
            // after close and exit): the daemon still maps the region.
            .filter(|(_, c)| c.pid() == pid && !c.has(APP_CLOSED) && !c.has(ORPHAN))
            .map(|(h, _)| h)
            .collect();
        mine.sort_unstable();
        for h in mine {
            self.forget_shared(h);
            self.local.resets[reset_index(reason)] += 1;
            self.ep.reset(now, h, reason);
            self.conn_owner.remove(&h);
            if let Some(ctx) = self.streams.remove(&h) {
                self.stream_timers.remove(&(ctx.timer, h));
            }
        }
    }

    /// A Data or Ack frame.
    pub(super) fn stream_frame(
        &mut self,
        now: Instant,
        hdr: &SanHeader,
        m: &Message,
        payload: &[u8],
    ) {
        let (Message::Data(seg) | Message::Ack(seg)) = *m else {
            return;
        };
        let h = match self.ep.stream_conn(hdr, seg.conn_id, seg.token) {
            Ok(h) => h,
            Err(false) => return self.ep.reset_unknown(hdr, seg.conn_id, seg.token),
            Err(true) => return, // wrong token: counted
        };
        let timing = self.timing();
        let Some(ctx) = self.streams.get_mut(&h) else {
            return self.local.unexpected += 1;
        };
        let progress = ctx.s.on_ack(now, &timing, &seg);
        let mut delivered = 0;
        let mut eof = false;
        if matches!(m, Message::Data(_)) {
            let was_fin = ctx.s.peer_finished();
            let at = ctx.s.received();
            let (skip, take) = ctx.s.on_data(now, &timing, &seg);
            if take > 0 && !ctx.has(APP_CLOSED) {
                match payload.get(skip..skip + take) {
                    Some(bytes) => ctx.area().write_recv(at, bytes),
                    None => return self.local.malformed += 1,
                }
            }
            delivered = take;
            eof = !was_fin && ctx.s.peer_finished();
            // An urgent byte that arrived just now: its mark and value for
            // the process (TCP's out-of-band byte; POLLPRI until read).
            let urgent = seg.seq + u64::from(seg.len);
            if seg.flags & SEG_URG != 0
                && urgent > at
                && urgent <= ctx.s.received()
                && !ctx.has(APP_CLOSED)
            {
                let mut b = [0u8];
                ctx.area().read_recv(urgent - 1, &mut b);
                ctx.shm().publish_urgent(urgent, b[0]);
            }
        }
        if ctx.has(APP_CLOSED) && delivered > 0 {
            // Nobody will read these: as TCP does, reset.
            return self.reset_stream(now, h, ResetReason::Aborted);
        }
        self.local.bytes_rx += delivered as u64;
        // The acknowledgement first, as TCP takes a segment's ACK before its
        // data: a reader that sees the peer's answer sees its own bytes
        // acknowledged (TCP_INFO, SIOCOUTQ).
        if progress {
            self.acked(h);
        }
        let ctx = self.streams.get_mut(&h).expect("present");
        // (Publishing asks the process for a kick first if the credit ran
        // low: a reader that sees the bytes sees the request.)
        if !ctx.has(APP_CLOSED)
            && (delivered > 0 || eof)
            && ctx
                .shm()
                .publish_received(ctx.s.received(), eof, ctx.s.credit_low())
        {
            self.signal(h, FD_READ);
        }
        self.finish_if_done(now, h);
        self.enqueue(h);
        self.reschedule(h);
    }

    /// Streams held back while their client was unconfirmed: those now
    /// confirmed join the transmit queue (those gone are dropped). Returns
    /// whether any did.
    pub(super) fn release_held(&mut self) -> bool {
        if self.held.is_empty() {
            return false;
        }
        let mut ready = Vec::new();
        let ep = &self.ep;
        let streams = &self.streams;
        self.held.retain(|h| {
            if streams.get(h).is_none() {
                return false;
            }
            if ep.is_unconfirmed(*h) {
                return true;
            }
            ready.push(*h);
            false
        });
        let any = !ready.is_empty();
        for h in ready {
            self.enqueue(h);
        }
        any
    }

    /// Bytes were acknowledged: the send ring's head moves, and a writer
    /// waiting for space learns it.
    fn acked(&mut self, h: ConnHandle) {
        let Some(ctx) = self.streams.get(&h) else {
            return;
        };
        if ctx.has(APP_CLOSED) {
            return;
        }
        if ctx.shm().publish_acked(ctx.s.acked()) {
            self.signal(h, FD_WRITE);
        }
    }

    fn signal(&mut self, h: ConnHandle, bit: u32) {
        let Some(ctx) = self.streams.get(&h) else {
            return;
        };
        if let Some(p) = self.procs.get(&ctx.pid()) {
            if !raise(
                p.shared.region.sock(usize::from(ctx.sock)),
                p.events.get(&ctx.sock()),
                bit,
            ) {
                self.local.event_signal_failed += 1;
            }
        }
    }

    /// The claim key of connection `h`: SipHash of its handle under the
    /// daemon's random keys (nothing stored per connection; a process
    /// learns it only from a stream block the connection had in its region).
    pub(super) fn claim_key(&self, h: ConnHandle) -> u64 {
        use std::hash::BuildHasher;
        self.claim_keys.hash_one((h.slot(), h.tag()))
    }

    /// Moves connection `h`'s rings into socket `sock` of process `pid`
    /// (a claim, or a hand-back when the socket serving it lets go): the
    /// bytes the peer has not acknowledged and the bytes not read yet are
    /// copied to the same absolute positions of the new rings, the new
    /// block gets every word of both sides (the process waits for the
    /// claim's completion before it touches it) and the process's own
    /// generation stamp, and the old block is marked [`ST_MOVED`](dsan_channel::stream::ST_MOVED). The
    /// protocol state does not change: the peer sees nothing. False if the
    /// stream is gone or closing, or the old holder's words are broken (it
    /// is condemned for that).
    pub(super) fn move_stream(&mut self, now: Instant, h: ConnHandle, pid: u64, sock: u32) -> bool {
        let Some(to) = self.procs.get(&pid).map(|p| p.shared.clone()) else {
            return false;
        };
        let key = self.claim_key(h);
        let Some(ctx) = self.streams.get_mut(&h) else {
            return false;
        };
        if ctx.has(APP_CLOSED) {
            return false;
        }
        if Self::sync_from_app(ctx, false).is_err() {
            let old = ctx.pid();
            self.local.resets[reset_index(ResetReason::Protocol)] += 1;
            self.violation(now, old);
            return false;
        }
        let (from, from_area) = (ctx.shm(), ctx.area());
        let at = RingMarks {
            acked: ctx.s.acked(),
            written: ctx.s.written(),
            consumed: ctx.s.consumed(),
            received: ctx.s.received(),
        };
        let (snd_size, rcv_size) = (ctx.snd_size(), ctx.s.rcv_size() as usize);
        let new = to.region.stream(sock as usize);
        let new_area = to.region.stream_area(sock as usize, snd_size, rcv_size);
        // At most a ring each (the stream's indices keep them so).
        let mut buf = vec![0u8; (at.written - at.acked) as usize];
        from_area.read_send(at.acked, &mut buf);
        new_area.write_send(at.acked, &buf);
        buf.resize((at.received - at.consumed) as usize, 0);
        from_area.read_recv(at.consumed, &mut buf);
        new_area.write_recv(at.consumed, &buf);
        let orphan = ctx.has(ORPHAN);
        let readable = new.take_over(from, at, snd_size as u32, rcv_size as u32, key, orphan);
        ctx.set(ORPHAN, false);
        ctx.sock = sock as u16;
        self.streams.rehome(h, to.clone());
        if readable {
            self.signal(h, FD_READ);
        }
        self.local.handovers += 1;
        self.enqueue(h);
        self.reschedule(h);
        true
    }

    /// Who serves connection `h`: process, socket, its user, and whether it
    /// is an orphan (no socket holds it; see [`super::handover`]).
    pub(super) fn serving(&self, h: ConnHandle) -> Option<(u64, u32, u32, bool)> {
        let c = self.streams.get(&h)?;
        (!c.has(APP_CLOSED)).then(|| (c.pid(), c.sock(), c.app.uid, c.has(ORPHAN)))
    }

    /// The socket serving `h` closed while another process may still claim
    /// it: the stream stays (its slot lingers, so the process does not
    /// reuse it) and bytes keep arriving into its ring. False if there is
    /// no such stream.
    pub(super) fn orphan_stream(&mut self, h: ConnHandle) -> bool {
        let Some(ctx) = self.streams.get_mut(&h) else {
            return false;
        };
        if ctx.has(APP_CLOSED) {
            return false;
        }
        ctx.set(ORPHAN, true);
        ctx.shm().linger();
        self.conn_owner.remove(&h);
        true
    }

    /// An orphan whose last holder went: it closes as that holder's close
    /// would have (its last bytes and FIN, or a reset if bytes arrived
    /// that nobody read).
    pub(super) fn close_orphan(&mut self, now: Instant, h: ConnHandle) {
        if let Some(ctx) = self.streams.get_mut(&h) {
            ctx.set(ORPHAN, false);
        }
        self.forget_shared(h);
        self.close_stream(now, h);
    }

    /// Connection `h` ended: the sockets that held it from afar (see
    /// [`ST_MOVED`](dsan_channel::stream::ST_MOVED)) read its end as their own, on their own blocks.
    fn end_away_holders(&mut self, h: ConnHandle, close_error: i32) {
        let Some(list) = self.away.remove(&h) else {
            return;
        };
        for (pid, sock) in list {
            let Some(p) = self.procs.get(&pid) else {
                continue;
            };
            p.shared.region.stream(sock as usize).end_moved(close_error);
            if !raise(
                p.shared.region.sock(sock as usize),
                p.events.get(&sock),
                FD_CLOSE,
            ) {
                self.local.event_signal_failed += 1;
            }
        }
    }

    /// Stream timers due at `now`.
    pub(super) fn stream_timeouts(&mut self, now: Instant) {
        let timing = self.timing();
        while let Some(&(t, h)) = self.stream_timers.first() {
            if t > now {
                break;
            }
            self.stream_timers.pop_first();
            let Some(ctx) = self.streams.get_mut(&h) else {
                continue;
            };
            ctx.timer = Instant::ZERO; // not in the set now
            match ctx.s.on_timer(now, &timing) {
                Timer::Dead => {
                    self.reset_stream(now, h, ResetReason::TimedOut);
                    continue;
                }
                Timer::Probe => ctx.set(PROBE, true),
                Timer::Retransmit | Timer::Idle => {}
            }
            let t = ctx.s.next_timer(&timing);
            ctx.timer = t;
            self.stream_timers.insert((t, h));
            self.enqueue(h);
        }
    }

    /// When the next stream timer is due.
    pub(super) fn next_stream_timer(&self) -> Option<Instant> {
        self.stream_timers.first().map(|(t, _)| *t)
    }

    /// Serves the transmit queue: Data frames from the send rings, Acks and
    /// probes. Returns whether anything went out.
    pub(super) fn stream_tx<D: Device>(&mut self, now: Instant, tx: &mut Tx<'_, D>) -> bool {
        let et = self.cfg.ethertype;
        let mut budget = TX_BUDGET;
        let mut busy = false;
        let rounds = self.txq.len();
        for _ in 0..rounds {
            if budget == 0 {
                break;
            }
            let Some(h) = self.txq.pop_front() else { break };
            let Some(ctx) = self.streams.get_mut(&h) else {
                continue;
            };
            ctx.set(QUEUED, false);
            if self.ep.is_unconfirmed(h) {
                // The client has not proven its address yet (the request
                // may be forged): nothing goes to it but the Accept. The
                // stream waits, and goes once it is confirmed.
                self.held.push(h);
                continue;
            }
            let Some(ctx) = self.streams.get_mut(&h) else {
                continue;
            };
            if !ctx.has(APP_CLOSED) {
                // The credit we advertise is as fresh as the reader's head
                // (a checked value; a bad one waits for the next kick).
                let _ = ctx.s.app_read(ctx.shm().read_head());
            }
            let Some((hdr, conn_id, token)) = self.ep.stream_route(h) else {
                continue;
            };
            let Some(ctx) = self.streams.get_mut(&h) else {
                continue;
            };
            let mut out_of_buffers = false;
            // An urgent byte ends its segment, which says so (the process's
            // word, read once a pass: a wrong value only cuts a segment).
            let urgent = ctx.shm().send_urgent_mark();
            while budget > 0 {
                let Some(mut o) = ctx.s.next_segment() else {
                    break;
                };
                let urg = urgent > o.seq && urgent <= o.seq + u64::from(o.len);
                if urg {
                    o.fin &= urgent == o.seq + u64::from(o.len);
                    o.len = (urgent - o.seq) as u16;
                }
                let (ack, limit, flags) = ctx.s.ack_fields();
                let seg = Segment {
                    conn_id,
                    token,
                    seq: o.seq,
                    ack,
                    limit,
                    flags: flags | o.flags() | if urg { SEG_URG } else { 0 },
                    len: o.len,
                };
                let repr = Repr {
                    header: hdr,
                    message: Message::Data(seg),
                };
                let area = ctx.area();
                let area = &area;
                let ok = tx.send_with(repr.buffer_len(), |b| {
                    repr.emit(&mut wire::Frame::new_unchecked(&mut *b), et);
                    area.read_send(o.seq, &mut b[PAYLOAD_OFFSET..]);
                });
                if !ok {
                    out_of_buffers = true;
                    break;
                }
                ctx.s.sent(now, o);
                self.local.tx[DATA_INDEX] += 1;
                self.local.bytes_tx += u64::from(o.len);
                if let Outgoing { again: true, .. } = o {
                    self.local.retransmitted += 1;
                }
                budget -= 1;
                busy = true;
            }
            if !out_of_buffers && (ctx.s.ack_due() || ctx.has(PROBE)) && budget > 0 {
                let (ack, limit, flags) = ctx.s.ack_fields();
                let seg = Segment {
                    conn_id,
                    token,
                    seq: 0,
                    ack,
                    limit,
                    flags: flags | if ctx.has(PROBE) { SEG_PROBE } else { 0 },
                    len: 0,
                };
                let repr = Repr {
                    header: hdr,
                    message: Message::Ack(seg),
                };
                if tx.send_with(repr.buffer_len(), |b| {
                    repr.emit(&mut wire::Frame::new_unchecked(b), et)
                }) {
                    ctx.s.take_ack();
                    ctx.set(PROBE, false);
                    self.local.tx[ACK_INDEX] += 1;
                    budget -= 1;
                    busy = true;
                }
            }
            if !ctx.has(APP_CLOSED) && ctx.s.credit_low() {
                ctx.shm().ask_for_credit();
            }
            // More to send (budget ran out): back of the queue.
            self.enqueue(h);
            self.reschedule(h);
            if out_of_buffers {
                break;
            }
        }
        busy
    }
}
