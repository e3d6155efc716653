//! Rate limiting: how many requests a client, a route or a whole service may send.
//!
//! | algorithm | type | behaviour |
//! |---|---|---|
//! | token bucket (GCRA) | [`Gcra::new`] | a sustained rate plus a burst; over it, refuse |
//! | leaky bucket, pacing | [`Gcra::pacing`] | evenly spaced; wait up to `max_wait` for a turn, else refuse |
//! | sliding-window counter | [`SlidingWindowCounter`] | at most N in any window |
//! | warm-up | [`WarmUpLimiter`] | a cold limiter starts at a fraction of the rate and ramps up |
//!
//! [`RateLimiter`] applies one algorithm to everything (one atomic, one CAS per
//! decision); [`KeyedRateLimiter`] keeps one state per key (client, route, the value
//! of a parameter) in bounded memory, forgetting idle keys by itself, with per-key
//! overrides for known hot keys.
//!
//! Every decision carries what HTTP needs: [`Allowed`] and [`RateLimited`] give the
//! limit, the remaining requests, when the window resets and, when refused, how long
//! to wait (`Retry-After`); [`RateLimitHeaders`] formats them.

mod algorithm;
mod direct;
mod keyed;
mod warmup;

use std::time::Duration;

pub use algorithm::{Algorithm, Gcra, Quota, SLIDING_WINDOW_MAX_LIMIT, SlidingWindowCounter, Verdict};
pub use direct::RateLimiter;
pub use keyed::KeyedRateLimiter;
pub use warmup::{WarmUp, WarmUpLimiter};

/// A request was admitted.
///
/// Durations are kept as nanoseconds and converted when read, so a limiter whose
/// caller never looks at them does not pay for the conversion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allowed {
    limit: u32,
    reset_after: u64,
    wait: u64,
    /// `remaining = headroom / per_request`, divided only when asked for.
    headroom: u64,
    per_request: u64,
}

impl Allowed {
    /// An admission: `reset_after` and `wait` in nanoseconds; the remaining allowance
    /// is `headroom / per_request` requests.
    pub const fn new(limit: u32, reset_after: u64, wait: u64, headroom: u64, per_request: u64) -> Self {
        Allowed {
            limit,
            reset_after,
            wait,
            headroom,
            per_request,
        }
    }

    /// The configured limit (`X-RateLimit-Limit`).
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// Requests that could still be sent at once (`X-RateLimit-Remaining`).
    pub fn remaining(&self) -> u32 {
        u32::try_from(self.headroom / self.per_request.max(1)).unwrap_or(u32::MAX)
    }

    /// Time until the limiter is back to its full allowance (`X-RateLimit-Reset`).
    pub fn reset_after(&self) -> Duration {
        Duration::from_nanos(self.reset_after)
    }

    /// How long the caller must wait before sending (pacing limiters only; zero
    /// otherwise). The slot is reserved: waiting is the caller's promise.
    pub fn wait(&self) -> Duration {
        Duration::from_nanos(self.wait)
    }

    /// True when the caller may send at once.
    pub fn is_immediate(&self) -> bool {
        self.wait == 0
    }
}

/// A request was refused by a rate limiter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("rate limited: retry after {:?}", self.retry_after())]
pub struct RateLimited {
    limit: u32,
    retry_after: u64,
    reset_after: u64,
}

impl RateLimited {
    /// A refusal; durations in nanoseconds.
    pub const fn new(limit: u32, retry_after: u64, reset_after: u64) -> Self {
        RateLimited {
            limit,
            retry_after,
            reset_after,
        }
    }

    /// The configured limit (`X-RateLimit-Limit`).
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// The earliest time a retry of the same request could be admitted (`Retry-After`).
    pub fn retry_after(&self) -> Duration {
        Duration::from_nanos(self.retry_after)
    }

    /// Time until the limiter is back to its full allowance (`X-RateLimit-Reset`).
    pub fn reset_after(&self) -> Duration {
        Duration::from_nanos(self.reset_after)
    }
}

/// The standard rate-limit response headers, as (name, value) pairs.
///
/// Seconds are rounded up, so `Retry-After: 1` never invites a client back too early.
///
/// ```
/// use palisade_resilience::ratelimit::{RateLimitHeaders, RateLimited};
///
/// let refused = RateLimited::new(10, 200_000_000, 3_000_000_000);
/// let headers = RateLimitHeaders::from(&refused);
/// assert_eq!(headers.to_pairs(), [
///     ("x-ratelimit-limit", "10".to_string()),
///     ("x-ratelimit-remaining", "0".to_string()),
///     ("x-ratelimit-reset", "3".to_string()),
///     ("retry-after", "1".to_string()),
/// ]);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimitHeaders {
    /// `X-RateLimit-Limit`.
    pub limit: u32,
    /// `X-RateLimit-Remaining`.
    pub remaining: u32,
    /// `X-RateLimit-Reset`, whole seconds.
    pub reset_secs: u64,
    /// `Retry-After`, whole seconds, when refused.
    pub retry_after_secs: Option<u64>,
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl From<&Allowed> for RateLimitHeaders {
    fn from(a: &Allowed) -> Self {
        RateLimitHeaders {
            limit: a.limit,
            remaining: a.remaining(),
            reset_secs: ceil_secs(a.reset_after()),
            retry_after_secs: None,
        }
    }
}

impl From<&RateLimited> for RateLimitHeaders {
    fn from(r: &RateLimited) -> Self {
        RateLimitHeaders {
            limit: r.limit,
            remaining: 0,
            reset_secs: ceil_secs(r.reset_after()),
            retry_after_secs: Some(ceil_secs(r.retry_after()).max(1)),
        }
    }
}

impl RateLimitHeaders {
    /// The headers as lower-case names and values.
    pub fn to_pairs(&self) -> Vec<(&'static str, String)> {
        let mut pairs = vec![
            ("x-ratelimit-limit", self.limit.to_string()),
            ("x-ratelimit-remaining", self.remaining.to_string()),
            ("x-ratelimit-reset", self.reset_secs.to_string()),
        ];
        if let Some(secs) = self.retry_after_secs {
            pairs.push(("retry-after", secs.to_string()));
        }
        pairs
    }
}
