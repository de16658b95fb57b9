//! The lcore loop, in the shape of DPDK's l2fwd.
//!
//! Per-lcore state is built before launch and moved into [`run`]; the loop runs
//! until the stop flag is set. Each pass reads the clock, receives a burst of up
//! to [`BURST`] frames and hands it to the [`Handler`], lets the handler do its
//! other work (application rings, commands, timers), and drains the transmit
//! buffer when it holds a burst or when [`EngineConfig::drain_interval`] has
//! passed. Counters are plain fields of the loop, published to [`LcoreStats`]
//! on each drain tick, so the hot path does no atomic read-modify-write.
//!
//! The idle policy is chosen at start-up:
//! * [`IdlePolicy::Poll`] spins for ever (isolated cores);
//! * [`IdlePolicy::Adaptive`] spins for `spin`, then announces that it sleeps
//!   ([`Doorbell::is_sleeping`]), looks once more at its inputs, and sleeps on the
//!   doorbell's eventfd for at most `max_sleep` (so arriving frames are picked up
//!   within that bound). Clients ring the doorbell only when the loop sleeps.
//!   A port that can wake the loop on a frame ([`Device::rx_wake_fd`]: a
//!   receive interrupt, or for af_packet a kernel packet socket) is armed
//!   before that last look, and the loop then sleeps until work comes (a
//!   frame, a bell, the next timer), at most [`EngineConfig::wake_sleep_cap`].

use crate::device::{Device, BURST};
use crate::time::{Clock, Instant};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How the loop behaves when there is nothing to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdlePolicy {
    /// Busy-poll without pause.
    Poll,
    /// Spin for `spin` after the last work, then sleep up to `max_sleep` at a time.
    Adaptive {
        /// How long to keep spinning after the last piece of work.
        spin: Duration,
        /// Longest single sleep: the bound on how late an arriving frame is seen.
        max_sleep: Duration,
        /// The spin while work comes in a rhythm: when work came back within
        /// this long of the loop's last work although the loop had gone to
        /// sleep (a request/response exchange whose round trip is longer
        /// than `spin`: each message would otherwise pay a wake-up, and the
        /// wake-up itself lengthens the round trip), the loop spins this
        /// long until a spin of it ends with no work. Zero: never.
        rhythm: Duration,
    },
}

impl IdlePolicy {
    /// The adaptive policy with the defaults documented in `docs/architecture.md`
    /// (spin 20 us, 200 us while an answer is awaited, see
    /// [`Handler::awaiting`]; sleep at most 50 us). A long spin with nothing
    /// awaited keeps the loop runnable through a busy application's pauses,
    /// and on a machine without spare cores it then competes with that
    /// application for the core (wrk against nginx through the preload:
    /// 3,000-38,000 requests per second from run to run with 200 us,
    /// 9,000-11,000 with 50 us, 18,500-25,700 with 20 us).
    pub const ADAPTIVE_DEFAULT: IdlePolicy = IdlePolicy::Adaptive {
        spin: Duration::from_micros(20),
        max_sleep: Duration::from_micros(50),
        rhythm: DEFAULT_RHYTHM,
    };

    /// `"poll"` or `"adaptive"`.
    pub fn name(&self) -> &'static str {
        match self {
            IdlePolicy::Poll => "poll",
            IdlePolicy::Adaptive { .. } => "adaptive",
        }
    }
}

impl std::str::FromStr for IdlePolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "poll" => Ok(IdlePolicy::Poll),
            "adaptive" => Ok(IdlePolicy::ADAPTIVE_DEFAULT),
            other => {
                // `adaptive:SPIN_US[:RHYTHM_US]`: the adaptive policy with
                // another spin (and rhythm spin; 0 turns it off).
                let us = |v: &str| v.parse::<u64>().ok().filter(|us| *us <= 1_000_000);
                let parsed = other.strip_prefix("adaptive:").and_then(|rest| {
                    let mut it = rest.splitn(2, ':');
                    let spin = us(it.next()?)?;
                    let rhythm = match it.next() {
                        Some(r) => Duration::from_micros(us(r)?),
                        None => DEFAULT_RHYTHM,
                    };
                    Some(IdlePolicy::Adaptive {
                        spin: Duration::from_micros(spin),
                        max_sleep: Duration::from_micros(50),
                        rhythm,
                    })
                });
                parsed.ok_or_else(|| {
                    format!(
                        "unknown idle policy {other:?} (expected \"poll\", \"adaptive\" or \"adaptive:SPIN_US[:RHYTHM_US]\")"
                    )
                })
            }
        }
    }
}

/// Loop configuration.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Idle behaviour.
    pub idle: IdlePolicy,
    /// Longest time a frame waits in the transmit buffer (l2fwd's BURST_TX_DRAIN_US).
    pub drain_interval: Duration,
    /// Longest single sleep when the port wakes the loop on a frame
    /// ([`Device::rx_wake_fd`]): commands ring the doorbell and timers set
    /// the sleep's end, so this only bounds the damage of a lost wake-up.
    pub wake_sleep_cap: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            idle: IdlePolicy::ADAPTIVE_DEFAULT,
            drain_interval: Duration::from_micros(100),
            wake_sleep_cap: Duration::from_secs(1),
        }
    }
}

pub use dsan_channel::doorbell::Doorbell;

/// Per-lcore counters, written by the loop on each drain tick, read by anyone.
#[derive(Debug, Default)]
pub struct LcoreStats {
    /// Frames received from the device.
    pub rx_frames: AtomicU64,
    /// Frames the device accepted for transmission.
    pub tx_frames: AtomicU64,
    /// Frames the device refused (freed and counted, as l2fwd does).
    pub tx_dropped: AtomicU64,
    /// Frames that could not be built for lack of buffers.
    pub alloc_failed: AtomicU64,
    /// Loop passes that found work.
    pub busy_polls: AtomicU64,
    /// Loop passes that found none.
    pub idle_polls: AtomicU64,
    /// Times the loop went to sleep (adaptive policy).
    pub sleeps: AtomicU64,
    /// Of those, sleeps until work (the port wakes the loop on a frame),
    /// not for a period.
    pub wake_sleeps: AtomicU64,
    /// Times work came back soon enough after a sleep that the loop took
    /// to spinning for the rhythm (see [`IdlePolicy::Adaptive`]).
    pub rhythm_spins: AtomicU64,
}

#[derive(Debug, Default, Clone, Copy)]
struct LocalStats {
    rx_frames: u64,
    tx_frames: u64,
    tx_dropped: u64,
    alloc_failed: u64,
    busy_polls: u64,
    idle_polls: u64,
    sleeps: u64,
    wake_sleeps: u64,
    rhythm_spins: u64,
}

impl LocalStats {
    fn publish(&self, s: &LcoreStats) {
        s.rx_frames.store(self.rx_frames, Ordering::Relaxed);
        s.tx_frames.store(self.tx_frames, Ordering::Relaxed);
        s.tx_dropped.store(self.tx_dropped, Ordering::Relaxed);
        s.alloc_failed.store(self.alloc_failed, Ordering::Relaxed);
        s.busy_polls.store(self.busy_polls, Ordering::Relaxed);
        s.idle_polls.store(self.idle_polls, Ordering::Relaxed);
        s.sleeps.store(self.sleeps, Ordering::Relaxed);
        s.wake_sleeps.store(self.wake_sleeps, Ordering::Relaxed);
        s.rhythm_spins.store(self.rhythm_spins, Ordering::Relaxed);
    }
}

/// What the loop shares with the control side.
#[derive(Debug)]
pub struct EngineShared {
    /// Set to stop the loop.
    pub stop: AtomicBool,
    /// Wakes a sleeping loop.
    pub doorbell: Doorbell,
    /// Published counters.
    pub stats: LcoreStats,
    /// The policy the loop runs with.
    pub idle: IdlePolicy,
}

impl EngineShared {
    /// Shared state for a loop with this policy.
    ///
    /// # Errors
    /// If the doorbell's eventfd cannot be created.
    pub fn new(idle: IdlePolicy) -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            stop: AtomicBool::new(false),
            doorbell: Doorbell::new()?,
            stats: Default::default(),
            idle,
        }))
    }

    /// Asks the loop to stop and wakes it.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.doorbell.force();
    }
}

/// The transmit side as the handler sees it: builds frames into device buffers
/// and sends them in bursts.
pub struct Tx<'a, D: Device> {
    dev: &'a mut D,
    pending: &'a mut Vec<D::Buf>,
    stats: &'a mut LocalStats,
}

impl<D: Device> Tx<'_, D> {
    /// Allocates a buffer of `len` bytes, lets `fill` write it, and queues it.
    /// Returns false (and counts) if no buffer was available.
    pub fn send_with(&mut self, len: usize, fill: impl FnOnce(&mut [u8])) -> bool {
        let Some(mut buf) = self.dev.alloc(len) else {
            self.stats.alloc_failed += 1;
            return false;
        };
        fill(buf.as_mut());
        self.push(buf);
        true
    }

    /// Queues a buffer that is already built (e.g. a received one, reused).
    pub fn push(&mut self, buf: D::Buf) {
        self.pending.push(buf);
        if self.pending.len() >= BURST {
            flush(self.dev, self.pending, self.stats);
        }
    }

    /// The device's MAC.
    pub fn mac(&self) -> crate::wire::EthernetAddress {
        self.dev.mac()
    }
}

fn flush<D: Device>(dev: &mut D, pending: &mut Vec<D::Buf>, stats: &mut LocalStats) {
    if pending.is_empty() {
        return;
    }
    let sent = dev.tx_burst(pending);
    stats.tx_frames += sent as u64;
    if !pending.is_empty() {
        // One retry, then free and count, as l2fwd does with unsent mbufs.
        let again = dev.tx_burst(pending);
        stats.tx_frames += again as u64;
        stats.tx_dropped += pending.len() as u64;
        pending.clear();
    }
}

/// The adaptive loop's spin while work comes in a rhythm (see
/// [`IdlePolicy::Adaptive`]): longer than a request/response round trip
/// through two programs on this lab (15-70 us), short enough that a loop
/// whose rhythm ended goes back to sleep soon.
pub const DEFAULT_RHYTHM: Duration = Duration::from_micros(100);

/// How much longer the adaptive loop spins while its handler awaits an
/// answer ([`Handler::awaiting`]): a connect's reply comes after the peer's
/// application has been woken and has decided, tens of microseconds, and a
/// sleeping loop costs a wake-up on top. With nothing awaited, a short spin
/// leaves the core to the applications.
pub const AWAIT_SPIN_FACTOR: u32 = 10;

/// What runs inside the loop.
pub trait Handler<D: Device> {
    /// A burst of received frames (the handler takes them out of `rx`).
    fn on_rx(&mut self, now: Instant, rx: &mut Vec<D::Buf>, tx: &mut Tx<'_, D>);
    /// Everything that does not arrive on the port: commands, application rings,
    /// timers. Returns whether it did any work.
    fn poll(&mut self, now: Instant, tx: &mut Tx<'_, D>) -> bool;
    /// Called on each drain tick, off the per-frame path.
    fn on_tick(&mut self, _now: Instant) {}
    /// When the handler next needs `poll` for a timer, if ever.
    fn next_deadline(&self) -> Option<Instant> {
        None
    }
    /// Whether an answer is due shortly (a connection being set up or torn
    /// down): the adaptive loop then spins [`AWAIT_SPIN_FACTOR`] times longer
    /// before it sleeps, so that the answer does not have to wake it.
    fn awaiting(&self) -> bool {
        false
    }
}

/// Runs the loop on the calling thread until `shared.stop` is set.
pub fn run<D: Device, H: Handler<D>>(
    dev: &mut D,
    handler: &mut H,
    cfg: &EngineConfig,
    shared: &EngineShared,
    clock: Clock,
) {
    let mut rx: Vec<D::Buf> = Vec::with_capacity(BURST);
    let mut pending: Vec<D::Buf> = Vec::with_capacity(BURST * 2);
    let mut stats = LocalStats::default();
    let mut last_drain = clock.now();
    let mut last_busy = last_drain;
    let drain = cfg.drain_interval;
    // A port that can wake the loop on a frame: its descriptor joins the
    // doorbell's set.
    let wake = dev
        .rx_wake_fd()
        .is_some_and(|fd| shared.doorbell.watch_wake(fd).is_ok());
    // Work comes in a rhythm (see `IdlePolicy::Adaptive::rhythm`), and the
    // loop slept since its last work.
    let mut in_rhythm = false;
    let mut slept = false;

    while !shared.stop.load(Ordering::Relaxed) {
        let now = clock.now();
        let n = dev.rx_burst(&mut rx, BURST);
        let mut busy = n > 0;
        let mut tx = Tx {
            dev: &mut *dev,
            pending: &mut pending,
            stats: &mut stats,
        };
        if n > 0 {
            tx.stats.rx_frames += n as u64;
            handler.on_rx(now, &mut rx, &mut tx);
            rx.clear();
        }
        busy |= handler.poll(now, &mut tx);

        if now - last_drain >= drain {
            flush(dev, &mut pending, &mut stats);
            handler.on_tick(now);
            stats.publish(&shared.stats);
            last_drain = now;
        }
        if busy {
            if std::mem::take(&mut slept) {
                // Work back after a sleep: in a rhythm if a spin of the
                // rhythm's length would have caught it.
                in_rhythm = match cfg.idle {
                    IdlePolicy::Adaptive { rhythm, .. } => now - last_busy < rhythm,
                    IdlePolicy::Poll => false,
                };
                stats.rhythm_spins += u64::from(in_rhythm);
            }
            // What this pass produced leaves now: a burst is the batch, and a
            // reply must not wait for the drain tick.
            flush(dev, &mut pending, &mut stats);
            stats.busy_polls += 1;
            last_busy = now;
            continue;
        }
        stats.idle_polls += 1;
        if let IdlePolicy::Adaptive {
            spin,
            max_sleep,
            rhythm,
        } = cfg.idle
        {
            let mut spin = if handler.awaiting() {
                spin * AWAIT_SPIN_FACTOR
            } else {
                spin
            };
            if in_rhythm {
                spin = spin.max(rhythm);
            }
            if now - last_busy < spin {
                // On a shared core, let whatever else is runnable (often the
                // application we serve) have the CPU between two polls.
                std::thread::yield_now();
                continue;
            }
            // A whole spin without work: no rhythm (any more).
            in_rhythm = false;
            // Going to sleep: nothing may wait in the tx buffer.
            flush(dev, &mut pending, &mut stats);
            shared.doorbell.set_sleeping(true);
            // The port's wake-up is armed before the last look, so that a
            // frame arriving after that look wakes the loop.
            let armed = wake && dev.arm_rx_wake();
            // Last look at the inputs after announcing the sleep.
            let n = dev.rx_burst(&mut rx, BURST);
            let mut tx = Tx {
                dev: &mut *dev,
                pending: &mut pending,
                stats: &mut stats,
            };
            if n > 0 {
                tx.stats.rx_frames += n as u64;
                handler.on_rx(now, &mut rx, &mut tx);
                rx.clear();
            }
            let late = handler.poll(now, &mut tx) || n > 0;
            if !late && !shared.stop.load(Ordering::Relaxed) {
                let mut sleep = if armed {
                    stats.wake_sleeps += 1;
                    cfg.wake_sleep_cap
                } else {
                    max_sleep
                };
                if let Some(d) = handler.next_deadline() {
                    sleep = sleep.min(d.saturating_since(now));
                }
                stats.sleeps += 1;
                stats.publish(&shared.stats);
                shared.doorbell.wait(sleep);
                slept = true;
            }
            if armed {
                dev.disarm_rx_wake();
            }
            shared.doorbell.set_sleeping(false);
            if late {
                // Work at the last look: a spin of the rhythm's length
                // would have caught it.
                in_rhythm = rhythm > spin;
                stats.rhythm_spins += u64::from(in_rhythm);
                last_busy = clock.now();
            }
        }
    }
    flush(dev, &mut pending, &mut stats);
    stats.publish(&shared.stats);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Loopback;
    use crate::wire::EthernetAddress;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    const MA: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 1]);
    const MB: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 2]);

    /// Reflects every frame it receives; sends frames queued by the test.
    struct Reflector {
        outbox: Arc<Mutex<Vec<Vec<u8>>>>,
        seen: Arc<AtomicUsize>,
    }

    impl Handler<Loopback> for Reflector {
        fn on_rx(&mut self, _now: Instant, rx: &mut Vec<Vec<u8>>, tx: &mut Tx<'_, Loopback>) {
            for f in rx.drain(..) {
                self.seen.fetch_add(1, Ordering::Relaxed);
                tx.push(f);
            }
        }
        fn poll(&mut self, _now: Instant, tx: &mut Tx<'_, Loopback>) -> bool {
            let mut out = self.outbox.lock().unwrap();
            let busy = !out.is_empty();
            for f in out.drain(..) {
                let len = f.len();
                tx.send_with(len, |b| b.copy_from_slice(&f));
            }
            busy
        }
    }

    fn run_reflector(policy: IdlePolicy) {
        let (mut dev, mut peer) = Loopback::pair(1024, MA, MB);
        let shared = EngineShared::new(policy).unwrap();
        let outbox = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::new(AtomicUsize::new(0));
        let mut h = Reflector {
            outbox: outbox.clone(),
            seen: seen.clone(),
        };
        let cfg = EngineConfig {
            idle: policy,
            drain_interval: Duration::from_micros(100),
            ..Default::default()
        };
        let s2 = shared.clone();
        let t = std::thread::spawn(move || run(&mut dev, &mut h, &cfg, &s2, Clock::new()));

        // Frames in: the peer sends 100, the loop reflects them all back.
        let mut frames: Vec<Vec<u8>> = (0..100u8).map(|i| vec![i; 60]).collect();
        peer.tx_burst(&mut frames);
        let mut back = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while back.len() < 100 && std::time::Instant::now() < deadline {
            peer.rx_burst(&mut back, BURST);
        }
        assert_eq!(back.len(), 100);
        assert_eq!(back[7], vec![7u8; 60]);

        // Work from the control side: queue a frame, ring the doorbell.
        std::thread::sleep(Duration::from_millis(5)); // let an adaptive loop fall asleep
        outbox.lock().unwrap().push(vec![0xab; 64]);
        shared.doorbell.ring();
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while got.is_empty() && std::time::Instant::now() < deadline {
            peer.rx_burst(&mut got, BURST);
        }
        assert_eq!(got, vec![vec![0xab; 64]]);

        shared.request_stop();
        t.join().unwrap();
        let st = &shared.stats;
        assert_eq!(st.rx_frames.load(Ordering::Relaxed), 100);
        assert_eq!(st.tx_frames.load(Ordering::Relaxed), 101);
        assert!(st.busy_polls.load(Ordering::Relaxed) >= 1);
        assert!(st.idle_polls.load(Ordering::Relaxed) >= 1);
        match policy {
            IdlePolicy::Poll => assert_eq!(st.sleeps.load(Ordering::Relaxed), 0),
            IdlePolicy::Adaptive { .. } => assert!(st.sleeps.load(Ordering::Relaxed) > 0),
        }
    }

    #[test]
    fn frames_in_and_out_with_poll_policy() {
        run_reflector(IdlePolicy::Poll);
    }

    #[test]
    fn frames_in_and_out_with_adaptive_policy() {
        run_reflector(IdlePolicy::ADAPTIVE_DEFAULT);
    }

    /// Exchanges one frame at a time with a loop of `policy`, pausing
    /// `pause` between them (longer than the policy's spin); returns the
    /// loop's (sleeps, rhythm spins).
    fn exchanges(policy: IdlePolicy, n: usize, pause: Duration) -> (u64, u64) {
        let (mut dev, mut peer) = Loopback::pair(1024, MA, MB);
        let shared = EngineShared::new(policy).unwrap();
        let mut h = Reflector {
            outbox: Arc::new(Mutex::new(Vec::new())),
            seen: Arc::new(AtomicUsize::new(0)),
        };
        let cfg = EngineConfig {
            idle: policy,
            ..Default::default()
        };
        let s2 = shared.clone();
        let t = std::thread::spawn(move || run(&mut dev, &mut h, &cfg, &s2, Clock::new()));
        let mut back = Vec::new();
        for i in 0..n {
            peer.tx_burst(&mut vec![vec![i as u8; 60]]);
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while back.is_empty() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "exchange {i} unanswered"
                );
                peer.rx_burst(&mut back, BURST);
            }
            back.clear();
            let until = std::time::Instant::now() + pause;
            while std::time::Instant::now() < until {
                std::hint::spin_loop();
            }
        }
        shared.request_stop();
        t.join().unwrap();
        let st = &shared.stats;
        (
            st.sleeps.load(Ordering::Relaxed),
            st.rhythm_spins.load(Ordering::Relaxed),
        )
    }

    #[test]
    fn a_rhythm_of_exchanges_keeps_the_adaptive_loop_awake() {
        let policy = |rhythm| IdlePolicy::Adaptive {
            spin: Duration::from_micros(20),
            max_sleep: Duration::from_micros(50),
            rhythm,
        };
        let n = 400;
        let pause = Duration::from_micros(80);
        // Without the rhythm spin every pause outlasts the spin: a sleep per
        // exchange.
        let (sleeps, rhythms) = exchanges(policy(Duration::ZERO), n, pause);
        assert_eq!(rhythms, 0);
        assert!(sleeps >= n as u64 / 2, "{sleeps} sleeps in {n} exchanges");
        // With it, the loop learns the rhythm and sleeps only when a pause
        // runs longer than the rhythm (a descheduled test thread).
        let (sleeps, rhythms) = exchanges(policy(Duration::from_millis(2)), n, pause);
        assert!(rhythms >= 1, "{sleeps} sleeps, no rhythm");
        assert!(sleeps < n as u64 / 4, "{sleeps} sleeps in {n} exchanges");
    }

    #[test]
    fn policy_parses() {
        assert_eq!("poll".parse::<IdlePolicy>().unwrap(), IdlePolicy::Poll);
        assert_eq!("adaptive".parse::<IdlePolicy>().unwrap().name(), "adaptive");
        assert!("spin".parse::<IdlePolicy>().is_err());
        assert_eq!(
            "adaptive:20".parse::<IdlePolicy>().unwrap(),
            IdlePolicy::Adaptive {
                spin: Duration::from_micros(20),
                max_sleep: Duration::from_micros(50),
                rhythm: DEFAULT_RHYTHM,
            }
        );
        assert_eq!(
            "adaptive:30:0".parse::<IdlePolicy>().unwrap(),
            IdlePolicy::Adaptive {
                spin: Duration::from_micros(30),
                max_sleep: Duration::from_micros(50),
                rhythm: Duration::ZERO,
            }
        );
        assert!("adaptive:20:".parse::<IdlePolicy>().is_err());
        assert!("adaptive:20:x".parse::<IdlePolicy>().is_err());
        assert!("adaptive:x".parse::<IdlePolicy>().is_err());
        assert!("adaptive:2000000".parse::<IdlePolicy>().is_err());
    }

    struct FailingAlloc(Loopback);
    impl Device for FailingAlloc {
        type Buf = Vec<u8>;
        fn rx_burst(&mut self, out: &mut Vec<Vec<u8>>, max: usize) -> usize {
            self.0.rx_burst(out, max)
        }
        fn tx_burst(&mut self, bufs: &mut Vec<Vec<u8>>) -> usize {
            // Accepts one frame per call: the rest must be freed and counted.
            let f = bufs.remove(0);
            let mut one = vec![f];
            self.0.tx_burst(&mut one)
        }
        fn alloc(&mut self, _len: usize) -> Option<Vec<u8>> {
            None
        }
        fn mac(&self) -> EthernetAddress {
            MA
        }
    }

    #[test]
    fn unsent_frames_are_freed_and_counted() {
        let (a, _b) = Loopback::pair(64, MA, MB);
        let mut dev = FailingAlloc(a);
        let mut pending = vec![vec![1u8], vec![2], vec![3], vec![4]];
        let mut stats = LocalStats::default();
        flush(&mut dev, &mut pending, &mut stats);
        assert_eq!(stats.tx_frames, 2);
        assert_eq!(stats.tx_dropped, 2);
        assert!(pending.is_empty());
        let mut tx = Tx {
            dev: &mut dev,
            pending: &mut pending,
            stats: &mut stats,
        };
        assert!(!tx.send_with(10, |_| {}));
        assert_eq!(stats.alloc_failed, 1);
    }
}
