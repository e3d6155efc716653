use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Allowed, Quota, RateLimited};
use crate::clock::{Instant, SharedClock, SystemClock, duration_nanos};
use crate::{ConfigError, ConfigErrors};

/// How a [`WarmUpLimiter`] ramps up.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WarmUp {
    /// The full, warm rate (`burst` is ignored: a warm-up limiter is smooth).
    pub quota: Quota,
    /// How long a fully cold limiter takes to reach the full rate under steady demand.
    pub period: Duration,
    /// How much slower the cold rate is than the warm one (Sentinel's default: 3).
    pub cold_factor: f64,
    /// How long a request may wait for its turn; zero refuses instead of waiting.
    pub max_wait: Duration,
}

impl WarmUp {
    /// Warm up to `quota` over `period`, starting 3 times slower, refusing rather
    /// than waiting.
    pub fn new(quota: Quota, period: Duration) -> Self {
        WarmUp {
            quota,
            period,
            cold_factor: 3.0,
            max_wait: Duration::ZERO,
        }
    }

    /// Every problem with this configuration, with its field.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut errors = self.quota.problems("quota.");
        errors.retain(|e| e.field != "quota.burst");
        if self.period.is_zero() {
            errors.push(ConfigError::new("period", "must be longer than zero"));
        }
        if !(self.cold_factor >= 1.0 && self.cold_factor.is_finite()) {
            errors.push(ConfigError::new(
                "cold_factor",
                "must be a finite number of at least 1",
            ));
        }
        ConfigErrors::result(errors)
    }
}

/// A smooth rate limiter with a cold start: after a quiet spell it admits requests
/// at `rate / cold_factor`, and speeds up to the full rate over the warm-up period as
/// traffic keeps coming, so a cold cache or a fresh JIT behind it is not flooded
/// (Sentinel's WARM_UP behaviour; the model is Guava's `SmoothWarmingUp`).
///
/// The limiter stores "permits" while idle, up to a maximum; spending a stored
/// permit above the threshold costs more time the more are stored, so the first
/// requests after a quiet spell are spaced at the cold interval and the spacing
/// shrinks linearly to the stable interval. With `max_wait` above zero a request
/// may be admitted with a [`wait`](Allowed::wait) (pacing) instead of refused.
///
/// The state is a few numbers under a mutex; a decision holds it for a few dozen
/// nanoseconds. Use [`RateLimiter`](super::RateLimiter) where no warm-up is needed.
#[derive(Clone)]
pub struct WarmUpLimiter {
    inner: Arc<Inner>,
}

struct Inner {
    config: WarmUp,
    stable: f64,
    threshold: f64,
    max_permits: f64,
    slope: f64,
    cool_down: f64,
    state: Mutex<State>,
    clock: SharedClock,
}

struct State {
    stored: f64,
    next_free: u64,
}

impl std::fmt::Debug for WarmUpLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WarmUpLimiter")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl WarmUpLimiter {
    /// A cold limiter on the system clock.
    pub fn new(config: WarmUp) -> Result<Self, ConfigErrors> {
        Self::with_clock(config, SystemClock)
    }

    /// A cold limiter on `clock`.
    pub fn with_clock(config: WarmUp, clock: impl crate::Clock) -> Result<Self, ConfigErrors> {
        config.validate()?;
        let stable = duration_nanos(config.quota.period) as f64 / f64::from(config.quota.limit);
        let cold = stable * config.cold_factor;
        let warm = duration_nanos(config.period) as f64;
        let threshold = 0.5 * warm / stable;
        let max_permits = threshold + 2.0 * warm / (stable + cold);
        Ok(WarmUpLimiter {
            inner: Arc::new(Inner {
                config,
                stable,
                threshold,
                max_permits,
                slope: (cold - stable) / (max_permits - threshold),
                cool_down: warm / max_permits,
                state: Mutex::new(State {
                    stored: max_permits,
                    next_free: 0,
                }),
                clock: SharedClock::new(clock),
            }),
        })
    }

    /// Admits or refuses one request now.
    pub fn check(&self) -> Result<Allowed, RateLimited> {
        self.check_n_at(self.inner.clock.now(), 1)
    }

    /// Admits or refuses a request of `cost` units at `now`.
    pub fn check_n_at(&self, now: Instant, cost: u32) -> Result<Allowed, RateLimited> {
        let inner = &*self.inner;
        let now = now.as_nanos();
        let mut state = inner.state.lock().unwrap_or_else(|e| e.into_inner());
        if now > state.next_free {
            state.stored = inner.stored_at(&state, now);
            state.next_free = now;
        }
        let wait = state.next_free - now;
        let limit = inner.config.quota.limit;
        let max_wait = duration_nanos(inner.config.max_wait);
        if wait > max_wait {
            return Err(RateLimited::new(limit, wait - max_wait, wait));
        }
        let spend = f64::from(cost).min(state.stored);
        let cost_nanos =
            inner.time_for_stored(state.stored, spend) + (f64::from(cost) - spend) * inner.stable;
        state.stored -= spend;
        state.next_free += cost_nanos as u64;
        Ok(Allowed::new(limit, state.next_free - now, wait, 0, 1))
    }

    /// The interval the next request would be spaced at now: the cold interval when
    /// fully cold, the stable one when warm.
    pub fn current_interval(&self) -> Duration {
        let now = self.inner.clock.now().as_nanos();
        let state = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        let stored = self.inner.stored_at(&state, now);
        Duration::from_nanos(self.inner.interval_at(stored) as u64)
    }
}

impl Inner {
    /// Permits stored by `now`: idle time since `next_free` refills them.
    fn stored_at(&self, state: &State, now: u64) -> f64 {
        let idle = now.saturating_sub(state.next_free) as f64;
        (state.stored + idle / self.cool_down).min(self.max_permits)
    }

    fn interval_at(&self, stored: f64) -> f64 {
        self.stable + (stored - self.threshold).max(0.0) * self.slope
    }

    /// Time to spend `spend` of `stored` permits: the area under the interval line.
    fn time_for_stored(&self, stored: f64, spend: f64) -> f64 {
        let above = (stored - self.threshold).max(0.0).min(spend);
        let ramp = above * (self.interval_at(stored) + self.interval_at(stored - above)) / 2.0;
        ramp + (spend - above) * self.stable
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::ManualClock;

    /// Offers a request every millisecond for `secs`; counts admissions per second.
    fn admitted_per_second(limiter: &WarmUpLimiter, clock: &ManualClock, secs: u32) -> Vec<usize> {
        (0..secs)
            .map(|_| {
                (0..1000)
                    .filter(|_| {
                        let ok = limiter.check().is_ok();
                        clock.advance(Duration::from_millis(1));
                        ok
                    })
                    .count()
            })
            .collect()
    }

    #[test]
    fn a_cold_limiter_ramps_to_the_full_rate_over_the_period() {
        let clock = ManualClock::new();
        let limiter = WarmUpLimiter::with_clock(
            WarmUp::new(Quota::per_second(100), Duration::from_secs(10)),
            clock.clone(),
        )
        .unwrap();
        assert_eq!(limiter.current_interval(), Duration::from_millis(30));
        let rates = admitted_per_second(&limiter, &clock, 14);
        assert!(
            rates[0] <= 36,
            "cold start admits about a third of the rate: {rates:?}"
        );
        assert!(
            rates.windows(2).take(9).all(|w| w[1] + 1 >= w[0]),
            "never slows down while warming: {rates:?}"
        );
        assert!(rates[12] >= 99, "warm after the period: {rates:?}");
        // A long quiet spell cools it down again.
        clock.advance(Duration::from_secs(60));
        assert_eq!(limiter.current_interval(), Duration::from_millis(30));
    }

    #[test]
    fn pacing_with_warm_up_waits_instead_of_refusing() {
        let clock = ManualClock::new();
        let limiter = WarmUpLimiter::with_clock(
            WarmUp {
                max_wait: Duration::from_millis(100),
                ..WarmUp::new(Quota::per_second(100), Duration::from_secs(10))
            },
            clock,
        )
        .unwrap();
        let waits: Vec<_> = (0..5)
            .map_while(|_| limiter.check().ok().map(|a| a.wait().as_millis()))
            .collect();
        // Spaced at the cold interval (about 30 ms) until the next would wait > 100 ms.
        assert_eq!(waits.len(), 4, "{waits:?}");
        assert_eq!(waits[0], 0);
        assert!((29..=30).contains(&waits[1]), "{waits:?}");
    }

    #[test]
    fn bad_config_names_fields() {
        let bad = WarmUp {
            cold_factor: 0.5,
            ..WarmUp::new(Quota::per_second(0), Duration::ZERO)
        };
        let errors = bad.validate().unwrap_err();
        let fields = errors.fields();
        assert_eq!(fields, ["quota.limit", "period", "cold_factor"]);
    }
}
