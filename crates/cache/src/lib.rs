//! # palisade-cache
//!
//! A two-level cache that gets the hard parts right by default: an in-process L1
//! (`quick_cache`, bounded by weight) in front of an optional Redis L2 shared by every
//! instance, in front of the caller's loader.
//!
//! ```no_run
//! use std::time::Duration;
//! use palisade_cache::{Cache, RedisOptions};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let products: Cache<String> = Cache::builder("products")
//!     .ttl(Duration::from_secs(300))
//!     .stale_if_error(Duration::from_secs(60))
//!     .redis(RedisOptions::new("redis://127.0.0.1:6379"))
//!     .build()?;
//! let name = products
//!     .get_or_load("42", || async { Ok::<_, std::io::Error>(Some("kettle".to_string())) })
//!     .await?;
//! assert_eq!(name.as_deref(), Some("kettle"));
//! # Ok(()) }
//! ```
//!
//! What it guards against:
//!
//! - **Stampede** (many callers missing one hot key at once): concurrent misses of a
//!   key in one process share one L2 lookup and one loader call (single-flight); with
//!   [`RedisOptions::lease`], one process loads while the others wait for its value or
//!   serve a stale one.
//! - **Penetration** (lookups of keys that do not exist, each reaching the database):
//!   an absence the loader confirms (`Ok(None)`) is cached for a shorter negative TTL;
//!   an optional [key filter](CacheBuilder::filter) refuses impossible keys up front.
//! - **Avalanche** (many keys expiring together): TTLs are jittered by default, and
//!   hot keys are refreshed in the background before they expire, by one caller
//!   (probabilistic early refresh, XFetch).
//! - **Errors**: with [`stale_if_error`](CacheBuilder::stale_if_error), a recently
//!   expired value answers when the loader or Redis fails. Every Redis call is bounded
//!   by a timeout and a circuit breaker: a dead Redis costs one fast refusal, the cache
//!   goes on with L1 and the loader, and reconnects by itself.
//! - **Stale writes**: [`Cache::set`] and [`Cache::invalidate`] bump a per-key
//!   generation in Redis, so a load that began before them cannot write its old value
//!   back, and publish the key so every other instance drops it from L1. A lost
//!   connection drops this instance's whole L1 (messages may have been missed).
//!
//! [`http`] (feature `http`, on by default) holds the rules of HTTP caching a shared
//! cache applies, without I/O, for a proxy's response cache built on [`Cache`].
//!
//! Values are stored in L2 as a 14-byte header and the value in `postcard`; a value
//! that does not decode (another version's type) counts as a miss, never a panic.
//! Metrics are Prometheus counters named `palisade_cache_*`, labelled by cache name
//! (see [`CacheStats`] for what each counts).

mod builder;
mod cache;
mod entry;
mod flight;
#[cfg(feature = "http")]
pub mod http;
mod l1;
mod l2;
mod load;
mod stats;

pub use builder::{CacheBuilder, KeyFilter, WeighFn};
pub use cache::{Cache, CacheError, Lookup};
pub use flight::{Abandoned, LoadError};
pub use l2::{LeaseOptions, RedisOptions};
pub use stats::CacheStats;
