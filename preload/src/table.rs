//! Which descriptors of the program are SAN sockets: a bitmap checked by
//! every interposed call (one atomic load for a descriptor that is not
//! ours), and the sockets themselves.

use std::cell::Cell;
use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

thread_local! {
    /// Set while this thread runs the library's own code (or for the
    /// switch's threads, always): calls it makes pass straight to the C
    /// library.
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

/// This thread is inside the library until the value is dropped.
pub(crate) struct Inside(());

/// Enters the library: None if this thread is inside it already (the
/// caller passes the call to the C library).
pub(crate) fn enter() -> Option<Inside> {
    INSIDE
        .try_with(|c| {
            if c.get() {
                None
            } else {
                c.set(true);
                Some(Inside(()))
            }
        })
        .ok()
        .flatten()
}

impl Drop for Inside {
    fn drop(&mut self) {
        let _ = INSIDE.try_with(|c| c.set(false));
    }
}

/// Marks this thread as the library's own for good (the switch's threads).
pub(crate) fn mark_internal() {
    let _ = INSIDE.try_with(|c| c.set(true));
}

/// Descriptors below this have a bit in [`MAP`]; above, [`BIG`] says
/// whether any is ours.
const BITS: usize = 1 << 16;
static MAP: [AtomicU64; BITS / 64] = [const { AtomicU64::new(0) }; BITS / 64];
static BIG: AtomicBool = AtomicBool::new(false);
static TABLE: RwLock<Option<HashMap<RawFd, Arc<PFd>>>> = RwLock::new(None);

/// Where a SAN-capable socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
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
pub(crate) struct Passed {
    pub(crate) life: std::os::fd::OwnedFd,
    pub(crate) ticket: Vec<u8>,
    pub(crate) v6: bool,
}

/// One socket of the program that the switch serves; every descriptor
/// number that refers to it (dup) maps here.
pub(crate) struct PFd {
    /// The switch's descriptor: its own (an epoll instance the program's
    /// numbers are duplicates of), or for a lean socket one of the
    /// program's numbers (see `dsan_switch::adopt_lean`).
    sw: AtomicI32,
    /// Program descriptors that refer to it.
    pub(crate) refs: AtomicUsize,
    pub(crate) state: Mutex<State>,
    /// A connect's failure not reported yet (SO_ERROR).
    pub(crate) so_error: AtomicI32,
    pub(crate) peer: Mutex<Option<SocketAddrV4>>,
    pub(crate) local: Mutex<Option<SocketAddrV4>>,
    /// Its epoll registrations (ids in [`crate::wait`]).
    pub(crate) regs: Mutex<Vec<usize>>,
    /// Inherited from the parent across fork: the parent's socket, which
    /// this process only closes (closing its copy of the descriptor); a
    /// listener is listened on again by the child on first use.
    pub(crate) inherited: AtomicBool,
    /// The listen backlog (a listener).
    pub(crate) backlog: AtomicI32,
    /// The descriptor's O_NONBLOCK, as the program set it (kept here so
    /// that a data call does not ask the kernel each time).
    pub(crate) nonblock: AtomicBool,
    /// An AF_INET6 socket (a dual-stack listener and what it accepts): SAN
    /// addresses are named v4-mapped, as Linux names IPv4 peers there.
    pub(crate) v6: AtomicBool,
    /// Options kept for a socket without a kernel socket (`crate::opts`):
    /// (level, name, the bytes getsockopt gives).
    pub(crate) opts: Mutex<Vec<(libc::c_int, libc::c_int, Vec<u8>)>>,
    /// Kept across exec (see [`crate::pass`]): the connection's life and
    /// ticket, until the first use claims the connection.
    pub(crate) passed: Mutex<Option<Passed>>,
    /// The program set options on its kernel socket (before or after it
    /// became ours): they are carried over when that socket is released.
    pub(crate) opts_set: AtomicBool,
}

impl PFd {
    pub(crate) fn new(sw: RawFd, state: State) -> Arc<PFd> {
        Arc::new(PFd {
            sw: AtomicI32::new(sw),
            refs: AtomicUsize::new(1),
            state: Mutex::new(state),
            so_error: AtomicI32::new(0),
            peer: Mutex::new(None),
            local: Mutex::new(None),
            regs: Mutex::new(Vec::new()),
            inherited: AtomicBool::new(false),
            backlog: AtomicI32::new(0),
            nonblock: AtomicBool::new(false),
            v6: AtomicBool::new(false),
            opts: Mutex::new(Vec::new()),
            opts_set: AtomicBool::new(false),
            passed: Mutex::new(None),
        })
    }
    /// The switch's descriptor.
    pub(crate) fn sw(&self) -> RawFd {
        self.sw.load(Ordering::Acquire)
    }
    /// A lean socket is known to the switch by program descriptor `fd` now.
    pub(crate) fn set_sw(&self, fd: RawFd) {
        self.sw.store(fd, Ordering::Release);
    }
    pub(crate) fn state(&self) -> State {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
    pub(crate) fn set_state(&self, s: State) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = s;
    }
    /// Whether it is a connection kept across exec, not claimed yet.
    pub(crate) fn kept(&self) -> bool {
        self.inherited()
            && self
                .passed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some()
    }
    /// Whether it is the parent's (see `inherited`).
    pub(crate) fn inherited(&self) -> bool {
        self.inherited.load(Ordering::Relaxed)
    }
}

fn bit(fd: RawFd) -> Option<(usize, u64)> {
    let i = usize::try_from(fd).ok()?;
    (i < BITS).then(|| (i / 64, 1u64 << (i % 64)))
}

/// Whether `fd` may be ours (the fast test of every interposed call).
#[inline]
pub(crate) fn maybe_ours(fd: RawFd) -> bool {
    match bit(fd) {
        Some((w, b)) => MAP[w].load(Ordering::Acquire) & b != 0,
        None => fd >= 0 && BIG.load(Ordering::Acquire),
    }
}

/// The socket behind program descriptor `fd`, if it is ours.
pub(crate) fn get(fd: RawFd) -> Option<Arc<PFd>> {
    if !maybe_ours(fd) {
        return None;
    }
    TABLE
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()?
        .get(&fd)
        .cloned()
}

/// Program descriptor `fd` now refers to `p`.
pub(crate) fn insert(fd: RawFd, p: Arc<PFd>) {
    TABLE
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(HashMap::new)
        .insert(fd, p);
    match bit(fd) {
        Some((w, b)) => {
            MAP[w].fetch_or(b, Ordering::Release);
        }
        None => BIG.store(true, Ordering::Release),
    }
}

/// Program descriptor `fd` no longer refers to a SAN socket.
pub(crate) fn remove(fd: RawFd) -> Option<Arc<PFd>> {
    if !maybe_ours(fd) {
        return None;
    }
    let mut t = TABLE.write().unwrap_or_else(|e| e.into_inner());
    let p = t.as_mut()?.remove(&fd);
    if let Some((w, b)) = bit(fd) {
        MAP[w].fetch_and(!b, Ordering::Release);
    }
    p
}

/// Another program descriptor than `fd` that refers to `p`, if any.
pub(crate) fn other_number(p: &Arc<PFd>, fd: RawFd) -> Option<RawFd> {
    TABLE
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()?
        .iter()
        .find(|(n, q)| **n != fd && Arc::ptr_eq(q, p))
        .map(|(n, _)| *n)
}

/// Every program descriptor other than `fd` that refers to `p`.
pub(crate) fn other_numbers(p: &Arc<PFd>, fd: RawFd) -> Vec<RawFd> {
    TABLE
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map_or_else(Vec::new, |t| {
            t.iter()
                .filter(|(n, q)| **n != fd && Arc::ptr_eq(q, p))
                .map(|(n, _)| *n)
                .collect()
        })
}

/// Whether any descriptor may be ours (a look at the bitmap only: no lock,
/// no allocation, so that it is safe in a vfork child).
pub(crate) fn any() -> bool {
    BIG.load(Ordering::Acquire) || MAP.iter().any(|w| w.load(Ordering::Acquire) != 0)
}

/// Every program descriptor that is ours.
pub(crate) fn all() -> Vec<RawFd> {
    TABLE
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map_or_else(Vec::new, |t| t.keys().copied().collect())
}

type TableGuard = std::sync::RwLockWriteGuard<'static, Option<HashMap<RawFd, Arc<PFd>>>>;

thread_local! {
    /// The descriptor table, held by a forking thread across the fork.
    static FORK_TABLE: std::cell::RefCell<Option<TableGuard>> =
        const { std::cell::RefCell::new(None) };
}

/// Before a fork (after the registration shards: the table is a leaf lock).
pub(crate) fn fork_prepare() {
    let g = TABLE.write().unwrap_or_else(|e| e.into_inner());
    let _ = FORK_TABLE.try_with(|c| *c.borrow_mut() = Some(g));
}

/// After a fork, in the parent and the child.
pub(crate) fn fork_release() {
    let _ = FORK_TABLE.try_with(|c| c.borrow_mut().take());
}

/// In a forked child: every SAN socket there is now is the parent's.
pub(crate) fn mark_inherited() {
    if let Some(t) = TABLE.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
        for p in t.values() {
            p.inherited.store(true, Ordering::Relaxed);
        }
    }
}
