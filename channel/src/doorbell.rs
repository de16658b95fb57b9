//! Doorbells: how a process (or a control thread) wakes a sleeping lcore.
//!
//! The lcore announces that it is about to sleep in one shared word (the flag
//! page, which processes can only map read-only: the memfd carries
//! `F_SEAL_FUTURE_WRITE` once the daemon has mapped it), fences, looks at its
//! inputs once more, and only then waits. A client publishes its work,
//! fences, and rings only if the word is set. Either the lcore sees the work
//! or the client sees the word, so no wake-up is lost and a busy lcore costs
//! its clients no system call (notification suppression, as virtio does).
//!
//! What a client rings is its own:
//! * the daemon's control threads ring the [`Doorbell`]'s eventfd, which no
//!   process ever holds;
//! * each attached process rings a [`Bell`] of its own, an eventfd the daemon
//!   created for it. The lcore waits on all of them through one epoll set,
//!   processes' bells edge-triggered, and **never reads a process's bell**:
//!   a process that clears O_NONBLOCK on its bell, reads it, or fills its
//!   counter harms no one but itself.

use crate::sys::{EventFd, Mapping};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// Bytes of the flag page.
pub const PAGE: usize = 4096;

/// The lcore's side: the flag page, the control eventfd and the epoll set of
/// every bell.
#[derive(Debug)]
pub struct Doorbell {
    page: Mapping,
    efd: EventFd,
    ep: OwnedFd,
    rung: AtomicU64,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl Doorbell {
    /// A new doorbell.
    ///
    /// # Errors
    /// If the eventfd, the epoll set or the page cannot be created.
    #[allow(unsafe_code)]
    pub fn new() -> io::Result<Self> {
        let page = Mapping::create("dsan-doorbell", PAGE)?;
        // Our writable mapping exists; nobody may make another.
        page.seal(libc::F_SEAL_FUTURE_WRITE)?;
        let efd = EventFd::new()?;
        // SAFETY: plain system call; the result is a new fd we own.
        let ep = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: just created, owned by nobody else.
        let ep = unsafe { OwnedFd::from_raw_fd(ep) };
        let d = Self {
            page,
            efd,
            ep,
            rung: AtomicU64::new(0),
        };
        d.ctl(libc::EPOLL_CTL_ADD, d.efd.as_raw_fd(), libc::EPOLLIN as u32)?;
        Ok(d)
    }

    #[allow(unsafe_code)]
    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events,
            u64: fd as u64,
        };
        // SAFETY: valid epoll and target fds, a live event struct.
        cvt(unsafe { libc::epoll_ctl(self.ep.as_raw_fd(), op, fd, &mut ev) }).map(|_| ())
    }

    /// Adds a process's bell to the set the lcore sleeps on (edge-triggered;
    /// the lcore never reads it).
    ///
    /// # Errors
    /// As `epoll_ctl`.
    pub fn watch(&self, bell: RawFd) -> io::Result<()> {
        self.ctl(
            libc::EPOLL_CTL_ADD,
            bell,
            (libc::EPOLLIN | libc::EPOLLET) as u32,
        )
    }

    /// Adds the port's wake-up descriptor (level-triggered: the lcore
    /// clears it itself after a sleep).
    ///
    /// # Errors
    /// As `epoll_ctl`.
    pub fn watch_wake(&self, fd: RawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, libc::EPOLLIN as u32)
    }

    /// Removes a process's bell (before the daemon closes its copy).
    pub fn unwatch(&self, bell: RawFd) {
        let _ = self.ctl(libc::EPOLL_CTL_DEL, bell, 0);
    }

    fn flag(&self) -> &AtomicU32 {
        self.page.at(0)
    }

    /// The memfd of the flag page (passed to attached processes, who can map
    /// it read-only only).
    pub fn page_fd(&self) -> RawFd {
        self.page.fd()
    }

    /// Call after publishing work for the lcore (control threads): wakes it if
    /// (and only if) it said it sleeps.
    pub fn ring(&self) {
        fence(Ordering::SeqCst);
        if self.is_sleeping() {
            self.rung.fetch_add(1, Ordering::Relaxed);
            self.efd.signal();
        }
    }

    /// Wakes the lcore whether or not it said it sleeps (stop requests).
    pub fn force(&self) {
        self.efd.signal();
    }

    /// Whether the lcore has announced that it sleeps.
    pub fn is_sleeping(&self) -> bool {
        self.flag().load(Ordering::Relaxed) != 0
    }

    /// The lcore announces (or withdraws) that it is about to sleep. After
    /// announcing, it must fence and look at its inputs once more.
    pub fn set_sleeping(&self, on: bool) {
        self.flag().store(u32::from(on), Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }

    /// The lcore waits for any bell, at most `timeout`. Returns whether one
    /// rang. Never blocks on anything a process controls: it polls the epoll
    /// set, takes its ready events without waiting, and drains only its own
    /// control eventfd.
    #[allow(unsafe_code)]
    pub fn wait(&self, timeout: Duration) -> bool {
        if !crate::sys::wait_readable(self.ep.as_raw_fd(), Some(timeout)) {
            return false;
        }
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 64];
        // Take what is ready (edge-triggered bells leave the ready list here).
        // SAFETY: a valid epoll fd and a buffer of 64 events; timeout 0.
        while unsafe { libc::epoll_wait(self.ep.as_raw_fd(), evs.as_mut_ptr(), 64, 0) } == 64 {}
        self.efd.drain();
        true
    }

    /// How many times a ring actually wrote the control eventfd.
    pub fn times_rung(&self) -> u64 {
        self.rung.load(Ordering::Relaxed)
    }
}

/// A process's side: the lcore's flag (read-only) and the process's own bell.
#[derive(Debug)]
pub struct Bell {
    page: Mapping,
    efd: OwnedFd,
}

impl Bell {
    /// A bell from the descriptors the daemon passed at attach.
    ///
    /// # Errors
    /// If the page cannot be mapped.
    pub fn open(page: OwnedFd, bell: OwnedFd) -> io::Result<Self> {
        Ok(Self {
            page: Mapping::map_readonly(page, PAGE)?,
            efd: bell,
        })
    }

    /// Call after publishing work: rings if (and only if) the lcore said it sleeps.
    pub fn ring(&self) {
        fence(Ordering::SeqCst);
        let flag: &AtomicU32 = self.page.at(0);
        if flag.load(Ordering::Relaxed) != 0 {
            crate::sys::signal_eventfd(self.efd.as_raw_fd());
        }
    }
}

#[cfg(test)]
#[allow(unsafe_code)] // descriptors duplicated and flags changed by hand
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn rings_only_when_sleeping() {
        let d = Doorbell::new().unwrap();
        d.ring();
        assert_eq!(d.times_rung(), 0);
        assert!(!d.wait(Duration::ZERO));
        d.set_sleeping(true);
        d.ring();
        assert_eq!(d.times_rung(), 1);
        assert!(d.wait(Duration::ZERO));
        assert!(!d.wait(Duration::ZERO), "drained");
        d.set_sleeping(false);
        assert!(!d.is_sleeping());
    }

    #[test]
    fn a_process_bell_wakes_the_lcore_and_cannot_block_it() {
        let d = Doorbell::new().unwrap();
        let bell = EventFd::new().unwrap();
        d.watch(bell.as_raw_fd()).unwrap();
        // The process's view.
        let page = d.page.fd();
        // SAFETY: dup of valid fds gives new fds we own.
        let (p, b) = unsafe {
            (
                OwnedFd::from_raw_fd(libc::dup(page)),
                OwnedFd::from_raw_fd(libc::dup(bell.as_raw_fd())),
            )
        };
        // The process cannot map the flag page writable.
        let dup_page = p.as_fd().try_clone_to_owned().unwrap();
        assert!(
            Mapping::map(dup_page, PAGE).is_err(),
            "sealed against writes"
        );
        let app = Bell::open(p, b).unwrap();
        app.ring();
        assert!(!d.wait(Duration::ZERO), "not sleeping: no ring");
        d.set_sleeping(true);
        app.ring();
        assert!(d.wait(Duration::from_secs(1)));
        assert!(!d.wait(Duration::ZERO), "edge-triggered: one wake per ring");
        // Hostile: a blocking bell whose counter the process reads away. The
        // lcore never reads the bell, so it cannot block on it: the ring is
        // simply lost (to the process that stole it) and the wait times out.
        // SAFETY: fcntl on an fd we own.
        unsafe { libc::fcntl(app.efd.as_raw_fd(), libc::F_SETFL, 0) };
        app.ring();
        assert_eq!(crate::sys::drain_eventfd(app.efd.as_raw_fd()), 2);
        let t = std::time::Instant::now();
        assert!(!d.wait(Duration::from_millis(20)));
        assert!(t.elapsed() < Duration::from_millis(500));
        // And it still wakes the lcore when it rings honestly again.
        app.ring();
        assert!(d.wait(Duration::from_secs(1)));
        d.unwatch(bell.as_raw_fd());
    }
}
