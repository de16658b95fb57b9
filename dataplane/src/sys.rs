//! Thin wrappers over the few Linux calls the engine needs (the eventfd and
//! ppoll helpers are the channel crate's, re-exported).
#![allow(unsafe_code)]

pub use dsan_channel::sys::{wait_readable, EventFd};

/// Resets the calling thread's CPU affinity to every CPU the machine has
/// (threads spawned by an EAL lcore inherit its single-core mask otherwise).
pub fn unpin_current_thread() {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) }.max(1) as usize;
    for cpu in 0..n.min(libc::CPU_SETSIZE as usize) {
        // SAFETY: cpu < CPU_SETSIZE, so CPU_SET stays inside the set.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: pid 0 means this thread; the set is valid for its size.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
}

/// Starts a thread named `name` that may run on every CPU: a thread
/// spawned by an EAL lcore inherits its single-core mask, and one that
/// polled or slept there would take the lcore's core (every thread of the
/// daemon but the lcore starts this way; the lab test
/// `only_the_lcore_is_pinned` checks).
///
/// # Errors
/// As [`std::thread::Builder::spawn`].
pub fn spawn_unpinned<F, T>(name: &str, f: F) -> std::io::Result<std::thread::JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            unpin_current_thread();
            f()
        })
}

/// A kernel packet socket bound to one EtherType on one interface: it
/// receives a copy of each such frame the interface receives (never the
/// frames a PMD sends with `qdisc_bypass`). Nonblocking.
#[derive(Debug)]
pub struct PacketSocket {
    fd: std::os::fd::OwnedFd,
}

impl PacketSocket {
    /// A socket on `iface` for frames of `ethertype`, with a receive
    /// buffer of `rcvbuf` bytes (the kernel rounds it up to its minimum).
    ///
    /// # Errors
    /// If the interface does not exist or packet sockets are not allowed.
    pub fn open(iface: &str, ethertype: u16, rcvbuf: usize) -> std::io::Result<Self> {
        use std::os::fd::FromRawFd;
        let name = std::ffi::CString::new(iface)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: a NUL-terminated name that outlives the call.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(std::io::Error::last_os_error());
        }
        let proto = ethertype.to_be();
        // SAFETY: plain system call; the result is a new descriptor we own.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                i32::from(proto),
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: just created, owned by nobody else.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        let size = libc::c_int::try_from(rcvbuf).unwrap_or(libc::c_int::MAX);
        // SAFETY: a valid socket and an int option of the right size.
        unsafe {
            libc::setsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        // SAFETY: sockaddr_ll is plain data; zeroed is valid.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: a valid socket and a sockaddr_ll of the size given.
        let r = unsafe {
            libc::bind(
                raw,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    /// The descriptor (readable when a frame is there).
    pub fn fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.fd)
    }

    /// The next frame into `buf` (its length; a longer frame is cut to
    /// `buf`), waiting at most `timeout`; None if none came.
    pub fn recv(&self, buf: &mut [u8], timeout: std::time::Duration) -> Option<usize> {
        if !wait_readable(self.fd(), Some(timeout)) {
            return None;
        }
        // SAFETY: a valid socket and a writable buffer of the length given.
        let r = unsafe {
            libc::recv(
                self.fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        usize::try_from(r).ok()
    }

    /// Discards what the socket holds.
    pub fn drain(&self) {
        let mut b = [0u8; 1];
        loop {
            // SAFETY: a valid socket and a 1-byte buffer (frames are
            // truncated, which is all we want: they are discarded).
            let r = unsafe {
                libc::recv(
                    self.fd(),
                    b.as_mut_ptr().cast(),
                    1,
                    libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                )
            };
            if r < 0 {
                return;
            }
        }
    }
}

/// A kernel packet socket on the port's interface that sees the SAN's
/// frames too, so that a sleeping lcore whose PMD has no receive interrupt
/// (af_packet) wakes when a frame arrives instead of on a period.
///
/// It is bound to the SAN's EtherType only (the kernel hands it nothing
/// else, and never the frames the PMD sends), with the smallest receive
/// buffer: while the lcore is busy the few frames it holds are dropped by
/// the kernel's buffer check, before any copy. Before sleeping the lcore
/// empties it ([`PacketWaker::drain`]), then looks at the port once more:
/// a frame that arrives after that makes the socket readable.
#[derive(Debug)]
pub struct PacketWaker(PacketSocket);

impl PacketWaker {
    /// A waker on interface `iface` for frames of `ethertype`.
    ///
    /// # Errors
    /// If the interface does not exist or packet sockets are not allowed.
    pub fn open(iface: &str, ethertype: u16) -> std::io::Result<Self> {
        PacketSocket::open(iface, ethertype, 1).map(Self)
    }

    /// The descriptor to sleep on (readable when a frame came).
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.0.fd()
    }

    /// Discards what the socket holds (only the kernel's copies: the PMD
    /// receives the frames themselves).
    pub fn drain(&self) {
        self.0.drain();
    }
}

/// The signal that interrupts a thread blocked in a system call (a notifier
/// stuck writing an eventfd a process made blocking and filled): a handler
/// that does nothing, installed without SA_RESTART, so the call returns
/// EINTR. SIGRTMIN + 7 (nothing else in dsand uses the real-time signals).
fn interrupt_signal() -> libc::c_int {
    libc::SIGRTMIN() + 7
}

extern "C" fn on_interrupt(_: libc::c_int) {}

/// Installs the interrupt signal's handler (once per process; idempotent).
pub fn install_interrupt_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is valid; the handler is an
        // async-signal-safe function that does nothing; no SA_RESTART.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_interrupt as extern "C" fn(libc::c_int) as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = 0;
            libc::sigaction(interrupt_signal(), &sa, std::ptr::null_mut());
        }
    });
}

/// The calling thread, for [`interrupt_thread`].
pub fn current_thread() -> libc::pthread_t {
    // SAFETY: no preconditions.
    unsafe { libc::pthread_self() }
}

/// Interrupts `t`'s blocking system call, if it is in one (it returns
/// EINTR; [`install_interrupt_handler`] must have run). Never blocks.
pub fn interrupt_thread(t: libc::pthread_t) {
    // SAFETY: `t` is a thread of this process that has not been joined
    // (notifier threads are detached and signal their own end first).
    unsafe { libc::pthread_kill(t, interrupt_signal()) };
}
