//! The program's side of a switch socket, for an interposing library
//! (`libdsan_preload.so`): what the program sees of the socket (its state,
//! names, flags, the options it set, its epoll registrations) lives in the
//! socket's one record ([`Socket::app`]), and which of the program's
//! descriptor numbers refer to a socket is the one number table here.
//!
//! The table is a bitmap checked by every interposed call (one atomic load
//! for a descriptor that is not a switch socket's) and a map from each
//! number to its socket; duplicates of a number map to the same socket.
//!
//! A socket's options are recorded once: on its kernel socket while it has
//! one, else in its record (`App::opts`, as the kernel reports them). When
//! a SAN connection's kernel socket goes, what the program set on it comes
//! over ([`carry_from`]).
#![allow(unsafe_code)] // the kernel's option calls: each block with a SAFETY comment

use crate::switch::Socket;
use libc::{c_int, socklen_t};
use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::sync::{Arc, Mutex, RwLock};

/// Where a socket is, as the program sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Listening on kernel TCP and the SAN.
    Listening,
    /// A nonblocking connect runs.
    Connecting,
    /// Connected (over the SAN, or over kernel TCP through the switch).
    Connected,
    /// Not connected (a connect failed).
    Idle,
}

/// A SAN connection this process holds but has not claimed yet (kept
/// across exec): its life's write end, its ticket, IPv6.
#[derive(Debug)]
pub struct Passed {
    /// The life's write end (see `pass_ticket`).
    pub life: OwnedFd,
    /// The connection's claim ticket.
    pub ticket: Vec<u8>,
    /// The socket is AF_INET6.
    pub v6: bool,
}

/// The program's side of one socket: every descriptor number of the
/// program that refers to the socket (dup) maps to the socket whose record
/// this is.
#[derive(Debug)]
pub struct App {
    /// Program descriptors that refer to it.
    pub refs: AtomicUsize,
    state: Mutex<State>,
    /// A connect's failure not reported yet (SO_ERROR).
    pub so_error: AtomicI32,
    /// The peer's name, as the program is told it.
    pub peer: Mutex<Option<SocketAddrV4>>,
    /// The socket's own name, as the program is told it.
    pub local: Mutex<Option<SocketAddrV4>>,
    /// Its epoll registrations (ids of the interposing library's).
    pub regs: Mutex<Vec<usize>>,
    /// Inherited from the parent across fork: the parent's socket, which
    /// this process only closes (closing its copy of the descriptor); a
    /// listener is listened on again by the child on first use.
    pub inherited: AtomicBool,
    /// The listen backlog (a listener).
    pub backlog: AtomicI32,
    /// The descriptor's O_NONBLOCK, as the program set it (kept here so
    /// that a data call does not ask the kernel each time).
    pub nonblock: AtomicBool,
    /// An AF_INET6 socket (a dual-stack listener and what it accepts): SAN
    /// addresses are named v4-mapped, as Linux names IPv4 peers there.
    pub v6: AtomicBool,
    /// Options kept for a socket without a kernel socket: (level, name,
    /// the bytes getsockopt gives).
    pub opts: Mutex<Vec<(libc::c_int, libc::c_int, Vec<u8>)>>,
    /// Kept across exec: the connection's life and ticket, until the first
    /// use claims the connection.
    pub passed: Mutex<Option<Passed>>,
    /// The program set options on its kernel socket (before or after it
    /// became a switch socket): they are carried over when that socket is
    /// released.
    pub opts_set: AtomicBool,
}

impl Default for App {
    fn default() -> App {
        App {
            refs: AtomicUsize::new(1),
            state: Mutex::new(State::Idle),
            so_error: AtomicI32::new(0),
            peer: Mutex::new(None),
            local: Mutex::new(None),
            regs: Mutex::new(Vec::new()),
            inherited: AtomicBool::new(false),
            backlog: AtomicI32::new(0),
            nonblock: AtomicBool::new(false),
            v6: AtomicBool::new(false),
            opts: Mutex::new(Vec::new()),
            passed: Mutex::new(None),
            opts_set: AtomicBool::new(false),
        }
    }
}

impl App {
    /// Where the socket is.
    pub fn state(&self) -> State {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The socket is in state `s` now.
    pub fn set_state(&self, s: State) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = s;
    }

    /// Whether it is a connection kept across exec, not claimed yet.
    pub fn kept(&self) -> bool {
        self.inherited()
            && self
                .passed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some()
    }

    /// Whether it is the parent's (see `inherited`).
    pub fn inherited(&self) -> bool {
        self.inherited.load(Ordering::Relaxed)
    }
}

/// Switch socket `sw` (a number [`socket`](crate::socket), [`adopt`](crate::adopt),
/// [`adopt_lean`](crate::adopt_lean) or [`accept_lean`](crate::accept_lean)
/// returned) as the program's, in state `state` with one program
/// descriptor referring to it. None if `sw` is not a switch socket.
pub fn take(sw: RawFd, state: State) -> Option<Arc<Socket>> {
    let s = crate::switch::lookup(sw)?;
    s.app.set_state(state);
    s.app.refs.store(1, Ordering::Relaxed);
    Some(s)
}

/// Switch socket `sw`'s record, as it is (None if `sw` is not a switch
/// socket).
pub fn record(sw: RawFd) -> Option<Arc<Socket>> {
    crate::switch::lookup(sw)
}

/// A record for a connection this process was started with (kept across
/// exec) and has not claimed yet: no switch socket serves it until then.
pub fn kept(passed: Passed, refs: usize) -> Arc<Socket> {
    let s = Socket::detached();
    s.app.set_state(State::Connected);
    s.app.inherited.store(true, Ordering::Relaxed);
    s.app.refs.store(refs, Ordering::Relaxed);
    *s.app.passed.lock().unwrap_or_else(|e| e.into_inner()) = Some(passed);
    s
}

/// Descriptors below this have a bit in [`MAP`]; above, [`BIG`] says
/// whether any is the program's socket.
const BITS: usize = 1 << 16;
static MAP: [AtomicU64; BITS / 64] = [const { AtomicU64::new(0) }; BITS / 64];
static BIG: AtomicBool = AtomicBool::new(false);
type Numbers = HashMap<RawFd, Arc<Socket>>;
static NUMBERS: RwLock<Option<Numbers>> = RwLock::new(None);

fn bit(fd: RawFd) -> Option<(usize, u64)> {
    let i = usize::try_from(fd).ok()?;
    (i < BITS).then(|| (i / 64, 1u64 << (i % 64)))
}

/// Whether program descriptor `fd` may be a switch socket's (the fast test
/// of every interposed call).
#[inline]
pub fn maybe_ours(fd: RawFd) -> bool {
    match bit(fd) {
        Some((w, b)) => MAP[w].load(Ordering::Acquire) & b != 0,
        None => fd >= 0 && BIG.load(Ordering::Acquire),
    }
}

/// The socket behind program descriptor `fd`, if it is a switch socket.
pub fn get(fd: RawFd) -> Option<Arc<Socket>> {
    if !maybe_ours(fd) {
        return None;
    }
    NUMBERS
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()?
        .get(&fd)
        .cloned()
}

/// Program descriptor `fd` now refers to `s`.
pub fn insert(fd: RawFd, s: Arc<Socket>) {
    NUMBERS
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(HashMap::new)
        .insert(fd, s);
    match bit(fd) {
        Some((w, b)) => {
            MAP[w].fetch_or(b, Ordering::Release);
        }
        None => BIG.store(true, Ordering::Release),
    }
}

/// Program descriptor `fd` no longer refers to a switch socket.
pub fn remove(fd: RawFd) -> Option<Arc<Socket>> {
    if !maybe_ours(fd) {
        return None;
    }
    let mut t = NUMBERS.write().unwrap_or_else(|e| e.into_inner());
    let s = t.as_mut()?.remove(&fd);
    if let Some((w, b)) = bit(fd) {
        MAP[w].fetch_and(!b, Ordering::Release);
    }
    s
}

/// Another program descriptor than `fd` that refers to `s`, if any.
pub fn other_number(s: &Arc<Socket>, fd: RawFd) -> Option<RawFd> {
    NUMBERS
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()?
        .iter()
        .find(|(n, q)| **n != fd && Arc::ptr_eq(q, s))
        .map(|(n, _)| *n)
}

/// Every program descriptor other than `fd` that refers to `s`.
pub fn other_numbers(s: &Arc<Socket>, fd: RawFd) -> Vec<RawFd> {
    NUMBERS
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map_or_else(Vec::new, |t| {
            t.iter()
                .filter(|(n, q)| **n != fd && Arc::ptr_eq(q, s))
                .map(|(n, _)| *n)
                .collect()
        })
}

/// Whether any program descriptor may be a switch socket's (a look at the
/// bitmap only: no lock, no allocation, so that it is safe in a vfork
/// child).
pub fn any() -> bool {
    BIG.load(Ordering::Acquire) || MAP.iter().any(|w| w.load(Ordering::Acquire) != 0)
}

/// Every program descriptor that is a switch socket's.
pub fn all() -> Vec<RawFd> {
    NUMBERS
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map_or_else(Vec::new, |t| t.keys().copied().collect())
}

type NumbersGuard = std::sync::RwLockWriteGuard<'static, Option<Numbers>>;

thread_local! {
    /// The number table, held by a forking thread across the fork.
    static FORK_NUMBERS: std::cell::RefCell<Option<NumbersGuard>> =
        const { std::cell::RefCell::new(None) };
}

/// Before a fork (the number table is a leaf lock: take it after the
/// caller's own locks).
pub fn fork_prepare() {
    let g = NUMBERS.write().unwrap_or_else(|e| e.into_inner());
    let _ = FORK_NUMBERS.try_with(|c| *c.borrow_mut() = Some(g));
}

/// After a fork, in the parent and the child.
pub fn fork_release() {
    let _ = FORK_NUMBERS.try_with(|c| c.borrow_mut().take());
}

/// In a forked child: every socket the program's numbers refer to is the
/// parent's.
pub fn mark_inherited() {
    if let Some(t) = NUMBERS.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
        for s in t.values() {
            s.app.inherited.store(true, Ordering::Relaxed);
        }
    }
}

/// The options a released kernel socket hands over when they differ from
/// the defaults.
pub const CARRIED: &[(c_int, c_int)] = &[
    (libc::SOL_SOCKET, libc::SO_REUSEADDR),
    (libc::SOL_SOCKET, libc::SO_REUSEPORT),
    (libc::SOL_SOCKET, libc::SO_KEEPALIVE),
    (libc::SOL_SOCKET, libc::SO_RCVBUF),
    (libc::SOL_SOCKET, libc::SO_SNDBUF),
    (libc::SOL_SOCKET, libc::SO_LINGER),
    (libc::SOL_SOCKET, libc::SO_RCVLOWAT),
    (libc::SOL_SOCKET, libc::SO_RCVTIMEO),
    (libc::SOL_SOCKET, libc::SO_SNDTIMEO),
    (libc::SOL_SOCKET, libc::SO_PRIORITY),
    (libc::SOL_SOCKET, libc::SO_OOBINLINE),
    (libc::SOL_SOCKET, libc::SO_BROADCAST),
    (libc::IPPROTO_TCP, libc::TCP_NODELAY),
    (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
    (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL),
    (libc::IPPROTO_TCP, libc::TCP_KEEPCNT),
    (libc::IPPROTO_TCP, libc::TCP_CORK),
    (libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT),
    (libc::IPPROTO_TCP, libc::TCP_MAXSEG),
    (libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT),
    (libc::IPPROTO_TCP, libc::TCP_CONGESTION),
    (libc::IPPROTO_IP, libc::IP_TOS),
    (libc::IPPROTO_IP, libc::IP_TTL),
];

/// The address family of socket `s` as the program sees it.
pub fn family(s: &Socket) -> c_int {
    if s.app.v6.load(Ordering::Relaxed) {
        libc::AF_INET6
    } else {
        libc::AF_INET
    }
}

/// The kernel socket of family `fam` that holds the defaults (one per
/// family and process, made on first need).
///
/// # Errors
/// The kernel's (EMFILE).
pub fn defaults(fam: c_int) -> Result<RawFd, i32> {
    static V4: OnceLock<OwnedFd> = OnceLock::new();
    static V6: OnceLock<OwnedFd> = OnceLock::new();
    let cell = if fam == libc::AF_INET6 { &V6 } else { &V4 };
    if let Some(k) = cell.get() {
        return Ok(k.as_raw_fd());
    }
    // SAFETY: plain system call.
    let k = unsafe { libc::socket(fam, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if k < 0 {
        return Err(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EMFILE));
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let k = crate::high(unsafe { OwnedFd::from_raw_fd(k) });
    Ok(cell.get_or_init(|| k).as_raw_fd())
}

/// Option (`level`, `name`) of kernel socket `k`, as its bytes.
pub fn read_opt(k: RawFd, level: c_int, name: c_int) -> Option<Vec<u8>> {
    let mut buf = [0u8; 256];
    let mut len = buf.len() as socklen_t;
    // SAFETY: a valid socket and out-buffers of the given length.
    let r = unsafe { libc::getsockopt(k, level, name, buf.as_mut_ptr().cast(), &mut len) };
    (r == 0).then(|| buf[..(len as usize).min(buf.len())].to_vec())
}

/// Records option (`level`, `name`) of `s` as the bytes `v` (as the
/// kernel reports it).
pub fn keep(s: &Socket, level: c_int, name: c_int, v: Vec<u8>) {
    let mut o = s.app.opts.lock().unwrap_or_else(|e| e.into_inner());
    match o.iter_mut().find(|(l, n, _)| *l == level && *n == name) {
        Some(e) => e.2 = v,
        None => o.push((level, name, v)),
    }
}

/// Whether `v` (SO_LINGER's bytes) is {1, 0}: a close that resets.
pub fn linger_abort(v: &[u8]) -> bool {
    if v.len() < std::mem::size_of::<libc::linger>() {
        return false;
    }
    // SAFETY: at least a linger's bytes; read unaligned.
    let l: libc::linger = unsafe { std::ptr::read_unaligned(v.as_ptr().cast()) };
    l.l_onoff != 0 && l.l_linger == 0
}

/// Kernel socket `k` of `s` is about to go (or its options are to be kept
/// for another socket): what the program set on it (the options in
/// [`CARRIED`] that differ from the defaults) is recorded in `s`.
pub fn carry_from(s: &Socket, k: RawFd) {
    let Ok(d) = defaults(family(s)) else {
        return;
    };
    for &(level, name) in CARRIED {
        let (Some(v), dv) = (read_opt(k, level, name), read_opt(d, level, name)) else {
            continue;
        };
        if Some(&v) != dv.as_ref() {
            if level == libc::SOL_SOCKET && name == libc::SO_LINGER {
                s.set_abort_on_close(linger_abort(&v));
            }
            keep(s, level, name, v);
        }
    }
}

/// The options kept in `s`'s record, set on kernel socket `k` (a socket
/// that takes over from another whose options were kept: a connection
/// claimed after fork keeps its options in its new kernel socket). Values
/// are as the kernel reported them, so SO_RCVBUF and SO_SNDBUF are set to
/// half (the kernel doubles what it is given). Options the kernel refuses
/// are left out.
pub fn apply_kept(s: &Socket, k: RawFd) {
    let kept = s.app.opts.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for (level, name, mut v) in kept {
        if level == libc::SOL_SOCKET && (name == libc::SO_RCVBUF || name == libc::SO_SNDBUF) {
            if let Ok(b) = <[u8; 4]>::try_from(&v[..v.len().min(4)]) {
                v = (c_int::from_ne_bytes(b) / 2).to_ne_bytes().to_vec();
            }
        }
        // SAFETY: a valid socket and an option buffer of its length.
        unsafe { libc::setsockopt(k, level, name, v.as_ptr().cast(), v.len() as socklen_t) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_map_to_their_socket_and_go_with_remove() {
        let s = Socket::detached();
        let t = Socket::detached();
        // One number in the bitmap, one beyond it, and a duplicate.
        for n in [4101, BITS as RawFd + 7, 4102] {
            assert!(get(n).is_none());
            insert(n, if n == 4102 { t.clone() } else { s.clone() });
        }
        assert!(maybe_ours(4101) && any());
        assert!(Arc::ptr_eq(&get(4101).unwrap(), &s));
        assert!(Arc::ptr_eq(&get(BITS as RawFd + 7).unwrap(), &s));
        assert_eq!(other_number(&s, 4101), Some(BITS as RawFd + 7));
        assert_eq!(other_numbers(&t, 4102), Vec::<RawFd>::new());
        assert!(Arc::ptr_eq(&remove(4101).unwrap(), &s));
        assert!(!maybe_ours(4101));
        assert!(get(4101).is_none());
        assert_eq!(other_number(&s, BITS as RawFd + 7), None);
        remove(BITS as RawFd + 7);
        remove(4102);
        assert!(all()
            .iter()
            .all(|n| ![4101, 4102, BITS as RawFd + 7].contains(n)));
    }

    #[test]
    fn a_kept_connection_is_the_parents_until_claimed() {
        let (r, w) = dsan_channel::sys::pipe_cloexec().unwrap();
        drop(r);
        let s = kept(
            Passed {
                life: w,
                ticket: vec![1, 2, 3],
                v6: false,
            },
            2,
        );
        assert_eq!(s.sw(), -1, "no switch socket serves it yet");
        assert_eq!(s.app.state(), State::Connected);
        assert!(s.app.kept() && s.app.inherited());
        assert_eq!(s.app.refs.load(Ordering::Relaxed), 2);
        s.app.passed.lock().unwrap().take();
        assert!(!s.app.kept());
    }

    #[test]
    fn options_are_kept_once_each_and_linger_zero_means_reset() {
        let s = Socket::detached();
        keep(
            &s,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            8192i32.to_ne_bytes().to_vec(),
        );
        keep(
            &s,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            16384i32.to_ne_bytes().to_vec(),
        );
        let o = s.app.opts.lock().unwrap().clone();
        assert_eq!(o.len(), 1);
        assert_eq!(o[0].2, 16384i32.to_ne_bytes().to_vec());
        let linger = |on: i32, secs: i32| {
            let mut v = on.to_ne_bytes().to_vec();
            v.extend_from_slice(&secs.to_ne_bytes());
            v
        };
        assert!(linger_abort(&linger(1, 0)));
        assert!(!linger_abort(&linger(1, 5)));
        assert!(!linger_abort(&linger(0, 0)));
        assert!(!linger_abort(&[1]));
    }

    #[test]
    fn what_the_program_set_on_a_kernel_socket_is_carried_over() {
        // SAFETY: plain system call.
        let k = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        assert!(k >= 0);
        // SAFETY: a fresh descriptor nobody else owns.
        let k = unsafe { OwnedFd::from_raw_fd(k) };
        let one: c_int = 1;
        // SAFETY: a valid socket and an int option.
        let r = unsafe {
            libc::setsockopt(
                k.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                (&one as *const c_int).cast(),
                std::mem::size_of::<c_int>() as socklen_t,
            )
        };
        assert_eq!(r, 0);
        let s = Socket::detached();
        carry_from(&s, k.as_raw_fd());
        let o = s.app.opts.lock().unwrap().clone();
        // TCP_NODELAY differs from a fresh socket's; nothing else does.
        assert_eq!(o.len(), 1, "{o:?}");
        assert_eq!((o[0].0, o[0].1), (libc::IPPROTO_TCP, libc::TCP_NODELAY));
        assert_eq!(o[0].2, 1i32.to_ne_bytes().to_vec());
    }
}
