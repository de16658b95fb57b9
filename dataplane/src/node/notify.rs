//! Signalling applications' event descriptors at the end of the lcore's
//! pass.
//!
//! A wake socket's sender (`dsan_channel::wake`) is signalled by the lcore
//! itself: that send cannot block, whatever the process does. An
//! application's eventfd shares its open file description with the copy
//! the daemon holds, so the application can clear O_NONBLOCK on it and fill
//! its counter: a `write` on it may then block. The lcore never makes that
//! call: it queues the descriptor (no allocation, no system call but the
//! wake-up of a daemon-private eventfd) for a notifier thread of that
//! process, which does the writes. A hostile process stalls only its own
//! notifier; every other process and the lcore carry on.

use crossbeam_queue::ArrayQueue;
use dsan_channel::sys::{self, EventFd};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Signals queued at most per process (beyond: counted as failed).
const QUEUE: usize = 4096;

thread_local! {
    /// The notifiers given signals during the lcore's current pass: each is
    /// woken once, at the pass's end (`wake_due`), however many signals
    /// the pass queued for it.
    static DUE: std::cell::RefCell<Vec<Arc<Notifier>>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The wake sockets signalled during the pass, each sent its token at
    /// the pass's end.
    static WAKES: std::cell::RefCell<Vec<Arc<OwnedFd>>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Wake tokens sent, and those that failed (neither sent nor moot: the
    /// socket full or gone), since the counters last took them.
    static WAKE_COUNTS: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
}

/// Queues a token for wake socket sender `fd`, sent at the end of the pass
/// (once however often the pass signalled it).
pub(super) fn wake_at_end(fd: &Arc<OwnedFd>) {
    let queued = WAKES.try_with(|w| {
        let mut w = w.borrow_mut();
        if !w.iter().any(|x| Arc::ptr_eq(x, fd)) {
            w.push(fd.clone());
        }
    });
    if queued.is_err() {
        send_wake(fd);
    }
}

fn send_wake(fd: &OwnedFd) {
    let r = dsan_channel::wake::signal(fd.as_raw_fd());
    let _ = WAKE_COUNTS.try_with(|c| {
        let (sent, failed) = c.get();
        c.set(match r {
            dsan_channel::wake::Signalled::Sent => (sent + 1, failed),
            dsan_channel::wake::Signalled::Full | dsan_channel::wake::Signalled::Gone => {
                (sent, failed)
            }
            dsan_channel::wake::Signalled::Failed(_) => (sent, failed + 1),
        })
    });
}

/// Wake tokens sent and failed on this thread (the lcore) since the last
/// call.
pub(super) fn take_wake_counts() -> (u64, u64) {
    WAKE_COUNTS
        .try_with(|c| c.replace((0, 0)))
        .unwrap_or((0, 0))
}

/// At the end of a pass of the lcore: sends each wake socket signalled
/// during it its token, and wakes each notifier that was given signals
/// during it, once (one system call per process per pass, however many of
/// its sockets became ready).
pub(super) fn wake_due() {
    let _ = WAKES.try_with(|w| {
        let mut w = w.borrow_mut();
        for fd in w.iter() {
            send_wake(fd);
        }
        w.clear();
    });
    let _ = DUE.try_with(|d| {
        for n in d.borrow_mut().drain(..) {
            n.due.store(false, Ordering::Release);
            n.wake.signal();
        }
    });
}

/// One attached process's notifier.
#[derive(Debug)]
pub struct Notifier {
    queue: ArrayQueue<Arc<OwnedFd>>,
    wake: EventFd,
    /// In [`DUE`]: to be woken at the end of the lcore's pass.
    due: AtomicBool,
    stop: AtomicBool,
    /// Signals skipped because the process's eventfd was full.
    skipped: std::sync::atomic::AtomicU64,
    /// The thread, and whether it is inside a write: a write the process
    /// made block is interrupted at its detach (see [`Notifier::reap`]).
    thread: std::sync::OnceLock<libc::pthread_t>,
    writing: AtomicBool,
    /// The thread has ended.
    ended: AtomicBool,
}

impl Notifier {
    /// Starts a notifier thread for process `pid` (call from a control
    /// thread, never from the lcore).
    ///
    /// # Errors
    /// If the eventfd or the thread cannot be created.
    pub fn start(pid: u32) -> std::io::Result<Arc<Notifier>> {
        crate::sys::install_interrupt_handler();
        let n = Arc::new(Notifier {
            queue: ArrayQueue::new(QUEUE),
            wake: EventFd::new()?,
            due: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            skipped: std::sync::atomic::AtomicU64::new(0),
            thread: std::sync::OnceLock::new(),
            writing: AtomicBool::new(false),
            ended: AtomicBool::new(false),
        });
        let t = n.clone();
        crate::sys::spawn_unpinned(&format!("notify-{pid}"), move || {
            let _ = t.thread.set(crate::sys::current_thread());
            while !t.stop.load(Ordering::Acquire) {
                t.wake.wait(None);
                t.wake.drain();
                while let Some(fd) = t.queue.pop() {
                    // A full counter is the process's doing: skip it.
                    // (It could still fill it between this look and the
                    // write, and make the write block: then only this
                    // thread waits, until the process detaches and
                    // `reap` interrupts the write.)
                    t.writing.store(true, Ordering::SeqCst);
                    // (Signals queued before a shutdown are still
                    // delivered: the last FD_ACCEPT says ENETDOWN.)
                    let ok =
                        sys::writable_now(fd.as_raw_fd()) && sys::signal_eventfd(fd.as_raw_fd());
                    t.writing.store(false, Ordering::SeqCst);
                    if !ok {
                        t.skipped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            t.ended.store(true, Ordering::Release);
        })?;
        Ok(n)
    }

    /// After [`shutdown`](Self::shutdown), off the lcore: interrupts a write
    /// the process made block until the thread has ended (at most `within`).
    /// Returns whether it ended.
    pub fn reap(&self, within: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        loop {
            if self.ended.load(Ordering::Acquire) {
                return true;
            }
            if self.writing.load(Ordering::SeqCst) {
                if let Some(t) = self.thread.get() {
                    crate::sys::interrupt_thread(*t);
                }
            }
            self.wake.signal();
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Queues a signal of `fd` (lcore side); the notifier is woken at the
    /// end of the pass (`wake_due`). Returns false if the queue is full
    /// (the process's notifier is stuck).
    pub fn notify(self: &Arc<Self>, fd: &Arc<OwnedFd>) -> bool {
        if self.queue.push(fd.clone()).is_err() {
            return false;
        }
        if !self.due.swap(true, Ordering::AcqRel) {
            let queued = DUE.try_with(|d| d.borrow_mut().push(self.clone())).is_ok();
            if !queued {
                // (The thread's storage is gone: wake it now.)
                self.due.store(false, Ordering::Release);
                self.wake.signal();
            }
        }
        true
    }

    /// Signals skipped so far (the process's eventfd was full).
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    /// Ends the thread (when its process detaches).
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        self.wake.signal();
    }
}
