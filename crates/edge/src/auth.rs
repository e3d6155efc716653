//! A provider's key set as it changes ([`KeyRing`]) and a route's token check
//! with a cache of tokens already verified ([`JwtAuth`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::jwt::{self, KeySet, Rejection, Rules, Verified};

/// A provider's keys: the last good set (empty until the first), replaced whole
/// by each successful fetch. Tells its fetcher when a refetch for an unknown key
/// may go out: at most once per `min_refetch`, so tokens with random `kid`s
/// cannot make the gateway hammer the issuer.
#[derive(Debug)]
pub struct KeyRing {
    set: ArcSwap<KeySet>,
    generation: AtomicU64,
    /// When the last refetch for an unknown key went out.
    refetched: std::sync::Mutex<Option<Instant>>,
    min_refetch: Duration,
}

impl KeyRing {
    /// An empty ring allowing a refetch for an unknown key every `min_refetch`.
    pub fn new(min_refetch: Duration) -> Self {
        KeyRing {
            set: ArcSwap::from_pointee(KeySet::default()),
            generation: AtomicU64::new(0),
            refetched: std::sync::Mutex::new(None),
            min_refetch,
        }
    }

    /// Puts `set` in place of the current one.
    pub fn install(&self, set: KeySet) {
        self.set.store(Arc::new(set));
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// The current set.
    pub fn keys(&self) -> Arc<KeySet> {
        self.set.load_full()
    }

    /// How many sets have been installed (0: none yet).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Whether a refetch for an unknown key may go out now (and, if so, marks it
    /// gone out).
    pub fn may_refetch(&self, now: Instant) -> bool {
        let mut last = self
            .refetched
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.is_some_and(|t| now.duration_since(t) < self.min_refetch) {
            return false;
        }
        *last = Some(now);
        true
    }
}

/// The longest token the cache keeps (longer ones are verified every time).
const CACHED_TOKEN_BYTES: usize = 4096;

/// A route's token check: its provider's rules and keys, and the tokens it has
/// verified (kept until their expiry or a new key set, whichever comes first).
pub struct JwtAuth {
    rules: Rules,
    ring: Arc<KeyRing>,
    cache: quick_cache::sync::Cache<String, (u64, Verified)>,
}

impl std::fmt::Debug for JwtAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtAuth")
            .field("rules", &self.rules)
            .finish_non_exhaustive()
    }
}

impl JwtAuth {
    /// Checks tokens under `rules` with the keys of `ring`, keeping up to
    /// `cached` verified tokens.
    pub fn new(rules: Rules, ring: Arc<KeyRing>, cached: usize) -> Self {
        JwtAuth {
            rules,
            ring,
            cache: quick_cache::sync::Cache::new(cached.max(1)),
        }
    }

    /// The provider's key ring.
    pub fn ring(&self) -> &Arc<KeyRing> {
        &self.ring
    }

    /// The rules.
    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// Checks `token` at `now` (Unix seconds): from the cache when it was verified
    /// with the current key set, else verified now (and kept).
    pub fn check(&self, token: &str, now: u64) -> Result<Verified, Rejection> {
        let generation = self.ring.generation();
        if let Some((seen, verified)) = self.cache.get(token)
            && seen == generation
        {
            verified.still_valid(&self.rules, now)?;
            return Ok(verified);
        }
        let verified = jwt::verify(token, &self.ring.keys(), &self.rules, now)?;
        if token.len() <= CACHED_TOKEN_BYTES {
            self.cache
                .insert(token.to_owned(), (generation, verified.clone()));
        }
        Ok(verified)
    }
}
