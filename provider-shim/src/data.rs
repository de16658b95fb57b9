//! Moving bytes: send, receive, shutdown and socket options of connected
//! SAN sockets, through the socket's send and receive rings
//! (`dsan_channel::stream`).
//!
//! Sends and receives do not take the socket's lock: each direction has a
//! lock of its own, so one thread may block in `recv` while another sends.
//! A busy stream makes no system call per call: the daemon is kicked (one
//! ring message) only when no kick is pending, and woken (futex / eventfd)
//! only when this process said it waits.

use super::{Error, LocalSock, Provider, Result, SocketId, State};
use dsan_channel::msg::{Command, Op};
use dsan_channel::region::{FD_CLOSE, FD_READ, FD_WRITE};
use dsan_channel::stream::{
    ring_size, StreamArea, StreamShm, MAX_RING, MIN_RING, ST_DEAD, ST_MOVED, ST_OPEN, ST_RX_EOF,
};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

/// How long one futex sleep lasts before the daemon's health is checked again.
const NAP: Duration = Duration::from_millis(10);
/// How long a blocked send or receive polls its ring (yielding the core)
/// before it sleeps: a reply on a busy connection usually comes sooner than
/// a futex wake-up would.
const SPIN: Duration = Duration::from_micros(50);

/// The per-socket data path state (outside the socket's lock).
#[derive(Default)]
pub(super) struct IoSlot {
    /// The rings, once the connection is established.
    area: RwLock<Option<StreamArea>>,
    /// One sender at a time.
    send: Mutex<()>,
    /// One receiver at a time.
    recv: Mutex<()>,
    /// Set by close: blocked calls return.
    closed: AtomicBool,
    /// The sequence number of a close posted to the daemon and not waited
    /// for (0: none): the slot is not reused until the daemon completes it.
    close_seq: std::sync::atomic::AtomicU32,
    /// The generation of the slot's current socket (this process's own
    /// count, never shared: nothing outside can forge it). The daemon
    /// echoes it in the stream block it opens for the socket.
    gen: AtomicU32,
    /// SO_OOBINLINE: the urgent byte stays in the stream.
    oob_inline: AtomicBool,
    /// The urgent mark (see [`StreamShm`]'s `rcv_p.urgent`) whose byte a
    /// receive with MSG_OOB took (it is not there to take again).
    urgent_taken: std::sync::atomic::AtomicU64,
    /// What keeps the slot from getting a new socket besides its own
    /// state: every [`SanSocket`](crate::SanSocket) naming it (for its
    /// whole life, also once aborted) and every data call in progress on it.
    pins: AtomicU32,
}

/// A pin on a socket slot for as long as it lives (see [`IoSlot::pin`]).
pub(super) struct SlotPin<'a>(&'a AtomicU32);

impl Drop for SlotPin<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What a poll of a connected SAN socket finds ([`Provider::readiness`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Readiness {
    /// A receive would not block (bytes, end of stream, or an error).
    pub readable: bool,
    /// A send would not block (room in the send ring, or an error).
    pub writable: bool,
    /// The peer shut down sending (its FIN arrived).
    pub peer_closed: bool,
    /// The connection is gone (reset, or closed by both sides).
    pub dead: bool,
    /// Why it ended: 0 or a negative errno.
    pub error: i32,
    /// Bytes received and not read yet.
    pub unread: u64,
    /// Bytes a send would take now (room in the send ring; 0 after a
    /// shutdown or the end of the connection).
    pub room: u64,
    /// An urgent byte arrived that a receive with MSG_OOB can take (or,
    /// with SO_OOBINLINE, that the reader has not passed): POLLPRI.
    pub urgent: bool,
    /// The next byte to read is the urgent one (SIOCATMARK).
    pub at_mark: bool,
}

/// A connected SAN socket's stream, in numbers ([`Provider::stream_info`]):
/// what TCP_INFO reports of a TCP connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamInfo {
    /// Bytes the peer acknowledged.
    pub acked: u64,
    /// Bytes the process wrote into the send ring.
    pub written: u64,
    /// Bytes received in order.
    pub received: u64,
    /// Bytes the process read.
    pub consumed: u64,
    /// Send ring (bytes).
    pub snd_size: u32,
    /// Receive ring (bytes): the receive window.
    pub rcv_size: u32,
    /// The largest payload of one segment.
    pub mss: u32,
    /// The peer's FIN arrived.
    pub peer_closed: bool,
    /// This side shut down sending.
    pub shut_wr: bool,
    /// The connection is gone.
    pub dead: bool,
}

/// Send with the last byte urgent; receive the urgent byte (TCP's
/// out-of-band data).
pub const MSG_OOB: i32 = libc::MSG_OOB;

/// `send` / `recv` flags this provider knows.
pub const MSG_DONTWAIT: i32 = libc::MSG_DONTWAIT;
/// Look at received bytes without consuming them.
pub const MSG_PEEK: i32 = libc::MSG_PEEK;

impl IoSlot {
    /// A fresh socket in this slot: its generation, the next nonzero one.
    pub(super) fn reset(&self) -> u32 {
        *self.area.write().unwrap_or_else(|e| e.into_inner()) = None;
        self.closed.store(false, Ordering::Release);
        self.oob_inline.store(false, Ordering::Relaxed);
        self.urgent_taken.store(0, Ordering::Relaxed);
        let next = self.gen.load(Ordering::Relaxed).wrapping_add(1).max(1);
        self.gen.store(next, Ordering::Release);
        next
    }
    /// The generation of the slot's current socket.
    pub(super) fn gen(&self) -> u32 {
        self.gen.load(Ordering::Acquire)
    }
    /// Keeps the slot from being given to a new socket while the guard lives.
    pub(super) fn pin(&self) -> SlotPin<'_> {
        self.pins.fetch_add(1, Ordering::SeqCst);
        SlotPin(&self.pins)
    }
    /// Takes a pin that outlives this borrow (a [`crate::SanSocket`]'s); undone by [`IoSlot::unpin`].
    pub(super) fn pin_forever(&self) {
        self.pins.fetch_add(1, Ordering::SeqCst);
    }
    /// Undoes [`IoSlot::pin_forever`].
    pub(super) fn unpin(&self) {
        self.pins.fetch_sub(1, Ordering::SeqCst);
    }
    /// Whether something still uses the slot.
    pub(super) fn pinned(&self) -> bool {
        self.pins.load(Ordering::SeqCst) != 0
    }
    /// Whether a close of the socket is under way.
    pub(super) fn closing(&self) -> bool {
        // SeqCst: a waiter announces itself, then looks here; a close
        // sets this, then looks at the waiter counts (one of the two sees
        // the other, so a close never leaves a waiter asleep for its nap).
        self.closed.load(Ordering::SeqCst)
    }
    /// The socket is being closed: blocked calls give up.
    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        *self.area.write().unwrap_or_else(|e| e.into_inner()) = None;
    }
    /// A close with sequence number `seq` was posted and not waited for.
    pub(super) fn posted_close(&self, seq: u32) {
        self.close_seq.store(seq, Ordering::Release);
    }
    /// Whether a posted close is still under way (`done`: the daemon's last
    /// completed sequence number for the slot); clears the record once it
    /// is not.
    pub(super) fn close_in_flight(&self, done: u32) -> bool {
        let seq = self.close_seq.load(Ordering::Acquire);
        if seq != 0 && seq != done {
            return true;
        }
        self.close_seq.store(0, Ordering::Relaxed);
        false
    }
}

/// Whether an urgent byte waits: one arrived (the word is 0 on nearly every
/// connection, so this is mostly one load), the reader has not passed it,
/// and a receive with MSG_OOB did not take it (with SO_OOBINLINE: until
/// the reader passes it).
fn urgent_waits(io: &IoSlot, shm: &StreamShm) -> bool {
    let urgent = shm.urgent_mark();
    urgent != 0
        && urgent > shm.read_head()
        && (io.oob_inline.load(Ordering::Relaxed)
            || io.urgent_taken.load(Ordering::Relaxed) != urgent)
}

impl Provider {
    /// The rings of connected socket `s` (set up on first use), and whether
    /// calls on it are nonblocking.
    fn stream(&self, s: SocketId) -> Result<(StreamArea, bool, bool, bool)> {
        let io = self.io.get(s as usize).ok_or(Error::NotSock)?;
        let mut g = self.lock(s)?;
        let ls: &mut LocalSock = g.as_mut().expect("checked");
        if ls.state == State::Connecting
            && self
                .region
                .sock(s as usize)
                .connect_state
                .load(Ordering::Acquire)
                == 1
        {
            ls.state = State::Connected;
        }
        if ls.state != State::Connected {
            return Err(Error::NotConn);
        }
        let flags = (ls.nonblocking, ls.shut_rd, ls.shut_wr);
        let st = self.region.stream(s as usize);
        // The block is this socket's only if the daemon opened it for this
        // socket: its stamp is the generation this process gave the socket.
        // (The daemon opens the stream before it reports the connection, so
        // a connected socket whose block carries another stamp was never
        // given one: nothing in the block can be trusted.)
        let mut state = st.state();
        if state & ST_OPEN != 0 && st.stamp() != io.gen() {
            return Err(Error::ConnReset);
        }
        if state & ST_MOVED != 0 {
            // Another process (a forked child) serves the connection now:
            // this call takes it back.
            self.reclaim(s, ls)?;
            state = st.state();
        }
        if let Some(a) = io.area.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
            return Ok((a.clone(), flags.0, flags.1, flags.2));
        }
        if state & ST_OPEN == 0 {
            return Err(Error::NotConn);
        }
        let ok = |v: u32| {
            let v = v as usize;
            v.is_power_of_two() && (MIN_RING..=MAX_RING).contains(&v)
        };
        let (snd, rcv) = st.ring_sizes();
        if !ok(snd) || !ok(rcv) {
            return Err(Error::NetDown);
        }
        let a = self
            .region
            .stream_area(s as usize, snd as usize, rcv as usize);
        *io.area.write().unwrap_or_else(|e| e.into_inner()) = Some(a.clone());
        Ok((a, flags.0, flags.1, flags.2))
    }

    /// Tells the daemon the stream of `s` has news, unless a kick is pending.
    fn kick(&self, s: SocketId, shm: &StreamShm) {
        if !shm.raise_kick() {
            return;
        }
        let slot = Command {
            sock: s,
            seq: 0,
            op: Op::Kick,
        }
        .to_slot();
        // A daemon gone or stuck: the next call on the socket says so.
        let _ = self.push_command(&slot);
    }

    fn gone(&self) -> bool {
        self.region.header().closed.load(Ordering::Acquire) != 0
    }

    /// Sends bytes: how many were taken. A blocking socket takes all of them
    /// (waiting for room as the peer acknowledges); a nonblocking one (or
    /// with [`MSG_DONTWAIT`]) takes what fits, or fails with
    /// [`Error::Again`] when nothing does (FD_WRITE follows when room frees up).
    ///
    /// # Errors
    /// [`Error::NotConn`], [`Error::Pipe`] (shut down, or the connection
    /// ended), [`Error::Again`], [`Error::Inval`] (flags), [`Error::NotSock`],
    /// [`Error::NetDown`].
    pub fn send(&self, s: SocketId, buf: &[u8], flags: i32) -> Result<usize> {
        self.send_mode(s, buf, flags, None)
    }

    /// [`send`](Self::send), blocking or not as `block` says (`None`: as
    /// the socket is), whatever event-select made the socket.
    ///
    /// # Errors
    /// As [`send`](Self::send).
    pub fn send_mode(
        &self,
        s: SocketId,
        buf: &[u8],
        flags: i32,
        block: Option<bool>,
    ) -> Result<usize> {
        if flags & !(MSG_DONTWAIT | libc::MSG_NOSIGNAL | MSG_OOB) != 0 {
            return Err(Error::Inval);
        }
        let _pin = self.io.get(s as usize).ok_or(Error::NotSock)?.pin();
        let (area, nonblocking, _, shut_wr) = self.stream(s)?;
        let nonblocking = block.map_or(nonblocking, |b| !b) || flags & MSG_DONTWAIT != 0;
        let io = &self.io[s as usize];
        let _g = io.send.lock().unwrap_or_else(|e| e.into_inner());
        let shm = self.region.stream(s as usize);
        let size = area.snd_size() as u64;
        let mut sent = 0usize;
        loop {
            if io.closed.load(Ordering::Acquire) {
                return Err(Error::NotSock);
            }
            if shut_wr || shm.state() & ST_DEAD != 0 || shm.fin_sent() {
                return if sent > 0 { Ok(sent) } else { Err(Error::Pipe) };
            }
            if self.gone() {
                return Err(Error::NetDown);
            }
            let (tail, head) = shm.send_marks();
            let used = tail
                .checked_sub(head)
                .filter(|u| *u <= size)
                .ok_or(Error::NetDown)?;
            let free = (size - used) as usize;
            if free > 0 {
                let n = free.min(buf.len() - sent);
                area.write_send(tail, &buf[sent..sent + n]);
                // With MSG_OOB, the last byte sent so far is the urgent one
                // (as TCP marks the end of what a send with MSG_OOB took).
                shm.publish_written(tail + n as u64, flags & MSG_OOB != 0);
                sent += n;
                self.kick(s, shm);
                if sent == buf.len() {
                    return Ok(sent);
                }
                continue;
            }
            if nonblocking && sent > 0 {
                return Ok(sent);
            }
            // Full: ask for FD_WRITE / a wake-up, then look again.
            let seq = shm.room_seq();
            if !shm.want_room(head) {
                continue;
            }
            if nonblocking {
                return Err(Error::Again);
            }
            let spin_until = Instant::now() + SPIN;
            while Instant::now() < spin_until
                && shm.acked_head() == head
                && shm.state() & ST_DEAD == 0
            {
                std::thread::yield_now();
            }
            if shm.acked_head() != head {
                continue;
            }
            shm.sleep_for_room(head, seq, NAP, || io.closing());
        }
    }

    /// Receives bytes: how many (0 at the end of the stream). A blocking
    /// socket waits for at least one byte; a nonblocking one (or with
    /// [`MSG_DONTWAIT`]) fails with [`Error::Again`] when there is none
    /// (FD_READ follows when bytes arrive). [`MSG_PEEK`] leaves them there.
    ///
    /// # Errors
    /// [`Error::NotConn`], [`Error::ConnReset`] (reset, nothing left to
    /// read), [`Error::Again`], [`Error::Inval`] (flags), [`Error::NotSock`],
    /// [`Error::NetDown`].
    pub fn recv(&self, s: SocketId, buf: &mut [u8], flags: i32) -> Result<usize> {
        self.recv_mode(s, buf, flags, None)
    }

    /// [`recv`](Self::recv), blocking or not as `block` says (`None`: as
    /// the socket is), whatever event-select made the socket.
    ///
    /// # Errors
    /// As [`recv`](Self::recv).
    pub fn recv_mode(
        &self,
        s: SocketId,
        buf: &mut [u8],
        flags: i32,
        block: Option<bool>,
    ) -> Result<usize> {
        if flags & !(MSG_DONTWAIT | MSG_PEEK | MSG_OOB) != 0 {
            return Err(Error::Inval);
        }
        let _pin = self.io.get(s as usize).ok_or(Error::NotSock)?.pin();
        let (area, nonblocking, shut_rd, _) = self.stream(s)?;
        if flags & MSG_OOB != 0 {
            return self.recv_urgent(s, buf, flags & MSG_PEEK != 0);
        }
        let nonblocking = block.map_or(nonblocking, |b| !b) || flags & MSG_DONTWAIT != 0;
        let io = &self.io[s as usize];
        let _g = io.recv.lock().unwrap_or_else(|e| e.into_inner());
        let shm = self.region.stream(s as usize);
        let size = area.rcv_size() as u64;
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if io.closed.load(Ordering::Acquire) {
                return Err(Error::NotSock);
            }
            let seq = shm.bytes_seq();
            let tail = shm.received_tail();
            let head = shm.read_head();
            let avail = tail
                .checked_sub(head)
                .filter(|a| *a <= size)
                .ok_or(Error::NetDown)?;
            // TCP's urgent mark: a receive stops before the urgent byte;
            // at it, the byte is passed over (it is out of band) unless
            // SO_OOBINLINE keeps it in the stream.
            let urgent = shm.urgent_mark();
            let (mut from, mut avail) = (head, avail);
            let mut upto = avail;
            if urgent > head && urgent - head <= avail {
                if urgent - 1 > head {
                    upto = urgent - 1 - head;
                } else if !io.oob_inline.load(Ordering::Relaxed) {
                    from += 1;
                    avail -= 1;
                    upto = avail;
                }
            }
            if avail > 0 {
                let n = (upto as usize).min(buf.len());
                area.read_recv(from, &mut buf[..n]);
                if flags & MSG_PEEK == 0 && shm.consume(from + n as u64) {
                    self.kick(s, shm);
                }
                return Ok(n);
            }
            // Only the urgent byte was there: it is passed over.
            if from != head && flags & MSG_PEEK == 0 && shm.consume(from) {
                self.kick(s, shm);
            }
            // After SHUT_RD the bytes already received are still read (as
            // Linux's TCP gives them); then the end of the stream, at once.
            if shut_rd {
                return Ok(0);
            }
            let st = shm.state();
            // The daemon publishes the last bytes before the end of the
            // stream: if they came after `tail` was read, read them first.
            if st & (ST_RX_EOF | ST_DEAD) != 0 && shm.received_tail() != tail {
                continue;
            }
            if st & ST_RX_EOF != 0 {
                return Ok(0);
            }
            if st & ST_DEAD != 0 {
                return match shm.close_error() {
                    0 => Ok(0),
                    _ => Err(Error::ConnReset),
                };
            }
            if self.gone() {
                return Err(Error::NetDown);
            }
            if !shm.want_bytes(tail) {
                continue;
            }
            if nonblocking {
                return Err(Error::Again);
            }
            let spin_until = Instant::now() + SPIN;
            while Instant::now() < spin_until && shm.received_tail() == tail && shm.state() == st {
                std::thread::yield_now();
            }
            if shm.received_tail() != tail {
                continue;
            }
            shm.sleep_for_bytes(tail, st, seq, NAP, || io.closing());
        }
    }

    /// A receive with MSG_OOB: the urgent byte the peer sent last, if it
    /// arrived, was not taken yet and the reader has not passed it (as
    /// Linux's TCP gives it; never with SO_OOBINLINE).
    ///
    /// # Errors
    /// [`Error::Inval`] when there is no such byte.
    fn recv_urgent(&self, s: SocketId, buf: &mut [u8], peek: bool) -> Result<usize> {
        let io = &self.io[s as usize];
        let shm = self.region.stream(s as usize);
        let urgent = shm.urgent_mark();
        let byte = shm.urgent_byte();
        if io.oob_inline.load(Ordering::Relaxed)
            || urgent <= shm.read_head()
            || io.urgent_taken.load(Ordering::Relaxed) == urgent
            || byte & 0x100 == 0
        {
            return Err(Error::Inval);
        }
        let Some(b) = buf.first_mut() else {
            return Ok(0);
        };
        *b = byte as u8;
        if !peek {
            io.urgent_taken.store(urgent, Ordering::Relaxed);
        }
        Ok(1)
    }

    /// Connected socket `s`'s stream in numbers (None unless connected).
    pub fn stream_info(&self, s: SocketId) -> Option<StreamInfo> {
        let io = self.io.get(s as usize)?;
        let _pin = io.pin();
        let (area, _, _, shut_wr) = self.stream(s).ok()?;
        let shm = self.region.stream(s as usize);
        let st = shm.state();
        let (written, acked) = shm.send_marks();
        Some(StreamInfo {
            acked,
            written,
            received: shm.received_tail(),
            consumed: shm.read_head(),
            snd_size: area.snd_size() as u32,
            rcv_size: area.rcv_size() as u32,
            mss: shm.mss(),
            peer_closed: st & ST_RX_EOF != 0,
            shut_wr: shut_wr || shm.fin_sent(),
            dead: st & ST_DEAD != 0,
        })
    }

    /// Whether an urgent byte of connected socket `s` waits (POLLPRI; see
    /// [`Readiness::urgent`]): a look at two words, no lock.
    pub fn urgent_pending(&self, s: SocketId) -> bool {
        self.io
            .get(s as usize)
            .is_some_and(|io| urgent_waits(io, self.region.stream(s as usize)))
    }

    /// SO_OOBINLINE for socket `s`: the urgent byte stays in the stream.
    pub fn set_oob_inline(&self, s: SocketId, on: bool) {
        if let Some(io) = self.io.get(s as usize) {
            io.oob_inline.store(on, Ordering::Relaxed);
        }
    }

    /// Shuts down receiving (`SHUT_RD`: later receives give the bytes
    /// already received, then 0, as Linux's TCP does), sending
    /// (`SHUT_WR`: the peer reads the end of the stream after the bytes
    /// sent), or both.
    ///
    /// # Errors
    /// [`Error::Inval`] for another `how`; [`Error::NotConn`]; [`Error::NotSock`].
    pub fn shutdown(&self, s: SocketId, how: i32) -> Result<()> {
        if ![libc::SHUT_RD, libc::SHUT_WR, libc::SHUT_RDWR].contains(&how) {
            return Err(Error::Inval);
        }
        let _pin = self.io.get(s as usize).ok_or(Error::NotSock)?.pin();
        self.stream(s)?;
        {
            let mut g = self.lock(s)?;
            let ls = g.as_mut().expect("checked");
            if how != libc::SHUT_WR {
                ls.shut_rd = true;
            }
            if how != libc::SHUT_RD {
                ls.shut_wr = true;
            }
        }
        if how != libc::SHUT_RD {
            // After the sender's lock: no send is between its write and its tail.
            let _g = self.io[s as usize]
                .send
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let shm = self.region.stream(s as usize);
            shm.send_fin();
            self.kick(s, shm);
        }
        Ok(())
    }

    /// Events to report at once when an eventfd is selected for them on a
    /// connected socket (bytes are there, or room to send): WSD posts
    /// FD_READ / FD_WRITE as soon as they hold.
    pub(super) fn ready_events(&self, s: SocketId, mask: u32) -> u32 {
        // Not connected (yet): nothing holds; a connect completing later
        // finds the want flags clear, so the first bytes are posted as
        // FD_READ by the next select or the first receive that finds none.
        let Some(io) = self.io.get(s as usize) else {
            return 0;
        };
        let _pin = io.pin();
        let Ok((area, ..)) = self.stream(s) else {
            return 0;
        };
        let shm = self.region.stream(s as usize);
        let mut ev = 0;
        if mask & FD_READ != 0 {
            shm.arm_read();
            let st = shm.state_now();
            if shm.unread() != 0 || st & (ST_RX_EOF | ST_DEAD) != 0 {
                ev |= FD_READ;
            }
        }
        if mask & FD_CLOSE != 0 && shm.state() & ST_DEAD != 0 {
            ev |= FD_CLOSE;
        }
        if mask & FD_WRITE != 0 {
            shm.arm_write();
            if shm.unacked() < area.snd_size() as u64 {
                ev |= FD_WRITE;
            }
        }
        ev
    }

    /// The readiness of connected socket `s` now, for a poll-style caller:
    /// what a receive and a send would do, whether the peer finished
    /// sending, and whether the connection is gone. Asking for `read` or
    /// `write` arms the daemon's FD_READ / FD_WRITE for it.
    pub fn readiness(&self, s: SocketId, read: bool, write: bool) -> Readiness {
        let Some(io) = self.io.get(s as usize) else {
            return Readiness::default();
        };
        let _pin = io.pin();
        let Ok((area, _, shut_rd, shut_wr)) = self.stream(s) else {
            return Readiness::default();
        };
        let shm = self.region.stream(s as usize);
        let st = shm.state_now();
        let dead = st & ST_DEAD != 0;
        let mut r = Readiness {
            peer_closed: st & ST_RX_EOF != 0,
            dead,
            error: if dead { shm.close_error() } else { 0 },
            ..Readiness::default()
        };
        if read {
            shm.arm_read();
        }
        r.unread = shm.unread();
        let head = shm.read_head();
        let urgent = shm.urgent_mark();
        let inline = io.oob_inline.load(Ordering::Relaxed);
        r.at_mark = urgent > head && urgent - 1 == head;
        r.urgent = urgent_waits(io, shm);
        // An urgent byte out of band at the head is nothing to read.
        let data = r.unread - u64::from(r.at_mark && !inline && r.unread > 0);
        r.readable = shut_rd || dead || r.peer_closed || data != 0;
        if write {
            shm.arm_write();
        }
        let used = shm.unacked();
        r.room = if shut_wr || dead {
            0
        } else {
            (area.snd_size() as u64).saturating_sub(used)
        };
        r.writable = shut_wr || dead || used < area.snd_size() as u64;
        r
    }

    /// Registers `wfd` (of the event descriptor's kind: an eventfd or a wake
    /// socket) as the descriptor FD_WRITE signals for
    /// `s`, instead of its event descriptor (which must be registered
    /// first), and adds FD_WRITE to its events: [`Provider::event_select_with`]
    /// with the event descriptor and events it has. A process that polls
    /// keeps "readable" and "writable" apart this way.
    ///
    /// # Errors
    /// [`Error::NotSock`]; [`Error::Inval`] (not of the event descriptor's
    /// kind, no event descriptor yet); [`Error::NetDown`].
    pub fn event_select_write(&self, s: SocketId, wfd: RawFd) -> Result<()> {
        let (efd, mask) = {
            let g = self.lock(s)?;
            let ls = g.as_ref().expect("checked");
            (ls.efd.ok_or(Error::Inval)?, ls.mask)
        };
        self.event_select_with(s, efd, Some(wfd), mask | FD_WRITE)
    }

    /// Sets a socket option. SOL_SOCKET: SO_RCVBUF and SO_SNDBUF (the ring
    /// sizes of the connection, rounded up to a power of two between 4 KiB
    /// and 1 MiB; effective when set before connect or listen, and inherited
    /// by accepted sockets), SO_KEEPALIVE (SAN connections always have a
    /// keepalive; recorded), SO_LINGER (a `struct linger`: {1, 0} makes
    /// the close of a connection reset it, as on TCP; other values are
    /// recorded, and a close never blocks), SO_REUSEPORT (a listener joins
    /// one of another process of the same user on the same address that
    /// set it too: requests go to them in turn). IPPROTO_TCP: TCP_NODELAY
    /// (accepted: segments leave as soon as they are written).
    ///
    /// # Errors
    /// [`Error::NoProtoOpt`] for other options; [`Error::Inval`] for a short
    /// value; [`Error::NotSock`].
    pub fn setsockopt(&self, s: SocketId, level: i32, name: i32, val: &[u8]) -> Result<()> {
        if (level, name) == (libc::SOL_SOCKET, libc::SO_LINGER) {
            // struct linger { int l_onoff; int l_linger; }
            let word = |i: usize| {
                val.get(i..i + 4)
                    .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
                    .ok_or(Error::Inval)
            };
            let (on, secs) = (word(0)?, word(4)?);
            let mut g = self.lock(s)?;
            g.as_mut().expect("checked").linger = (on != 0, secs.max(0));
            return Ok(());
        }
        let v = val
            .get(..4)
            .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
            .ok_or(Error::Inval)?;
        let mut g = self.lock(s)?;
        let ls = g.as_mut().expect("checked");
        match (level, name) {
            (libc::SOL_SOCKET, libc::SO_RCVBUF) => ls.bufs.rcv = ring_size(v.max(1) as usize),
            (libc::SOL_SOCKET, libc::SO_SNDBUF) => ls.bufs.snd = ring_size(v.max(1) as usize),
            (libc::SOL_SOCKET, libc::SO_KEEPALIVE) => ls.keepalive = v != 0,
            (libc::SOL_SOCKET, libc::SO_REUSEPORT) => ls.reuse_port = v != 0,
            (libc::SOL_SOCKET, libc::SO_OOBINLINE) => self.set_oob_inline(s, v != 0),
            (libc::IPPROTO_TCP, libc::TCP_NODELAY) => ls.nodelay = v != 0,
            _ => return Err(Error::NoProtoOpt),
        }
        Ok(())
    }

    /// Reads a socket option: those of [`setsockopt`](Self::setsockopt),
    /// plus SO_ERROR (the pending error: a failed nonblocking connect, or
    /// how the connection ended; reading clears it) and SO_TYPE.
    ///
    /// # Errors
    /// [`Error::NoProtoOpt`]; [`Error::NotSock`].
    pub fn getsockopt(&self, s: SocketId, level: i32, name: i32) -> Result<i32> {
        let mut g = self.lock(s)?;
        let ls = g.as_mut().expect("checked");
        let sh = self.region.sock(s as usize);
        Ok(match (level, name) {
            (libc::SOL_SOCKET, libc::SO_RCVBUF) => ls.bufs.rcv as i32,
            (libc::SOL_SOCKET, libc::SO_SNDBUF) => ls.bufs.snd as i32,
            (libc::SOL_SOCKET, libc::SO_KEEPALIVE) => i32::from(ls.keepalive),
            (libc::SOL_SOCKET, libc::SO_REUSEPORT) => i32::from(ls.reuse_port),
            (libc::SOL_SOCKET, libc::SO_TYPE) => libc::SOCK_STREAM,
            (libc::SOL_SOCKET, libc::SO_OOBINLINE) => {
                i32::from(self.io[s as usize].oob_inline.load(Ordering::Relaxed))
            }
            (libc::IPPROTO_TCP, libc::TCP_NODELAY) => i32::from(ls.nodelay),
            (libc::SOL_SOCKET, libc::SO_ERROR) => {
                let c = sh.connect_error.swap(0, Ordering::AcqRel);
                if c != 0 {
                    -c
                } else if ls.state == State::Connected && !ls.error_reported {
                    let st = self.region.stream(s as usize);
                    let e = if st.state() & ST_DEAD != 0 {
                        st.close_error()
                    } else {
                        0
                    };
                    ls.error_reported = e != 0;
                    -e
                } else {
                    0
                }
            }
            _ => return Err(Error::NoProtoOpt),
        })
    }
}
