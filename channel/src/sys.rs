//! The system calls around the channel: eventfds, futexes, shared mappings of
//! sealed memfds, and lines with file descriptors over the control socket.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// A non-blocking, close-on-exec eventfd (counter semantics, not semaphore).
#[derive(Debug)]
pub struct EventFd(OwnedFd);

impl EventFd {
    /// Creates one.
    ///
    /// # Errors
    /// As `eventfd(2)`.
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd takes no pointers; a non-negative result is a new fd we own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Wraps an fd received from elsewhere (it must be an eventfd).
    pub fn from_owned(fd: OwnedFd) -> Self {
        Self(fd)
    }

    /// Adds 1 to the counter (see [`signal_eventfd`]).
    pub fn signal(&self) -> bool {
        signal_eventfd(self.0.as_raw_fd())
    }

    /// Reads and clears the counter; returns the value (0 if nothing pending).
    pub fn drain(&self) -> u64 {
        drain_eventfd(self.0.as_raw_fd())
    }

    /// Waits until the counter is non-zero or `timeout` passes. Returns whether it
    /// became readable. Does not drain.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        wait_readable(self.0.as_raw_fd(), timeout)
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl std::os::fd::AsFd for EventFd {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl From<EventFd> for OwnedFd {
    fn from(e: EventFd) -> OwnedFd {
        e.0
    }
}

/// Adds 1 to the eventfd `fd`. Returns whether the write went through: a
/// full counter on a nonblocking eventfd, or a bad fd, returns false (the
/// caller counts it). Never retries more than on EINTR.
pub fn signal_eventfd(fd: RawFd) -> bool {
    let one: u64 = 1;
    loop {
        // SAFETY: writes 8 bytes from a live u64; a bad fd only returns an error.
        let r = unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
        if r == 8 {
            return true;
        }
        if r < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return false;
    }
}

/// Signals an eventfd unless it is readable already. For posting a state
/// that holds (not news): a second write to a readable eventfd is one more
/// wake-up, which an edge-triggered epoll registration reports as a new
/// edge although nothing new happened.
pub fn signal_eventfd_if_quiet(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    if unsafe { libc::poll(&mut p, 1, 0) } == 1 && p.revents & libc::POLLIN != 0 {
        return true;
    }
    signal_eventfd(fd)
}

/// Reads and clears an eventfd's counter without blocking (a blocking eventfd
/// is polled first). Returns the value, 0 if nothing was pending.
pub fn drain_eventfd(fd: RawFd) -> u64 {
    let mut v: u64 = 0;
    if wait_readable(fd, Some(Duration::ZERO)) {
        // SAFETY: reads 8 bytes into a live u64.
        let r = unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
        if r != 8 {
            return 0;
        }
    }
    v
}

/// Whether `fd` is an eventfd (by its anonymous inode's name).
pub fn is_eventfd(fd: RawFd) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .is_ok_and(|p| p.as_os_str() == "anon_inode:[eventfd]")
}

/// Whether `fd` is a pipe (a FIFO).
pub fn is_pipe(fd: RawFd) -> bool {
    pipe_inode(fd).is_some()
}

/// The inode of the pipe `fd` is an end of (both ends have the same one,
/// and no other pipe has it while it exists); None if `fd` is no pipe.
pub fn pipe_inode(fd: RawFd) -> Option<u64> {
    // SAFETY: stat is plain data; zeroed is valid.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a live out-buffer.
    let ok = unsafe { libc::fstat(fd, &mut st) == 0 };
    (ok && st.st_mode & libc::S_IFMT == libc::S_IFIFO).then_some(st.st_ino)
}

/// A new pipe (read end, write end), both close-on-exec.
///
/// # Errors
/// The kernel's (EMFILE, ...).
pub fn pipe_cloexec() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1; 2];
    // SAFETY: a live two-element out-array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: two fresh descriptors, owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Whether the far end of `fd` (a pipe's read end: every copy of its write
/// end) is gone, without waiting.
pub fn hung_up(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    let r = unsafe { libc::poll(&mut pfd, 1, 0) };
    r > 0 && pfd.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
}

/// CLOCK_MONOTONIC in nanoseconds: the one clock both sides of the channel
/// read the same way (request expiry).
pub fn monotonic_ns() -> u64 {
    // SAFETY: timespec is plain data; zeroed is valid.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: a valid clock id and a live timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Waits for `fd` to become readable, with a nanosecond-resolution timeout.
pub fn wait_readable(fd: RawFd, timeout: Option<Duration>) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ts = timeout.map(|d| libc::timespec {
        tv_sec: d.as_secs() as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    });
    let tsp = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: one valid pollfd, a timespec that outlives the call or NULL, no sigmask.
    let r = unsafe { libc::ppoll(&mut pfd, 1, tsp, std::ptr::null()) };
    r > 0 && pfd.revents & libc::POLLIN != 0
}

/// Whether a write to `fd` would not block now (for an eventfd: a write of
/// 1 fits its counter).
pub fn writable_now(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    let r = unsafe { libc::poll(&mut pfd, 1, 0) };
    r == 1 && pfd.revents & libc::POLLOUT != 0
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

/// Wakes every thread waiting on `word` (never blocks).
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

/// A shared mapping of a memfd.
///
/// Memfds made here are **sealed** before anyone else sees them: they can
/// neither shrink nor grow (`F_SEAL_SHRINK | F_SEAL_GROW`, then
/// [`Mapping::seal`] adds `F_SEAL_SEAL` and whatever else applies), so a
/// process holding the descriptor cannot truncate it under the daemon (which
/// would make the daemon's next access fault).
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    fd: OwnedFd,
}

// SAFETY: the mapping is plain shared memory accessed only through atomics and
// the position-independent structures built on it.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

/// The seals every shared mapping carries once [`Mapping::seal`]ed.
pub const SEALS: i32 = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

impl Mapping {
    /// Creates a zeroed, sealed memfd of `len` bytes and maps it shared.
    ///
    /// # Errors
    /// As `memfd_create`, `ftruncate`, `fcntl(F_ADD_SEALS)` and `mmap`.
    pub fn create(name: &str, len: usize) -> io::Result<Mapping> {
        let cname =
            std::ffi::CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a valid C string; the result is a new fd we own.
        let fd = unsafe {
            libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just created and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: fd is a memfd we own.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
        // SAFETY: fcntl on a memfd we own.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Self::map(fd, len)
    }

    /// Adds `extra` seals (e.g. `F_SEAL_FUTURE_WRITE`) and `F_SEAL_SEAL`, so
    /// that nobody can change the seals afterwards. Call before handing the
    /// memfd out.
    ///
    /// # Errors
    /// As `fcntl(F_ADD_SEALS)`.
    pub fn seal(&self, extra: i32) -> io::Result<()> {
        // SAFETY: fcntl on a memfd we own.
        if unsafe {
            libc::fcntl(
                self.fd.as_raw_fd(),
                libc::F_ADD_SEALS,
                extra | libc::F_SEAL_SEAL,
            )
        } != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Maps `len` bytes of a memfd received from elsewhere.
    ///
    /// # Errors
    /// If the file is smaller than `len`, or `mmap` fails.
    pub fn map(fd: OwnedFd, len: usize) -> io::Result<Mapping> {
        Self::map_with(fd, len, libc::PROT_READ | libc::PROT_WRITE)
    }

    /// Maps `len` bytes of a memfd received from elsewhere, read-only.
    ///
    /// # Errors
    /// If the file is smaller than `len`, or `mmap` fails.
    pub fn map_readonly(fd: OwnedFd, len: usize) -> io::Result<Mapping> {
        Self::map_with(fd, len, libc::PROT_READ)
    }

    fn map_with(fd: OwnedFd, len: usize, prot: libc::c_int) -> io::Result<Mapping> {
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
                prot,
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
            fd,
        })
    }

    /// The memfd (to pass to the other side).
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The seals on the memfd.
    pub fn seals(&self) -> i32 {
        // SAFETY: fcntl on an fd we own.
        unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_GET_SEALS) }
    }

    /// Length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether empty (never, once created).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A pointer `off` bytes into the mapping.
    ///
    /// # Panics
    /// If `off` is outside the mapping.
    pub fn ptr_at(&self, off: usize) -> NonNull<u8> {
        assert!(off < self.len, "offset out of the region");
        // SAFETY: off is inside the mapping.
        unsafe { NonNull::new_unchecked(self.ptr.as_ptr().add(off)) }
    }

    /// A reference to a `T` at `off` (must be in bounds and aligned). Only for
    /// types made of atomics, which any bytes are valid for.
    ///
    /// # Panics
    /// If `off` is out of bounds or misaligned for `T`.
    pub fn at<T: Shared>(&self, off: usize) -> &T {
        assert!(
            off + std::mem::size_of::<T>() <= self.len,
            "offset out of the region"
        );
        let p = self.ptr_at(off).as_ptr();
        assert!(
            (p as usize).is_multiple_of(std::mem::align_of::<T>()),
            "misaligned"
        );
        // SAFETY: in bounds, aligned, shared memory; `Shared` types are built
        // from atomics only, so every bit pattern is valid and sharing is sound.
        unsafe { &*p.cast::<T>() }
    }
}

/// Types that may live in shared memory: made only of atomics (any bytes are a
/// valid value, and concurrent access is defined).
///
/// # Safety
/// Implement only for `#[repr(C)]` types whose fields are all atomics.
pub unsafe trait Shared {}
// SAFETY: an atomic.
unsafe impl Shared for AtomicU32 {}
// SAFETY: an atomic.
unsafe impl Shared for std::sync::atomic::AtomicU64 {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we mapped exactly this range and nothing refers to it any more
        // (views borrow the mapping or are dropped first by their owners).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Longest control line accepted (bytes, without the newline).
pub const MAX_LINE: usize = 64 * 1024;
/// Most descriptors one control message may carry.
pub const MAX_FDS: usize = 4;

/// Sends one line (newline added) with file descriptors attached.
///
/// # Errors
/// As `sendmsg`; more than [`MAX_FDS`] descriptors is EINVAL.
pub fn send_line(sock: RawFd, line: &str, fds: &[RawFd]) -> io::Result<()> {
    let mut data = line.as_bytes().to_vec();
    data.push(b'\n');
    send_bytes(sock, data, fds)
}

/// Sends one typed control message ([`crate::ctl`]) with file descriptors
/// attached.
///
/// # Errors
/// As [`send_line`].
pub fn send_typed(sock: RawFd, message: Vec<u8>, fds: &[RawFd]) -> io::Result<()> {
    send_bytes(sock, message, fds)
}

/// Sends `data`, the descriptors with its first byte.
fn send_bytes(sock: RawFd, mut data: Vec<u8>, fds: &[RawFd]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
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
        let mut cbuf = [0u64; 8];
        if first && !fds.is_empty() {
            // SAFETY: CMSG_SPACE is a pure size computation.
            let space = unsafe { libc::CMSG_SPACE((fds.len() * 4) as u32) } as usize;
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = space;
            // SAFETY: the control buffer (64 bytes) has room for one header with
            // at most MAX_FDS ints.
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

/// A message read from a control socket: a JSON line (the operator's
/// requests) or a typed message ([`crate::ctl`]: the application's).
#[derive(Debug)]
pub enum Received {
    /// A line, without its newline.
    Line(String),
    /// A typed message, whole (header and body; not yet parsed).
    Typed(Vec<u8>),
}

/// Receives one line (without the newline) and the descriptors sent with it.
/// The protocol is strictly request / response, so a line never shares a read
/// with the next one. Returns `None` at end of file.
///
/// Descriptors are accepted only with the first read of a line, at most
/// [`MAX_FDS`]; a truncated control message (more than the buffer holds) is
/// an error, and every descriptor received with it is closed.
///
/// # Errors
/// As `recvmsg`; a line longer than [`MAX_LINE`], descriptors beyond the
/// first read or [`MAX_FDS`], or truncated control data (InvalidData); a
/// typed message where a line was expected.
pub fn recv_line(sock: RawFd) -> io::Result<Option<(String, Vec<OwnedFd>)>> {
    match recv_message(sock)? {
        None => Ok(None),
        Some((Received::Line(l), fds)) => Ok(Some((l, fds))),
        Some((Received::Typed(_), _)) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a typed message where a line was expected",
        )),
    }
}

/// Receives one typed control message ([`crate::ctl`], not yet parsed) and
/// the descriptors sent with it; `None` at end of file.
///
/// # Errors
/// As [`recv_message`]; a line where a typed message was expected.
pub fn recv_typed(sock: RawFd) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    match recv_message(sock)? {
        None => Ok(None),
        Some((Received::Typed(m), fds)) => Ok(Some((m, fds))),
        Some((Received::Line(_), _)) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a line where a typed message was expected",
        )),
    }
}

/// Receives one message, a line or a typed message (told apart by its first
/// byte, [`crate::ctl::MAGIC`]), with the descriptors sent with it, under
/// the rules of [`recv_line`]. Bytes beyond a typed message's declared
/// length in the same read are an error (the protocol never pipelines).
///
/// # Errors
/// As [`recv_line`]; a typed message whose header declares a body over
/// [`crate::ctl::MAX_BODY`] (InvalidData).
pub fn recv_message(sock: RawFd) -> io::Result<Option<(Received, Vec<OwnedFd>)>> {
    let mut out = Vec::new();
    let mut fds = Vec::new();
    let invalid = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    loop {
        let mut buf = [0u8; 4096];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut cbuf = [0u64; 8];
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
        let first = out.is_empty();
        let mut got = 0;
        // SAFETY: walking the control messages the kernel wrote into cbuf; each
        // received descriptor is taken into an OwnedFd at once (closed on error).
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let count = ((*c).cmsg_len - libc::CMSG_LEN(0) as usize) / 4;
                    let p = libc::CMSG_DATA(c).cast::<RawFd>();
                    for i in 0..count {
                        fds.push(OwnedFd::from_raw_fd(p.add(i).read_unaligned()));
                        got += 1;
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(invalid("control data truncated (too many descriptors)"));
        }
        if got > 0 && !first {
            return Err(invalid("descriptors must come with the start of a line"));
        }
        if fds.len() > MAX_FDS {
            return Err(invalid("too many descriptors"));
        }
        if n == 0 {
            return if out.is_empty() {
                Ok(None)
            } else {
                Err(io::Error::from(io::ErrorKind::UnexpectedEof))
            };
        }
        out.extend_from_slice(&buf[..n as usize]);
        if out[0] == crate::ctl::MAGIC {
            match crate::ctl::message_len(&out) {
                Some(len) if len > crate::ctl::HEADER + crate::ctl::MAX_BODY => {
                    return Err(invalid("typed control message too long"));
                }
                Some(len) if out.len() > len => {
                    return Err(invalid("bytes after a typed control message"));
                }
                Some(len) if out.len() == len => return Ok(Some((Received::Typed(out), fds))),
                _ => continue,
            }
        }
        if out.last() == Some(&b'\n') {
            out.pop();
            if out.len() > MAX_LINE {
                return Err(invalid("line too long"));
            }
            return Ok(Some((
                Received::Line(String::from_utf8_lossy(&out).into_owned()),
                fds,
            )));
        }
        if out.len() > MAX_LINE {
            return Err(invalid("line too long"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::Ordering;

    #[test]
    fn eventfd_signal_wait_drain() {
        let e = EventFd::new().unwrap();
        assert!(!e.wait(Some(Duration::from_millis(1))));
        assert!(e.signal());
        assert!(e.signal());
        assert!(e.wait(Some(Duration::ZERO)));
        assert_eq!(e.drain(), 2);
        assert_eq!(e.drain(), 0);
        assert!(is_eventfd(e.as_raw_fd()));
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(!is_eventfd(a.as_raw_fd()));
        assert!(!signal_eventfd(-1));
    }

    #[test]
    fn a_full_nonblocking_eventfd_is_refused_not_waited_on() {
        let e = EventFd::new().unwrap();
        let max: u64 = u64::MAX - 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
        let n = unsafe { libc::write(e.as_raw_fd(), (&max as *const u64).cast(), 8) };
        assert_eq!(n, 8);
        assert!(!e.signal());
    }

    #[test]
    fn regions_are_sealed() {
        let m = Mapping::create("dsan-test", 8192).unwrap();
        m.seal(0).unwrap();
        assert_eq!(m.seals() & SEALS, SEALS);
        // SAFETY: ftruncate on an fd we own; the seal must refuse it.
        assert_ne!(unsafe { libc::ftruncate(m.fd(), 0) }, 0);
        let w: &AtomicU32 = m.at(4096);
        w.store(5, Ordering::Relaxed);
        assert_eq!(w.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn lines_carry_fds_within_limits() {
        let (a, b) = UnixStream::pair().unwrap();
        let e = EventFd::new().unwrap();
        send_line(a.as_raw_fd(), "{\"x\":1}", &[e.as_raw_fd()]).unwrap();
        let (l, fds) = recv_line(b.as_raw_fd()).unwrap().unwrap();
        assert_eq!(l, "{\"x\":1}");
        assert_eq!(fds.len(), 1);
        assert!(signal_eventfd(fds[0].as_raw_fd()));
        assert_eq!(e.drain(), 1);
        send_line(a.as_raw_fd(), "plain", &[]).unwrap();
        assert_eq!(recv_line(b.as_raw_fd()).unwrap().unwrap().0, "plain");
        assert!(send_line(a.as_raw_fd(), "x", &[e.as_raw_fd(); 5]).is_err());
        let long = "y".repeat(MAX_LINE + 1);
        let t = std::thread::spawn(move || {
            let _ = send_line(a.as_raw_fd(), &long, &[]);
            a
        });
        assert!(recv_line(b.as_raw_fd()).is_err());
        drop(b);
        drop(t.join().unwrap());
    }

    #[test]
    fn typed_messages_and_lines_share_the_socket() {
        use crate::ctl::{Reply, Request};
        let (a, b) = UnixStream::pair().unwrap();
        let e = EventFd::new().unwrap();
        let req = Request::EventFd { sock: 3 };
        send_typed(a.as_raw_fd(), req.emit(), &[e.as_raw_fd()]).unwrap();
        let (m, fds) = recv_typed(b.as_raw_fd()).unwrap().unwrap();
        assert_eq!(Request::parse(&m), Ok(req));
        assert_eq!(fds.len(), 1);
        // A line where a typed message is expected, and the other way round.
        send_line(a.as_raw_fd(), "{\"cmd\":\"status\"}", &[]).unwrap();
        assert!(recv_typed(b.as_raw_fd()).is_err());
        send_typed(a.as_raw_fd(), Reply::Ok.emit(), &[]).unwrap();
        assert!(recv_line(b.as_raw_fd()).is_err());
        // Either, told apart by the first byte.
        send_typed(a.as_raw_fd(), Reply::Key(9).emit(), &[]).unwrap();
        match recv_message(b.as_raw_fd()).unwrap().unwrap().0 {
            Received::Typed(m) => assert_eq!(Reply::parse(&m), Ok(Reply::Key(9))),
            other => panic!("{other:?}"),
        }
        // Bytes after a typed message in the same read: the protocol never
        // pipelines, so that is refused.
        let mut two = Request::Attach.emit();
        two.extend(Request::Attach.emit());
        send_typed(a.as_raw_fd(), two, &[]).unwrap();
        assert!(recv_message(b.as_raw_fd()).is_err());
        // A header declaring a body over the limit.
        let mut big = Request::Attach.emit();
        big[4..8].copy_from_slice(&((crate::ctl::MAX_BODY + 1) as u32).to_le_bytes());
        send_typed(a.as_raw_fd(), big, &[]).unwrap();
        assert!(recv_message(b.as_raw_fd()).is_err());
    }
}
