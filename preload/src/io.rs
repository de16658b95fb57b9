//! Moving bytes on switch sockets: the receive and send families and
//! sendfile, with a kernel socket's semantics (blocking or O_NONBLOCK,
//! partial writes, MSG_* flags, SIGPIPE unless MSG_NOSIGNAL).
#![allow(unsafe_code)] // the caller's buffers and iovecs: each block with a SAFETY comment

use crate::cret::errno;
use crate::table::{PFd, State};
use libc::{c_int, iovec};
use std::cell::RefCell;
use std::sync::atomic::Ordering;

const RECV_FLAGS: c_int = libc::MSG_DONTWAIT
    | libc::MSG_OOB
    | libc::MSG_PEEK
    | libc::MSG_WAITALL
    | libc::MSG_NOSIGNAL
    | libc::MSG_CMSG_CLOEXEC;
const SEND_FLAGS: c_int =
    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL | libc::MSG_MORE | libc::MSG_EOR | libc::MSG_OOB;

/// Whether data calls can go ahead: connected (after recording a finished
/// nonblocking connect).
fn ready(p: &PFd) -> Result<(), i32> {
    p.settle();
    match p.app.state() {
        State::Connected => Ok(()),
        State::Connecting => Err(libc::EAGAIN),
        State::Listening => Err(libc::ENOTCONN),
        State::Idle => match p.app.so_error.swap(0, Ordering::AcqRel) {
            0 => Err(libc::ENOTCONN),
            e => Err(e),
        },
    }
}

/// MSG_DONTWAIT for a nonblocking descriptor (so the switch need not ask
/// the kernel for the descriptor's flags on every call).
fn dontwait(p: &PFd) -> c_int {
    if p.app.nonblock.load(Ordering::Relaxed) {
        libc::MSG_DONTWAIT
    } else {
        0
    }
}

/// Receives into `buf`.
pub(crate) fn recv(p: &PFd, buf: &mut [u8], flags: c_int) -> Result<usize, i32> {
    if flags & !RECV_FLAGS != 0 {
        return Err(libc::EOPNOTSUPP);
    }
    ready(p)?;
    let f = flags & (libc::MSG_DONTWAIT | libc::MSG_PEEK | libc::MSG_OOB) | dontwait(p);
    // (The socket's record says whether to wait: no system call asks.)
    let block = f & libc::MSG_DONTWAIT == 0;
    if flags & libc::MSG_WAITALL == 0 || f & (libc::MSG_PEEK | libc::MSG_OOB) != 0 {
        return p.recv(buf, f, block);
    }
    let mut got = 0;
    while got < buf.len() {
        match p.recv(&mut buf[got..], f, block) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(_) if got > 0 => break,
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Sends from `buf`.
pub(crate) fn send(p: &PFd, buf: &[u8], flags: c_int) -> Result<usize, i32> {
    if flags & !SEND_FLAGS != 0 {
        return Err(libc::EOPNOTSUPP);
    }
    let r = ready(p).and_then(|()| {
        let f = flags & (libc::MSG_DONTWAIT | libc::MSG_OOB) | dontwait(p);
        p.send(buf, f, f & libc::MSG_DONTWAIT == 0)
    });
    if let Some(e) = r.err().filter(|e| *e != libc::EAGAIN) {
        crate::rules::log(|| {
            format!(
                "send on switch socket {} ({:?}): errno {e}",
                p.sw(),
                p.app.state()
            )
        });
    }
    if r == Err(libc::EPIPE) && flags & libc::MSG_NOSIGNAL == 0 {
        // As the kernel does for a socket whose peer is gone.
        // SAFETY: signalling the calling thread.
        unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGPIPE) };
    }
    r
}

/// The caller's iovecs as slices.
///
/// # Safety
/// `iov` points to `n` iovecs (or `n` is 0), each describing valid memory.
unsafe fn iovecs<'a>(iov: *const iovec, n: c_int) -> Result<&'a [iovec], i32> {
    if !(0..=libc::UIO_MAXIOV).contains(&n) {
        return Err(libc::EINVAL);
    }
    if n == 0 {
        return Ok(&[]);
    }
    if iov.is_null() {
        return Err(libc::EFAULT);
    }
    // SAFETY: the caller's array of `n` iovecs.
    Ok(unsafe { std::slice::from_raw_parts(iov, n as usize) })
}

/// Runs `step` over the caller's iovecs in order (empty ones skipped; its
/// second argument says whether nothing moved yet), stopping at a short
/// step; a failure after some bytes moved ends the call with those bytes,
/// as the kernel does.
fn over_iovs(
    v: &[iovec],
    mut step: impl FnMut(&iovec, bool) -> Result<usize, i32>,
) -> Result<usize, i32> {
    let mut total = 0;
    for io in v.iter().filter(|io| io.iov_len > 0) {
        match step(io, total == 0) {
            Ok(k) => {
                total += k;
                if k < io.iov_len {
                    break;
                }
            }
            Err(_) if total > 0 => break,
            Err(e) => return Err(e),
        }
    }
    Ok(total)
}

/// Receives into the caller's iovecs (scatter): the first waits as the
/// socket does, the rest take what is there.
///
/// # Safety
/// As [`iovecs`].
pub(crate) unsafe fn recv_iov(
    p: &PFd,
    iov: *const iovec,
    n: c_int,
    flags: c_int,
) -> Result<usize, i32> {
    // SAFETY: the caller's contract.
    let v = unsafe { iovecs(iov, n)? };
    over_iovs(v, |io, first| {
        // SAFETY: the caller's buffer of iov_len bytes.
        let buf = unsafe { std::slice::from_raw_parts_mut(io.iov_base.cast::<u8>(), io.iov_len) };
        recv(
            p,
            buf,
            if first {
                flags
            } else {
                flags | libc::MSG_DONTWAIT
            },
        )
    })
}

/// Sends from the caller's iovecs (gather), stopping at a partial send.
///
/// # Safety
/// As [`iovecs`].
pub(crate) unsafe fn send_iov(
    p: &PFd,
    iov: *const iovec,
    n: c_int,
    flags: c_int,
) -> Result<usize, i32> {
    // SAFETY: the caller's contract.
    let v = unsafe { iovecs(iov, n)? };
    over_iovs(v, |io, first| {
        // SAFETY: the caller's buffer of iov_len bytes.
        let buf = unsafe { std::slice::from_raw_parts(io.iov_base.cast::<u8>(), io.iov_len) };
        send(
            p,
            buf,
            if first {
                flags
            } else {
                flags | libc::MSG_NOSIGNAL
            },
        )
    })
}

thread_local! {
    static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// How much one sendfile step reads.
const CHUNK: usize = 256 * 1024;

/// `sendfile` to a switch socket: reads the file at `offset` (or at its
/// position, which then moves) and sends, stopping at a partial send.
///
/// # Safety
/// `offset` is null or a valid in/out parameter.
pub(crate) unsafe fn sendfile(
    p: &PFd,
    in_fd: c_int,
    offset: *mut i64,
    count: usize,
) -> Result<usize, i32> {
    ready(p)?;
    let use_pos = offset.is_null();
    let mut pos = if use_pos {
        // SAFETY: plain call.
        let o = unsafe { libc::lseek64(in_fd, 0, libc::SEEK_CUR) };
        if o < 0 {
            return Err(errno());
        }
        o
    } else {
        // SAFETY: the caller's parameter.
        unsafe { *offset }
    };
    let r = BUF.with(|b| {
        let mut b = b.borrow_mut();
        if b.len() < CHUNK {
            b.resize(CHUNK, 0);
        }
        let mut total = 0usize;
        while total < count {
            let want = (count - total).min(CHUNK);
            // SAFETY: our buffer of at least `want` bytes.
            let n = unsafe { libc::pread64(in_fd, b.as_mut_ptr().cast(), want, pos) };
            if n < 0 {
                if total > 0 {
                    break;
                }
                return Err(errno());
            }
            if n == 0 {
                break;
            }
            // SIGPIPE only when nothing was sent (else the bytes are the answer).
            let quiet = if total > 0 { libc::MSG_NOSIGNAL } else { 0 };
            let sent = match send(p, &b[..n as usize], quiet) {
                Ok(k) => k,
                Err(_) if total > 0 => break,
                Err(e) => return Err(e),
            };
            pos += sent as i64;
            total += sent;
            if sent < n as usize {
                break;
            }
        }
        Ok(total)
    });
    if use_pos {
        // SAFETY: plain call.
        unsafe { libc::lseek64(in_fd, pos, libc::SEEK_SET) };
    } else {
        // SAFETY: the caller's parameter.
        unsafe { *offset = pos };
    }
    r
}

/// Bytes waiting to be received (FIONREAD).
pub(crate) fn unread(p: &PFd) -> usize {
    p.san()
        .map_or(0, |ss| ss.readiness(false, false).unread as usize)
}

/// Whether `fd` is a pipe (a FIFO).
fn is_pipe(fd: c_int) -> bool {
    // SAFETY: stat is plain data; zeroed is valid.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a live out-buffer.
    unsafe { libc::fstat(fd, &mut st) == 0 && st.st_mode & libc::S_IFMT == libc::S_IFIFO }
}

/// What splice answers before moving anything: ESPIPE for an offset (a
/// socket and a pipe have none), EINVAL if the other end is not a pipe, 0
/// for nothing to move; None to go on.
fn splice_check(
    off_in: *mut libc::loff_t,
    pipe: c_int,
    off_out: *mut libc::loff_t,
    len: usize,
) -> Option<Result<usize, i32>> {
    if !off_in.is_null() || !off_out.is_null() {
        return Some(Err(libc::ESPIPE));
    }
    if !is_pipe(pipe) {
        return Some(Err(libc::EINVAL));
    }
    (len == 0).then_some(Ok(0))
}

/// The most one splice moves (as the kernel's pipe-sized steps).
const SPLICE_MAX: usize = 256 << 10;

/// splice from SAN socket `p` into pipe `pipe`: the bytes are looked at
/// (MSG_PEEK), written to the pipe, and only what the pipe took is
/// consumed, so nothing is lost when the pipe is full.
pub(crate) fn splice_to_pipe(
    p: &PFd,
    off_in: *mut libc::loff_t,
    pipe: c_int,
    off_out: *mut libc::loff_t,
    len: usize,
    flags: libc::c_uint,
) -> Result<usize, i32> {
    if let Some(r) = splice_check(off_in, pipe, off_out, len) {
        return r;
    }
    let nonblock = flags & libc::SPLICE_F_NONBLOCK != 0;
    let mut buf = vec![0u8; len.min(SPLICE_MAX)];
    let peek = libc::MSG_PEEK | if nonblock { libc::MSG_DONTWAIT } else { 0 };
    let k = recv(p, &mut buf, peek)?;
    if k == 0 {
        return Ok(0);
    }
    let w = loop {
        // SAFETY: a valid buffer of `k` bytes.
        let w = unsafe { crate::real::write()(pipe, buf.as_ptr().cast(), k) };
        if w >= 0 {
            break w as usize;
        }
        let e = errno();
        if e == libc::EAGAIN && !nonblock {
            // A pipe the program made nonblocking: the kernel's splice
            // waits for room unless told not to.
            let mut pfd = libc::pollfd {
                fd: pipe,
                events: libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { crate::real::poll()(&mut pfd, 1, -1) };
            continue;
        }
        return Err(e);
    };
    // The bytes the pipe took are there to consume.
    let mut done = 0;
    while done < w {
        done += recv(p, &mut buf[done..w], libc::MSG_DONTWAIT)?;
    }
    Ok(w)
}

/// splice from pipe `pipe` into SAN socket `p`: no more is read from the
/// pipe than the socket takes (when it must not wait, no more than its
/// send ring has room for), and all of it is sent.
pub(crate) fn splice_from_pipe(
    pipe: c_int,
    off_in: *mut libc::loff_t,
    p: &PFd,
    off_out: *mut libc::loff_t,
    len: usize,
    flags: libc::c_uint,
) -> Result<usize, i32> {
    if let Some(r) = splice_check(off_in, pipe, off_out, len) {
        return r;
    }
    ready(p)?;
    let nonblock = flags & libc::SPLICE_F_NONBLOCK != 0 || p.app.nonblock.load(Ordering::Relaxed);
    let mut n = len.min(SPLICE_MAX);
    if nonblock {
        let room = p
            .san()
            .map_or(n as u64, |ss| ss.readiness(false, true).room);
        if room == 0 {
            return Err(libc::EAGAIN);
        }
        n = n.min(room as usize);
    }
    let mut buf = vec![0u8; n];
    if flags & libc::SPLICE_F_NONBLOCK != 0 {
        // The pipe without waiting: nothing in it is EAGAIN.
        let mut pfd = libc::pollfd {
            fd: pipe,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { crate::real::poll()(&mut pfd, 1, 0) } == 0 {
            return Err(libc::EAGAIN);
        }
    }
    // SAFETY: a valid buffer of `n` bytes.
    let r = unsafe { crate::real::read()(pipe, buf.as_mut_ptr().cast(), n) };
    if r < 0 {
        return Err(errno());
    }
    let k = r as usize;
    let mut done = 0;
    while done < k {
        // The bytes are out of the pipe and must go: a full ring is waited
        // for, whatever the socket's O_NONBLOCK.
        match dsan_switch::send(p.sw(), &buf[done..k], libc::MSG_NOSIGNAL) {
            Ok(m) => done += m,
            Err(libc::EAGAIN) => {
                if let Some(w) = dsan_switch::watch_writable(p.sw()) {
                    let mut pfd = libc::pollfd {
                        fd: w,
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    unsafe { crate::real::poll()(&mut pfd, 1, 100) };
                }
            }
            Err(e) if done == 0 => return Err(e),
            Err(_) => return Ok(done),
        }
    }
    Ok(k)
}
