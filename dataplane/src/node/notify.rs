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

/// Sends wake socket sender `fd` its token: (sent, failed) as 0 or 1
/// (neither when moot: the socket full or gone).
fn signal_wake(fd: &OwnedFd) -> (u64, u64) {
    match dsan_channel::wake::signal(fd.as_raw_fd()) {
        dsan_channel::wake::Signalled::Sent => (1, 0),
        dsan_channel::wake::Signalled::Full | dsan_channel::wake::Signalled::Gone => (0, 0),
        dsan_channel::wake::Signalled::Failed(_) => (0, 1),
    }
}

fn send_wake(fd: &OwnedFd) {
    let (s, f) = signal_wake(fd);
    let _ = WAKE_COUNTS.try_with(|c| {
        let (sent, failed) = c.get();
        c.set((sent + s, failed + f));
    });
}

/// Wake tokens sent and failed by this thread (the lcore) and the waker
/// since the last call.
pub(super) fn take_wake_counts() -> (u64, u64) {
    let (sent, failed) = WAKE_COUNTS
        .try_with(|c| c.replace((0, 0)))
        .unwrap_or((0, 0));
    (
        sent + WAKER_SENT.swap(0, Ordering::Relaxed),
        failed + WAKER_FAILED.swap(0, Ordering::Relaxed),
    )
}

/// At most this many wake tokens of a pass are sent by the lcore itself:
/// a pass that readied more wake sockets hands them all to the waker
/// thread ([`start_waker`]) with one eventfd write, so that it costs the
/// lcore one system call, not one per socket (a single connection's
/// message still wakes its program with no thread in between).
pub const DIRECT_WAKES: usize = 2;

/// The waker: a daemon thread that sends wake tokens the lcore hands it.
/// A wake socket's send never blocks, so one thread serves every process.
#[derive(Debug)]
struct Waker {
    queue: ArrayQueue<Arc<OwnedFd>>,
    wake: EventFd,
}

static WAKER: std::sync::OnceLock<Waker> = std::sync::OnceLock::new();
/// The waker's tokens sent and failed, not yet taken by the counters.
static WAKER_SENT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static WAKER_FAILED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Starts the waker thread if it is not running (call from a control
/// thread, never from the lcore: when a process registers its first wake
/// socket). Until it runs, the lcore sends every token itself.
///
/// # Errors
/// If the eventfd or the thread cannot be created.
pub fn start_waker() -> std::io::Result<()> {
    static STARTING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = STARTING.lock().unwrap_or_else(|e| e.into_inner());
    if WAKER.get().is_some() {
        return Ok(());
    }
    let w = Waker {
        queue: ArrayQueue::new(QUEUE),
        wake: EventFd::new()?,
    };
    let _ = WAKER.set(w);
    crate::sys::spawn_unpinned("dsan-waker", || {
        let w = WAKER.get().expect("set before the thread starts");
        loop {
            w.wake.wait(None);
            w.wake.drain();
            while let Some(fd) = w.queue.pop() {
                let (sent, failed) = signal_wake(&fd);
                WAKER_SENT.fetch_add(sent, Ordering::Relaxed);
                WAKER_FAILED.fetch_add(failed, Ordering::Relaxed);
            }
        }
    })?;
    Ok(())
}

/// At the end of a pass of the lcore: sends each wake socket signalled
/// during it its token (itself for up to [`DIRECT_WAKES`], else through
/// the waker), and wakes each notifier that was given signals during it,
/// once (one system call per process per pass, however many of its
/// sockets became ready).
pub(super) fn wake_due() {
    let _ = WAKES.try_with(|w| {
        let mut w = w.borrow_mut();
        let waker = WAKER.get().filter(|_| w.len() > DIRECT_WAKES);
        match waker {
            Some(k) => {
                for fd in w.drain(..) {
                    if let Err(fd) = k.queue.push(fd) {
                        send_wake(&fd);
                    }
                }
                k.wake.signal();
            }
            None => {
                for fd in w.iter() {
                    send_wake(fd);
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Whether wake socket `w` gets a token within 5 s (taking it).
    fn woken(w: &OwnedFd) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if dsan_channel::wake::drain(w.as_raw_fd()) {
                return true;
            }
            std::thread::yield_now();
        }
        false
    }

    #[test]
    fn a_pass_that_readies_many_wake_sockets_wakes_each_through_the_waker() {
        start_waker().unwrap();
        let n = DIRECT_WAKES * 8;
        let pairs: Vec<(OwnedFd, Arc<OwnedFd>)> = (0..n)
            .map(|_| {
                let w = dsan_channel::wake::new(true, true).unwrap();
                let s = Arc::new(dsan_channel::wake::sender(w.as_raw_fd()).unwrap());
                (w, s)
            })
            .collect();
        let before = WAKER_SENT.load(Ordering::Relaxed);
        // One pass: every socket signalled (one twice: one token).
        for (_, s) in &pairs {
            wake_at_end(s);
        }
        wake_at_end(&pairs[0].1);
        wake_due();
        for (i, (w, _)) in pairs.iter().enumerate() {
            assert!(woken(w), "wake socket {i} of {n} not woken");
        }
        // The waker sent them (the lcore none of its own).
        let deadline = Instant::now() + Duration::from_secs(5);
        while WAKER_SENT.load(Ordering::Relaxed) < before + n as u64 {
            assert!(Instant::now() < deadline, "the waker sent fewer than {n}");
            std::thread::sleep(Duration::from_millis(1));
        }
        let (own, _) = WAKE_COUNTS.with(|c| c.get());
        assert_eq!(own, 0, "the lcore sent tokens itself");
    }

    #[test]
    fn a_pass_with_few_wake_sockets_wakes_them_itself() {
        let w = dsan_channel::wake::new(true, true).unwrap();
        let s = Arc::new(dsan_channel::wake::sender(w.as_raw_fd()).unwrap());
        wake_at_end(&s);
        wake_due();
        // Sent by this thread (the lcore's part), before wake_due returned.
        assert_eq!(WAKE_COUNTS.with(|c| c.get()).0, 1);
        assert!(woken(&w));
    }
}
