//! The lab's stand-in for netem: a seeded injector that drops, duplicates
//! and holds back received SAN frames.

use crate::proto::rng::SeededRng;
use crate::time::Instant;

/// A seeded fault injector on received SAN frames: each frame is dropped
/// with probability `loss`, else delivered twice with probability `dup`,
/// and held back 0.1-2 ms (so that later frames overtake it) with
/// probability `reorder`. Off when all are 0. Dropped frames are counted as
/// `injected`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    /// Drop probability.
    pub loss: f64,
    /// Duplication probability.
    pub dup: f64,
    /// Delay (reorder) probability.
    pub reorder: f64,
    /// Seed of the injector's generator.
    pub seed: u64,
}

impl Faults {
    /// Whether any fault is configured.
    pub fn active(&self) -> bool {
        self.loss > 0.0 || self.dup > 0.0 || self.reorder > 0.0
    }
}

/// The injector's state: its generator and the frames it holds back.
pub(super) struct FaultInjector {
    faults: Faults,
    rng: SeededRng,
    delayed: Vec<(Instant, Vec<u8>)>,
}

impl FaultInjector {
    pub(super) fn new(faults: Faults) -> FaultInjector {
        FaultInjector {
            faults,
            rng: SeededRng::new(faults.seed),
            delayed: Vec::new(),
        }
    }

    /// Whether any fault is configured.
    #[inline]
    pub(super) fn active(&self) -> bool {
        self.faults.active()
    }

    /// A frame arrived: how many copies to handle now (0 when it is
    /// dropped: `lost` is set), the others held back until they are due.
    pub(super) fn admit(&mut self, now: Instant, bytes: &[u8], lost: &mut bool) -> usize {
        let f = self.faults;
        if self.rng.chance(f.loss) {
            *lost = true;
            return 0;
        }
        let copies = if self.rng.chance(f.dup) { 2 } else { 1 };
        let mut now_copies = 0;
        for _ in 0..copies {
            if self.rng.chance(f.reorder) {
                let hold = std::time::Duration::from_micros(100 + self.rng.below(1900));
                self.delayed.push((now + hold, bytes.to_vec()));
            } else {
                now_copies += 1;
            }
        }
        now_copies
    }

    /// The held-back frames that are due at `now`, in the order held.
    pub(super) fn take_due(&mut self, now: Instant) -> Vec<Vec<u8>> {
        if self.delayed.is_empty() {
            return Vec::new();
        }
        let mut due = Vec::new();
        self.delayed.retain(|(t, b)| {
            if *t <= now {
                due.push(b.clone());
                false
            } else {
                true
            }
        });
        due
    }

    /// When the next held-back frame is due.
    pub(super) fn next_due(&self) -> Option<Instant> {
        self.delayed.iter().map(|(t, _)| *t).min()
    }
}
