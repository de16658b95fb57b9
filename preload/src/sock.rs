//! Socket lifecycle on the switch: when a program's socket becomes a
//! switch socket (listen on a SAN address or the wildcard, connect to a
//! SAN subnet), accept, connect, close, dup, options and names.
//!
//! A program's descriptor keeps its number: the switch socket's descriptor
//! (an epoll instance that polls readable when the socket has something to
//! receive or accept) is duplicated onto it, and the program's kernel
//! socket lives on as the switch socket's kernel TCP side (with its bound
//! address and options).
#![allow(unsafe_code)] // the caller's socket addresses and the kernel's calls: each block with a SAFETY comment

use crate::cret::{errno, kernel_result};
use crate::real;
use crate::rules::{self, Action, Role};
use crate::table::{self, PFd, State};
use dsan_provider::sockaddr::{from_sockaddr_in, sockaddr_in};
use dsan_switch::Transport;
use libc::{c_int, sockaddr, socklen_t};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The IPv4 address in a caller's sockaddr, if it is one.
///
/// # Safety
/// `a` is null or points to `len` readable bytes.
pub(crate) unsafe fn read_v4(a: *const sockaddr, len: socklen_t) -> Option<SocketAddrV4> {
    if a.is_null() || (len as usize) < std::mem::size_of::<libc::sockaddr_in>() {
        return None;
    }
    // SAFETY: the caller's buffer holds a sockaddr_in (checked length); read
    // unaligned, as callers pass any buffer.
    let sin: libc::sockaddr_in = unsafe { std::ptr::read_unaligned(a.cast()) };
    (i32::from(sin.sin_family) == libc::AF_INET).then(|| from_sockaddr_in(&sin))
}

/// An IPv4 destination from a caller's address: a `sockaddr_in`, or a
/// `sockaddr_in6` holding a v4-mapped address (an IPv6 socket reaching an
/// IPv4 peer, as Java's and other dual-stack clients do); with whether it
/// was the latter.
///
/// # Safety
/// `a` is null or points to `len` readable bytes.
pub(crate) unsafe fn read_dst(a: *const sockaddr, len: socklen_t) -> Option<(SocketAddrV4, bool)> {
    // SAFETY: the caller's contract.
    if let Some(v4) = unsafe { read_v4(a, len) } {
        return Some((v4, false));
    }
    if a.is_null() || (len as usize) < std::mem::size_of::<libc::sockaddr_in6>() {
        return None;
    }
    // SAFETY: the caller's buffer holds a sockaddr_in6 (checked length).
    let s6: libc::sockaddr_in6 = unsafe { std::ptr::read_unaligned(a.cast()) };
    if i32::from(s6.sin6_family) != libc::AF_INET6 {
        return None;
    }
    let ip = std::net::Ipv6Addr::from(s6.sin6_addr.s6_addr).to_ipv4_mapped()?;
    Some((SocketAddrV4::new(ip, u16::from_be(s6.sin6_port)), true))
}

/// Writes `v` to a caller's sockaddr out-parameters (truncated to its
/// length, which is set to the full length), as the kernel does.
///
/// # Safety
/// `a` and `len` are null or valid out-parameters of `*len` bytes.
pub(crate) unsafe fn write_v4(v: SocketAddrV4, a: *mut sockaddr, len: *mut socklen_t) {
    if a.is_null() || len.is_null() {
        return;
    }
    let sin = sockaddr_in(v);
    let full = std::mem::size_of::<libc::sockaddr_in>();
    // SAFETY: `len` is valid (caller).
    let room = unsafe { *len } as usize;
    // SAFETY: `a` has `room` writable bytes; we copy at most that many.
    unsafe {
        std::ptr::copy_nonoverlapping(
            (&sin as *const libc::sockaddr_in).cast::<u8>(),
            a.cast::<u8>(),
            room.min(full),
        );
        *len = full as socklen_t;
    }
}

/// Writes `v` as the kernel names an IPv4 peer to an AF_INET6 socket (a
/// v4-mapped `::ffff:a.b.c.d` in a sockaddr_in6) when `v6`, else as
/// [`write_v4`] does.
///
/// # Safety
/// As [`write_v4`].
pub(crate) unsafe fn write_addr(v: SocketAddrV4, v6: bool, a: *mut sockaddr, len: *mut socklen_t) {
    if !v6 {
        // SAFETY: the caller's contract.
        return unsafe { write_v4(v, a, len) };
    }
    if a.is_null() || len.is_null() {
        return;
    }
    // SAFETY: sockaddr_in6 is plain data; zeroed is valid.
    let mut sin6: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    sin6.sin6_port = v.port().to_be();
    sin6.sin6_addr.s6_addr = v.ip().to_ipv6_mapped().octets();
    let full = std::mem::size_of::<libc::sockaddr_in6>();
    // SAFETY: `len` is valid (caller).
    let room = unsafe { *len } as usize;
    // SAFETY: `a` has `room` writable bytes; we copy at most that many.
    unsafe {
        std::ptr::copy_nonoverlapping(
            (&sin6 as *const libc::sockaddr_in6).cast::<u8>(),
            a.cast::<u8>(),
            room.min(full),
        );
        *len = full as socklen_t;
    }
}

/// The IPv4 address a listener on `fd` serves: its bound IPv4 address, or
/// for an AF_INET6 socket bound to `::` without IPV6_V6ONLY (a dual-stack
/// listener) the IPv4 wildcard, or for one bound to a v4-mapped address
/// that address; with whether the socket is AF_INET6.
fn listen_name(fd: RawFd) -> Option<(SocketAddrV4, bool)> {
    if let Some(v4) = name_of(fd) {
        return Some((v4, false));
    }
    // SAFETY: sockaddr_in6 is plain data; zeroed is valid.
    let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in6>() as socklen_t;
    // SAFETY: valid out-buffers.
    let r =
        unsafe { real::getsockname()(fd, (&mut sa as *mut libc::sockaddr_in6).cast(), &mut len) };
    if r != 0 || i32::from(sa.sin6_family) != libc::AF_INET6 {
        return None;
    }
    let port = u16::from_be(sa.sin6_port);
    let ip = std::net::Ipv6Addr::from(sa.sin6_addr.s6_addr);
    let v4 = if ip.is_unspecified() {
        (int_opt(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY) == Some(0))
            .then_some(Ipv4Addr::UNSPECIFIED)?
    } else {
        ip.to_ipv4_mapped()?
    };
    Some((SocketAddrV4::new(v4, port), true))
}

fn int_opt(fd: RawFd, level: c_int, name: c_int) -> Option<c_int> {
    let mut v: c_int = 0;
    let mut len = std::mem::size_of::<c_int>() as socklen_t;
    // SAFETY: a valid out-buffer and length.
    let r = unsafe { real::getsockopt()(fd, level, name, (&mut v as *mut c_int).cast(), &mut len) };
    (r == 0).then_some(v)
}

/// Whether `fd` is a kernel TCP (stream) socket.
fn is_stream(fd: RawFd) -> bool {
    int_opt(fd, libc::SOL_SOCKET, libc::SO_TYPE) == Some(libc::SOCK_STREAM)
}

fn name_of(fd: RawFd) -> Option<SocketAddrV4> {
    let mut sa = sockaddr_in(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as socklen_t;
    // SAFETY: valid out-buffers.
    let r =
        unsafe { real::getsockname()(fd, (&mut sa as *mut libc::sockaddr_in).cast(), &mut len) };
    (r == 0 && i32::from(sa.sin_family) == libc::AF_INET).then(|| from_sockaddr_in(&sa))
}

fn fl(fd: RawFd) -> c_int {
    // SAFETY: F_GETFL has no argument.
    unsafe { real::fcntl()(fd, libc::F_GETFL, 0) }
}

fn set_fl(fd: RawFd, flags: c_int) {
    // SAFETY: F_SETFL with an int argument.
    unsafe { real::fcntl()(fd, libc::F_SETFL, flags as usize) };
}

fn cloexec(fd: RawFd) -> bool {
    // SAFETY: F_GETFD has no argument.
    unsafe { real::fcntl()(fd, libc::F_GETFD, 0) & libc::FD_CLOEXEC != 0 }
}

/// A copy of `fd` (close-on-exec), owned.
fn dup_owned(fd: RawFd) -> Result<OwnedFd, i32> {
    // SAFETY: F_DUPFD_CLOEXEC with an int argument.
    let d = unsafe { real::fcntl()(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if d < 0 {
        return Err(errno());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(dsan_switch::high(unsafe { OwnedFd::from_raw_fd(d) }))
}

/// Puts switch socket `sw` in the place of program descriptor `fd` (same
/// number, the program's O_NONBLOCK `nonblock` and close-on-exec), and
/// records it. `nonblock` is read before the switch touched the kernel
/// socket: its listen makes that socket nonblocking, and the program's
/// descriptor shares the socket's flags until it is replaced here.
fn take_over(fd: RawFd, sw: RawFd, state: State, nonblock: c_int) -> Result<Arc<PFd>, i32> {
    let nonblock = nonblock & libc::O_NONBLOCK;
    set_fl(sw, (fl(sw) & !libc::O_NONBLOCK) | nonblock);
    let flags = if cloexec(fd) { libc::O_CLOEXEC } else { 0 };
    // SAFETY: two valid descriptors; `fd` is replaced atomically.
    if unsafe { real::dup3()(sw, fd, flags) } < 0 {
        return Err(errno());
    }
    let p = table::take(sw, state).ok_or(libc::EBADF)?;
    p.app.nonblock.store(nonblock != 0, Ordering::Relaxed);
    table::insert(fd, p.clone());
    Ok(p)
}

/// `listen` on a descriptor that is not ours yet. `None`: the kernel's
/// call is the right one (not an AF_INET stream socket, a `tcp` rule, a
/// forked child).
pub(crate) fn listen_new(fd: RawFd, backlog: c_int) -> Option<Result<c_int, i32>> {
    if !is_stream(fd) {
        return None;
    }
    let (bound, v6) = listen_name(fd)?;
    let (action, rule) = rules::decide(Role::Server, bound);
    if action == Action::Tcp {
        rules::log(|| {
            format!(
                "listen fd {fd} {bound}: kernel TCP (rule on line {})",
                rule.unwrap_or(0)
            )
        });
        return None;
    }
    let flags = fl(fd);
    let sw = match dup_owned(fd).and_then(dsan_switch::adopt) {
        Ok(sw) => sw,
        Err(e) => return Some(Err(e)),
    };
    // Options the program set before listen go to the SAN side too.
    if crate::opts::take_mark(fd) {
        if let Some(r) = dsan_switch::app::record(sw) {
            r.app.opts_set.store(true, Ordering::Relaxed);
        }
    }
    match dsan_switch::listen(sw, backlog) {
        Ok(true) => {
            let r = take_over(fd, sw, State::Listening, flags).map(|p| {
                *p.app.local.lock().unwrap_or_else(|e| e.into_inner()) = Some(bound);
                p.app.backlog.store(backlog, Ordering::Relaxed);
                p.app.v6.store(v6, Ordering::Relaxed);
                crate::opts::keep_for_accepted(&p);
                0
            });
            if r.is_err() {
                let _ = dsan_switch::close(sw);
            }
            rules::log(|| format!("listen fd {fd} {bound}: kernel TCP and SAN"));
            Some(r)
        }
        Ok(false) => {
            // No SAN side (not a SAN address, or no daemon): the kernel
            // socket, listening now, serves alone, as the program left it.
            let _ = dsan_switch::close(sw);
            set_fl(fd, flags);
            rules::log(|| format!("listen fd {fd} {bound}: kernel TCP (no SAN here)"));
            Some(Ok(0))
        }
        Err(e) => {
            let _ = dsan_switch::close(sw);
            set_fl(fd, flags);
            Some(Err(e))
        }
    }
}

/// `connect` on a descriptor that is not ours yet. `None`: the kernel's
/// call is the right one.
pub(crate) fn connect_new(fd: RawFd, dst: SocketAddrV4, v6: bool) -> Option<Result<c_int, i32>> {
    if dst.ip().is_loopback() || !is_stream(fd) {
        return None;
    }
    // An IPv6 socket that may not reach IPv4 peers is the kernel's to refuse.
    if v6 && int_opt(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY) != Some(0) {
        return None;
    }
    let (action, rule) = rules::decide(Role::Client, dst);
    if action == Action::Tcp {
        rules::log(|| {
            format!(
                "connect fd {fd} {dst}: kernel TCP (rule on line {})",
                rule.unwrap_or(0)
            )
        });
        return None;
    }
    if !dsan_switch::san_destination(*dst.ip()) {
        rules::log(|| format!("connect fd {fd} {dst}: kernel TCP (not a SAN destination)"));
        return None;
    }
    // A lean socket: the program's number becomes the socket's eventfd
    // (its kernel socket lives on, moved, until a SAN connection serves it).
    let nonblock = fl(fd) & libc::O_NONBLOCK != 0;
    let cloexec = cloexec(fd);
    let sw = match dup_owned(fd).and_then(|k| dsan_switch::adopt_lean(k, fd, nonblock, cloexec)) {
        Ok(sw) => sw,
        Err(e) => return Some(Err(e)),
    };
    let _ = dsan_switch::set_san_only(sw, action == Action::San);
    let Some(p) = table::take(sw, State::Connecting) else {
        return Some(Err(libc::EBADF));
    };
    p.app.nonblock.store(nonblock, Ordering::Relaxed);
    p.app.v6.store(v6, Ordering::Relaxed);
    if crate::opts::take_mark(fd) {
        p.app.opts_set.store(true, Ordering::Relaxed);
    }
    table::insert(fd, p.clone());
    *p.app.peer.lock().unwrap_or_else(|e| e.into_inner()) = Some(dst);
    Some(connect_ours(fd, &p, dst))
}

/// `connect` on a switch socket (the switch moves the socket's state).
pub(crate) fn connect_ours(fd: RawFd, p: &Arc<PFd>, dst: SocketAddrV4) -> Result<c_int, i32> {
    let r = dsan_switch::connect(p.sw(), dst);
    match r {
        Ok(t) => {
            rules::log(|| format!("connect fd {fd} {dst}: {}", transport_name(t)));
            Ok(0)
        }
        Err(libc::EINPROGRESS) => {
            rules::log(|| format!("connect fd {fd} {dst}: in progress (SAN first)"));
            Err(libc::EINPROGRESS)
        }
        Err(e @ (libc::EALREADY | libc::EISCONN)) => Err(e),
        Err(e) => {
            rules::log(|| format!("connect fd {fd} {dst}: failed, errno {e}"));
            Err(e)
        }
    }
}

fn transport_name(t: Transport) -> &'static str {
    match t {
        Transport::San => "SAN",
        Transport::Tcp => "kernel TCP (fallback)",
    }
}

/// `accept4` on a listening switch socket.
pub(crate) fn accept(
    p: &PFd,
    addr: *mut sockaddr,
    len: *mut socklen_t,
    flags: c_int,
) -> Result<c_int, i32> {
    if flags & !(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) != 0 {
        return Err(libc::EINVAL);
    }
    if p.app.state() != State::Listening {
        return Err(libc::EINVAL);
    }
    let nonblock = flags & libc::SOCK_NONBLOCK != 0;
    let cloexec = flags & libc::SOCK_CLOEXEC != 0;
    let (nfd, peer) = dsan_switch::accept_lean(p.sw(), nonblock, cloexec)?;
    let fd = match dsan_switch::take_tcp(nfd) {
        Ok(tcp) => {
            // A kernel TCP connection: the program gets the kernel socket.
            use std::os::fd::IntoRawFd;
            let fd = tcp.into_raw_fd();
            if p.app.v6.load(Ordering::Relaxed) {
                // An IPv6 (or v4-mapped) client of a dual-stack listener:
                // its name as the kernel gives it.
                // SAFETY: a valid socket and the caller's out-parameters.
                unsafe { real::getpeername()(fd, addr, len) };
            }
            if nonblock {
                set_fl(fd, fl(fd) | libc::O_NONBLOCK);
            }
            if !cloexec {
                // SAFETY: F_SETFD with an int argument.
                unsafe { real::fcntl()(fd, libc::F_SETFD, 0) };
            }
            fd
        }
        Err(_) => {
            // A lean SAN connection: `nfd` is the program's descriptor.
            let fd = nfd;
            let np = table::take(nfd, State::Connected).ok_or(libc::EBADF)?;
            np.app.nonblock.store(nonblock, Ordering::Relaxed);
            np.app
                .v6
                .store(p.app.v6.load(Ordering::Relaxed), Ordering::Relaxed);
            *np.app.peer.lock().unwrap_or_else(|e| e.into_inner()) = Some(peer);
            *np.app.local.lock().unwrap_or_else(|e| e.into_inner()) =
                *p.app.local.lock().unwrap_or_else(|e| e.into_inner());
            crate::opts::inherit(p, &np);
            table::insert(fd, np);
            rules::log(|| format!("accept: fd {fd} from {peer} over the SAN"));
            fd
        }
    };
    if !(p.app.v6.load(Ordering::Relaxed) && table::get(fd).is_none()) {
        // SAFETY: the caller's out-parameters.
        unsafe { write_addr(peer, p.app.v6.load(Ordering::Relaxed), addr, len) };
    }
    Ok(fd)
}

/// A new program descriptor `nfd` refers to the same socket as `p`.
pub(crate) fn duplicated(p: &Arc<PFd>, nfd: RawFd) {
    p.app.refs.fetch_add(1, Ordering::AcqRel);
    table::insert(nfd, p.clone());
}

/// The kernel socket behind `p` for options and names.
fn kernel(p: &PFd) -> Result<RawFd, i32> {
    p.kernel().inspect_err(|e| {
        rules::log(|| {
            format!(
                "switch socket {} ({:?}): no kernel socket: errno {e}",
                p.sw(),
                p.app.state()
            )
        })
    })
}

/// `getsockopt` on a switch socket.
///
/// # Safety
/// `val` and `len` are the caller's out-parameters.
pub(crate) unsafe fn getsockopt(
    p: &PFd,
    level: c_int,
    name: c_int,
    val: *mut libc::c_void,
    len: *mut socklen_t,
) -> Result<c_int, i32> {
    let int = |v: c_int| -> Result<c_int, i32> {
        if val.is_null() || len.is_null() {
            return Err(libc::EFAULT);
        }
        // SAFETY: the caller's out-parameters; we write at most *len bytes.
        unsafe {
            let n = (*len as usize).min(4);
            std::ptr::copy_nonoverlapping((&v as *const c_int).cast::<u8>(), val.cast::<u8>(), n);
            *len = 4;
        }
        Ok(0)
    };
    if level == libc::SOL_SOCKET {
        match name {
            libc::SO_ERROR => {
                p.settle();
                let e = p.app.so_error.swap(0, Ordering::AcqRel);
                if e != 0 {
                    return int(e);
                }
                if let Some(ss) = p.san() {
                    let r = ss.readiness(false, false);
                    return int(if r.dead { -r.error } else { 0 });
                }
            }
            libc::SO_TYPE => return int(libc::SOCK_STREAM),
            libc::SO_DOMAIN => {
                return int(if p.app.v6.load(Ordering::Relaxed) {
                    libc::AF_INET6
                } else {
                    libc::AF_INET
                })
            }
            libc::SO_PROTOCOL => return int(libc::IPPROTO_TCP),
            libc::SO_ACCEPTCONN => return int(c_int::from(p.app.state() == State::Listening)),
            _ => {}
        }
    }
    if (level, name) == (libc::IPPROTO_TCP, libc::TCP_INFO) {
        if let Some(i) = p.san().and_then(|ss| ss.stream_info()) {
            if val.is_null() || len.is_null() {
                return Err(libc::EFAULT);
            }
            let t = tcp_info(&i);
            // SAFETY: the caller's out-parameters; we write at most *len bytes.
            unsafe {
                let n = (*len as usize).min(std::mem::size_of::<libc::tcp_info>());
                std::ptr::copy_nonoverlapping(
                    (&t as *const libc::tcp_info).cast::<u8>(),
                    val.cast::<u8>(),
                    n,
                );
                *len = n as socklen_t;
            }
            return Ok(0);
        }
    }
    let r = match p.kernel() {
        // SAFETY: the caller's parameters, passed on.
        Ok(k) => kernel_result(unsafe { real::getsockopt()(k, level, name, val, len) })?,
        // SAFETY: the caller's parameters, passed on.
        Err(libc::EBADFD) => unsafe { crate::opts::get(p, level, name, val, len) }?,
        Err(e) => {
            rules::log(|| {
                format!(
                    "getsockopt {level}/{name} on switch socket {}: errno {e}",
                    p.sw()
                )
            });
            return Err(e);
        }
    };
    // TCP_INFO of a SAN connection: the kernel socket behind it never
    // connected, so its state says CLOSE; the connection's own state goes in
    // (its first byte, `tcpi_state`), as Linux reports it.
    if level == libc::IPPROTO_TCP && name == libc::TCP_INFO && !val.is_null() && !len.is_null() {
        if let Some(ss) = p.san() {
            let rd = ss.readiness(false, false);
            // linux/tcp_states.h
            let state: u8 = if rd.dead {
                7 // TCP_CLOSE
            } else if rd.peer_closed {
                8 // TCP_CLOSE_WAIT
            } else {
                1 // TCP_ESTABLISHED
            };
            // SAFETY: the kernel filled *len (> 0 checked) bytes of `val`.
            unsafe {
                if *len > 0 {
                    *val.cast::<u8>() = state;
                }
            }
        }
    }
    Ok(r)
}

/// What TCP_INFO says of a SAN connection, in Linux's terms: the state
/// (ESTABLISHED; CLOSE_WAIT once the peer's FIN came; FIN_WAIT1/2 after
/// a shutdown of sending, as the peer acknowledged; LAST_ACK, then CLOSE,
/// with both; CLOSE once gone), the mss, the windows (the rings), the byte counts
/// (`tcpi_bytes_acked` counts the SYN, as Linux's does), what is not
/// acknowledged yet. Round-trip times are not measured (0).
fn tcp_info(i: &dsan_provider::StreamInfo) -> libc::tcp_info {
    // SAFETY: tcp_info is plain data; zeroed is valid.
    let mut t: libc::tcp_info = unsafe { std::mem::zeroed() };
    let all_acked = i.acked == i.written;
    t.tcpi_state = match (i.dead, i.shut_wr, i.peer_closed) {
        (true, ..) => 7,                        // TCP_CLOSE
        (false, false, false) => 1,             // TCP_ESTABLISHED
        (false, false, true) => 8,              // TCP_CLOSE_WAIT
        (false, true, false) if all_acked => 5, // TCP_FIN_WAIT2
        (false, true, false) => 4,              // TCP_FIN_WAIT1
        (false, true, true) if all_acked => 7,  // both sides done: TCP_CLOSE
        (false, true, true) => 9,               // TCP_LAST_ACK
    };
    t.tcpi_snd_mss = i.mss;
    t.tcpi_rcv_mss = i.mss;
    t.tcpi_advmss = i.mss;
    t.tcpi_pmtu = i.mss + 40;
    t.tcpi_rcv_space = i.rcv_size;
    t.tcpi_rcv_ssthresh = i.rcv_size;
    t.tcpi_snd_cwnd = (i.snd_size / i.mss.max(1)).max(1);
    t.tcpi_snd_ssthresh = t.tcpi_snd_cwnd;
    let unacked = i.written - i.acked;
    t.tcpi_unacked = unacked.div_ceil(u64::from(i.mss.max(1))) as u32;
    t.tcpi_bytes_acked = i.acked + 1;
    t.tcpi_bytes_received = i.received;
    t
}

/// `setsockopt` on a switch socket: the kernel socket takes it (it serves
/// kernel TCP, and its options are the socket's).
///
/// # Safety
/// `val` points to `len` readable bytes (or is null).
pub(crate) unsafe fn setsockopt(
    p: &PFd,
    level: c_int,
    name: c_int,
    val: *const libc::c_void,
    len: socklen_t,
) -> Result<c_int, i32> {
    match p.kernel() {
        Ok(k) => {
            // SAFETY: the caller's parameters, passed on.
            let r = kernel_result(unsafe { real::setsockopt()(k, level, name, val, len) })?;
            p.app.opts_set.store(true, Ordering::Relaxed);
            if p.app.state() == State::Listening {
                crate::opts::keep_for_accepted(p);
            }
            if level == libc::SOL_SOCKET && name == libc::SO_LINGER {
                let _ = dsan_switch::set_linger_abort(p.sw(), false);
            }
            oob_inline(p, level, name, val, len);
            // SAFETY: the kernel read these bytes just now.
            unsafe { to_san(p, level, name, val, len) };
            Ok(r)
        }
        Err(libc::EBADFD) => {
            // SAFETY: the caller's parameters, passed on.
            let r = unsafe { crate::opts::set(p, level, name, val, len) }?;
            oob_inline(p, level, name, val, len);
            // SAFETY: as above (its stand-in read them).
            unsafe { to_san(p, level, name, val, len) };
            Ok(r)
        }
        Err(e) => Err(e),
    }
}

/// An option just set on `p` reaches its SAN connection too (see
/// `dsan_switch::Socket::set_san_option`).
///
/// # Safety
/// `val` points to `len` readable bytes (or is null).
unsafe fn to_san(p: &PFd, level: c_int, name: c_int, val: *const libc::c_void, len: socklen_t) {
    if val.is_null() || (len as usize) < std::mem::size_of::<c_int>() {
        return;
    }
    // SAFETY: the caller's `len` readable bytes (at most 8 read).
    let b = unsafe { std::slice::from_raw_parts(val.cast::<u8>(), (len as usize).min(8)) };
    p.set_san_option(level, name, b);
}

/// SO_OOBINLINE, just set on `p`: its SAN connection keeps the urgent
/// byte in the stream (or not) too.
fn oob_inline(p: &PFd, level: c_int, name: c_int, val: *const libc::c_void, len: socklen_t) {
    if (level, name) != (libc::SOL_SOCKET, libc::SO_OOBINLINE)
        || val.is_null()
        || (len as usize) < std::mem::size_of::<c_int>()
    {
        return;
    }
    // SAFETY: the kernel (or its stand-in) read this int just now.
    let on = unsafe { std::ptr::read_unaligned(val.cast::<c_int>()) } != 0;
    dsan_switch::set_oob_inline(p.sw(), on);
}

/// `getsockname` / `getpeername` on a switch socket.
///
/// # Safety
/// `a` and `len` are the caller's out-parameters.
pub(crate) unsafe fn name(
    p: &PFd,
    peer: bool,
    a: *mut sockaddr,
    len: *mut socklen_t,
) -> Result<c_int, i32> {
    let san = p.san().is_some();
    if !san {
        let k = kernel(p)?;
        // SAFETY: the caller's out-parameters, passed on.
        let r = unsafe {
            if peer {
                real::getpeername()(k, a, len)
            } else {
                real::getsockname()(k, a, len)
            }
        };
        return kernel_result(r);
    }
    let v = if peer {
        (*p.app.peer.lock().unwrap_or_else(|e| e.into_inner())).ok_or(libc::ENOTCONN)?
    } else {
        // The SAN connection's own address and port (a connect's, chosen
        // by the daemon; an accepted one's, the address the client asked
        // for), as the kernel names a TCP connection.
        p.san()
            .and_then(|ss| ss.local_addr().ok())
            .filter(|a| !a.ip().is_unspecified())
            .or(*p.app.local.lock().unwrap_or_else(|e| e.into_inner()))
            .or_else(|| kernel(p).ok().and_then(name_of))
            .unwrap_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))
    };
    // SAFETY: the caller's out-parameters.
    unsafe { write_addr(v, p.app.v6.load(Ordering::Relaxed), a, len) };
    Ok(0)
}

/// The socket behind program descriptor `fd` for this process to use: in
/// a forked child, a listener inherited from the parent is listened on
/// again first (a switch socket of the child's own over the same kernel
/// listener, taking the SAN side over from the parent). None if `fd` is a
/// plain kernel listener now (the child could not make a switch socket).
pub(crate) fn own(fd: RawFd, p: Arc<PFd>) -> Option<Arc<PFd>> {
    if !p.app.inherited() {
        return Some(p);
    }
    let kept = p
        .app
        .passed
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    if let Some(kept) = kept {
        return claim_kept(fd, &p, kept);
    }
    match p.app.state() {
        State::Listening => relisten(fd, p),
        State::Connected => claim(fd, p),
        _ => Some(p),
    }
}

/// In a forked child: the parent's connection on `fd` becomes the child's
/// to use (the parent keeps holding it, as a TCP socket shared across fork
/// is held by both): a SAN connection is claimed from the daemon into a
/// switch socket of the child's, a kernel TCP one is the kernel socket
/// from now on (None then: the caller makes the kernel's call).
fn claim(fd: RawFd, p: Arc<PFd>) -> Option<Arc<PFd>> {
    let others = table::other_numbers(&p, fd);
    match dsan_switch::claim_inherited(p.sw()) {
        Ok(Some(dsan_switch::Inherited::San(sw))) => {
            let flags = fl(fd);
            match take_over(fd, sw, State::Connected, flags) {
                Ok(np) => {
                    follow(fd, &np, others);
                    *np.app.peer.lock().unwrap_or_else(|e| e.into_inner()) =
                        *p.app.peer.lock().unwrap_or_else(|e| e.into_inner());
                    *np.app.local.lock().unwrap_or_else(|e| e.into_inner()) =
                        *p.app.local.lock().unwrap_or_else(|e| e.into_inner());
                    np.app
                        .v6
                        .store(p.app.v6.load(Ordering::Relaxed), Ordering::Relaxed);
                    // The options kept for the parent's socket are this
                    // one's too (one socket, shared across the fork).
                    crate::opts::inherit(&p, &np);
                    if !np
                        .app
                        .opts
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .is_empty()
                    {
                        if let Ok(k) = np.kernel() {
                            dsan_switch::app::apply_kept(&np, k);
                            np.app.opts_set.store(true, Ordering::Relaxed);
                        }
                    }
                    rules::log(|| format!("fd {fd}: the parent's SAN connection, claimed"));
                    Some(np)
                }
                Err(e) => {
                    let _ = dsan_switch::close(sw);
                    rules::log(|| {
                        format!("fd {fd}: cannot take the claimed connection (errno {e})")
                    });
                    Some(p)
                }
            }
        }
        Ok(Some(dsan_switch::Inherited::Tcp(t))) => {
            // SAFETY: two valid descriptors; `fd` is replaced atomically.
            unsafe {
                real::dup3()(
                    t.as_raw_fd(),
                    fd,
                    if cloexec(fd) { libc::O_CLOEXEC } else { 0 },
                )
            };
            table::remove(fd);
            for m in others {
                // SAFETY: as above; the program's other numbers for it.
                unsafe {
                    real::dup3()(
                        t.as_raw_fd(),
                        m,
                        if cloexec(m) { libc::O_CLOEXEC } else { 0 },
                    )
                };
                table::remove(m);
            }
            rules::log(|| format!("fd {fd}: the parent's kernel TCP connection"));
            None
        }
        Ok(None) => Some(p),
        Err(e) => {
            rules::log(|| format!("fd {fd}: cannot claim the parent's connection (errno {e})"));
            Some(p)
        }
    }
}

/// A passed connection's life (write end), ticket and whether its socket
/// is IPv6.
pub(crate) type PassInfo = (RawFd, [u8; dsan_provider::TICKET_BYTES], bool);

/// What goes beside program descriptor `fd` when the program sends it in
/// an `SCM_RIGHTS` message (see [`crate::pass`]): the write end of its
/// connection's life, its ticket and whether it is an IPv6 socket. None
/// unless `fd` is a SAN connection of ours (anything else travels as the
/// descriptor it is).
pub(crate) fn pass_info(fd: RawFd) -> Option<PassInfo> {
    let p = own(fd, table::get(fd)?)?;
    if p.app.state() != State::Connected {
        return None;
    }
    match dsan_switch::pass_ticket(p.sw()) {
        Ok(Some((life, ticket))) => Some((life, ticket, p.app.v6.load(Ordering::Relaxed))),
        Ok(None) => None,
        Err(e) => {
            rules::log(|| format!("fd {fd}: sent without its connection's life (errno {e})"));
            None
        }
    }
}

/// Before an exec: if program descriptor `fd` is a connection that the
/// switch serves over kernel TCP, the kernel socket takes the number (in
/// this process's descriptor table only, which the new program inherits:
/// a vfork child shares the parent's memory but not its descriptors, so
/// nothing of the library's records changes).
pub(crate) fn kernel_for_exec(fd: RawFd) {
    let Some(p) = table::get(fd) else {
        return;
    };
    if p.app.state() != State::Connected
        || dsan_switch::transport(p.sw()) != Ok(dsan_switch::Transport::Tcp)
    {
        return;
    }
    if let Some(k) = p.kernel().ok().filter(|k| *k != fd) {
        // SAFETY: two valid descriptors; `fd` is replaced atomically and
        // stays inheritable, as it was.
        unsafe { real::dup3()(k, fd, 0) };
    }
}

/// Program descriptor `fd`, just received in an `SCM_RIGHTS` message with
/// `life` and `ticket` beside it (see [`crate::pass`]), becomes a socket of
/// this process serving the SAN connection the sender passed: claimed from
/// the daemon with the life, in a switch socket put in `fd`'s place. Left
/// as it came if the claim fails (the connection ended meanwhile).
pub(crate) fn take_passed(fd: RawFd, life: OwnedFd, ticket: &[u8], v6: bool) {
    let t = dsan_provider::ClaimTicket::from_bytes(ticket);
    let r = dsan_switch::claim_passed(life, ticket).and_then(|sw| {
        take_over(fd, sw, State::Connected, fl(fd)).inspect_err(|_| {
            let _ = dsan_switch::close(sw);
        })
    });
    match r {
        Ok(np) => {
            *np.app.peer.lock().unwrap_or_else(|e| e.into_inner()) = t.and_then(|t| t.peer());
            *np.app.local.lock().unwrap_or_else(|e| e.into_inner()) = t.and_then(|t| t.local());
            np.app.v6.store(v6, Ordering::Relaxed);
            np.adopt_san_options();
            rules::log(|| format!("fd {fd}: a SAN connection passed to this process, claimed"));
        }
        Err(e) => {
            rules::log(|| format!("fd {fd}: cannot claim the SAN connection received (errno {e})"))
        }
    }
}

/// A connection this program was started with (kept across exec, see
/// [`crate::pass`]) is claimed on `fd`'s first use; the program's other
/// numbers for it become duplicates of the claimed socket. None if the
/// claim failed (the connection ended): the numbers are plain
/// descriptors then.
fn claim_kept(fd: RawFd, p: &Arc<PFd>, kept: table::Passed) -> Option<Arc<PFd>> {
    let others = table::other_numbers(p, fd);
    take_passed(fd, kept.life, &kept.ticket, kept.v6);
    let Some(np) = table::get(fd).filter(|np| !Arc::ptr_eq(np, p)) else {
        for n in others.into_iter().chain([fd]) {
            table::remove(n);
        }
        return None;
    };
    follow(fd, &np, others);
    Some(np)
}

/// The program's `others` numbers, which referred to the socket that `fd`
/// referred to before it was claimed into `np`, refer to `np` now
/// (duplicates of `fd`, as they were before).
fn follow(fd: RawFd, np: &Arc<PFd>, others: Vec<RawFd>) {
    for m in others {
        let flags = if cloexec(m) { libc::O_CLOEXEC } else { 0 };
        // SAFETY: two valid descriptors; `m` is replaced atomically.
        if unsafe { real::dup3()(fd, m, flags) } >= 0 {
            table::remove(m);
            duplicated(np, m);
        }
    }
}

/// In a forked child: the parent's listener on `fd`, listened on again.
fn relisten(fd: RawFd, p: Arc<PFd>) -> Option<Arc<PFd>> {
    let Some(t) = dsan_switch::inherited_listener(p.sw()) else {
        return Some(p);
    };
    let local = *p.app.local.lock().unwrap_or_else(|e| e.into_inner());
    let backlog = p.app.backlog.load(Ordering::Relaxed);
    let flags = fl(fd);
    let made = dup_owned(t).and_then(dsan_switch::adopt).and_then(|sw| {
        // SAFETY: plain call.
        let ppid = unsafe { libc::getppid() } as u32;
        let _ = dsan_switch::set_takeover(sw, ppid);
        if let Some(r) = dsan_switch::app::record(sw) {
            r.app
                .opts_set
                .store(p.app.opts_set.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        match dsan_switch::listen(sw, backlog) {
            Ok(san) => Ok((sw, san)),
            Err(e) => {
                let _ = dsan_switch::close(sw);
                Err(e)
            }
        }
    });
    match made.and_then(|(sw, san)| take_over(fd, sw, State::Listening, flags).map(|np| (np, san)))
    {
        Ok((np, san)) => {
            *np.app.local.lock().unwrap_or_else(|e| e.into_inner()) = local;
            np.app.backlog.store(backlog, Ordering::Relaxed);
            np.app
                .v6
                .store(p.app.v6.load(Ordering::Relaxed), Ordering::Relaxed);
            crate::opts::keep_for_accepted(&np);
            rules::log(|| {
                format!(
                    "listen fd {fd} again after fork: {}",
                    if san {
                        "kernel TCP and SAN"
                    } else {
                        "kernel TCP"
                    }
                )
            });
            Some(np)
        }
        Err(e) => {
            // The kernel listener itself then: the program keeps accepting
            // kernel TCP connections.
            // SAFETY: two valid descriptors; `fd` is replaced atomically.
            unsafe { real::dup3()(t, fd, if cloexec(fd) { libc::O_CLOEXEC } else { 0 }) };
            table::remove(fd);
            rules::log(|| format!("listen fd {fd} after fork: kernel TCP only (errno {e})"));
            None
        }
    }
}
