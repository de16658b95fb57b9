//! Randomness for connection ids and tokens, behind a trait so that the
//! simulator can replay a schedule exactly.

/// A source of 64-bit random numbers.
pub trait Rng {
    /// The next number.
    fn next_u64(&mut self) -> u64;
}

/// Unguessable numbers from the operating system (`getrandom`), fetched 32 at
/// a time so that the dataplane makes one system call per 32 connections.
#[derive(Debug, Default)]
pub struct OsRng {
    buf: [u64; 32],
    left: usize,
}

impl Rng for OsRng {
    fn next_u64(&mut self) -> u64 {
        if self.left == 0 {
            let mut bytes = [0u8; 256];
            // The kernel's CSPRNG does not fail once booted; a failure would
            // leave ids predictable, which is worse than stopping.
            getrandom::getrandom(&mut bytes).expect("getrandom failed");
            for (i, c) in bytes.chunks_exact(8).enumerate() {
                self.buf[i] = u64::from_le_bytes(c.try_into().unwrap());
            }
            self.left = 32;
        }
        self.left -= 1;
        self.buf[self.left]
    }
}

/// A seeded, deterministic generator (SplitMix64) for tests and the simulator.
/// Not for production: its output is predictable from its seed.
#[derive(Debug, Clone)]
pub struct SeededRng(u64);

impl SeededRng {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// A number in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p && p > 0.0
    }
}

impl Rng for SeededRng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_rng_varies_and_seeded_repeats() {
        let mut o = OsRng::default();
        let a: Vec<u64> = (0..40).map(|_| o.next_u64()).collect();
        assert!(a.windows(2).any(|w| w[0] != w[1]));
        let mut s1 = SeededRng::new(7);
        let mut s2 = SeededRng::new(7);
        assert_eq!(s1.next_u64(), s2.next_u64());
        assert!(s1.below(10) < 10);
    }
}
