//! What a cache counts: Prometheus counters through `metrics`, and the same events
//! (except L1 hits, the hot path) as plain counters for [`Cache::stats`].
//!
//! [`Cache::stats`]: crate::Cache::stats

use std::sync::atomic::{AtomicU64, Ordering};

use metrics::{Counter, counter};

macro_rules! events {
    ($( $(#[$doc:meta])* $field:ident => $name:literal $(, $label:literal = $value:literal)?; )*) => {
        /// Counts of a cache's events since it was built.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct CacheStats {
            $( $(#[$doc])* pub $field: u64, )*
        }

        pub(crate) struct Stats {
            $( $field: AtomicU64, )*
            metrics: Metrics,
        }

        struct Metrics {
            l1_hits: Counter,
            $( $field: Counter, )*
        }

        impl Stats {
            pub fn new(cache: &str) -> Self {
                let cache = cache.to_owned();
                Stats {
                    $( $field: AtomicU64::new(0), )*
                    metrics: Metrics {
                        l1_hits: counter!("palisade_cache_hits_total", "cache" => cache.clone(), "level" => "l1"),
                        $( $field: counter!($name, "cache" => cache.clone() $(, $label => $value)?), )*
                    },
                }
            }

            pub fn snapshot(&self) -> CacheStats {
                CacheStats { $( $field: self.$field.load(Ordering::Relaxed), )* }
            }

            $(
                #[inline]
                pub fn $field(&self) {
                    self.$field.fetch_add(1, Ordering::Relaxed);
                    self.metrics.$field.increment(1);
                }
            )*
        }
    };
}

events! {
    /// Answers found in L2 (Redis).
    l2_hits => "palisade_cache_hits_total", "level" = "l2";
    /// Lookups found in neither level (a load followed, or was joined).
    misses => "palisade_cache_misses_total";
    /// Loader calls that produced a value.
    loads => "palisade_cache_loads_total", "outcome" = "value";
    /// Loader calls that confirmed the key has no value (cached as a negative entry).
    loads_absent => "palisade_cache_loads_total", "outcome" = "absent";
    /// Loader calls that failed.
    load_errors => "palisade_cache_loads_total", "outcome" = "error";
    /// Callers that waited for another caller's load of the same key.
    coalesced => "palisade_cache_coalesced_total";
    /// Stale values served because a load or Redis failed, or another process held the load lease.
    stale_served => "palisade_cache_stale_served_total";
    /// Keys refused up front by the key filter.
    filtered => "palisade_cache_filtered_total";
    /// Background refreshes started before expiry (probabilistic early refresh).
    early_refreshes => "palisade_cache_early_refreshes_total";
    /// Loads that waited for another process holding the key's load lease.
    lease_waits => "palisade_cache_lease_waits_total";
    /// Redis calls that failed.
    redis_errors => "palisade_cache_redis_errors_total", "kind" = "error";
    /// Redis calls that ran past the timeout.
    redis_timeouts => "palisade_cache_redis_errors_total", "kind" = "timeout";
    /// Redis calls not made because its circuit breaker was open.
    redis_refused => "palisade_cache_redis_errors_total", "kind" = "refused";
    /// L2 values that did not decode (another version's format), treated as misses.
    decode_errors => "palisade_cache_decode_errors_total";
    /// Entries L1 evicted to stay within its weight.
    evictions => "palisade_cache_evictions_total";
    /// Times the Redis connection dropped (L1 is dropped when it answers again).
    disconnections => "palisade_cache_redis_disconnections_total";
    /// Invalidations received from other instances.
    remote_invalidations => "palisade_cache_remote_invalidations_total";
}

impl Stats {
    /// Disconnections so far.
    #[inline]
    pub fn snapshot_disconnections(&self) -> u64 {
        self.disconnections.load(Ordering::Relaxed)
    }

    /// An L1 hit: Prometheus only (a shared atomic here would be contended by every core).
    #[inline]
    pub fn l1_hit(&self) {
        self.metrics.l1_hits.increment(1);
    }
}
