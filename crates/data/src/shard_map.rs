//! Where a key lives: a shard map from keys to shard names, with no I/O.
//!
//! A key is hashed to 64 bits with `palisade-balance`'s stable hash (FNV-1a with a
//! murmur3 finaliser: the same on every build and platform, which placement
//! needs), and the hash is placed by one of four strategies:
//!
//! - **ring**: a consistent-hash ring with `vnodes` points per shard (150 by
//!   default); adding a shard moves about 1/n of the keys, from every shard.
//! - **jump**: Lamping and Veach's jump consistent hash over the shards in their
//!   listed order; no table at all, and adding a shard at the end moves exactly
//!   the keys it takes. Shards can only be added or removed at the end.
//! - **rendezvous**: highest random weight; every shard scored per key (O(n)),
//!   any shard removable with only its keys moving.
//! - **ranges**: explicit ranges of the hash space, each owned by a shard (as
//!   Vitess's key ranges): moving a range moves exactly its keys, which is what
//!   online resharding does. The ranges must cover the whole space.

use palisade_balance::hash::{Ring, hash_bytes, mix};
use palisade_core::{ConfigError, ConfigErrors};
use serde::{Deserialize, Serialize};

/// How keys are placed on shards.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Placement {
    /// Consistent hashing on a ring with `vnodes` points per shard.
    #[default]
    Ring,
    /// Jump consistent hash over the shards in order.
    Jump,
    /// Highest random weight.
    Rendezvous,
    /// Explicit ranges of the hash space.
    Ranges,
}

/// A range of the 64-bit hash space owned by one shard, written as hexadecimal
/// prefixes of the hash (`from = "80"` is 0x8000_0000_0000_0000), `""` meaning the
/// start (for `from`) or the end (for `to`) of the space.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRange {
    /// First hash of the range (inclusive).
    #[serde(default)]
    pub from: String,
    /// End of the range (exclusive).
    #[serde(default)]
    pub to: String,
    /// The shard that owns it.
    pub shard: String,
}

/// Which shards own keys, and how: what resharding changes, and what the control
/// database records (shards by name; their URLs are each process's own).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Layout {
    /// How keys are placed.
    pub placement: Placement,
    /// Points per shard on the ring (`placement = "ring"`).
    #[serde(default)]
    pub vnodes: u32,
    /// The shards that own keys, by name, in order.
    pub shards: Vec<String>,
    /// The hash ranges each shard owns (`placement = "ranges"`).
    #[serde(default)]
    pub ranges: Vec<KeyRange>,
}

impl Layout {
    /// The shard map of this layout, or every problem with it.
    pub fn map(&self) -> Result<ShardMap, ConfigErrors> {
        ShardMap::new(&self.shards, self.placement, self.vnodes, &self.ranges)
    }
}

/// A placement of keys on named shards.
#[derive(Clone, Debug)]
pub struct ShardMap {
    names: Vec<String>,
    how: How,
}

#[derive(Clone, Debug)]
enum How {
    Ring(Ring),
    Jump,
    Rendezvous(Vec<u64>),
    /// Range starts, ascending, the first at 0; each with its shard's index.
    Ranges(Vec<(u64, usize)>),
}

impl ShardMap {
    /// A map over `names` (in order) placed by `placement`; `vnodes` is the ring's
    /// points per shard, `ranges` the ranges' owners (only for
    /// [`Placement::Ranges`]). Every problem is reported, naming its field.
    pub fn new(
        names: &[String],
        placement: Placement,
        vnodes: u32,
        ranges: &[KeyRange],
    ) -> Result<ShardMap, ConfigErrors> {
        let mut errors = Vec::new();
        if names.is_empty() {
            errors.push(ConfigError::new("shards", "at least one shard is needed"));
        }
        for (i, n) in names.iter().enumerate() {
            if n.is_empty() {
                errors.push(ConfigError::new(format!("shards[{i}].name"), "must not be empty"));
            } else if names[..i].contains(n) {
                errors.push(ConfigError::new(
                    format!("shards[{i}].name"),
                    format!("{n:?} is defined twice"),
                ));
            }
        }
        if placement == Placement::Ring && vnodes == 0 {
            errors.push(ConfigError::new("vnodes", "must be at least 1"));
        }
        if placement != Placement::Ranges && !ranges.is_empty() {
            errors.push(ConfigError::new("ranges", "only for placement = \"ranges\""));
        }
        let how = match placement {
            Placement::Ring => How::Ring(Ring::new(names.iter().map(|n| (n.as_bytes(), 1)), vnodes)),
            Placement::Jump => How::Jump,
            Placement::Rendezvous => {
                How::Rendezvous(names.iter().map(|n| hash_bytes(n.as_bytes())).collect())
            }
            Placement::Ranges => How::Ranges(check_ranges(names, ranges, &mut errors)),
        };
        ConfigErrors::result(errors)?;
        Ok(ShardMap {
            names: names.to_vec(),
            how,
        })
    }

    /// The shards' names, in order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The index (in [`names`](Self::names)) of the shard that owns `key`.
    #[inline]
    pub fn shard_of(&self, key: &[u8]) -> usize {
        self.shard_of_hash(hash_bytes(key))
    }

    /// The index of the shard that owns a key hashed to `hash`.
    #[inline]
    pub fn shard_of_hash(&self, hash: u64) -> usize {
        match &self.how {
            How::Ring(ring) => ring.lookup(hash, |_| true).unwrap_or(0),
            How::Jump => jump(hash, self.names.len()),
            How::Rendezvous(seeds) => {
                let mut best = (0, 0u64);
                for (i, &seed) in seeds.iter().enumerate() {
                    let score = mix(seed ^ hash);
                    if score > best.1 || i == 0 {
                        best = (i, score);
                    }
                }
                best.0
            }
            How::Ranges(starts) => {
                let at = starts.partition_point(|&(start, _)| start <= hash);
                starts[at.saturating_sub(1)].1
            }
        }
    }
}

/// Lamping and Veach, "A Fast, Minimal Memory, Consistent Hash Algorithm" (2014).
fn jump(mut key: u64, buckets: usize) -> usize {
    let (mut b, mut j) = (-1i64, 0i64);
    let n = i64::try_from(buckets).unwrap_or(i64::MAX);
    while j < n {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    usize::try_from(b.max(0)).unwrap_or(0)
}

/// A hex prefix of the hash space as its first hash: `"8"` and `"80"` are both
/// 0x8000_0000_0000_0000.
pub(crate) fn parse_bound(hex: &str) -> Result<u64, String> {
    if hex.len() > 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "{hex:?} is not a hexadecimal prefix of at most 16 digits"
        ));
    }
    let padded = format!("{hex:0<16}");
    u64::from_str_radix(&padded, 16).map_err(|e| e.to_string())
}

/// The ranges as sorted starts, checking they cover the space once, in order,
/// each owned by a listed shard.
fn check_ranges(names: &[String], ranges: &[KeyRange], errors: &mut Vec<ConfigError>) -> Vec<(u64, usize)> {
    if ranges.is_empty() {
        errors.push(ConfigError::new(
            "ranges",
            "placement \"ranges\" needs ranges covering the key space",
        ));
        return Vec::new();
    }
    let mut starts = Vec::with_capacity(ranges.len());
    // The end of the range before, as a u128 so that the end of the space (2^64) fits.
    let mut expected: u128 = 0;
    for (i, r) in ranges.iter().enumerate() {
        let field = |f: &str| format!("ranges[{i}].{f}");
        let Some(owner) = names.iter().position(|n| *n == r.shard) else {
            errors.push(ConfigError::new(
                field("shard"),
                format!("{:?} is not a listed shard", r.shard),
            ));
            continue;
        };
        let from = match parse_bound(&r.from) {
            Ok(v) => u128::from(v),
            Err(p) => {
                errors.push(ConfigError::new(field("from"), p));
                return starts;
            }
        };
        let to = match (r.to.as_str(), parse_bound(&r.to)) {
            ("", _) => 1u128 << 64,
            (_, Ok(v)) => u128::from(v),
            (_, Err(p)) => {
                errors.push(ConfigError::new(field("to"), p));
                return starts;
            }
        };
        if from != expected {
            let what = if from > expected {
                "leaves a gap"
            } else {
                "overlaps the range before"
            };
            errors.push(ConfigError::new(
                field("from"),
                format!("{what}: the range before ends at {expected:016x}, this one starts at {from:016x}"),
            ));
            return starts;
        }
        if to <= from {
            errors.push(ConfigError::new(field("to"), "must be after from"));
            return starts;
        }
        starts.push((from as u64, owner));
        expected = to;
    }
    if expected != 1u128 << 64 && errors.is_empty() {
        errors.push(ConfigError::new(
            format!("ranges[{}].to", ranges.len() - 1),
            format!("the ranges end at {expected:016x}: the rest of the key space has no shard (end the last with to = \"\")"),
        ));
    }
    starts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("s{i}")).collect()
    }

    fn range(from: &str, to: &str, shard: &str) -> KeyRange {
        KeyRange {
            from: from.into(),
            to: to.into(),
            shard: shard.into(),
        }
    }

    fn spread(map: &ShardMap, keys: u32) -> Vec<u32> {
        let mut counts = vec![0u32; map.names().len()];
        for k in 0..keys {
            counts[map.shard_of(format!("user:{k}").as_bytes())] += 1;
        }
        counts
    }

    /// Share of keys that change shard from `a` to `b`.
    fn moved(a: &ShardMap, b: &ShardMap, keys: u32) -> f64 {
        let n = (0..keys)
            .filter(|k| {
                let key = format!("user:{k}");
                a.names()[a.shard_of(key.as_bytes())] != b.names()[b.shard_of(key.as_bytes())]
            })
            .count();
        n as f64 / f64::from(keys)
    }

    #[test]
    fn every_strategy_spreads_keys_and_a_fifth_shard_moves_about_a_fifth() {
        for placement in [Placement::Ring, Placement::Jump, Placement::Rendezvous] {
            let four = ShardMap::new(&names(4), placement, 150, &[]).unwrap();
            let five = ShardMap::new(&names(5), placement, 150, &[]).unwrap();
            for c in spread(&four, 40_000) {
                assert!(
                    (8_000..12_000).contains(&c),
                    "{placement:?}: {c} of 40000 on one of 4 shards"
                );
            }
            let share = moved(&four, &five, 40_000);
            assert!((0.15..0.25).contains(&share), "{placement:?} moved {share}");
            // Only to the new shard.
            for k in 0..10_000 {
                let key = format!("user:{k}");
                let (a, b) = (four.shard_of(key.as_bytes()), five.shard_of(key.as_bytes()));
                assert!(a == b || b == 4, "{placement:?}: {key} moved from s{a} to s{b}");
            }
        }
    }

    #[test]
    fn ranges_place_by_hash_prefix() {
        let n = names(2);
        let map = ShardMap::new(
            &n,
            Placement::Ranges,
            0,
            &[range("", "8", "s0"), range("8", "", "s1")],
        )
        .unwrap();
        assert_eq!(map.shard_of_hash(0), 0);
        assert_eq!(map.shard_of_hash(0x7fff_ffff_ffff_ffff), 0);
        assert_eq!(map.shard_of_hash(0x8000_0000_0000_0000), 1);
        assert_eq!(map.shard_of_hash(u64::MAX), 1);
        let counts = spread(&map, 10_000);
        assert!(counts.iter().all(|&c| c > 4_000), "{counts:?}");
    }

    #[test]
    fn ranges_that_leave_a_gap_overlap_or_stop_short_are_named() {
        let n = names(2);
        let gap = [range("", "40", "s0"), range("80", "", "s1")];
        let e = ShardMap::new(&n, Placement::Ranges, 0, &gap).unwrap_err();
        assert_eq!(e.fields(), ["ranges[1].from"]);
        assert!(e.0[0].problem.contains("gap"), "{e}");
        let overlap = [range("", "90", "s0"), range("80", "", "s1")];
        let e = ShardMap::new(&n, Placement::Ranges, 0, &overlap).unwrap_err();
        assert!(e.0[0].problem.contains("overlaps"), "{e}");
        let short = [range("", "80", "s0"), range("80", "c0", "s1")];
        let e = ShardMap::new(&n, Placement::Ranges, 0, &short).unwrap_err();
        assert_eq!(e.fields(), ["ranges[1].to"]);
        let unknown = [range("", "", "s9")];
        assert_eq!(
            ShardMap::new(&n, Placement::Ranges, 0, &unknown)
                .unwrap_err()
                .fields(),
            ["ranges[0].shard"]
        );
        assert_eq!(
            ShardMap::new(&n, Placement::Ranges, 0, &[]).unwrap_err().fields(),
            ["ranges"]
        );
        let bad = [range("xyz", "", "s0")];
        assert_eq!(
            ShardMap::new(&n, Placement::Ranges, 0, &bad)
                .unwrap_err()
                .fields(),
            ["ranges[0].from"]
        );
    }

    #[test]
    fn duplicate_and_empty_names_are_named() {
        let n: Vec<String> = ["a", "b", "a", ""].iter().map(|s| s.to_string()).collect();
        let e = ShardMap::new(&n, Placement::Ring, 150, &[]).unwrap_err();
        assert_eq!(e.fields(), ["shards[2].name", "shards[3].name"]);
        assert_eq!(
            ShardMap::new(&[], Placement::Jump, 150, &[])
                .unwrap_err()
                .fields(),
            ["shards"]
        );
    }

    #[test]
    fn placement_is_stable_across_builds() {
        // Data placed by one build must be found by the next: these are fixed.
        let map = ShardMap::new(&names(4), Placement::Ring, 150, &[]).unwrap();
        let jump4 = ShardMap::new(&names(4), Placement::Jump, 0, &[]).unwrap();
        let got: Vec<usize> = ["a", "b", "c", "user:42"]
            .iter()
            .flat_map(|k| [map.shard_of(k.as_bytes()), jump4.shard_of(k.as_bytes())])
            .collect();
        assert_eq!(got, STABLE);
    }

    const STABLE: [usize; 8] = [2, 3, 0, 0, 2, 1, 0, 1];
}
