//! The doorbell: how a process (or a control thread) wakes a sleeping lcore.
//!
//! An eventfd plus one shared word that says the lcore sleeps on it. The
//! lcore sets the word, fences, looks at its inputs once more, and only then
//! waits on the eventfd; a client publishes its work, fences, and writes the
//! eventfd only if the word is set ([`Doorbell::ring`]). Either the lcore sees
//! the work or the client sees the word, so no wake-up is lost and a busy
//! lcore costs its clients no system call (notification suppression, as
//! virtio does).

use crate::sys::{EventFd, Mapping};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// Bytes of the flag page.
pub const PAGE: usize = 4096;

/// See the module documentation.
#[derive(Debug)]
pub struct Doorbell {
    page: Mapping,
    efd: EventFd,
    rung: AtomicU64,
}

impl Doorbell {
    /// A new doorbell (the lcore's side).
    ///
    /// # Errors
    /// If the eventfd or the page cannot be created.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            page: Mapping::create("dsan-doorbell", PAGE)?,
            efd: EventFd::new()?,
            rung: AtomicU64::new(0),
        })
    }

    /// A doorbell received from the daemon (a client's side).
    ///
    /// # Errors
    /// If the page cannot be mapped.
    pub fn open(page: OwnedFd, efd: OwnedFd) -> std::io::Result<Self> {
        Ok(Self {
            page: Mapping::map(page, PAGE)?,
            efd: EventFd::from_owned(efd),
            rung: AtomicU64::new(0),
        })
    }

    fn flag(&self) -> &AtomicU32 {
        self.page.at(0)
    }

    /// The memfd of the flag page (passed to attached processes).
    pub fn page_fd(&self) -> RawFd {
        self.page.fd()
    }

    /// The eventfd (passed to attached processes).
    pub fn eventfd(&self) -> RawFd {
        self.efd.as_raw_fd()
    }

    /// Call after publishing work for the lcore: wakes it if (and only if) it
    /// said it sleeps.
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

    /// The lcore waits for a ring, at most `timeout`; drains it.
    pub fn wait(&self, timeout: Duration) -> bool {
        let rung = self.efd.wait(Some(timeout));
        if rung {
            self.efd.drain();
        }
        rung
    }

    /// How many times a ring actually wrote the eventfd.
    pub fn times_rung(&self) -> u64 {
        self.rung.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
