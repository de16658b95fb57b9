//! The interposed calls: every C library function the library exports
//! (`preload/exports.map`), its setup at load time and its fork handlers.
//! Each call checks whether its descriptor is a switch socket (one bitmap
//! test) and hands it to the module that serves it, or to the C library.
#![allow(unsafe_code)] // the C library's calls, interposed
#![allow(clippy::missing_safety_doc)] // each call's contract is the C library's
#![allow(unreachable_pub)] // exported by symbol name (no_mangle, exports.map), not by path

use crate::cret::ret;
use crate::table::PFd;
use crate::{closing, io, opts, pass, real, rules, sock, table, wait};
use libc::{
    c_char, epoll_event, fd_set, sigset_t, sockaddr, socklen_t, ssize_t, timespec, timeval,
};
use libc::{c_int, c_ulong, c_void, iovec, msghdr, nfds_t, off64_t, off_t, pollfd, size_t};
use std::sync::atomic::Ordering;

/// The library's setup when it is loaded: the switch's threads are its own.
#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = init;

extern "C" fn init() {
    dsan_switch::set_thread_hook(table::mark_internal);
    // The library's locks join the switch's fork handlers, taken before
    // the switch's (the library calls the switch while holding them).
    dsan_switch::set_fork_hooks(fork_prepare, fork_release);
    // What the environment says, now: programs may clear it later (nginx's
    // workers keep only TZ).
    if let Some(p) = std::env::var_os("DSAN_SOCKET") {
        dsan_switch::set_daemon_socket(p.into());
    }
    rules::init();
    // Readiness descriptors: wake sockets with DSAN_WAKE=socket, else eventfds.
    dsan_switch::set_wake_sockets(std::env::var_os("DSAN_WAKE").is_some_and(|v| v == "socket"));
    // Connections the program that exec'd this one kept open.
    pass::adopt_kept();
    // The library's own descriptors go to the upper part of the
    // descriptor space, when there is room, so that the program's own
    // numbers stay as low as without the library.
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid out-parameter.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0 && r.rlim_cur >= 4096 {
        let base = (r.rlim_cur / 4).clamp(1024, i32::MAX as u64) as i32;
        dsan_switch::set_fd_base(base);
    }
}

fn fork_prepare() {
    wait::fork_prepare();
    table::fork_prepare();
}

fn fork_release() {
    table::fork_release();
    wait::fork_release();
}

/// At exit, the program's SAN sockets are closed as the kernel closes its
/// sockets when a process exits: their bytes are still delivered, then the
/// peer sees the end of the stream (a process that dies without exiting
/// resets them instead).
#[used]
#[link_section = ".fini_array"]
static FINI: extern "C" fn() = fini;

extern "C" fn fini() {
    let Some(_in) = table::enter() else {
        return;
    };
    for fd in table::all() {
        closing::close(fd);
    }
}

/// The switch socket behind `fd` if it is ours and the call comes from the
/// program (not from the library itself); else the call goes to `$real`.
macro_rules! ours {
    ($fd:expr, $real:expr) => {{
        if !table::maybe_ours($fd) {
            return $real;
        }
        let Some(inside) = table::enter() else {
            return $real;
        };
        match table::get($fd) {
            // A connection kept across exec is claimed on any first use.
            Some(p) if p.app.kept() => match sock::own($fd, p) {
                Some(p) => (p, inside),
                None => {
                    drop(inside);
                    return $real;
                }
            },
            Some(p) => (p, inside),
            None => {
                drop(inside);
                return $real;
            }
        }
    }};
}

/// [`ours!`], for a call that uses the connection: in a forked child, an
/// inherited connection is claimed first (see [`sock::own`]); one that is
/// a plain kernel socket now goes to `$real`.
macro_rules! ours_live {
    ($fd:expr, $real:expr) => {{
        let (p, inside) = ours!($fd, $real);
        match sock::own($fd, p) {
            Some(p) => (p, inside),
            None => {
                drop(inside);
                return $real;
            }
        }
    }};
}

fn sret(r: Result<usize, i32>) -> ssize_t {
    ret(r.map(|n| n as ssize_t))
}

extern "C" {
    /// The C library's environment (what execv and execvp pass).
    static environ: *const *const c_char;
}

/// Interposed: SAN connections that stay open across the exec go with it
/// (see [`pass::with_kept`]); the new program claims them on first use.
#[no_mangle]
pub unsafe extern "C" fn execve(
    path: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    // SAFETY: the caller's environment; the caller's arguments passed on.
    unsafe { pass::with_kept(envp, true, |env| real::execve()(path, argv, env)) }
}

/// Interposed: as [`execve`] with the process's environment.
#[no_mangle]
pub unsafe extern "C" fn execv(path: *const c_char, argv: *const *const c_char) -> c_int {
    // SAFETY: the C library's environment, read once here.
    unsafe { execve(path, argv, environ) }
}

/// Interposed: as [`execve`], searching `PATH`.
#[no_mangle]
pub unsafe extern "C" fn execvpe(
    file: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    // SAFETY: as in `execve`.
    unsafe { pass::with_kept(envp, true, |env| real::execvpe()(file, argv, env)) }
}

/// Interposed: as [`execvpe`] with the process's environment.
#[no_mangle]
pub unsafe extern "C" fn execvp(file: *const c_char, argv: *const *const c_char) -> c_int {
    // SAFETY: the C library's environment, read once here.
    unsafe { execvpe(file, argv, environ) }
}

/// Interposed: as [`execve`], of an open file.
#[no_mangle]
pub unsafe extern "C" fn fexecve(
    fd: c_int,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    // SAFETY: as in `execve`.
    unsafe { pass::with_kept(envp, true, |env| real::fexecve()(fd, argv, env)) }
}

/// Interposed: as [`execve`], for the program `posix_spawn` starts (the
/// C library's spawn calls the kernel from inside it): the connections'
/// lives and marker are made in this process and inherited by the new one,
/// and this process's copies are closed once it started.
#[no_mangle]
pub unsafe extern "C" fn posix_spawn(
    pid: *mut libc::pid_t,
    path: *const c_char,
    actions: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *mut c_char,
    envp: *const *mut c_char,
) -> c_int {
    // SAFETY: as in `execve`.
    unsafe {
        pass::with_kept(envp.cast(), false, |env| {
            real::posix_spawn()(pid, path, actions, attr, argv, env.cast())
        })
    }
}

/// Interposed: as [`posix_spawn`], searching `PATH`.
#[no_mangle]
pub unsafe extern "C" fn posix_spawnp(
    pid: *mut libc::pid_t,
    file: *const c_char,
    actions: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *mut c_char,
    envp: *const *mut c_char,
) -> c_int {
    // SAFETY: as in `execve`.
    unsafe {
        pass::with_kept(envp.cast(), false, |env| {
            real::posix_spawnp()(pid, file, actions, attr, argv, env.cast())
        })
    }
}

/// Interposed: passes to the C library (sockets are looked at when they
/// listen or connect).
#[no_mangle]
pub unsafe extern "C" fn socket(domain: c_int, ty: c_int, proto: c_int) -> c_int {
    // SAFETY: the caller's arguments, passed on.
    let fd = unsafe { real::socket()(domain, ty, proto) };
    opts::clear(fd);
    fd
}

/// Interposed: a switch socket binds its kernel socket.
#[no_mangle]
pub unsafe extern "C" fn bind(fd: c_int, a: *const sockaddr, len: socklen_t) -> c_int {
    // SAFETY: the caller's arguments, passed on.
    let (p, _in) = ours!(fd, unsafe { real::bind()(fd, a, len) });
    match p.kernel() {
        // SAFETY: the caller's arguments.
        Ok(k) => unsafe { real::bind()(k, a, len) },
        // A SAN connection without a kernel socket: connected, as the
        // kernel says of a connected socket.
        Err(libc::EBADFD) => ret(Err(libc::EINVAL)),
        Err(e) => ret(Err(e)),
    }
}

/// Interposed: an AF_INET stream socket bound to a SAN address or the
/// wildcard listens on kernel TCP and on the SAN.
#[no_mangle]
pub unsafe extern "C" fn listen(fd: c_int, backlog: c_int) -> c_int {
    let Some(_in) = table::enter() else {
        // SAFETY: plain call.
        return unsafe { real::listen()(fd, backlog) };
    };
    if let Some(p) = table::get(fd) {
        return ret(dsan_switch::listen(p.sw(), backlog).map(|_| 0));
    }
    match sock::listen_new(fd, backlog) {
        Some(r) => ret(r),
        // SAFETY: plain call.
        None => unsafe { real::listen()(fd, backlog) },
    }
}

/// Interposed: accepts SAN and kernel TCP connections of a switch listener.
#[no_mangle]
pub unsafe extern "C" fn accept(fd: c_int, a: *mut sockaddr, len: *mut socklen_t) -> c_int {
    // SAFETY: the caller's arguments, passed on.
    let (p, _in) = ours!(fd, unsafe { real::accept()(fd, a, len) });
    let Some(p) = sock::own(fd, p) else {
        // SAFETY: the caller's arguments (now a kernel listener).
        return unsafe { real::accept()(fd, a, len) };
    };
    ret(sock::accept(&p, a, len, 0))
}

/// Interposed: as [`accept`], with SOCK_NONBLOCK and SOCK_CLOEXEC.
#[no_mangle]
pub unsafe extern "C" fn accept4(
    fd: c_int,
    a: *mut sockaddr,
    len: *mut socklen_t,
    flags: c_int,
) -> c_int {
    // SAFETY: the caller's arguments, passed on.
    let (p, _in) = ours!(fd, unsafe { real::accept4()(fd, a, len, flags) });
    let Some(p) = sock::own(fd, p) else {
        // SAFETY: the caller's arguments (now a kernel listener).
        return unsafe { real::accept4()(fd, a, len, flags) };
    };
    ret(sock::accept(&p, a, len, flags))
}

/// Interposed: a connect to a SAN subnet goes over the SAN.
#[no_mangle]
pub unsafe extern "C" fn connect(fd: c_int, a: *const sockaddr, len: socklen_t) -> c_int {
    let Some(_in) = table::enter() else {
        // SAFETY: the caller's arguments, passed on.
        return unsafe { real::connect()(fd, a, len) };
    };
    // SAFETY: the caller's address buffer.
    let dst = unsafe { sock::read_dst(a, len) };
    if let Some(p) = table::get(fd) {
        return match dst {
            Some((d, _)) => ret(sock::connect_ours(fd, &p, d)),
            None => ret(Err(libc::EAFNOSUPPORT)),
        };
    }
    match dst.and_then(|(d, v6)| sock::connect_new(fd, d, v6)) {
        Some(r) => ret(r),
        // SAFETY: the caller's arguments, passed on.
        None => unsafe { real::connect()(fd, a, len) },
    }
}

/// Interposed: closing the last descriptor of a switch socket closes it.
#[no_mangle]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    // SAFETY: plain call.
    let (_p, _in) = ours!(fd, unsafe { real::close()(fd) });
    closing::close(fd)
}

/// Interposed.
#[no_mangle]
pub unsafe extern "C" fn shutdown(fd: c_int, how: c_int) -> c_int {
    // SAFETY: plain call.
    let (p, _in) = ours_live!(fd, unsafe { real::shutdown()(fd, how) });
    ret(dsan_switch::shutdown(p.sw(), how).map(|()| 0))
}

/// A caller's buffer as a slice (empty for a zero length).
///
/// # Safety
/// `buf` points to `n` bytes (or `n` is 0).
unsafe fn bytes<'a>(buf: *const c_void, n: size_t) -> &'a [u8] {
    if n == 0 || buf.is_null() {
        return &[];
    }
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts(buf.cast(), n) }
}

/// # Safety
/// `buf` points to `n` writable bytes (or `n` is 0).
unsafe fn bytes_mut<'a>(buf: *mut c_void, n: size_t) -> &'a mut [u8] {
    if n == 0 || buf.is_null() {
        return &mut [];
    }
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts_mut(buf.cast(), n) }
}

/// Interposed.
#[no_mangle]
pub unsafe extern "C" fn read(fd: c_int, buf: *mut c_void, n: size_t) -> ssize_t {
    // SAFETY: the caller's arguments, passed on.
    let (p, _in) = ours_live!(fd, unsafe { real::read()(fd, buf, n) });
    // SAFETY: the caller's buffer.
    let r = io::recv(&p, unsafe { bytes_mut(buf, n) }, 0);
    if let Some(e) = r.err().filter(|e| *e != libc::EAGAIN) {
        rules::log(|| format!("read fd {fd}: errno {e}"));
    }
    sret(r)
}

extern "C" {
    /// The C library's report of a buffer overflow caught by a fortified
    /// call: it ends the process, as the C library's own checks do.
    fn __chk_fail() -> !;
}

/// Interposed: the fortified `read` (`-D_FORTIFY_SOURCE`, as Debian builds
/// its packages): the same check as the C library's, then [`read`].
#[no_mangle]
pub unsafe extern "C" fn __read_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    buflen: size_t,
) -> ssize_t {
    if n > buflen {
        // SAFETY: the C library's overflow report; it does not return.
        unsafe { __chk_fail() }
    }
    // SAFETY: the caller's arguments, checked as the C library checks them.
    unsafe { read(fd, buf, n) }
}

/// Interposed: the fortified `recv`.
#[no_mangle]
pub unsafe extern "C" fn __recv_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    buflen: size_t,
    flags: c_int,
) -> ssize_t {
    if n > buflen {
        // SAFETY: as in `__read_chk`.
        unsafe { __chk_fail() }
    }
    // SAFETY: the caller's arguments, checked.
    unsafe { recv(fd, buf, n, flags) }
}

/// Interposed: the fortified `recvfrom`.
#[no_mangle]
pub unsafe extern "C" fn __recvfrom_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    buflen: size_t,
    flags: c_int,
    a: *mut sockaddr,
    len: *mut socklen_t,
) -> ssize_t {
    if n > buflen {
        // SAFETY: as in `__read_chk`.
        unsafe { __chk_fail() }
    }
    // SAFETY: the caller's arguments, checked.
    unsafe { recvfrom(fd, buf, n, flags, a, len) }
}

/// Interposed: the fortified `poll`.
#[no_mangle]
pub unsafe extern "C" fn __poll_chk(
    fds: *mut pollfd,
    nfds: nfds_t,
    timeout: c_int,
    fdslen: size_t,
) -> c_int {
    if (fdslen / std::mem::size_of::<pollfd>()) < nfds as usize {
        // SAFETY: as in `__read_chk`.
        unsafe { __chk_fail() }
    }
    // SAFETY: the caller's arguments, checked.
    unsafe { poll(fds, nfds, timeout) }
}

/// Interposed.
#[no_mangle]
pub unsafe extern "C" fn write(fd: c_int, buf: *const c_void, n: size_t) -> ssize_t {
    // SAFETY: the caller's arguments, passed on.
    let (p, _in) = ours_live!(fd, unsafe { real::write()(fd, buf, n) });
    // SAFETY: the caller's buffer.
    sret(io::send(&p, unsafe { bytes(buf, n) }, 0))
}

/// Interposed.
#[no_mangle]
pub unsafe extern "C" fn readv(fd: c_int, iov: *const iovec, n: c_int) -> ssize_t {
    // SAFETY: the caller's arguments, passed on.
    let (p, _in) = ours_live!(fd, unsafe { real::readv()(fd, iov, n) });
    // SAFETY: the caller's iovecs.
    sret(unsafe { io::recv_iov(&p, iov, n, 0) })
}

/// Interposed.
#[no_mangle]
pub unsafe extern "C" fn writev(fd: c_int, iov: *const iovec, n: c_int) -> ssize_t {
    // SAFETY: the caller's arguments, passed on.
    let (p, _in) = ours_live!(fd, unsafe { real::writev()(fd, iov, n) });
    // SAFETY: the caller's iovecs.
    sret(unsafe { io::send_iov(&p, iov, n, 0) })
}

/// Interposed.
#[no_mangle]
pub unsafe extern "C" fn recv(fd: c_int, buf: *mut c_void, n: size_t, flags: c_int) -> ssize_t {
    // SAFETY: the caller's arguments, passed on.
    let (p, _in) = ours_live!(fd, unsafe { real::recv()(fd, buf, n, flags) });
    // SAFETY: the caller's buffer.
    sret(io::recv(&p, unsafe { bytes_mut(buf, n) }, flags))
}

/// Interposed.
#[no_mangle]
pub unsafe extern "C" fn send(fd: c_int, buf: *const c_void, n: size_t, flags: c_int) -> ssize_t {
    // SAFETY: the caller's arguments, passed on.
    let (p, _in) = ours_live!(fd, unsafe { real::send()(fd, buf, n, flags) });
    // SAFETY: the caller's buffer.
    sret(io::send(&p, unsafe { bytes(buf, n) }, flags))
}

/// Interposed: the source is the peer.
#[no_mangle]
pub unsafe extern "C" fn recvfrom(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    flags: c_int,
    a: *mut sockaddr,
    len: *mut socklen_t,
) -> ssize_t {
    // SAFETY: the caller's arguments, passed on.
    let (p, _in) = ours_live!(fd, unsafe { real::recvfrom()(fd, buf, n, flags, a, len) });
    // SAFETY: the caller's buffer.
    let r = io::recv(&p, unsafe { bytes_mut(buf, n) }, flags);
    if r.is_ok() && !a.is_null() {
        // SAFETY: the caller's out-parameters.
        let _ = unsafe { sock::name(&p, true, a, len) };
    }
    sret(r)
}

/// Interposed: a connected socket ignores the address, as TCP does.
#[no_mangle]
pub unsafe extern "C" fn sendto(
    fd: c_int,
    buf: *const c_void,
    n: size_t,
    flags: c_int,
    a: *const sockaddr,
    len: socklen_t,
) -> ssize_t {
    // SAFETY: the caller's arguments, passed on.
    let (p, _in) = ours_live!(fd, unsafe { real::sendto()(fd, buf, n, flags, a, len) });
    // SAFETY: the caller's buffer.
    sret(io::send(&p, unsafe { bytes(buf, n) }, flags))
}

/// Interposed: no ancillary data on a SAN socket.
#[no_mangle]
pub unsafe extern "C" fn recvmsg(fd: c_int, m: *mut msghdr, flags: c_int) -> ssize_t {
    if !table::maybe_ours(fd) {
        // SAFETY: the caller's arguments, passed on.
        return unsafe { pass::recv_msg(fd, m, flags) };
    }
    // SAFETY: the caller's arguments, passed on.
    let (p, _in) = ours_live!(fd, unsafe { real::recvmsg()(fd, m, flags) });
    // SAFETY: the caller's message header.
    sret(unsafe { recv_msg(&p, m, flags) })
}

/// recvmsg on switch socket `p`.
///
/// # Safety
/// `m` is null or the caller's message header.
unsafe fn recv_msg(p: &PFd, m: *mut msghdr, flags: c_int) -> Result<usize, i32> {
    if m.is_null() {
        return Err(libc::EFAULT);
    }
    // SAFETY: the caller's message header.
    let m = unsafe { &mut *m };
    // SAFETY: the caller's iovecs.
    let r = unsafe { io::recv_iov(p, m.msg_iov, m.msg_iovlen as c_int, flags) };
    if r.is_ok() {
        if !m.msg_name.is_null() {
            // SAFETY: the caller's name buffer and its length.
            let _ = unsafe { sock::name(p, true, m.msg_name.cast(), &mut m.msg_namelen) };
        }
        m.msg_controllen = 0;
        m.msg_flags = 0;
    }
    r
}

/// sendmsg on switch socket `p`: ancillary data is refused.
///
/// # Safety
/// `m` is null or the caller's message header.
unsafe fn send_msg(p: &PFd, m: *const msghdr, flags: c_int) -> Result<usize, i32> {
    if m.is_null() {
        return Err(libc::EFAULT);
    }
    // SAFETY: the caller's message header.
    let m = unsafe { &*m };
    if m.msg_controllen != 0 {
        return Err(libc::EOPNOTSUPP);
    }
    // SAFETY: the caller's iovecs.
    unsafe { io::send_iov(p, m.msg_iov, m.msg_iovlen as c_int, flags) }
}

/// The deadline a call's timespec timeout sets (None: null, for ever).
///
/// # Safety
/// `t` is null or the caller's timespec.
unsafe fn deadline_of(t: *const timespec) -> Result<Option<std::time::Instant>, i32> {
    if t.is_null() {
        return Ok(None);
    }
    // SAFETY: the caller's timespec.
    let t = unsafe { *t };
    if t.tv_sec < 0 || !(0..1_000_000_000).contains(&t.tv_nsec) {
        return Err(libc::EINVAL);
    }
    Ok(Some(
        std::time::Instant::now() + std::time::Duration::new(t.tv_sec as u64, t.tv_nsec as u32),
    ))
}

/// Interposed: on a SAN socket, one recvmsg per message, as the kernel
/// does for a stream socket (MSG_WAITFORONE: the messages after the first
/// do not wait; the timeout is looked at after each message, as Linux's).
#[no_mangle]
pub unsafe extern "C" fn recvmmsg(
    fd: c_int,
    v: *mut libc::mmsghdr,
    n: libc::c_uint,
    flags: c_int,
    timeout: *mut timespec,
) -> c_int {
    // SAFETY: the caller's arguments, passed on.
    let (p, _in) = ours_live!(fd, unsafe { real::recvmmsg()(fd, v, n, flags, timeout) });
    if v.is_null() && n > 0 {
        return ret(Err(libc::EFAULT));
    }
    // SAFETY: the caller's timespec.
    let until = match unsafe { deadline_of(timeout) } {
        Ok(u) => u,
        Err(e) => return ret(Err(e)),
    };
    let mut f = flags & !libc::MSG_WAITFORONE;
    let mut got: c_int = 0;
    for i in 0..n.min(libc::UIO_MAXIOV as libc::c_uint) as usize {
        // SAFETY: the caller's array of `n` headers.
        let e = unsafe { &mut *v.add(i) };
        // SAFETY: the caller's message header.
        match unsafe { recv_msg(&p, &mut e.msg_hdr, f) } {
            Ok(k) => {
                e.msg_len = k as libc::c_uint;
                got += 1;
            }
            Err(e) if got == 0 => return ret(Err(e)),
            Err(_) => break,
        }
        if flags & libc::MSG_WAITFORONE != 0 {
            f |= libc::MSG_DONTWAIT;
        }
        if until.is_some_and(|d| std::time::Instant::now() >= d) {
            break;
        }
    }
    got
}

/// Interposed: on a SAN socket, one sendmsg per message.
#[no_mangle]
pub unsafe extern "C" fn sendmmsg(
    fd: c_int,
    v: *mut libc::mmsghdr,
    n: libc::c_uint,
    flags: c_int,
) -> c_int {
    // SAFETY: the caller's arguments, passed on.
    let (p, _in) = ours_live!(fd, unsafe { real::sendmmsg()(fd, v, n, flags) });
    if v.is_null() && n > 0 {
        return ret(Err(libc::EFAULT));
    }
    let mut sent: c_int = 0;
    for i in 0..n.min(libc::UIO_MAXIOV as libc::c_uint) as usize {
        // SAFETY: the caller's array of `n` headers.
        let e = unsafe { &mut *v.add(i) };
        // SAFETY: the caller's message header.
        match unsafe { send_msg(&p, &e.msg_hdr, flags) } {
            Ok(k) => {
                e.msg_len = k as libc::c_uint;
                sent += 1;
            }
            Err(e) if sent == 0 => return ret(Err(e)),
            Err(_) => break,
        }
    }
    sent
}

/// Interposed: bytes move between a pipe and a SAN socket (read from one,
/// written to the other, never lost: what the pipe cannot take stays in
/// the socket, and no more is taken from the pipe than the socket takes
/// without waiting when it must not wait).
#[no_mangle]
pub unsafe extern "C" fn splice(
    fd_in: c_int,
    off_in: *mut libc::loff_t,
    fd_out: c_int,
    off_out: *mut libc::loff_t,
    len: size_t,
    flags: libc::c_uint,
) -> ssize_t {
    let call = || {
        // SAFETY: the caller's arguments, passed on.
        unsafe { real::splice()(fd_in, off_in, fd_out, off_out, len, flags) }
    };
    if !table::maybe_ours(fd_in) && !table::maybe_ours(fd_out) {
        return call();
    }
    let Some(_in) = table::enter() else {
        return call();
    };
    let (pin, pout) = (
        table::get(fd_in).and_then(|p| sock::own(fd_in, p)),
        table::get(fd_out).and_then(|p| sock::own(fd_out, p)),
    );
    sret(match (pin, pout) {
        (None, None) => return call(),
        (Some(_), Some(_)) => Err(libc::EINVAL),
        (Some(p), None) => io::splice_to_pipe(&p, off_in, fd_out, off_out, len, flags),
        (None, Some(p)) => io::splice_from_pipe(fd_in, off_in, &p, off_out, len, flags),
    })
}

/// Interposed: ancillary data is refused on a SAN socket.
#[no_mangle]
pub unsafe extern "C" fn sendmsg(fd: c_int, m: *const msghdr, flags: c_int) -> ssize_t {
    if !table::maybe_ours(fd) {
        // SAFETY: the caller's arguments, passed on.
        return unsafe { pass::send_msg(fd, m, flags) };
    }
    // SAFETY: the caller's arguments, passed on.
    let (p, _in) = ours_live!(fd, unsafe { real::sendmsg()(fd, m, flags) });
    // SAFETY: the caller's message header.
    sret(unsafe { send_msg(&p, m, flags) })
}

/// Interposed: to a SAN socket, the file is read and sent.
#[no_mangle]
pub unsafe extern "C" fn sendfile(out: c_int, inp: c_int, off: *mut off_t, n: size_t) -> ssize_t {
    // SAFETY: the caller's arguments, passed on.
    let (p, _in) = ours_live!(out, unsafe { real::sendfile()(out, inp, off, n) });
    // SAFETY: off_t is 64-bit here; the caller's offset.
    sret(unsafe { io::sendfile(&p, inp, off.cast(), n) })
}

/// Interposed: as [`sendfile`].
#[no_mangle]
pub unsafe extern "C" fn sendfile64(
    out: c_int,
    inp: c_int,
    off: *mut off64_t,
    n: size_t,
) -> ssize_t {
    // SAFETY: the caller's arguments, passed on.
    let (p, _in) = ours_live!(out, unsafe { real::sendfile64()(out, inp, off, n) });
    // SAFETY: the caller's offset.
    sret(unsafe { io::sendfile(&p, inp, off, n) })
}

/// fcntl for both names: a duplicate of a switch socket refers to it too;
/// the rest (O_NONBLOCK included: the descriptor is shared with the
/// switch) is the kernel's.
unsafe fn fcntl_any(
    fd: c_int,
    cmd: c_int,
    arg: usize,
    f: unsafe extern "C" fn(c_int, c_int, usize) -> c_int,
) -> c_int {
    // SAFETY: the caller's arguments, passed on.
    let (p, _in) = ours!(fd, unsafe { f(fd, cmd, arg) });
    // SAFETY: the caller's arguments, passed on.
    let r = unsafe { f(fd, cmd, arg) };
    if r >= 0 && (cmd == libc::F_DUPFD || cmd == libc::F_DUPFD_CLOEXEC) {
        sock::duplicated(&p, r);
    }
    if r >= 0 && cmd == libc::F_SETFL {
        p.app
            .nonblock
            .store(arg as c_int & libc::O_NONBLOCK != 0, Ordering::Relaxed);
    }
    r
}

/// Interposed (the third argument, when there is one, is an int or a pointer).
#[no_mangle]
pub unsafe extern "C" fn fcntl(fd: c_int, cmd: c_int, arg: usize) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { fcntl_any(fd, cmd, arg, real::fcntl()) }
}

/// Interposed: as [`fcntl`].
#[no_mangle]
pub unsafe extern "C" fn fcntl64(fd: c_int, cmd: c_int, arg: usize) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { fcntl_any(fd, cmd, arg, real::fcntl64()) }
}

/// ioctl: whether the next byte to read is the urgent one.
const SIOCATMARK: libc::c_ulong = 0x8905;

/// Interposed: whether the next byte to read is the urgent one (the C
/// library's own calls its ioctl from inside, where the interposer does
/// not see it).
#[no_mangle]
pub unsafe extern "C" fn sockatmark(fd: c_int) -> c_int {
    let mut at: c_int = 0;
    // SAFETY: a valid int out-parameter.
    let r = unsafe { ioctl(fd, SIOCATMARK, (&mut at as *mut c_int) as usize) };
    if r < 0 {
        r
    } else {
        at
    }
}

/// Interposed: FIONREAD counts a SAN socket's received bytes; SIOCATMARK
/// says whether the urgent byte is next; FIONBIO,
/// FIOCLEX and FIONCLEX act on the program's descriptor; the rest are the
/// kernel socket's.
#[no_mangle]
pub unsafe extern "C" fn ioctl(fd: c_int, req: c_ulong, arg: usize) -> c_int {
    // SAFETY: the caller's arguments, passed on.
    let (p, _in) = ours_live!(fd, unsafe { real::ioctl()(fd, req, arg) });
    if req == libc::FIONREAD && p.san().is_some() {
        let ptr = arg as *mut c_int;
        if ptr.is_null() {
            return ret(Err(libc::EFAULT));
        }
        // SAFETY: the caller's int out-parameter.
        unsafe { *ptr = io::unread(&p).min(c_int::MAX as usize) as c_int };
        return 0;
    }
    if req == SIOCATMARK {
        if let Some(at) = dsan_switch::at_mark(p.sw()) {
            let ptr = arg as *mut c_int;
            if ptr.is_null() {
                return ret(Err(libc::EFAULT));
            }
            // SAFETY: the caller's int out-parameter.
            unsafe { *ptr = c_int::from(at) };
            return 0;
        }
    }
    if req == libc::FIOCLEX || req == libc::FIONCLEX {
        // Close-on-exec is the program's descriptor's own flag.
        // SAFETY: the caller's arguments, passed on.
        return unsafe { real::ioctl()(fd, req, arg) };
    }
    if req == libc::FIONBIO {
        // SAFETY: the caller's arguments, passed on (the shared descriptor).
        let r = unsafe { real::ioctl()(fd, req, arg) };
        if r == 0 {
            // SAFETY: the kernel read the caller's int just now.
            let on = unsafe { *(arg as *const c_int) } != 0;
            p.app.nonblock.store(on, Ordering::Relaxed);
        }
        return r;
    }
    match p.kernel() {
        // SAFETY: the caller's arguments, to the kernel socket.
        Ok(k) => unsafe { real::ioctl()(k, req, arg) },
        Err(libc::EBADFD) => ret(Err(libc::ENOTTY)),
        Err(e) => ret(Err(e)),
    }
}

/// Interposed.
#[no_mangle]
pub unsafe extern "C" fn setsockopt(
    fd: c_int,
    level: c_int,
    name: c_int,
    val: *const c_void,
    len: socklen_t,
) -> c_int {
    if !table::maybe_ours(fd) {
        // Kept in mind for a socket that later connects over the SAN and
        // gives its kernel socket up (`opts`).
        opts::mark(fd);
    }
    // SAFETY: the caller's arguments, passed on.
    let (p, _in) = ours_live!(fd, unsafe { real::setsockopt()(fd, level, name, val, len) });
    // SAFETY: the caller's arguments.
    ret(unsafe { sock::setsockopt(&p, level, name, val, len) })
}

/// Interposed.
#[no_mangle]
pub unsafe extern "C" fn getsockopt(
    fd: c_int,
    level: c_int,
    name: c_int,
    val: *mut c_void,
    len: *mut socklen_t,
) -> c_int {
    // SAFETY: the caller's arguments, passed on.
    let (p, _in) = ours_live!(fd, unsafe { real::getsockopt()(fd, level, name, val, len) });
    // SAFETY: the caller's arguments.
    ret(unsafe { sock::getsockopt(&p, level, name, val, len) })
}

/// Interposed.
#[no_mangle]
pub unsafe extern "C" fn getsockname(fd: c_int, a: *mut sockaddr, len: *mut socklen_t) -> c_int {
    // SAFETY: the caller's arguments, passed on.
    let (p, _in) = ours!(fd, unsafe { real::getsockname()(fd, a, len) });
    // SAFETY: the caller's out-parameters.
    ret(unsafe { sock::name(&p, false, a, len) })
}

/// Interposed.
#[no_mangle]
pub unsafe extern "C" fn getpeername(fd: c_int, a: *mut sockaddr, len: *mut socklen_t) -> c_int {
    // SAFETY: the caller's arguments, passed on.
    let (p, _in) = ours!(fd, unsafe { real::getpeername()(fd, a, len) });
    // SAFETY: the caller's out-parameters.
    ret(unsafe { sock::name(&p, true, a, len) })
}

/// Interposed: the duplicate refers to the same switch socket.
#[no_mangle]
pub unsafe extern "C" fn dup(fd: c_int) -> c_int {
    // SAFETY: plain call.
    let (p, _in) = ours!(fd, unsafe { real::dup()(fd) });
    // SAFETY: plain call.
    let r = unsafe { real::dup()(fd) };
    if r >= 0 {
        sock::duplicated(&p, r);
    }
    r
}

/// dup2 and dup3: a switch socket's number being replaced is closed first
/// (as the kernel closes it), a switch socket duplicated is recorded.
fn dup_to(old: c_int, new: c_int, flags: c_int, three: bool) -> c_int {
    let call = || {
        // SAFETY: plain calls.
        unsafe {
            if three {
                real::dup3()(old, new, flags)
            } else {
                real::dup2()(old, new)
            }
        }
    };
    if !table::maybe_ours(old) && !table::maybe_ours(new) {
        return call();
    }
    let Some(_in) = table::enter() else {
        return call();
    };
    if old == new {
        return call();
    }
    let p: Option<std::sync::Arc<PFd>> = table::get(old);
    // The kernel closes `new` as part of the call.
    let r = closing::close_as(new, call);
    if r >= 0 {
        if let Some(p) = p {
            sock::duplicated(&p, r);
        }
    }
    r
}

/// Interposed.
#[no_mangle]
pub extern "C" fn dup2(old: c_int, new: c_int) -> c_int {
    dup_to(old, new, 0, false)
}

/// Interposed.
#[no_mangle]
pub extern "C" fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int {
    dup_to(old, new, flags, true)
}

/// Whether any of the caller's pollfds is ours.
fn any_ours(fds: &[pollfd]) -> bool {
    fds.iter().any(|f| table::maybe_ours(f.fd))
}

/// Interposed.
#[no_mangle]
pub unsafe extern "C" fn poll(fds: *mut pollfd, n: nfds_t, timeout: c_int) -> c_int {
    let v: &mut [pollfd] = if n == 0 || fds.is_null() {
        &mut []
    } else {
        // SAFETY: the caller's array of `n` pollfds.
        unsafe { std::slice::from_raw_parts_mut(fds, n as usize) }
    };
    if !any_ours(v) {
        // SAFETY: the caller's arguments, passed on.
        return unsafe { real::poll()(fds, n, timeout) };
    }
    let Some(_in) = table::enter() else {
        // SAFETY: the caller's arguments, passed on.
        return unsafe { real::poll()(fds, n, timeout) };
    };
    // SAFETY: no signal mask.
    unsafe { wait::poll(v, wait::until_ms(timeout), std::ptr::null()) }
}

fn ts_deadline(ts: *const timespec) -> Option<std::time::Instant> {
    if ts.is_null() {
        return None;
    }
    // SAFETY: the caller's timespec.
    let t = unsafe { *ts };
    Some(
        std::time::Instant::now()
            + std::time::Duration::new(
                t.tv_sec.max(0) as u64,
                t.tv_nsec.clamp(0, 999_999_999) as u32,
            ),
    )
}

/// Interposed.
#[no_mangle]
pub unsafe extern "C" fn ppoll(
    fds: *mut pollfd,
    n: nfds_t,
    ts: *const timespec,
    mask: *const sigset_t,
) -> c_int {
    let v: &mut [pollfd] = if n == 0 || fds.is_null() {
        &mut []
    } else {
        // SAFETY: the caller's array of `n` pollfds.
        unsafe { std::slice::from_raw_parts_mut(fds, n as usize) }
    };
    if !any_ours(v) {
        // SAFETY: the caller's arguments, passed on.
        return unsafe { real::ppoll()(fds, n, ts, mask) };
    }
    let Some(_in) = table::enter() else {
        // SAFETY: the caller's arguments, passed on.
        return unsafe { real::ppoll()(fds, n, ts, mask) };
    };
    // SAFETY: the caller's mask.
    unsafe { wait::poll(v, ts_deadline(ts), mask) }
}

/// select and pselect over descriptors some of which are ours: as poll.
///
/// # Safety
/// The caller's sets (null or valid for `nfds` descriptors) and mask.
unsafe fn select_any(
    nfds: c_int,
    r: *mut fd_set,
    w: *mut fd_set,
    x: *mut fd_set,
    until: Option<std::time::Instant>,
    mask: *const sigset_t,
) -> c_int {
    let nfds = nfds.clamp(0, libc::FD_SETSIZE as c_int);
    let is_set = |s: *mut fd_set, fd: c_int| {
        // SAFETY: a caller's set (checked non-null) and a descriptor below FD_SETSIZE.
        !s.is_null() && unsafe { libc::FD_ISSET(fd, s) }
    };
    let mut fds: Vec<pollfd> = Vec::new();
    for fd in 0..nfds {
        let mut ev = 0;
        if is_set(r, fd) {
            ev |= libc::POLLIN;
        }
        if is_set(w, fd) {
            ev |= libc::POLLOUT;
        }
        if is_set(x, fd) {
            ev |= libc::POLLPRI;
        }
        if ev != 0 {
            fds.push(pollfd {
                fd,
                events: ev,
                revents: 0,
            });
        }
    }
    // SAFETY: the caller's mask.
    let n = unsafe { wait::poll(&mut fds, until, mask) };
    if n < 0 {
        return n;
    }
    for s in [r, w, x] {
        if !s.is_null() {
            // SAFETY: a caller's set.
            unsafe { libc::FD_ZERO(s) };
        }
    }
    let mut count = 0;
    for f in &fds {
        if f.revents & libc::POLLNVAL != 0 {
            rules::log(|| format!("select: fd {} is not open", f.fd));
            return ret(Err(libc::EBADF));
        }
        let rd = f.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
            && f.events & libc::POLLIN != 0;
        let wr = f.revents & (libc::POLLOUT | libc::POLLERR) != 0 && f.events & libc::POLLOUT != 0;
        let ex = f.revents & libc::POLLPRI != 0 && f.events & libc::POLLPRI != 0;
        for (on, s) in [(rd, r), (wr, w), (ex, x)] {
            if on {
                // SAFETY: a caller's set (non-null: the descriptor was asked for in it).
                unsafe { libc::FD_SET(f.fd, s) };
                count += 1;
            }
        }
    }
    count
}

fn sets_ours(nfds: c_int, sets: [*mut fd_set; 3]) -> bool {
    (0..nfds.clamp(0, libc::FD_SETSIZE as c_int)).any(|fd| {
        table::maybe_ours(fd)
            && sets
                .iter()
                // SAFETY: a caller's set (non-null) and a descriptor below FD_SETSIZE.
                .any(|s| !s.is_null() && unsafe { libc::FD_ISSET(fd, *s) })
    })
}

/// Interposed.
#[no_mangle]
pub unsafe extern "C" fn select(
    nfds: c_int,
    r: *mut fd_set,
    w: *mut fd_set,
    x: *mut fd_set,
    tv: *mut timeval,
) -> c_int {
    if !sets_ours(nfds, [r, w, x]) {
        // SAFETY: the caller's arguments, passed on.
        return unsafe { real::select()(nfds, r, w, x, tv) };
    }
    let Some(_in) = table::enter() else {
        // SAFETY: the caller's arguments, passed on.
        return unsafe { real::select()(nfds, r, w, x, tv) };
    };
    let until = if tv.is_null() {
        None
    } else {
        // SAFETY: the caller's timeval.
        let t = unsafe { *tv };
        Some(
            std::time::Instant::now()
                + std::time::Duration::new(
                    t.tv_sec.max(0) as u64,
                    (t.tv_usec.clamp(0, 999_999) * 1000) as u32,
                ),
        )
    };
    // SAFETY: the caller's sets.
    let n = unsafe { select_any(nfds, r, w, x, until, std::ptr::null()) };
    if let (false, Some(d)) = (tv.is_null(), until) {
        // Linux leaves the time not slept in the timeval.
        let l = d.saturating_duration_since(std::time::Instant::now());
        // SAFETY: the caller's timeval.
        unsafe {
            (*tv).tv_sec = l.as_secs() as libc::time_t;
            (*tv).tv_usec = libc::suseconds_t::from(l.subsec_micros() as i32);
        }
    }
    n
}

/// Interposed.
#[no_mangle]
pub unsafe extern "C" fn pselect(
    nfds: c_int,
    r: *mut fd_set,
    w: *mut fd_set,
    x: *mut fd_set,
    ts: *const timespec,
    mask: *const sigset_t,
) -> c_int {
    if !sets_ours(nfds, [r, w, x]) {
        // SAFETY: the caller's arguments, passed on.
        return unsafe { real::pselect()(nfds, r, w, x, ts, mask) };
    }
    let Some(_in) = table::enter() else {
        // SAFETY: the caller's arguments, passed on.
        return unsafe { real::pselect()(nfds, r, w, x, ts, mask) };
    };
    // SAFETY: the caller's sets and mask.
    unsafe { select_any(nfds, r, w, x, ts_deadline(ts), mask) }
}

/// Interposed: passes to the C library.
#[no_mangle]
pub unsafe extern "C" fn epoll_create(size: c_int) -> c_int {
    // SAFETY: plain call.
    unsafe { real::epoll_create()(size) }
}

/// Interposed: passes to the C library.
#[no_mangle]
pub unsafe extern "C" fn epoll_create1(flags: c_int) -> c_int {
    // SAFETY: plain call.
    unsafe { real::epoll_create1()(flags) }
}

/// Interposed: a switch socket is registered by what the kernel waits on for it.
#[no_mangle]
pub unsafe extern "C" fn epoll_ctl(ep: c_int, op: c_int, fd: c_int, ev: *mut epoll_event) -> c_int {
    // SAFETY: the caller's arguments, passed on.
    let (p, _in) = ours!(fd, unsafe { real::epoll_ctl()(ep, op, fd, ev) });
    let p = match op {
        libc::EPOLL_CTL_DEL => p,
        _ => match sock::own(fd, p) {
            Some(p) => p,
            // SAFETY: the caller's arguments (now a kernel listener).
            None => return unsafe { real::epoll_ctl()(ep, op, fd, ev) },
        },
    };
    // SAFETY: the caller's event (read unaligned: epoll_event is packed).
    let e = (!ev.is_null()).then(|| unsafe { std::ptr::read_unaligned(ev) });
    let r = wait::epoll_ctl(ep, op, fd, &p, e);
    if let Err(err) = r {
        rules::log(|| format!("epoll_ctl({ep}, {op}, fd {fd}): errno {err}"));
    }
    ret(r.map(|()| 0))
}

/// Interposed: events of switch sockets are given the program's data back.
#[no_mangle]
pub unsafe extern "C" fn epoll_wait(
    ep: c_int,
    evs: *mut epoll_event,
    max: c_int,
    timeout: c_int,
) -> c_int {
    let Some(_in) = table::enter() else {
        // SAFETY: the caller's arguments, passed on.
        return unsafe { real::epoll_wait()(ep, evs, max, timeout) };
    };
    // SAFETY: the caller's buffer.
    unsafe { wait::epoll_wait(ep, evs, max, timeout, std::ptr::null()) }
}

/// Interposed: as [`epoll_wait`].
#[no_mangle]
pub unsafe extern "C" fn epoll_pwait(
    ep: c_int,
    evs: *mut epoll_event,
    max: c_int,
    timeout: c_int,
    mask: *const sigset_t,
) -> c_int {
    let Some(_in) = table::enter() else {
        // SAFETY: the caller's arguments, passed on.
        return unsafe { real::epoll_pwait()(ep, evs, max, timeout, mask) };
    };
    // SAFETY: the caller's buffer and mask.
    unsafe { wait::epoll_wait(ep, evs, max, timeout, mask) }
}

/// Interposed: as [`epoll_pwait`], with a timeout in nanoseconds.
#[no_mangle]
pub unsafe extern "C" fn epoll_pwait2(
    ep: c_int,
    evs: *mut epoll_event,
    max: c_int,
    timeout: *const timespec,
    mask: *const sigset_t,
) -> c_int {
    let Some(_in) = table::enter() else {
        // SAFETY: the caller's arguments, passed on.
        return unsafe { real::epoll_pwait2()(ep, evs, max, timeout, mask) };
    };
    // SAFETY: the caller's timespec.
    let until = match unsafe { deadline_of(timeout) } {
        Ok(u) => u,
        Err(e) => return ret(Err(e)),
    };
    // SAFETY: the caller's buffer and mask.
    unsafe { wait::epoll_wait_until(ep, evs, max, until, mask) }
}

/// Interposed: the child keeps its descriptors; a SAN connection it uses
/// is claimed from the parent's attachment (both keep holding it; it ends
/// with the last close), a listener is listened on again by the child when
/// it first uses it (taking the SAN side over from the parent), and the
/// child's new sockets get SAN sockets of its own.
#[no_mangle]
pub unsafe extern "C" fn fork() -> libc::pid_t {
    // SAFETY: plain call.
    let pid = unsafe { real::fork()() };
    if pid == 0 {
        table::mark_inherited();
    }
    pid
}
