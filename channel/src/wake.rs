//! Wake sockets: readiness descriptors that the daemon's lcore signals
//! itself, without a thread in between and without any way for the
//! process to make that signal block.
//!
//! An eventfd cannot be that: the daemon's copy shares its open file
//! description with the process, which can clear O_NONBLOCK on it and fill
//! its counter, so a write may block (hence the notifier thread that writes
//! eventfds for the lcore, `dataplane::node::notify`). A pipe cannot be
//! either: every write takes the pipe's mutex, which the process holds
//! while a read of its own copies into memory that faults (a userfaultfd
//! page), `RWF_NOWAIT` or not.
//!
//! A wake socket is an `AF_UNIX` datagram socket bound to a random abstract
//! name under [`NAME_PREFIX`]; it is readable while a datagram (a *token*)
//! waits in it. The process gives the daemon a *sender*: another datagram
//! socket, connected to that name. The daemon's [`signal`] sends one byte
//! with `MSG_DONTWAIT`, which never sleeps: it copies from the daemon's own
//! memory, takes only the receiver's short spin locks (never the mutex a
//! reader holds while copying out), and a full queue or send buffer is
//! `EAGAIN` (the socket is readable already). The process drains tokens
//! ([`drain`]) and, where it must make its own descriptor readable, posts
//! one ([`post`]) from a socket of its own, by name.
//!
//! The name is visible to the network namespace (`/proc/net/unix`), and an
//! abstract name has no permissions: a stranger could send a token too. It
//! would make the socket readable for nothing (a receive then finds no
//! bytes), no more; the daemon sends only to names under [`NAME_PREFIX`]
//! ([`is_sender`]), so it cannot be pointed at another program's socket.
#![allow(unsafe_code)] // socket calls on sockaddr_un: each block with a SAFETY comment

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::OnceLock;

/// Every wake socket's abstract name starts with these bytes (the leading
/// NUL makes it abstract).
pub const NAME_PREFIX: &[u8] = b"\0dsan-wake/";

/// The name's length: the prefix, then 32 hex digits (128 random bits).
const NAME_LEN: usize = NAME_PREFIX.len() + 32;

/// Descriptors this module makes for itself (the posting socket) go at or
/// above this number (see [`set_fd_base`]).
static FD_BASE: AtomicI32 = AtomicI32::new(0);

/// Puts the descriptor this module keeps for itself (the socket [`post`]
/// sends from) at `base` or above, away from the low numbers a program
/// expects to get (an interposing library sets it).
pub fn set_fd_base(base: i32) {
    FD_BASE.store(base.max(0), Ordering::Relaxed);
}

fn owned(r: libc::c_int) -> io::Result<OwnedFd> {
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

fn dgram(flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain system call.
    owned(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | flags, 0) })
}

fn sockaddr(name: &[u8]) -> (libc::sockaddr_un, libc::socklen_t) {
    // SAFETY: sockaddr_un is plain data; zeroed is valid.
    let mut a: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    a.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in a.sun_path.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + name.len().min(a.sun_path.len());
    (a, len as libc::socklen_t)
}

fn random_name() -> io::Result<[u8; NAME_LEN]> {
    let mut r = [0u8; 16];
    // SAFETY: fills a live 16-byte buffer.
    let n = unsafe { libc::getrandom(r.as_mut_ptr().cast(), r.len(), 0) };
    if n != r.len() as isize {
        return Err(io::Error::last_os_error());
    }
    let mut name = [0u8; NAME_LEN];
    name[..NAME_PREFIX.len()].copy_from_slice(NAME_PREFIX);
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in r.iter().enumerate() {
        name[NAME_PREFIX.len() + 2 * i] = HEX[usize::from(b >> 4)];
        name[NAME_PREFIX.len() + 2 * i + 1] = HEX[usize::from(b & 15)];
    }
    Ok(name)
}

/// The abstract name `fd` is bound to (`peer`: connected to), if it is an
/// `AF_UNIX` datagram socket with a wake socket's name.
fn wake_name(fd: RawFd, peer: bool) -> Option<[u8; NAME_LEN]> {
    let mut ty: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a live int and its length.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut ty as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 || ty != libc::SOCK_DGRAM {
        return None;
    }
    // SAFETY: sockaddr_un is plain data; zeroed is valid.
    let mut a: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    let p = (&mut a as *mut libc::sockaddr_un).cast();
    // SAFETY: a live sockaddr_un and its length.
    let r = unsafe {
        if peer {
            libc::getpeername(fd, p, &mut len)
        } else {
            libc::getsockname(fd, p, &mut len)
        }
    };
    let off = std::mem::size_of::<libc::sa_family_t>();
    if r != 0 || i32::from(a.sun_family) != libc::AF_UNIX || len as usize != off + NAME_LEN {
        return None;
    }
    let mut name = [0u8; NAME_LEN];
    for (d, s) in name.iter_mut().zip(a.sun_path.iter()) {
        *d = *s as u8;
    }
    (name.starts_with(NAME_PREFIX) && name[NAME_PREFIX.len()..].iter().all(u8::is_ascii_hexdigit))
        .then_some(name)
}

/// A new wake socket at the lowest free number, O_NONBLOCK and
/// close-on-exec as asked (receives from it never block either way: they
/// pass `MSG_DONTWAIT`).
///
/// # Errors
/// The kernel's (EMFILE, ENFILE, ENOBUFS), or EADDRINUSE after a few names
/// that were taken.
pub fn new(nonblock: bool, cloexec: bool) -> io::Result<OwnedFd> {
    let mut flags = 0;
    if nonblock {
        flags |= libc::SOCK_NONBLOCK;
    }
    if cloexec {
        flags |= libc::SOCK_CLOEXEC;
    }
    let s = dgram(flags)?;
    for _ in 0..4 {
        let (a, len) = sockaddr(&random_name()?);
        // SAFETY: a valid socket and a live sockaddr_un of `len` bytes.
        let r = unsafe { libc::bind(s.as_raw_fd(), (&a as *const libc::sockaddr_un).cast(), len) };
        if r == 0 {
            return Ok(s);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EADDRINUSE) {
            return Err(e);
        }
    }
    Err(io::Error::from_raw_os_error(libc::EADDRINUSE))
}

/// Whether `fd` is a wake socket.
pub fn is_wake(fd: RawFd) -> bool {
    wake_name(fd, false).is_some()
}

/// A sender for wake socket `wake`, for the daemon: a datagram socket
/// connected to its name (close-on-exec). Made by the process, in its
/// network namespace, where the name is found.
///
/// # Errors
/// EINVAL if `wake` is no wake socket; the kernel's.
pub fn sender(wake: RawFd) -> io::Result<OwnedFd> {
    let name = wake_name(wake, false).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    let s = dgram(libc::SOCK_CLOEXEC)?;
    let (a, len) = sockaddr(&name);
    // SAFETY: a valid socket and a live sockaddr_un of `len` bytes.
    let r = unsafe { libc::connect(s.as_raw_fd(), (&a as *const libc::sockaddr_un).cast(), len) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(s)
}

/// Whether `fd` is a sender the daemon may signal: an `AF_UNIX` datagram
/// socket connected to a wake socket's name.
pub fn is_sender(fd: RawFd) -> bool {
    wake_name(fd, true).is_some()
}

/// What a [`signal`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signalled {
    /// A token went.
    Sent,
    /// The socket holds tokens enough (it is readable).
    Full,
    /// The wake socket is closed: nobody to tell.
    Gone,
    /// Any other failure (the errno).
    Failed(i32),
}

/// Sends one token through `sender` (the daemon's side; see
/// [`is_sender`]). Never blocks, whatever the process does with its
/// descriptors.
pub fn signal(sender: RawFd) -> Signalled {
    let one = [1u8];
    loop {
        // SAFETY: a one-byte live buffer; a bad fd only returns an error.
        let r = unsafe {
            libc::send(
                sender,
                one.as_ptr().cast(),
                1,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if r == 1 {
            return Signalled::Sent;
        }
        match io::Error::last_os_error().raw_os_error().unwrap_or(0) {
            libc::EINTR => continue,
            libc::EAGAIN => return Signalled::Full,
            libc::ECONNREFUSED | libc::ENOTCONN | libc::EPIPE => return Signalled::Gone,
            e => return Signalled::Failed(e),
        }
    }
}

/// Takes every token waiting in wake socket `fd` (never blocks). Returns
/// whether there was any.
pub fn drain(fd: RawFd) -> bool {
    const N: usize = 16;
    let mut bufs = [[0u8; 1]; N];
    // SAFETY: iovec and mmsghdr are plain data; zeroed is valid.
    let mut iov: [libc::iovec; N] = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut msgs: [libc::mmsghdr; N] = unsafe { std::mem::zeroed() };
    for i in 0..N {
        iov[i] = libc::iovec {
            iov_base: bufs[i].as_mut_ptr().cast(),
            iov_len: 1,
        };
        msgs[i].msg_hdr.msg_iov = &mut iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    let mut any = false;
    loop {
        // SAFETY: N headers, each with one live one-byte iovec; no timeout.
        let r = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                N as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if r <= 0 {
            if r < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return any;
        }
        any = true;
        if (r as usize) < N {
            return true;
        }
    }
}

/// The process's own posting socket (see [`post`]).
fn poster() -> Option<RawFd> {
    static POSTER: OnceLock<Option<OwnedFd>> = OnceLock::new();
    POSTER
        .get_or_init(|| {
            let s = dgram(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK).ok()?;
            let base = FD_BASE.load(Ordering::Relaxed);
            if base == 0 || s.as_raw_fd() >= base {
                return Some(s);
            }
            // SAFETY: F_DUPFD_CLOEXEC with an int argument on a descriptor we own.
            let d = unsafe { libc::fcntl(s.as_raw_fd(), libc::F_DUPFD_CLOEXEC, base) };
            Some(owned(d).unwrap_or(s))
        })
        .as_ref()
        .map(AsRawFd::as_raw_fd)
}

/// Makes wake socket `fd` readable from this process (a token, unless it
/// holds one already). Returns whether it is readable now or a token went.
pub fn post(fd: RawFd) -> bool {
    if crate::sys::wait_readable(fd, Some(std::time::Duration::ZERO)) {
        return true;
    }
    let Some(name) = wake_name(fd, false) else {
        return false;
    };
    let Some(p) = poster() else {
        return false;
    };
    let (a, len) = sockaddr(&name);
    let one = [1u8];
    loop {
        // SAFETY: a one-byte live buffer and a live sockaddr_un of `len` bytes.
        let r = unsafe {
            libc::sendto(
                p,
                one.as_ptr().cast(),
                1,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                (&a as *const libc::sockaddr_un).cast(),
                len,
            )
        };
        if r == 1 {
            return true;
        }
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => continue,
            // Full: readable already.
            Some(libc::EAGAIN) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::wait_readable;
    use std::time::Duration;

    fn readable(fd: RawFd) -> bool {
        wait_readable(fd, Some(Duration::ZERO))
    }

    #[test]
    fn a_sender_signals_and_drain_clears() {
        let w = new(true, true).unwrap();
        assert!(is_wake(w.as_raw_fd()));
        assert!(!is_sender(w.as_raw_fd()), "a wake socket is no sender");
        let s = sender(w.as_raw_fd()).unwrap();
        assert!(is_sender(s.as_raw_fd()));
        assert!(!readable(w.as_raw_fd()));
        assert_eq!(signal(s.as_raw_fd()), Signalled::Sent);
        assert_eq!(signal(s.as_raw_fd()), Signalled::Sent);
        assert!(readable(w.as_raw_fd()));
        assert!(drain(w.as_raw_fd()));
        assert!(!readable(w.as_raw_fd()));
        assert!(!drain(w.as_raw_fd()));
        // Posting from the process: one token, not two.
        assert!(post(w.as_raw_fd()));
        assert!(post(w.as_raw_fd()));
        assert!(readable(w.as_raw_fd()));
        assert!(drain(w.as_raw_fd()));
        assert!(!readable(w.as_raw_fd()));
        drop(w);
        assert_eq!(signal(s.as_raw_fd()), Signalled::Gone);
    }

    #[test]
    fn a_socket_that_is_never_read_never_blocks_its_sender() {
        // Blocking descriptors on both sides: the sends still return.
        let w = new(false, true).unwrap();
        let s = sender(w.as_raw_fd()).unwrap();
        let mut full = false;
        for _ in 0..100_000 {
            match signal(s.as_raw_fd()) {
                Signalled::Sent => {}
                Signalled::Full => {
                    full = true;
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(full, "the queue fills and says so");
        assert!(readable(w.as_raw_fd()));
        assert!(drain(w.as_raw_fd()));
        assert!(!readable(w.as_raw_fd()));
    }

    #[test]
    fn other_sockets_are_not_senders() {
        let (a, b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        assert!(!is_sender(a.as_raw_fd()));
        assert!(!is_wake(b.as_raw_fd()));
        let e = crate::sys::EventFd::new().unwrap();
        assert!(!is_sender(e.as_raw_fd()));
        assert!(!is_wake(e.as_raw_fd()));
        assert!(sender(e.as_raw_fd()).is_err());
    }
}
