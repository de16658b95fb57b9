//! Thin wrappers over the few Linux calls the engine needs (eventfd, ppoll).
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

macro_rules! syscall {
    ($e:expr) => {{
        let r = $e;
        if r == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }};
}

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
        let fd = syscall!(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
        // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Wraps an fd received from elsewhere (it must be an eventfd).
    pub fn from_owned(fd: OwnedFd) -> Self {
        Self(fd)
    }

    /// Adds 1 to the counter (signals). A full counter is drained and retried.
    pub fn signal(&self) {
        let one: u64 = 1;
        loop {
            // SAFETY: writes 8 bytes from a live u64 to an fd we own.
            let r = unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
            if r == 8 {
                return;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => {
                    self.drain();
                }
                _ => return,
            }
        }
    }

    /// Reads and clears the counter; returns the value (0 if nothing pending).
    pub fn drain(&self) -> u64 {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from an fd we own.
        let r = unsafe { libc::read(self.0.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        if r == 8 {
            v
        } else {
            0
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eventfd_signal_wait_drain() {
        let e = EventFd::new().unwrap();
        assert!(!e.wait(Some(Duration::from_millis(1))));
        e.signal();
        e.signal();
        assert!(e.wait(Some(Duration::ZERO)));
        assert_eq!(e.drain(), 2);
        assert_eq!(e.drain(), 0);
    }
}
