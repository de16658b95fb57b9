//! Memory shared between the daemon and attached processes, and the system
//! calls around it: memfd mappings, the per-process region layout, futexes,
//! and passing file descriptors over the control socket.
//!
//! ## The per-process region (version 1)
//!
//! One memfd per attached process, mapped by the daemon and by the process:
//!
//! | offset | what |
//! |---|---|
//! | 0 | [`RegionHeader`] |
//! | `SOCKS_OFF` | [`MAX_SOCKETS`] x [`SockShm`] (64 bytes each): per-socket command sequence, completion, event word, errors, futex words |
//! | `CMD_OFF` | the command ring: a [`Backlog<Cmd>`] of [`CMD_RING`] entries (many app threads push, the lcore pops) |
//! | `backlog_off(k)` | [`MAX_LISTENERS`] backlog areas, each a [`Backlog<PendingShm>`] of up to `MAX_BACKLOG` entries, formatted by the daemon at listen |
//!
//! Nothing in it is a pointer, so each side maps it wherever it likes.
#![allow(unsafe_code)]

use crate::backlog::{Backlog, MAX_BACKLOG};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicI32, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// Sockets per attached process.
pub const MAX_SOCKETS: usize = 1024;
/// Listening sockets per attached process (backlog areas in the region).
pub const MAX_LISTENERS: usize = 64;
/// Entries in the command ring.
pub const CMD_RING: usize = 256;
/// Marks a region ("dsanPROC").
pub const REGION_MAGIC: u64 = 0x6473_616e_5052_4f43;
/// Layout version.
pub const REGION_VERSION: u32 = 1;

/// Event bits (as in WSD).
pub const FD_ACCEPT: u32 = 1 << 3;
/// Event bits (as in WSD).
pub const FD_CONNECT: u32 = 1 << 4;

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
    /// Garbage commands the daemon dropped (counted, never fatal).
    pub bad_commands: AtomicU64,
}

/// Per-socket shared state (one cache line).
#[repr(C, align(64))]
#[derive(Default)]
pub struct SockShm {
    /// Sequence number of the last completed command (futex word).
    pub done_seq: AtomicU32,
    /// App threads sleeping on `done_seq` or `arrivals` (the daemon wakes only then).
    pub waiters: AtomicU32,
    /// Result of the last completed command (>= 0 or a negative errno).
    pub result: AtomicI64,
    /// Extra result (e.g. the local port a connect used).
    pub result2: AtomicU64,
    /// FD_* bits recorded since the last enumeration.
    pub events: AtomicU32,
    /// Bits the application selected (only these signal its eventfd).
    pub event_mask: AtomicU32,
    /// 0 or a negative errno for FD_ACCEPT.
    pub accept_error: AtomicI32,
    /// 0 or a negative errno for FD_CONNECT.
    pub connect_error: AtomicI32,
    /// Bumped on every queued request and every connect outcome (futex word).
    pub arrivals: AtomicU32,
    /// Outcome of the last connect: 0 pending, 1 connected, negative errno failed.
    pub connect_state: AtomicI32,
}

/// A command, app -> lcore.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Cmd {
    /// One of the `OP_*` constants.
    pub op: u32,
    /// The socket (index into the socket table).
    pub sock: u32,
    /// Sequence number the completion carries back.
    pub seq: u32,
    /// Reserved.
    pub _pad: u32,
    /// Operation arguments.
    pub a: u64,
    /// Operation arguments.
    pub b: u64,
    /// Operation arguments.
    pub c: u64,
}

/// Listen: a = ip << 16 | port, b = backlog (i64), c = backlog area.
pub const OP_LISTEN: u32 = 1;
/// Accept or reject the head: a = conn id, b = decision (0 accept, 1 reject) | new socket << 8, c = peer ip << 16 | peer port.
pub const OP_DECIDE: u32 = 2;
/// Connect: a = dst ip << 16 | port, b = src ip (0: any), c = 1 if nonblocking.
pub const OP_CONNECT: u32 = 3;
/// Close whatever the socket is (listener, connection, attempt).
pub const OP_CLOSE: u32 = 4;

/// A pending request as the accept path sees it in the backlog ring.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct PendingShm {
    /// Wire connection id.
    pub conn_id: u64,
    /// Peer IPv4 (host order).
    pub peer_ip: u32,
    /// Peer port.
    pub peer_port: u16,
    /// Local port it asked for.
    pub local_port: u16,
    /// Local IPv4 it asked for.
    pub local_ip: u32,
    /// Reserved.
    pub _pad: u32,
}

/// Packs an address for a command.
pub fn pack_addr(ip: std::net::Ipv4Addr, port: u16) -> u64 {
    (u64::from(u32::from(ip)) << 16) | u64::from(port)
}

/// Unpacks [`pack_addr`].
pub fn unpack_addr(v: u64) -> (std::net::Ipv4Addr, u16) {
    (std::net::Ipv4Addr::from((v >> 16) as u32), v as u16)
}

/// Offsets of the region's parts.
pub mod layout {
    use super::*;
    const fn up(x: usize, a: usize) -> usize {
        x.div_ceil(a) * a
    }
    /// The socket table.
    pub fn socks_off() -> usize {
        up(std::mem::size_of::<RegionHeader>(), 64)
    }
    /// The command ring.
    pub fn cmd_off() -> usize {
        up(
            socks_off() + MAX_SOCKETS * std::mem::size_of::<SockShm>(),
            4096,
        )
    }
    fn backlog_stride() -> usize {
        up(Backlog::<PendingShm>::region_size(MAX_BACKLOG), 4096)
    }
    /// Backlog area `k`.
    pub fn backlog_off(k: usize) -> usize {
        up(cmd_off() + Backlog::<Cmd>::region_size(CMD_RING), 4096) + k * backlog_stride()
    }
    /// Bytes of one backlog area.
    pub fn backlog_len() -> usize {
        backlog_stride()
    }
    /// The whole region.
    pub fn size() -> usize {
        backlog_off(MAX_LISTENERS)
    }
}

/// A shared mapping of a memfd (or a private anonymous one for tests).
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    fd: Option<OwnedFd>,
}

// SAFETY: the mapping is plain shared memory accessed only through atomics and
// the position-independent structures above.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Creates a zeroed memfd of `len` bytes and maps it shared.
    ///
    /// # Errors
    /// As `memfd_create`, `ftruncate` and `mmap`.
    pub fn create(name: &str, len: usize) -> io::Result<Mapping> {
        let cname =
            std::ffi::CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a valid C string; the result is a new fd we own.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just created and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: fd is a memfd we own.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Self::map(fd, len)
    }

    /// Maps `len` bytes of a memfd received from elsewhere.
    ///
    /// # Errors
    /// If the file is smaller than `len`, or `mmap` fails.
    pub fn map(fd: OwnedFd, len: usize) -> io::Result<Mapping> {
        // SAFETY: fstat into a zeroed struct for an fd we own.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        if (st.st_size as usize) < len || len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "shared region smaller than announced",
            ));
        }
        // SAFETY: a fresh shared mapping of a file at least `len` bytes long.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: NonNull::new(p.cast()).expect("mmap never returns NULL on success"),
            len,
            fd: Some(fd),
        })
    }

    /// The memfd (to pass to the other side).
    pub fn fd(&self) -> Option<RawFd> {
        self.fd.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Base address.
    pub fn as_ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// Length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether empty (never, once created).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A reference to a `T` at `off` (must be in bounds and aligned).
    ///
    /// # Panics
    /// If `off` is out of bounds or misaligned for `T`.
    pub fn at<T>(&self, off: usize) -> &T {
        assert!(
            off + std::mem::size_of::<T>() <= self.len,
            "offset out of the region"
        );
        // SAFETY: in bounds (checked); the region is page-aligned so `off`
        // alignment is checked next; T is only ever an atomic-based struct.
        let p = unsafe { self.ptr.as_ptr().add(off) };
        assert!(
            (p as usize).is_multiple_of(std::mem::align_of::<T>()),
            "misaligned"
        );
        // SAFETY: in bounds, aligned, shared memory of plain atomics.
        unsafe { &*p.cast::<T>() }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we mapped exactly this range and nothing refers to it any more
        // (views borrow the mapping or are dropped first by their owners).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A process's region, seen from either side.
#[derive(Debug)]
pub struct Region {
    // Field order matters: the view is dropped before the mapping it points into.
    cmd: Backlog<Cmd>,
    map: Mapping,
}

impl Region {
    /// Creates and formats a region (daemon side).
    ///
    /// # Errors
    /// As [`Mapping::create`].
    pub fn create(name: &str) -> io::Result<Region> {
        let map = Mapping::create(name, layout::size())?;
        let h: &RegionHeader = map.at(0);
        h.version.store(REGION_VERSION, Ordering::Relaxed);
        h.size.store(layout::size() as u64, Ordering::Relaxed);
        // SAFETY: the command area lies inside the mapping, which outlives the view
        // (both are owned by the Region, and the view is dropped first: field order).
        let cmd = unsafe {
            Backlog::init_in(
                offset(&map, layout::cmd_off()),
                layout::backlog_off(0) - layout::cmd_off(),
                CMD_RING,
            )
        }
        .map_err(|e| io::Error::other(e.to_string()))?;
        h.magic.store(REGION_MAGIC, Ordering::Release);
        Ok(Region { cmd, map })
    }

    /// Opens a region received from the daemon (application side).
    ///
    /// # Errors
    /// If the memfd is too small or not a region of this version.
    pub fn open(fd: OwnedFd, len: usize) -> io::Result<Region> {
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
        // SAFETY: as in `create`.
        let cmd = unsafe {
            Backlog::attach(
                offset(&map, layout::cmd_off()),
                layout::backlog_off(0) - layout::cmd_off(),
            )
        }
        .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Region { cmd, map })
    }

    /// The header.
    pub fn header(&self) -> &RegionHeader {
        self.map.at(0)
    }

    /// Socket `i`'s shared state.
    ///
    /// # Panics
    /// If `i >= MAX_SOCKETS`.
    pub fn sock(&self, i: usize) -> &SockShm {
        assert!(i < MAX_SOCKETS);
        self.map
            .at(layout::socks_off() + i * std::mem::size_of::<SockShm>())
    }

    /// The command ring.
    pub fn commands(&self) -> &Backlog<Cmd> {
        &self.cmd
    }

    /// Formats backlog area `k` for `capacity` requests (daemon side, at listen).
    ///
    /// # Panics
    /// If `k >= MAX_LISTENERS` or the capacity is out of range.
    pub fn format_backlog(&self, k: usize, capacity: usize) -> Backlog<PendingShm> {
        assert!(k < MAX_LISTENERS);
        // SAFETY: area k lies inside the mapping, which the caller keeps alive
        // (the Region) as long as the view; at listen time nobody else uses it.
        unsafe {
            Backlog::init_in(
                offset(&self.map, layout::backlog_off(k)),
                layout::backlog_len(),
                capacity,
            )
        }
        .expect("capacity in range")
    }

    /// Opens backlog area `k` (application side, after the listen completed).
    ///
    /// # Errors
    /// If the area is not formatted.
    pub fn open_backlog(
        &self,
        k: usize,
    ) -> Result<Backlog<PendingShm>, crate::backlog::RegionError> {
        if k >= MAX_LISTENERS {
            return Err(crate::backlog::RegionError::Region);
        }
        // SAFETY: as in `format_backlog`; the view must not outlive the Region.
        unsafe {
            Backlog::attach(
                offset(&self.map, layout::backlog_off(k)),
                layout::backlog_len(),
            )
        }
    }

    /// The memfd.
    pub fn fd(&self) -> Option<RawFd> {
        self.map.fd()
    }
}

fn offset(map: &Mapping, off: usize) -> NonNull<u8> {
    assert!(off < map.len());
    // SAFETY: off is inside the mapping.
    unsafe { NonNull::new_unchecked(map.as_ptr().as_ptr().add(off)) }
}

/// Waits while `*word == expected`, at most `timeout` (shared futex: works
/// across processes). Returns on wake, timeout, or a changed value.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: a valid aligned u32 in shared memory and a timespec that outlives the call.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            0usize,
            0u32,
        );
    }
}

/// Wakes every thread waiting on `word`.
pub fn futex_wake(word: &AtomicU32) {
    // SAFETY: a valid aligned u32; FUTEX_WAKE reads nothing else.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            0usize,
            0usize,
            0u32,
        );
    }
}

/// Writes 1 to an eventfd that is not ours to own (a raw fd).
pub fn signal_eventfd(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64; a bad fd only returns an error.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

/// Drains an eventfd that is not ours to own (nonblocking read; a blocking
/// eventfd is polled first so this never blocks).
pub fn drain_eventfd(fd: RawFd) {
    let mut v: u64 = 0;
    if crate::sys::wait_readable(fd, Some(Duration::ZERO)) {
        // SAFETY: reads 8 bytes into a live u64.
        unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
    }
}

/// Sends one line (newline added) with file descriptors attached.
///
/// # Errors
/// As `sendmsg`.
pub fn send_line(sock: RawFd, line: &str, fds: &[RawFd]) -> io::Result<()> {
    let mut data = line.as_bytes().to_vec();
    data.push(b'\n');
    let mut sent = 0;
    let mut first = true;
    while sent < data.len() {
        let mut iov = libc::iovec {
            iov_base: data[sent..].as_mut_ptr().cast(),
            iov_len: data.len() - sent,
        };
        // SAFETY: msghdr is plain data; zeroed is a valid empty header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        let space = if first && !fds.is_empty() {
            // SAFETY: CMSG_SPACE is a pure size computation.
            unsafe { libc::CMSG_SPACE((fds.len() * 4) as u32) as usize }
        } else {
            0
        };
        let mut cbuf = vec![0u8; space];
        if space > 0 {
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = space;
            // SAFETY: the control buffer has room for one header with fds.len() ints.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN((fds.len() * 4) as u32) as usize;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr(),
                    libc::CMSG_DATA(c).cast::<RawFd>(),
                    fds.len(),
                );
            }
        }
        // SAFETY: msg points to live buffers for the duration of the call.
        let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        sent += n as usize;
        first = false;
    }
    Ok(())
}

/// Receives one line (without the newline) and any file descriptors sent with
/// it. The protocol is strictly request / response, so a line never shares a
/// read with the next one. Returns `None` at end of file.
///
/// # Errors
/// As `recvmsg`, or a line longer than 16 MiB.
pub fn recv_line(sock: RawFd) -> io::Result<Option<(String, Vec<OwnedFd>)>> {
    let mut out = Vec::new();
    let mut fds = Vec::new();
    loop {
        let mut buf = [0u8; 4096];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut cbuf = [0u64; 32];
        // SAFETY: msghdr is plain data.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cbuf);
        // SAFETY: buffers live for the call.
        let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // SAFETY: walking the control messages the kernel wrote into cbuf.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let count = ((*c).cmsg_len - libc::CMSG_LEN(0) as usize) / 4;
                    let p = libc::CMSG_DATA(c).cast::<RawFd>();
                    for i in 0..count {
                        fds.push(OwnedFd::from_raw_fd(p.add(i).read_unaligned()));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        if n == 0 {
            return if out.is_empty() {
                Ok(None)
            } else {
                Err(io::Error::from(io::ErrorKind::UnexpectedEof))
            };
        }
        out.extend_from_slice(&buf[..n as usize]);
        if out.last() == Some(&b'\n') {
            out.pop();
            return Ok(Some((String::from_utf8_lossy(&out).into_owned(), fds)));
        }
        if out.len() > 16 << 20 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn region_round_trip_between_two_mappings() {
        let r = Region::create("dsan-test").unwrap();
        let fd = r.fd().unwrap();
        // SAFETY: dup of a valid fd.
        let dup = unsafe { OwnedFd::from_raw_fd(libc::dup(fd)) };
        let app = Region::open(dup, layout::size()).unwrap();
        app.commands()
            .push(Cmd {
                op: OP_CLOSE,
                sock: 3,
                seq: 1,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(r.commands().pop().unwrap().sock, 3);
        r.sock(5).events.fetch_or(FD_ACCEPT, Ordering::SeqCst);
        assert_eq!(app.sock(5).events.load(Ordering::SeqCst), FD_ACCEPT);
        let b = r.format_backlog(2, 4);
        let ab = app.open_backlog(2).unwrap();
        b.push(PendingShm {
            conn_id: 9,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(ab.peek().unwrap().conn_id, 9);
        assert!(app.open_backlog(3).is_err(), "unformatted area");
        assert!(layout::size() < 16 << 20);
    }

    #[test]
    fn lines_carry_fds() {
        let (a, b) = UnixStream::pair().unwrap();
        let e = crate::sys::EventFd::new().unwrap();
        send_line(a.as_raw_fd(), "{\"x\":1}", &[e.as_raw_fd()]).unwrap();
        let (l, fds) = recv_line(b.as_raw_fd()).unwrap().unwrap();
        assert_eq!(l, "{\"x\":1}");
        assert_eq!(fds.len(), 1);
        signal_eventfd(fds[0].as_raw_fd());
        assert_eq!(e.drain(), 1);
        send_line(a.as_raw_fd(), "plain", &[]).unwrap();
        assert_eq!(recv_line(b.as_raw_fd()).unwrap().unwrap().0, "plain");
        drop(a);
        assert!(recv_line(b.as_raw_fd()).unwrap().is_none());
    }

    #[test]
    fn futex_wakes_and_times_out() {
        let w = std::sync::Arc::new(AtomicU32::new(0));
        let t0 = std::time::Instant::now();
        futex_wait(&w, 0, Duration::from_millis(20));
        assert!(t0.elapsed() >= Duration::from_millis(15));
        let w2 = w.clone();
        let h = std::thread::spawn(move || {
            while w2.load(Ordering::SeqCst) == 0 {
                futex_wait(&w2, 0, Duration::from_secs(5));
            }
        });
        std::thread::sleep(Duration::from_millis(10));
        w.store(1, Ordering::SeqCst);
        futex_wake(&w);
        h.join().unwrap();
    }
}
