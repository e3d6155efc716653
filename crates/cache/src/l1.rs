//! L1: the in-process level, a `quick_cache` bounded by weight.
//!
//! `quick_cache` has no expiry of its own: an entry carries its times and is judged
//! on read. An expired entry stays until it is replaced or evicted (its S3-FIFO
//! policy evicts entries that are not read again first), which is also what lets it
//! serve as a stale value when a load fails.

use std::sync::Arc;

use quick_cache::sync::Cache as QuickCache;
use quick_cache::{DefaultHashBuilder, Lifecycle, Weighter};

use crate::builder::WeighFn;
use crate::entry::Entry;
use crate::stats::Stats;

/// Weighs entries with the user's function; negative entries weigh 1.
pub(crate) struct Weigh<V>(Option<WeighFn<V>>);

impl<V> Clone for Weigh<V> {
    fn clone(&self) -> Self {
        Weigh(self.0.clone())
    }
}

impl<V> Weighter<String, Entry<V>> for Weigh<V> {
    #[inline]
    fn weight(&self, key: &String, entry: &Entry<V>) -> u64 {
        match (&self.0, &entry.value) {
            (Some(weigh), Some(value)) => weigh(key, value).max(1),
            _ => 1,
        }
    }
}

/// Counts evictions.
#[derive(Clone)]
pub(crate) struct Evictions(Arc<Stats>);

impl<V> Lifecycle<String, Entry<V>> for Evictions {
    type RequestState = ();

    #[inline]
    fn on_evict(&self, _state: &mut (), _key: String, _entry: Entry<V>) {
        self.0.evictions();
    }
}

pub(crate) type L1<V> = QuickCache<String, Entry<V>, Weigh<V>, DefaultHashBuilder, Evictions>;

pub(crate) fn new<V: Clone>(
    max_weight: u64,
    estimated_items: usize,
    weigh: Option<WeighFn<V>>,
    stats: Arc<Stats>,
) -> L1<V> {
    let items = if estimated_items > 0 {
        estimated_items
    } else {
        usize::try_from(max_weight).unwrap_or(usize::MAX).min(1 << 20)
    };
    QuickCache::with(
        items,
        max_weight,
        Weigh(weigh),
        DefaultHashBuilder::default(),
        Evictions(stats),
    )
}
