//! Small deterministic generators: the workloads regenerate their inputs to
//! check results against a direct computation, so every number must be a
//! pure function of a seed and an index.

/// SplitMix64's output function: a good 64-bit mix of `x`.
#[inline]
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A uniform double in [-1, 1) from a 64-bit hash.
#[inline]
pub fn unit_signed(h: u64) -> f64 {
    ((h >> 11) as f64) * (1.0 / (1u64 << 52) as f64) - 1.0
}

/// Hashes a string into a seed (FNV-1a, then mixed).
pub fn seed_of(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix(h)
}

/// A sequential generator (SplitMix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Rng {
        Rng(mix(seed))
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    #[inline]
    pub fn next_f64(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64) * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [lo, hi] (inclusive).
    #[inline]
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            lo
        } else {
            lo + self.next_u64() % (hi - lo + 1)
        }
    }
}

/// Fills `buf` with the pattern of `seed`: little-endian words
/// `mix(seed + i)`; a trailing partial word takes the first bytes of the next.
pub fn fill_pattern(buf: &mut [u8], seed: u64) {
    let mut chunks = buf.chunks_exact_mut(8);
    let mut i = 0u64;
    for c in &mut chunks {
        c.copy_from_slice(&mix(seed.wrapping_add(i)).to_le_bytes());
        i += 1;
    }
    let rest = chunks.into_remainder();
    let w = mix(seed.wrapping_add(i)).to_le_bytes();
    let n = rest.len();
    rest.copy_from_slice(&w[..n]);
}

/// Whether `buf` holds the pattern of `seed`.
pub fn check_pattern(buf: &[u8], seed: u64) -> bool {
    let mut chunks = buf.chunks_exact(8);
    let mut i = 0u64;
    for c in &mut chunks {
        if c != mix(seed.wrapping_add(i)).to_le_bytes() {
            return false;
        }
        i += 1;
    }
    let rest = chunks.remainder();
    let w = mix(seed.wrapping_add(i)).to_le_bytes();
    rest == &w[..rest.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_round_trips_and_detects_a_flip() {
        let mut b = vec![0u8; 1003];
        fill_pattern(&mut b, 42);
        assert!(check_pattern(&b, 42));
        assert!(!check_pattern(&b, 43));
        b[500] ^= 1;
        assert!(!check_pattern(&b, 42));
    }

    #[test]
    fn ranges_and_units() {
        let mut r = Rng::new(1);
        for _ in 0..1000 {
            let v = r.range(3, 5);
            assert!((3..=5).contains(&v));
            let f = r.next_f64();
            assert!((0.0..1.0).contains(&f));
            let s = unit_signed(r.next_u64());
            assert!((-1.0..1.0).contains(&s));
        }
    }
}
