//! proptest: the lock-free GCRA makes exactly the decisions of a plain token bucket
//! (credit in nanoseconds, refilled by elapsed time, capped at the burst).

use std::time::Duration;

use palisade_resilience::ManualClock;
use palisade_resilience::ratelimit::{Quota, RateLimiter};
use proptest::prelude::*;

struct TokenBucket {
    credit: u64,
    cap: u64,
    per_request: u64,
}

impl TokenBucket {
    fn check(&mut self, elapsed: u64, cost: u64) -> bool {
        self.credit = (self.credit + elapsed).min(self.cap);
        let need = self.per_request * cost;
        if need <= self.credit {
            self.credit -= need;
            true
        } else {
            false
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn gcra_matches_a_token_bucket(
        limit in 1u32..50,
        burst in 1u32..20,
        steps in prop::collection::vec((0u64..300, 1u32..4), 1..200),
    ) {
        let clock = ManualClock::new();
        let quota = Quota::new(limit, Duration::from_secs(1)).burst(burst);
        let limiter = RateLimiter::gcra(quota).unwrap().with_clock(clock.clone());
        let per_request = 1_000_000_000 / u64::from(limit);
        let mut model = TokenBucket { credit: per_request * u64::from(burst), cap: per_request * u64::from(burst), per_request };
        for (elapsed_ms, cost) in steps {
            clock.advance(Duration::from_millis(elapsed_ms));
            let got = limiter.check_n(cost).is_ok();
            let want = model.check(elapsed_ms * 1_000_000, u64::from(cost));
            prop_assert_eq!(got, want);
        }
    }
}
