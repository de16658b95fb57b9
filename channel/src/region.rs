//! The per-process shared region (layout version 2).
//!
//! One sealed memfd per attached process, mapped by the daemon and by the
//! process. Nothing in it is a pointer, so each side maps it wherever it likes.
//!
//! | offset | what | written by |
//! |---|---|---|
//! | 0 | [`RegionHeader`] | the daemon (`bad_commands`, `closed`, `subnets_epoch`) |
//! | [`layout::socks_off`] | [`MAX_SOCKETS`] x [`SockShm`] (64 bytes each) | see [`SockShm`] |
//! | [`layout::cmd_off`] | the command ring ([`CMD_RING`] slots of [`crate::msg::Command`]) | the process produces, the daemon consumes |
//! | [`layout::backlog_off`]`(k)` | [`MAX_LISTENERS`] backlog rings of up to [`MAX_BACKLOG`] [`crate::msg::Request`]s | the daemon produces, the process consumes |
//! | [`layout::streams_off`] | [`MAX_SOCKETS`] x [`StreamShm`] (320 bytes each) | see [`crate::stream`] |
//! | [`layout::data_off`]`(i)` | socket `i`'s send ring, then its receive ring ([`MAX_RING`] bytes reserved for each) | see [`crate::stream`] |
//!
//! The data area is large (2 MiB per socket) but sparse: a memfd page costs
//! memory only once touched, and a ring touches only as many pages as its size.
//!
//! The daemon reads nothing back from this region that it owns: it keeps its
//! own copies of the ring indices it owns, of each ring's capacity and of
//! every socket's state; the words the process writes (ring heads and tails,
//! `waiters`) are checked where they are read.
#![allow(unsafe_code)] // system calls and shared memory: each block has a SAFETY comment

use crate::ring::{self, Consumer, FormatError, Producer};
use crate::stream::{StreamArea, StreamShm, MAX_RING};
use crate::sys::{Mapping, Shared};
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicI32, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

/// Sockets per attached process.
pub const MAX_SOCKETS: usize = 1024;
/// Listening sockets per attached process (backlog areas in the region:
/// 256 KiB each, touched only as far as a backlog fills).
pub const MAX_LISTENERS: usize = 256;
/// Largest backlog of one listener, and the clamp of a requested backlog
/// (the protocol core's: `dsan_core::proto`).
pub use dsan_core::proto::{effective_backlog, MAX_BACKLOG};
/// Slots in the command ring.
pub const CMD_RING: usize = 256;
/// Marks a region ("dsanPROC").
pub const REGION_MAGIC: u64 = 0x6473_616e_5052_4f43;
/// Layout version.
pub const REGION_VERSION: u32 = 4;

/// Event bit (as in WSD): a connection request is waiting.
pub const FD_ACCEPT: u32 = 1 << 3;
/// Event bit (as in WSD): a nonblocking connect finished.
pub const FD_CONNECT: u32 = 1 << 4;
/// Event bit: data or end of stream can be received.
pub const FD_READ: u32 = 1 << 0;
/// Event bit: a send would take bytes again.
pub const FD_WRITE: u32 = 1 << 1;
/// Event bit: the peer closed (close_error 0) or the connection was reset.
pub const FD_CLOSE: u32 = 1 << 5;
/// Every event bit a socket may select.
pub const FD_ALL: u32 = FD_READ | FD_WRITE | FD_ACCEPT | FD_CONNECT | FD_CLOSE;

/// Start of a region.
#[repr(C)]
pub struct RegionHeader {
    /// [`REGION_MAGIC`].
    pub magic: AtomicU64,
    /// [`REGION_VERSION`].
    pub version: AtomicU32,
    /// Set by the daemon when it detaches the process or stops.
    pub closed: AtomicU32,
    /// Total size in bytes.
    pub size: AtomicU64,
    /// Commands the daemon refused to parse (a copy of its own count, for the process).
    pub bad_commands: AtomicU64,
    /// Bumped by the daemon whenever the host's SAN addresses change: a
    /// process that sees a new value asks for them again (`subnets`).
    pub subnets_epoch: AtomicU64,
}
// SAFETY: repr(C), atomics only.
unsafe impl Shared for RegionHeader {}

/// Per-socket shared state (one cache line).
///
/// The daemon writes `done_seq`, `result`, `result2`, `events`,
/// `accept_error`, `connect_error`, `arrivals` and `connect_state`; the
/// process writes `waiters` and `accepted_waiting` (and clears `events` when
/// it enumerates them). The daemon reads `waiters` only to decide whether to
/// wake, and `accepted_waiting` only to report it.
#[repr(C, align(64))]
#[derive(Default)]
pub struct SockShm {
    /// Sequence number of the last completed command (futex word).
    pub done_seq: AtomicU32,
    /// App threads sleeping on `done_seq` or `arrivals` (the daemon wakes only then).
    pub waiters: AtomicU32,
    /// Result of the last completed command (>= 0 or a negative errno).
    pub result: AtomicI64,
    /// Extra result (the local address a connect used: ip << 16 | port).
    pub result2: AtomicU64,
    /// FD_* bits recorded since the last enumeration.
    pub events: AtomicU32,
    /// On a listener: connections accepted on the application's behalf (by the
    /// switch) that wait for the application's accept. Written by the
    /// process; the daemon only reports it (clamped to the capacity).
    pub accepted_waiting: AtomicU32,
    /// 0 or a negative errno for FD_ACCEPT.
    pub accept_error: AtomicI32,
    /// 0 or a negative errno for FD_CONNECT.
    pub connect_error: AtomicI32,
    /// Bumped on every queued request and every connect outcome (futex word).
    pub arrivals: AtomicU32,
    /// Outcome of the last connect: 0 pending, 1 connected, negative errno failed.
    pub connect_state: AtomicI32,
}
// SAFETY: repr(C), atomics only.
unsafe impl Shared for SockShm {}

/// Offsets of the region's parts.
pub mod layout {
    use super::*;
    const fn up(x: usize, a: usize) -> usize {
        x.div_ceil(a) * a
    }
    /// The socket table.
    pub const fn socks_off() -> usize {
        up(std::mem::size_of::<RegionHeader>(), 64)
    }
    /// The command ring.
    pub const fn cmd_off() -> usize {
        up(
            socks_off() + MAX_SOCKETS * std::mem::size_of::<SockShm>(),
            4096,
        )
    }
    /// Bytes of the command ring's area.
    pub const fn cmd_len() -> usize {
        up(ring::region_size(CMD_RING), 4096)
    }
    /// Bytes of one backlog area.
    pub const fn backlog_len() -> usize {
        up(ring::region_size(MAX_BACKLOG), 4096)
    }
    /// Backlog area `k`.
    pub const fn backlog_off(k: usize) -> usize {
        cmd_off() + cmd_len() + k * backlog_len()
    }
    /// The stream control blocks.
    pub const fn streams_off() -> usize {
        backlog_off(MAX_LISTENERS)
    }
    /// Socket `i`'s data area (its send ring; the receive ring follows at [`MAX_RING`]).
    pub const fn data_off(i: usize) -> usize {
        up(
            streams_off() + MAX_SOCKETS * std::mem::size_of::<StreamShm>(),
            1 << 21,
        ) + i * 2 * MAX_RING
    }
    /// The whole region.
    pub const fn size() -> usize {
        data_off(MAX_SOCKETS)
    }
}

/// A process's region, seen from either side.
///
/// The ring ends it hands out keep the mapping alive, so they may outlive it.
#[derive(Debug)]
pub struct Region {
    map: Arc<Mapping>,
}

fn fmt_err(e: FormatError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl Region {
    /// Creates and formats a region (daemon side). Returns it with the
    /// consuming end of its command ring, which only the daemon may use.
    ///
    /// # Errors
    /// As [`Mapping::create`].
    pub fn create(name: &str) -> io::Result<(Region, Consumer)> {
        let map = Mapping::create(name, layout::size())?;
        map.seal(0)?;
        let h: &RegionHeader = map.at(0);
        h.version.store(REGION_VERSION, Ordering::Relaxed);
        h.size.store(layout::size() as u64, Ordering::Relaxed);
        let map = Arc::new(map);
        // SAFETY: the command area lies inside the mapping, which the ring end
        // keeps alive; nobody else consumes from it.
        let (_, cmd) =
            unsafe { ring::format(map.ptr_at(layout::cmd_off()), layout::cmd_len(), CMD_RING) }
                .map_err(fmt_err)?;
        map.at::<RegionHeader>(0)
            .magic
            .store(REGION_MAGIC, Ordering::Release);
        let cmd = cmd.keeping(map.clone());
        Ok((Region { map }, cmd))
    }

    /// Opens a region received from the daemon (application side). Returns it
    /// with the producing end of its command ring.
    ///
    /// # Errors
    /// If the memfd is too small or not a region of this version.
    pub fn open(fd: OwnedFd, len: usize) -> io::Result<(Region, Producer)> {
        if len != layout::size() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "region size mismatch (daemon and library versions differ)",
            ));
        }
        let map = Mapping::map(fd, len)?;
        let h: &RegionHeader = map.at(0);
        if h.magic.load(Ordering::Acquire) != REGION_MAGIC
            || h.version.load(Ordering::Relaxed) != REGION_VERSION
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a dsan region of this version",
            ));
        }
        let map = Arc::new(map);
        // SAFETY: as in `create`; nobody else in this process produces into it
        // (the caller owns the one producer).
        let cmd =
            unsafe { ring::attach_producer(map.ptr_at(layout::cmd_off()), layout::cmd_len()) }
                .map_err(fmt_err)?
                .keeping(map.clone());
        Ok((Region { map }, cmd))
    }

    /// The header.
    pub fn header(&self) -> &RegionHeader {
        self.map.at(0)
    }

    /// Socket `i`'s shared state.
    ///
    /// # Panics
    /// If `i >= MAX_SOCKETS` (callers check indices they received).
    pub fn sock(&self, i: usize) -> &SockShm {
        assert!(i < MAX_SOCKETS);
        self.map
            .at(layout::socks_off() + i * std::mem::size_of::<SockShm>())
    }

    /// Socket `i`'s stream control block.
    ///
    /// # Panics
    /// If `i >= MAX_SOCKETS`.
    pub fn stream(&self, i: usize) -> &StreamShm {
        assert!(i < MAX_SOCKETS);
        self.map
            .at(layout::streams_off() + i * std::mem::size_of::<StreamShm>())
    }

    /// Socket `i`'s byte rings with the given sizes (powers of two in
    /// [`crate::stream::MIN_RING`]..=[`MAX_RING`]).
    ///
    /// # Panics
    /// If `i >= MAX_SOCKETS` or a size is out of range.
    pub fn stream_area(&self, i: usize, snd_size: usize, rcv_size: usize) -> StreamArea {
        assert!(i < MAX_SOCKETS);
        let off = layout::data_off(i);
        StreamArea::new(self.map.clone(), off, off + MAX_RING, snd_size, rcv_size)
    }

    /// Formats backlog area `k` for `capacity` requests (daemon side, at
    /// listen); returns the producing end.
    ///
    /// The caller keeps one producer per area (formatting an area again
    /// replaces the ring; the old producer must be dropped first).
    ///
    /// # Errors
    /// If `k >= MAX_LISTENERS` or the capacity is out of range.
    pub fn format_backlog(&self, k: usize, capacity: usize) -> io::Result<Producer> {
        if k >= MAX_LISTENERS || capacity > MAX_BACKLOG {
            return Err(fmt_err(FormatError::Capacity));
        }
        // SAFETY: area k lies inside the mapping, which the end keeps alive.
        // A second producer for the same area would only race on the ring's
        // words, which are atomics: a protocol error, not memory unsafety.
        let (p, _) = unsafe {
            ring::format(
                self.map.ptr_at(layout::backlog_off(k)),
                layout::backlog_len(),
                capacity,
            )
        }
        .map_err(fmt_err)?;
        Ok(p.keeping(self.map.clone()))
    }

    /// Opens backlog area `k` (application side, after the listen completed).
    ///
    /// # Errors
    /// If the area is out of range or not formatted.
    pub fn open_backlog(&self, k: usize) -> io::Result<Consumer> {
        if k >= MAX_LISTENERS {
            return Err(fmt_err(FormatError::Area));
        }
        // SAFETY: as in `format_backlog`.
        let c = unsafe {
            ring::attach_consumer(
                self.map.ptr_at(layout::backlog_off(k)),
                layout::backlog_len(),
            )
        }
        .map_err(fmt_err)?;
        Ok(c.keeping(self.map.clone()))
    }

    /// The memfd.
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.map.fd()
    }

    /// The mapping (for tests that play a hostile process).
    pub fn mapping(&self) -> &Mapping {
        &self.map
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::{Command, Op, Request};
    use std::net::{Ipv4Addr, SocketAddrV4};
    use std::os::fd::{FromRawFd, OwnedFd};

    #[test]
    fn region_round_trip_between_two_mappings() {
        let (r, mut cmds) = Region::create("dsan-test").unwrap();
        // SAFETY: dup of a valid fd.
        let dup = unsafe { OwnedFd::from_raw_fd(libc::dup(r.fd())) };
        let (app, mut tx) = Region::open(dup, layout::size()).unwrap();
        let c = Command {
            sock: 3,
            seq: 1,
            op: Op::Close,
        };
        tx.push(&c.to_slot()).unwrap();
        assert_eq!(Command::parse(&cmds.pop().unwrap().unwrap()), Ok(c));
        r.sock(5).events.fetch_or(FD_ACCEPT, Ordering::SeqCst);
        assert_eq!(app.sock(5).events.load(Ordering::SeqCst), FD_ACCEPT);
        let mut b = r.format_backlog(2, 4).unwrap();
        let mut ab = app.open_backlog(2).unwrap();
        let req = Request {
            peer: SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 9),
            local: SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 80),
            conn_id: 9,
            expires_ns: 0,
        };
        b.push(&req.to_slot()).unwrap();
        assert_eq!(Request::parse(&ab.pop().unwrap().unwrap()), Ok(req));
        assert!(app.open_backlog(3).is_err(), "unformatted area");
        assert!(app.open_backlog(MAX_LISTENERS).is_err());
        drop((r, app));
        // The ends keep the mapping alive.
        b.push(&req.to_slot()).unwrap();
        assert!(ab.pop().unwrap().is_some());
        // Backlog areas: 256 listeners x 4,096 requests x 64 bytes (sparse).
        assert!(layout::streams_off() < 80 << 20);
        assert_eq!(layout::size(), layout::data_off(0) + (2 << 30));
        assert_eq!(effective_backlog(0), 1);
        assert_eq!(effective_backlog(-1), MAX_BACKLOG);
        assert_eq!(effective_backlog(3), 3);
        assert_eq!(effective_backlog(i64::MAX), MAX_BACKLOG);
    }
}
