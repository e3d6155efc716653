//! Stable hashing and consistent-hash tables: a ring with virtual nodes (ketama
//! style) and Google's maglev table. Both map a request key to an endpoint so that
//! the same key keeps going to the same endpoint, and adding or removing one
//! endpoint moves only about 1/n of the keys.
//!
//! The hash is FNV-1a with a murmur3 finaliser: stable across runs, builds and
//! platforms (unlike `std`'s `DefaultHasher`), which sharding needs too.

/// Hashes bytes to 64 bits, stably.
#[inline]
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix(h)
}

/// murmur3's 64-bit finaliser: spreads every input bit over the output.
#[inline]
pub fn mix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// A consistent-hash ring: each endpoint owns `vnodes x weight` points; a key goes
/// to the first point at or after its hash.
#[derive(Clone, Debug, Default)]
pub struct Ring {
    points: Vec<(u64, u32)>,
}

impl Ring {
    /// Builds a ring over `(name, weight)` members; index `i` of the input is what
    /// lookups return.
    pub fn new<'a>(members: impl IntoIterator<Item = (&'a [u8], u32)>, vnodes: u32) -> Self {
        let mut points = Vec::new();
        for (i, (name, weight)) in members.into_iter().enumerate() {
            let base = hash_bytes(name);
            for v in 0..u64::from(vnodes.max(1)) * u64::from(weight.max(1)) {
                points.push((mix(base ^ mix(v + 1)), i as u32));
            }
        }
        points.sort_unstable();
        Ring { points }
    }

    /// The first member at or after `key` on the ring that `ok` accepts, walking
    /// clockwise; `None` if none does.
    pub fn lookup(&self, key: u64, ok: impl Fn(usize) -> bool) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let start = self.points.partition_point(|&(h, _)| h < key);
        let n = self.points.len();
        (0..n)
            .map(|k| self.points[(start + k) % n].1 as usize)
            .find(|&i| ok(i))
    }
}

/// A maglev lookup table (Eisenbud et al., NSDI 2016): every endpoint fills the
/// table's slots in its own pseudo-random order, taking turns, so each owns an
/// almost equal share (weighted by taking more turns) and a change moves few slots.
#[derive(Clone, Debug, Default)]
pub struct Maglev {
    table: Vec<u32>,
}

impl Maglev {
    /// The default table size: a prime well above 100 x the endpoints of any cluster.
    pub const DEFAULT_SIZE: u32 = 65_537;

    /// Builds a table of `size` slots (a prime) over `(name, weight)` members.
    pub fn new<'a>(members: impl IntoIterator<Item = (&'a [u8], u32)>, size: u32) -> Self {
        let members: Vec<(&[u8], u32)> = members.into_iter().collect();
        let m = u64::from(size.max(1));
        if members.is_empty() {
            return Maglev::default();
        }
        let perms: Vec<(u64, u64)> = members
            .iter()
            .map(|(name, _)| {
                let h = hash_bytes(name);
                let offset = mix(h ^ 0x9e37_79b9_7f4a_7c15) % m;
                let skip = mix(h ^ 0x6a09_e667_f3bc_c909) % (m - 1).max(1) + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0u64; members.len()];
        let mut table = vec![u32::MAX; m as usize];
        let max_weight = members.iter().map(|&(_, w)| w.max(1)).max().unwrap_or(1);
        let mut filled = 0u64;
        'fill: loop {
            // Weighted turns: in each round a member of weight w takes w turns per
            // max_weight (approximately, by credit).
            for round in 0..max_weight {
                for (i, &(_, w)) in members.iter().enumerate() {
                    if round >= w.max(1) {
                        continue;
                    }
                    let (offset, skip) = perms[i];
                    loop {
                        let slot = (offset + next[i] * skip) % m;
                        next[i] += 1;
                        if table[slot as usize] == u32::MAX {
                            table[slot as usize] = i as u32;
                            filled += 1;
                            break;
                        }
                    }
                    if filled == m {
                        break 'fill;
                    }
                }
            }
        }
        Maglev { table }
    }

    /// The member owning `key`'s slot if `ok` accepts it, otherwise the owner of the
    /// next slot that `ok` accepts.
    pub fn lookup(&self, key: u64, ok: impl Fn(usize) -> bool) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        let n = self.table.len();
        let start = (key % n as u64) as usize;
        let first = self.table[start] as usize;
        if ok(first) {
            return Some(first);
        }
        // Rare path: walk on, but test each distinct member only once.
        let mut rejected = vec![first];
        for k in 1..n {
            let i = self.table[(start + k) % n] as usize;
            if rejected.contains(&i) {
                continue;
            }
            if ok(i) {
                return Some(i);
            }
            rejected.push(i);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<Vec<u8>> {
        (0..n).map(|i| format!("10.0.0.{i}:80").into_bytes()).collect()
    }

    fn shares(lookup: impl Fn(u64) -> usize, n: usize) -> Vec<f64> {
        let mut counts = vec![0u32; n];
        for k in 0..100_000u64 {
            counts[lookup(mix(k))] += 1;
        }
        counts.iter().map(|&c| f64::from(c) / 100_000.0).collect()
    }

    #[test]
    fn the_hash_is_stable() {
        // Pinned: sharding and rings across restarts depend on it.
        assert_eq!(hash_bytes(b""), mix(0xcbf2_9ce4_8422_2325));
        assert_eq!(hash_bytes(b"user-42"), hash_bytes(b"user-42"));
        assert_ne!(hash_bytes(b"user-42"), hash_bytes(b"user-43"));
    }

    #[test]
    fn ring_spreads_keys_and_moves_few_when_one_leaves() {
        let n = names(5);
        let ring = Ring::new(n.iter().map(|s| (s.as_slice(), 1)), 160);
        let s = shares(|k| ring.lookup(k, |_| true).unwrap(), 5);
        assert!(s.iter().all(|&x| (0.12..0.28).contains(&x)), "{s:?}");
        // Without member 2 (by `ok`), only member 2's keys move.
        let mut moved = 0;
        for k in 0..10_000u64 {
            let before = ring.lookup(mix(k), |_| true).unwrap();
            let after = ring.lookup(mix(k), |i| i != 2).unwrap();
            if before != after {
                assert_eq!(before, 2);
                moved += 1;
            }
        }
        assert!((1_200..2_800).contains(&moved), "{moved}");
    }

    #[test]
    fn maglev_is_nearly_even_and_weighted() {
        let n = names(4);
        let m = Maglev::new(n.iter().map(|s| (s.as_slice(), 1)), 65_537);
        let s = shares(|k| m.lookup(k, |_| true).unwrap(), 4);
        assert!(s.iter().all(|&x| (0.23..0.27).contains(&x)), "{s:?}");
        let w = Maglev::new(n.iter().zip([3, 1, 1, 1]).map(|(s, w)| (s.as_slice(), w)), 65_537);
        let s = shares(|k| w.lookup(k, |_| true).unwrap(), 4);
        assert!((0.45..0.55).contains(&s[0]), "{s:?}");
    }

    #[test]
    fn maglev_keeps_most_keys_when_a_member_is_removed() {
        let n = names(5);
        let before = Maglev::new(n.iter().map(|s| (s.as_slice(), 1)), 65_537);
        let after = Maglev::new(n[..4].iter().map(|s| (s.as_slice(), 1)), 65_537);
        let mut kept = 0;
        for k in 0..10_000u64 {
            let b = before.lookup(mix(k), |_| true).unwrap();
            let a = after.lookup(mix(k), |_| true).unwrap();
            if b != 4 && a == b {
                kept += 1;
            }
        }
        // ~80% of keys were on members 0..4; nearly all of them stay.
        assert!(kept > 7_000, "{kept}");
    }
}
