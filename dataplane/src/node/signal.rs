//! Signalling a process's socket: completing its command (futex wake-up
//! of a waiting thread) and raising an event bit (its registered event
//! descriptor at the end of the pass: a wake socket by the lcore itself,
//! an eventfd through the process's notifier; and waiting threads).
//! Used by the application side ([`super::apps`]: commands and the core's
//! events for them) and the streams ([`super::streams`]).

use dsan_channel::region::{SockShm, FD_CLOSE, FD_WRITE};
use dsan_channel::sys;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// A registered event descriptor and the events that signal it.
#[derive(Debug)]
pub(super) struct EventReg {
    pub(super) fd: Arc<OwnedFd>,
    /// A second descriptor that FD_WRITE signals instead of `fd` (so that a
    /// process can wait for "readable" and "writable" apart, as poll does).
    pub(super) wfd: Option<Arc<OwnedFd>>,
    pub(super) mask: u32,
    /// Writes `fd` for the lcore (see [`super::notify`]); eventfds only.
    pub(super) notifier: Option<Arc<super::Notifier>>,
    /// `fd` and `wfd` are wake socket senders (`dsan_channel::wake`): the
    /// lcore signals them itself, at the end of the pass.
    pub(super) direct: bool,
}

impl EventReg {
    /// Signals `fd` at the end of the pass. False if it cannot be (an
    /// eventfd whose notifier is stuck or missing).
    fn post(&self, fd: &Arc<OwnedFd>) -> bool {
        if self.direct {
            super::notify::wake_at_end(fd);
            return true;
        }
        self.notifier.as_ref().is_some_and(|n| n.notify(fd))
    }
}

impl EventReg {
    pub(super) fn descriptors(&self) -> u32 {
        1 + u32::from(self.wfd.is_some())
    }
}

/// Completes command `seq` of a socket with `result`, waking a waiting thread.
pub(super) fn complete(s: &SockShm, seq: u32, result: i64) {
    s.result.store(result, Ordering::Relaxed);
    s.done_seq.store(seq, Ordering::Release);
    std::sync::atomic::fence(Ordering::SeqCst);
    if s.waiters.load(Ordering::Relaxed) != 0 {
        sys::futex_wake(&s.done_seq);
    }
}

/// Records event `bit` on a socket, signals its eventfd if the application
/// selected the bit, and wakes threads waiting for arrivals. Returns false if
/// a selected eventfd could not be signalled.
pub(super) fn raise(s: &SockShm, reg: Option<&EventReg>, bit: u32) -> bool {
    s.events.fetch_or(bit, Ordering::AcqRel);
    s.arrivals.fetch_add(1, Ordering::Release);
    let mut ok = true;
    if let Some(r) = reg.filter(|r| r.mask & bit != 0) {
        // Never an eventfd write from the lcore: the process could make it
        // block (a wake socket's cannot).
        let fd = match &r.wfd {
            Some(w) if bit == FD_WRITE => w,
            _ => &r.fd,
        };
        ok = r.post(fd);
        if let Some(w) = r.wfd.as_ref().filter(|_| bit == FD_CLOSE) {
            // A writer waiting for room learns at once that none will come.
            ok &= r.post(w);
        }
    }
    std::sync::atomic::fence(Ordering::SeqCst);
    if s.waiters.load(Ordering::Relaxed) != 0 {
        sys::futex_wake(&s.arrivals);
    }
    ok
}
