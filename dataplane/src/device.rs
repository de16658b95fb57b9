//! The device abstraction the engine polls, and the in-memory loopback device.
//!
//! A [`Device`] receives bursts of owned frame buffers and transmits them; the
//! DPDK port (`dpdk::DpdkDevice`, behind the `dpdk` feature) and [`Loopback`]
//! implement it, so everything above this layer runs unchanged in unit tests.

use crate::wire::EthernetAddress;
use crossbeam_queue::ArrayQueue;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Frames per rx/tx burst, as in DPDK's l2fwd.
pub const BURST: usize = 32;

/// An owned, writable frame buffer.
pub trait FrameBuf: AsRef<[u8]> + AsMut<[u8]> {}
impl<T: AsRef<[u8]> + AsMut<[u8]>> FrameBuf for T {}

/// A port the engine polls.
pub trait Device {
    /// The buffer type: dropping it frees it.
    type Buf: FrameBuf;
    /// Appends up to `max` received frames to `out`; returns how many.
    fn rx_burst(&mut self, out: &mut Vec<Self::Buf>, max: usize) -> usize;
    /// Transmits frames from the front of `bufs`, removing those sent; returns
    /// how many were sent. Frames left in `bufs` were not accepted by the device.
    fn tx_burst(&mut self, bufs: &mut Vec<Self::Buf>) -> usize;
    /// A writable buffer of exactly `len` bytes, or `None` when out of buffers.
    fn alloc(&mut self, len: usize) -> Option<Self::Buf>;
    /// The port's MAC address.
    fn mac(&self) -> EthernetAddress;
    /// A descriptor that becomes readable when a frame arrives while the
    /// wake-up is armed (a receive interrupt, or a kernel socket that sees
    /// the port's frames), if the port has one: a sleeping loop then waits
    /// for it instead of waking on a period.
    fn rx_wake_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// Arms the wake-up, before the loop's last look at the port. Returns
    /// false if it cannot (the loop then wakes on a period).
    fn arm_rx_wake(&mut self) -> bool {
        false
    }
    /// Disarms it after the sleep and clears what woke the loop.
    fn disarm_rx_wake(&mut self) {}
}

/// Counters of a loopback link end.
#[derive(Debug, Default)]
pub struct LoopbackStats {
    /// Frames dropped because the peer's queue was full.
    pub tx_dropped: AtomicU64,
}

/// An in-memory device: what one end transmits, the other receives, through a
/// bounded lock-free queue (a full queue drops, as a NIC ring does).
#[derive(Debug)]
pub struct Loopback {
    mac: EthernetAddress,
    rx: Arc<ArrayQueue<Vec<u8>>>,
    tx: Arc<ArrayQueue<Vec<u8>>>,
    stats: Arc<LoopbackStats>,
}

impl Loopback {
    /// Two connected ends, each queue holding up to `capacity` frames.
    ///
    /// # Panics
    /// If `capacity` is zero.
    pub fn pair(capacity: usize, a: EthernetAddress, b: EthernetAddress) -> (Loopback, Loopback) {
        let q1 = Arc::new(ArrayQueue::new(capacity));
        let q2 = Arc::new(ArrayQueue::new(capacity));
        (
            Loopback {
                mac: a,
                rx: q1.clone(),
                tx: q2.clone(),
                stats: Default::default(),
            },
            Loopback {
                mac: b,
                rx: q2,
                tx: q1,
                stats: Default::default(),
            },
        )
    }

    /// This end's counters.
    pub fn stats(&self) -> Arc<LoopbackStats> {
        self.stats.clone()
    }
}

impl Device for Loopback {
    type Buf = Vec<u8>;

    fn rx_burst(&mut self, out: &mut Vec<Vec<u8>>, max: usize) -> usize {
        let mut n = 0;
        while n < max {
            match self.rx.pop() {
                Some(f) => {
                    out.push(f);
                    n += 1;
                }
                None => break,
            }
        }
        n
    }

    fn tx_burst(&mut self, bufs: &mut Vec<Vec<u8>>) -> usize {
        let mut sent = 0;
        for f in bufs.drain(..) {
            if self.tx.push(f).is_ok() {
                sent += 1;
            } else {
                self.stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        sent
    }

    fn alloc(&mut self, len: usize) -> Option<Vec<u8>> {
        Some(vec![0; len])
    }

    fn mac(&self) -> EthernetAddress {
        self.mac
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_carries_frames_both_ways_and_drops_when_full() {
        let (mut a, mut b) = Loopback::pair(
            2,
            EthernetAddress([2, 0, 0, 0, 0, 1]),
            EthernetAddress([2, 0, 0, 0, 0, 2]),
        );
        let mut v = vec![vec![1u8], vec![2], vec![3]];
        assert_eq!(a.tx_burst(&mut v), 2);
        assert!(v.is_empty());
        assert_eq!(a.stats().tx_dropped.load(Ordering::Relaxed), 1);
        let mut got = Vec::new();
        assert_eq!(b.rx_burst(&mut got, BURST), 2);
        assert_eq!(got, vec![vec![1], vec![2]]);
        let mut back = vec![vec![9u8]];
        b.tx_burst(&mut back);
        got.clear();
        assert_eq!(a.rx_burst(&mut got, 1), 1);
        assert_eq!(got, vec![vec![9]]);
        assert_eq!(a.rx_burst(&mut got, 1), 0);
    }
}
