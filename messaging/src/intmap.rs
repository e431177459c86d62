//! Hash maps keyed by small integers (memfd serials, remote keys, transfer
//! tags, command and namespace IDs) that sit on the per-message path, where
//! the standard SipHash costs more than the rest of the lookup. Public for
//! the drivers built on this crate.
//!
//! The hash is a folded 64 × 64 → 128-bit multiply of the key mixed with a
//! per-process random seed: one multiplication per key, every key bit
//! reaching both the bucket index and the control byte hashbrown takes
//! from the top. Some keys come from a peer (an shm peer names its memfd
//! serials), and the random seed keeps a peer from aiming many keys at one
//! bucket.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;

/// A `HashMap` with [`IntHash`].
pub type IntMap<K, V> = HashMap<K, V, IntHash>;
/// A `HashSet` with [`IntHash`].
pub type IntSet<K> = HashSet<K, IntHash>;

/// Builds [`IntHasher`]s seeded once per process.
#[derive(Debug, Clone, Copy)]
pub struct IntHash {
    seed: u64,
}

impl Default for IntHash {
    fn default() -> IntHash {
        static SEED: OnceLock<u64> = OnceLock::new();
        IntHash {
            seed: *SEED.get_or_init(|| RandomState::new().hash_one(0x6368_616e_696f_u64)),
        }
    }
}

impl BuildHasher for IntHash {
    type Hasher = IntHasher;
    fn build_hasher(&self) -> IntHasher {
        IntHasher(self.seed)
    }
}

/// See the module documentation.
#[derive(Debug)]
pub struct IntHasher(u64);

/// 2^64 / φ: an odd constant with well-spread bits.
const K: u64 = 0x9e37_79b9_7f4a_7c15;

fn fold(x: u64) -> u64 {
    let m = u128::from(x) * u128::from(K);
    (m as u64) ^ ((m >> 64) as u64)
}

impl Hasher for IntHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = fold(self.0 ^ n);
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(n.into());
    }
    fn write_u16(&mut self, n: u16) {
        self.write_u64(n.into());
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_and_sets_behave_like_the_standard_ones() {
        let mut m: IntMap<u64, u64> = IntMap::default();
        for k in 0..10_000u64 {
            m.insert(k << 12, k);
        }
        assert_eq!(m.len(), 10_000);
        assert!((0..10_000u64).all(|k| m.get(&(k << 12)) == Some(&k)));
        assert_eq!(m.remove(&(5 << 12)), Some(5));
        assert!(!m.contains_key(&(5 << 12)));
        let s: IntSet<u16> = (0..=u16::MAX).collect();
        assert_eq!(s.len(), 65_536);
    }

    #[test]
    fn every_key_bit_moves_the_hash_and_its_top_byte() {
        let h = IntHash::default();
        let base = h.hash_one(0u64);
        for bit in 0..64 {
            let other = h.hash_one(1u64 << bit);
            assert_ne!(other, base, "bit {bit}");
        }
        // Keys that differ only in high bits (aligned addresses, serials
        // counted up) still spread over the top 7 bits hashbrown uses.
        let tops: IntSet<u64> = (0..256u64).map(|k| h.hash_one(k << 20) >> 57).collect();
        assert!(tops.len() > 64, "only {} distinct top bytes", tops.len());
    }
}
