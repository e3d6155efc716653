//! A keyed rate limiter fed 10 million distinct keys stays within its stated
//! memory bound (docs/patterns/rate-limiting.md): about 48 bytes per key of
//! capacity for `u64` keys, whatever the number of keys seen.

use palisade_resilience::ManualClock;
use palisade_resilience::ratelimit::{Gcra, KeyedRateLimiter, Quota};
use std::time::Duration;

const DISTINCT_KEYS: u64 = 10_000_000;
const CAPACITY: usize = 100_000;
/// 32 shards of at most `CAPACITY / 32` entries. Each entry is 16 bytes (key +
/// state) plus a control byte; pruning leaves tombstones, so a table settles at the
/// power of two above twice its share (8192 buckets here): 32 x 8192 x 17 bytes =
/// 4.46 MB, plus a shard's old array while it grows and the pruning scratch.
const BOUND_BYTES: u64 = 48 * CAPACITY as u64;

#[test]
fn ten_million_distinct_keys_stay_within_the_bound() {
    let clock = ManualClock::new();
    let limiter: KeyedRateLimiter<u64> =
        KeyedRateLimiter::new(Gcra::new(Quota::per_second(10)).unwrap(), CAPACITY).with_clock(clock.clone());
    let info = allocation_counter::measure(|| {
        for key in 0..DISTINCT_KEYS {
            assert!(limiter.check(&key).is_ok(), "a fresh key has its full burst");
            if key % 1_000_000 == 0 {
                // Time moves: earlier keys go idle and become prunable.
                clock.advance(Duration::from_millis(50));
            }
        }
    });
    eprintln!(
        "peak heap {} bytes for {} keys kept",
        info.bytes_max,
        limiter.len()
    );
    assert!(limiter.len() <= limiter.capacity(), "{} keys kept", limiter.len());
    assert!(
        info.bytes_max <= BOUND_BYTES,
        "peak heap {} bytes > bound {BOUND_BYTES} ({} per key of capacity)",
        info.bytes_max,
        info.bytes_max / CAPACITY as u64
    );
}

#[test]
fn keys_under_capacity_keep_their_state() {
    let clock = ManualClock::new();
    let limiter: KeyedRateLimiter<u64> =
        KeyedRateLimiter::new(Gcra::new(Quota::per_second(1).burst(1)).unwrap(), CAPACITY).with_clock(clock);
    for key in 0..1000 {
        limiter.check(&key).unwrap();
    }
    for key in 0..1000 {
        assert!(
            limiter.check(&key).is_err(),
            "key {key} was forgotten while busy and under capacity"
        );
    }
}
