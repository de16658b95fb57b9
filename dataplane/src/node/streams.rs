//! Connection byte streams at the I/O edge: the processes' send and
//! receive rings and their stream blocks, joined to the protocol core's
//! streams (`Endpoint`'s "Byte streams": each stream's state, its timer,
//! the transmit queue, when to reset).
//!
//! * A process's `kick` (a command, sent only when its `kick` word was clear)
//!   says a stream has news: its ring indices are read once and handed to
//!   the core, which checks them and queues the stream if it has something
//!   to send. The lcore never scans idle connections: it serves the core's
//!   transmit queue, the frames that arrive and the core's timers.
//! * Bytes go from the send ring straight into the frame buffer, and from a
//!   received frame straight into the receive ring (one copy each way at the
//!   edge; the application copies once more into or out of the ring).
//! * A closed socket lingers until its last bytes and FIN are acknowledged,
//!   then the connection's Close handshake runs; bytes arriving after the
//!   close, unread bytes at close, a dead peer and a process that goes away
//!   reset the connection.

use super::counters::Local;
use super::handover::Shares;
use super::procs::{AppShared, Procs, SockObj};
use crate::device::Device;
use crate::engine::Tx;
use crate::proto::rng::OsRng;
use crate::proto::slab::Slab;
use crate::proto::stream::Outgoing;
use crate::proto::{Arrival, ConnHandle, Endpoint, StreamClose, StreamParams};
use crate::time::Instant;
use crate::wire::{self, Message, ResetReason, PAYLOAD_OFFSET, SEG_URG};
use dsan_channel::msg::Bufs;
use dsan_channel::region::{FD_CLOSE, FD_READ, FD_WRITE};
use dsan_channel::stream::{RingMarks, StreamArea, StreamShm};
use std::collections::HashMap;
use std::sync::Arc;

/// The daemon's state per established connection, not counting the rings
/// (which live in the process's region): the edge's stream context, the
/// core's stream and the core's connection, each in its slot of a slab
/// indexed by the connection's handle, the core's wire index entry (a slot
/// number in a hash table) and the timer entry. The process, socket and
/// ring view are found through `app`, so there is no owner entry.
pub const STREAM_STATE_BYTES: usize = STREAM_ENTRY_BYTES
    + crate::proto::STREAM_SLOT_BYTES
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
struct StreamTable(Slab<StreamCtx>, HashMap<u32, u32>);

impl StreamTable {
    fn get(&self, h: &ConnHandle) -> Option<&StreamCtx> {
        self.0.get(h.slot()).filter(|c| c.tag == h.tag())
    }
    fn get_mut(&mut self, h: &ConnHandle) -> Option<&mut StreamCtx> {
        self.0.get_mut(h.slot()).filter(|c| c.tag == h.tag())
    }
    /// Connections that processes of user `uid` serve (0 for root).
    fn of_user(&self, uid: u32) -> u32 {
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
    fn len(&self) -> usize {
        self.0.len()
    }
    fn iter(&self) -> impl Iterator<Item = (ConnHandle, &StreamCtx)> {
        self.0
            .iter()
            .map(|(i, c)| (ConnHandle::new(i as u32, c.tag), c))
    }
}

/// The lcore's state for one connection's rings (16 bytes; the stream's
/// protocol state is the core's).
struct StreamCtx {
    app: Arc<AppShared>,
    /// The random part of the connection's handle (the slot is its index
    /// in the table; a slot's next occupant has another tag).
    tag: u32,
    /// The socket (< `MAX_SOCKETS`, 1,024).
    sock: u16,
    /// log2 of the send ring's size (the rings are found from `app` and
    /// `sock` when needed).
    snd_shift: u8,
    /// log2 of the receive ring's size.
    rcv_shift: u8,
    /// [`APP_CLOSED`], [`ORPHAN`].
    flags: u8,
}

/// The application closed its socket (the stream lingers; its block is no
/// longer the process's to read).
const APP_CLOSED: u8 = 4;
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
    fn rcv_size(&self) -> usize {
        1 << self.rcv_shift
    }
    fn area(&self) -> StreamArea {
        self.app
            .region
            .stream_area(usize::from(self.sock), self.snd_size(), self.rcv_size())
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
pub(super) fn reset_index(r: ResetReason) -> usize {
    match r {
        ResetReason::ProcessGone => 0,
        ResetReason::Aborted => 1,
        ResetReason::TimedOut => 2,
        ResetReason::Shutdown => 3,
        _ => 4,
    }
}

/// The streams at the edge: every established connection's rings (the
/// table), the sockets holding a connection before its stream opens (a
/// connect in progress, an accept being set up), and who else holds each
/// connection ([`Shares`]).
#[derive(Default)]
pub(super) struct Streams {
    table: StreamTable,
    /// The process and socket of a connection that has no stream yet.
    owners: HashMap<ConnHandle, (u64, u32)>,
    pub(super) shares: Shares,
}

/// What moving a connection's rings to another socket came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Moved {
    /// It serves the connection now.
    Yes,
    /// The stream is gone or closing.
    No,
    /// The old holder's words were broken: that process broke the
    /// channel's protocol (the caller condemns it).
    Violation(u64),
}

impl Streams {
    /// Established connections with a stream.
    pub(super) fn len(&self) -> usize {
        self.table.len()
    }

    /// Connections that processes of user `uid` serve (0 for root).
    pub(super) fn of_user(&self, uid: u32) -> u32 {
        self.table.of_user(uid)
    }

    /// Socket `sock` of process `pid` holds connection `h`, which has no
    /// stream yet.
    pub(super) fn set_owner(&mut self, h: ConnHandle, pid: u64, sock: u32) {
        self.owners.insert(h, (pid, sock));
    }

    /// The socket holding connection `h`, which has no stream yet.
    pub(super) fn pending_owner(&self, h: ConnHandle) -> Option<(u64, u32)> {
        self.owners.get(&h).copied()
    }

    /// Connection `h` (without a stream) is nobody's any more.
    pub(super) fn forget_owner(&mut self, h: ConnHandle) {
        self.owners.remove(&h);
    }

    /// The claim key of connection `h` (see [`Shares::claim_key`]).
    pub(super) fn claim_key(&self, h: ConnHandle) -> u64 {
        self.shares.claim_key(h)
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
    #[allow(clippy::too_many_arguments)]
    pub(super) fn open(
        &mut self,
        now: Instant,
        h: ConnHandle,
        (pid, sock): (u64, u32),
        bufs: Bufs,
        params: StreamParams,
        ep: &mut Endpoint<OsRng>,
        procs: &mut Procs,
        local: &mut Local,
    ) -> bool {
        if let Some(stale) = self.table.occupant(h).filter(|o| *o != h) {
            // The core gave the slot to a new connection while the old one's
            // stream was still here (it must not): end the old one.
            debug_assert!(false, "stream slot {} still held", h.slot());
            self.drop(stale, -libc::ECONNRESET, ep, procs, local);
        } else {
            self.table.remove(&h);
        }
        let Some(p) = procs.get(pid) else {
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
        ep.open_stream(now, h, params, bufs.rcv as u32);
        self.table.insert(
            h,
            StreamCtx {
                app,
                tag: h.tag(),
                sock: sock as u16,
                snd_shift: bufs.snd.trailing_zeros() as u8,
                rcv_shift: bufs.rcv.trailing_zeros() as u8,
                flags: 0,
            },
        );
        // The stream names its owner from now on.
        self.owners.remove(&h);
        true
    }

    /// The process and socket holding connection `h`, if any (a connect in
    /// progress, or a stream whose socket is still open).
    pub(super) fn owner(&self, h: ConnHandle) -> Option<(u64, u32)> {
        if let Some(o) = self.owners.get(&h) {
            return Some(*o);
        }
        self.table
            .get(&h)
            .filter(|c| !c.has(APP_CLOSED))
            .map(|c| (c.pid(), c.sock()))
    }

    /// Reads what the application wrote and consumed into the core's stream.
    /// Err: it broke the protocol.
    fn sync_from_app(&self, h: ConnHandle, ep: &mut Endpoint<OsRng>) -> Result<(), ()> {
        let Some(ctx) = self.table.get(&h) else {
            return Ok(());
        };
        let at = ctx.shm().take_kick();
        let snd_size = ctx.snd_size() as u64;
        ep.stream_app(h, at.tail, at.fin, at.head, snd_size)
            .map_err(|_| ())
    }

    /// A process's kick for its connection `h`. Err: the process broke the
    /// protocol (counted; the caller condemns it).
    pub(super) fn kick(
        &self,
        h: ConnHandle,
        ep: &mut Endpoint<OsRng>,
        local: &mut Local,
    ) -> Result<(), ()> {
        self.sync_from_app(h, ep).inspect_err(|_| {
            local.resets[reset_index(ResetReason::Protocol)] += 1;
        })
    }

    /// The application closed socket `sock` holding connection `h`: its last
    /// bytes and FIN still go (the slot lingers), unless it left received
    /// bytes unread (then the connection is reset, as TCP does).
    pub(super) fn close(
        &mut self,
        now: Instant,
        h: ConnHandle,
        ep: &mut Endpoint<OsRng>,
        procs: &mut Procs,
        local: &mut Local,
    ) -> bool {
        let Some(ctx) = self.table.get_mut(&h) else {
            return false;
        };
        ctx.set(APP_CLOSED, true);
        let at = ctx.shm().take_kick();
        let snd_size = ctx.snd_size() as u64;
        self.owners.remove(&h);
        match ep.close_stream(now, h, at.tail, at.head, snd_size) {
            StreamClose::Reset => {
                local.resets[reset_index(ResetReason::Aborted)] += 1;
                self.drop(h, -libc::ECONNRESET, ep, procs, local);
            }
            StreamClose::Closed | StreamClose::Unknown => self.drop(h, 0, ep, procs, local),
            StreamClose::Lingering => {
                if let Some(ctx) = self.table.get(&h) {
                    ctx.shm().linger();
                }
            }
        }
        true
    }

    /// The application closed socket `sock` holding connection `h` with
    /// SO_LINGER {1, 0}: the connection is reset at once (unsent bytes are
    /// dropped, the peer reads ECONNRESET) and the socket slot is free.
    pub(super) fn abort(
        &mut self,
        now: Instant,
        h: ConnHandle,
        ep: &mut Endpoint<OsRng>,
        procs: &mut Procs,
        local: &mut Local,
    ) -> bool {
        let Some(ctx) = self.table.get_mut(&h) else {
            return false;
        };
        ctx.set(APP_CLOSED, true);
        self.owners.remove(&h);
        self.reset(now, h, ResetReason::Aborted, ep, procs, local);
        true
    }

    /// A closed socket's stream delivered its last bytes and FIN: the
    /// socket's slot is free.
    pub(super) fn done(
        &mut self,
        h: ConnHandle,
        ep: &mut Endpoint<OsRng>,
        procs: &mut Procs,
        local: &mut Local,
    ) {
        self.drop(h, 0, ep, procs, local);
    }

    /// Forgets a stream; tells its socket how the connection ended (a closed
    /// socket's slot is freed instead).
    fn drop(
        &mut self,
        h: ConnHandle,
        close_error: i32,
        ep: &mut Endpoint<OsRng>,
        procs: &mut Procs,
        local: &mut Local,
    ) {
        ep.forget_stream(h);
        let Some(ctx) = self.table.remove(&h) else {
            return;
        };
        self.end_away_holders(h, close_error, procs, local);
        self.forget_shared(h, procs);
        let shm = ctx.shm();
        if ctx.has(APP_CLOSED) || ctx.has(ORPHAN) {
            shm.release();
            return;
        }
        shm.mark_dead(close_error);
        if !procs.signal(ctx.pid(), ctx.sock(), FD_CLOSE) {
            local.event_signal_failed += 1;
        }
    }

    /// Connection `h` ended: its life and claim key go (the process that
    /// registered the life has one event descriptor fewer).
    fn forget_shared(&mut self, h: ConnHandle, procs: &mut Procs) {
        if let Some(owner) = self.shares.forget(h) {
            if let Some(p) = procs.get_mut(owner) {
                p.event_fds = p.event_fds.saturating_sub(1);
            }
        }
    }

    /// Aborts connection `h` (a Reset goes to the peer) and ends its stream.
    pub(super) fn reset(
        &mut self,
        now: Instant,
        h: ConnHandle,
        reason: ResetReason,
        ep: &mut Endpoint<OsRng>,
        procs: &mut Procs,
        local: &mut Local,
    ) {
        local.resets[reset_index(reason)] += 1;
        ep.abort_stream(now, h, reason);
        self.aborted(h, ep, procs, local);
    }

    /// The connection of stream `h` was reset here: its socket (if still
    /// open) reads ECONNRESET.
    pub(super) fn aborted(
        &mut self,
        h: ConnHandle,
        ep: &mut Endpoint<OsRng>,
        procs: &mut Procs,
        local: &mut Local,
    ) {
        let owner = self.owner(h);
        self.owners.remove(&h);
        if let Some((pid, sock)) = owner {
            if let Some(p) = procs.get_mut(pid) {
                p.socks.insert(sock, SockObj::Ended);
            }
        }
        self.drop(h, -libc::ECONNRESET, ep, procs, local);
    }

    /// The core ended connection `h` (the peer closed or reset it).
    pub(super) fn ended(
        &mut self,
        h: ConnHandle,
        reset: bool,
        ep: &mut Endpoint<OsRng>,
        procs: &mut Procs,
        local: &mut Local,
    ) {
        if reset {
            local.resets[5] += 1;
        }
        // A close is clean when every byte the peer sent arrived (its FIN
        // came, or it never wrote: it closes without a FIN only then) and
        // ours were acknowledged.
        let clean = !reset && self.table.get(&h).is_some() && ep.stream_clean(h);
        self.drop(
            h,
            if clean { 0 } else { -libc::ECONNRESET },
            ep,
            procs,
            local,
        );
    }

    /// A process goes away: the connections it still holds are reset at once.
    pub(super) fn reset_all_of(
        &mut self,
        now: Instant,
        pid: u64,
        reason: ResetReason,
        ep: &mut Endpoint<OsRng>,
        procs: &mut Procs,
        local: &mut Local,
    ) {
        let mut mine: Vec<ConnHandle> = self
            .table
            .iter()
            // Sockets it closed keep sending their last bytes (as TCP does
            // after close and exit): the daemon still maps the region.
            .filter(|(_, c)| c.pid() == pid && !c.has(APP_CLOSED) && !c.has(ORPHAN))
            .map(|(h, _)| h)
            .collect();
        mine.sort_unstable();
        for h in mine {
            self.forget_shared(h, procs);
            local.resets[reset_index(reason)] += 1;
            ep.abort_stream(now, h, reason);
            self.owners.remove(&h);
            self.table.remove(&h);
        }
    }

    /// What a Data or Ack frame brought to stream `a.conn` (the core took
    /// it): its payload (the frame's, `payload`) into the receive ring, the
    /// urgent byte's mark, and the process told of bytes, the end of the
    /// stream and room to send.
    pub(super) fn arrival(
        &self,
        m: &Message,
        a: Arrival,
        payload: &[u8],
        ep: &Endpoint<OsRng>,
        procs: &Procs,
        local: &mut Local,
    ) {
        let h = a.conn;
        let Some(ctx) = self.table.get(&h) else {
            return;
        };
        if ctx.has(APP_CLOSED) {
            return; // its last bytes go; nobody reads (the core resets if any came)
        }
        if a.take > 0 {
            match payload.get(a.skip..a.skip + a.take) {
                Some(bytes) => ctx.area().write_recv(a.at, bytes),
                None => return local.malformed += 1,
            }
        }
        let Some(s) = ep.stream(h) else {
            return;
        };
        let (received, credit_low) = (s.received(), s.credit_low());
        // An urgent byte that arrived just now: its mark and value for the
        // process (TCP's out-of-band byte; POLLPRI until read).
        if let Message::Data(seg) = m {
            let urgent = seg.seq + u64::from(seg.len);
            if seg.flags & SEG_URG != 0 && urgent > a.at && urgent <= received {
                let mut b = [0u8];
                ctx.area().read_recv(urgent - 1, &mut b);
                ctx.shm().publish_urgent(urgent, b[0]);
            }
        }
        local.bytes_rx += a.take as u64;
        // The acknowledgement first, as TCP takes a segment's ACK before its
        // data: a reader that sees the peer's answer sees its own bytes
        // acknowledged (TCP_INFO, SIOCOUTQ).
        if a.acked {
            self.acked(h, ep, procs, local);
        }
        // (Publishing asks the process for a kick first if the credit ran
        // low: a reader that sees the bytes sees the request.)
        if (a.take > 0 || a.eof) && ctx.shm().publish_received(received, a.eof, credit_low) {
            self.signal(h, FD_READ, procs, local);
        }
    }

    /// Bytes were acknowledged: the send ring's head moves, and a writer
    /// waiting for space learns it.
    fn acked(&self, h: ConnHandle, ep: &Endpoint<OsRng>, procs: &Procs, local: &mut Local) {
        let Some(ctx) = self.table.get(&h) else {
            return;
        };
        if ctx.has(APP_CLOSED) {
            return;
        }
        let Some(acked) = ep.stream(h).map(|s| s.acked()) else {
            return;
        };
        if ctx.shm().publish_acked(acked) {
            self.signal(h, FD_WRITE, procs, local);
        }
    }

    /// Raises event `bit` on the socket serving `h`.
    fn signal(&self, h: ConnHandle, bit: u32, procs: &Procs, local: &mut Local) {
        let Some(ctx) = self.table.get(&h) else {
            return;
        };
        if !procs.signal(ctx.pid(), ctx.sock(), bit) {
            local.event_signal_failed += 1;
        }
    }

    /// Moves connection `h`'s rings into socket `sock` of process `pid`
    /// (a claim, or a hand-back when the socket serving it lets go): the
    /// bytes the peer has not acknowledged and the bytes not read yet are
    /// copied to the same absolute positions of the new rings, the new
    /// block gets every word of both sides (the process waits for the
    /// claim's completion before it touches it) and the process's own
    /// generation stamp, and the old block is marked [`ST_MOVED`](dsan_channel::stream::ST_MOVED). The
    /// protocol state does not change: the peer sees nothing.
    pub(super) fn move_to(
        &mut self,
        h: ConnHandle,
        (pid, sock): (u64, u32),
        ep: &mut Endpoint<OsRng>,
        procs: &Procs,
        local: &mut Local,
    ) -> Moved {
        let Some(to) = procs.get(pid).map(|p| p.shared.clone()) else {
            return Moved::No;
        };
        let key = self.claim_key(h);
        let Some(ctx) = self.table.get(&h) else {
            return Moved::No;
        };
        if ctx.has(APP_CLOSED) {
            return Moved::No;
        }
        let old = ctx.pid();
        if self.sync_from_app(h, ep).is_err() {
            local.resets[reset_index(ResetReason::Protocol)] += 1;
            return Moved::Violation(old);
        }
        let Some(s) = ep.stream(h) else {
            return Moved::No;
        };
        let at = RingMarks {
            acked: s.acked(),
            written: s.written(),
            consumed: s.consumed(),
            received: s.received(),
        };
        let Some(ctx) = self.table.get_mut(&h) else {
            return Moved::No;
        };
        let (from, from_area) = (ctx.shm(), ctx.area());
        let (snd_size, rcv_size) = (ctx.snd_size(), ctx.rcv_size());
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
        self.table.rehome(h, to.clone());
        if readable {
            self.signal(h, FD_READ, procs, local);
        }
        local.handovers += 1;
        Moved::Yes
    }

    /// Who serves connection `h`: process, socket, its user, and whether it
    /// is an orphan (no socket holds it; see [`super::handover`]).
    pub(super) fn serving(&self, h: ConnHandle) -> Option<(u64, u32, u32, bool)> {
        let c = self.table.get(&h)?;
        (!c.has(APP_CLOSED)).then(|| (c.pid(), c.sock(), c.app.uid, c.has(ORPHAN)))
    }

    /// Whether `h` has a stream.
    pub(super) fn has(&self, h: ConnHandle) -> bool {
        self.table.get(&h).is_some()
    }

    /// The socket serving `h` closed while another process may still claim
    /// it: the stream stays (its slot lingers, so the process does not
    /// reuse it) and bytes keep arriving into its ring; `h` is an orphan
    /// now. False if there is no such stream.
    pub(super) fn orphan(&mut self, h: ConnHandle) -> bool {
        let Some(ctx) = self.table.get_mut(&h) else {
            return false;
        };
        if ctx.has(APP_CLOSED) {
            return false;
        }
        ctx.set(ORPHAN, true);
        ctx.shm().linger();
        self.owners.remove(&h);
        self.shares.orphan(h);
        true
    }

    /// Orphans whose life hung up (every holder is gone without claiming
    /// them) close now, as their last holder's close would have (their
    /// last bytes and FIN, or a reset if bytes arrived that nobody read).
    pub(super) fn close_orphans(
        &mut self,
        now: Instant,
        ep: &mut Endpoint<OsRng>,
        procs: &mut Procs,
        local: &mut Local,
    ) {
        for h in self.shares.hung_up_orphans(now) {
            if let Some(ctx) = self.table.get_mut(&h) {
                ctx.set(ORPHAN, false);
            }
            self.forget_shared(h, procs);
            self.close(now, h, ep, procs, local);
        }
    }

    /// Connection `h` ended: the sockets that held it from afar (see
    /// [`ST_MOVED`](dsan_channel::stream::ST_MOVED)) read its end as their own, on their own blocks.
    fn end_away_holders(
        &mut self,
        h: ConnHandle,
        close_error: i32,
        procs: &Procs,
        local: &mut Local,
    ) {
        let Some(list) = self.shares.take_away(h) else {
            return;
        };
        for (pid, sock) in list {
            let Some(p) = procs.get(pid) else {
                continue;
            };
            p.shared.region.stream(sock as usize).end_moved(close_error);
            if !procs.signal(pid, sock, FD_CLOSE) {
                local.event_signal_failed += 1;
            }
        }
    }

    /// Serves the core's transmit queue: Data frames whose payload comes
    /// from the send rings, Acks and probes. Returns whether anything went
    /// out.
    pub(super) fn transmit<D: Device>(
        &self,
        now: Instant,
        tx: &mut Tx<'_, D>,
        et: u16,
        ep: &mut Endpoint<OsRng>,
        local: &mut Local,
    ) -> bool {
        let mut budget = TX_BUDGET;
        let mut busy = false;
        // Streams queued again in this pass wait for the next one.
        for _ in 0..ep.streams_queued() {
            if budget == 0 {
                break;
            }
            let Some(h) = ep.next_stream() else {
                break;
            };
            let Some(ctx) = self.table.get(&h) else {
                continue;
            };
            let app_closed = ctx.has(APP_CLOSED);
            if !app_closed {
                // The credit we advertise is as fresh as the reader's head
                // (a checked value; a bad one waits for the next kick).
                ep.stream_read(h, ctx.shm().read_head());
            }
            // An urgent byte ends its segment, which says so (the process's
            // word, read once a pass: a wrong value only cuts a segment).
            let urgent = ctx.shm().send_urgent_mark();
            let area = ctx.area();
            let area = &area;
            let mut out_of_buffers = false;
            while budget > 0 {
                let Some((repr, o)) = ep.stream_segment(h, urgent) else {
                    break;
                };
                let ok = tx.send_with(repr.buffer_len(), |b| {
                    repr.emit(&mut wire::Frame::new_unchecked(&mut *b), et);
                    area.read_send(o.seq, &mut b[PAYLOAD_OFFSET..]);
                });
                if !ok {
                    out_of_buffers = true;
                    break;
                }
                ep.stream_sent(now, h, o);
                local.tx[DATA_INDEX] += 1;
                local.bytes_tx += u64::from(o.len);
                if let Outgoing { again: true, .. } = o {
                    local.retransmitted += 1;
                }
                budget -= 1;
                busy = true;
            }
            if !out_of_buffers && budget > 0 {
                if let Some(repr) = ep.stream_ack(h) {
                    if tx.send_with(repr.buffer_len(), |b| {
                        repr.emit(&mut wire::Frame::new_unchecked(b), et)
                    }) {
                        ep.stream_ack_sent(h);
                        local.tx[ACK_INDEX] += 1;
                        budget -= 1;
                        busy = true;
                    }
                }
            }
            // More to send (budget ran out): back of the queue.
            if ep.stream_served(h) && !app_closed {
                if let Some(ctx) = self.table.get(&h) {
                    ctx.shm().ask_for_credit();
                }
            }
            if out_of_buffers {
                break;
            }
        }
        busy
    }
}
