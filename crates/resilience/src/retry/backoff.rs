use std::time::Duration;

/// How long to wait before retry number `n` (1-based).
///
/// Jittered variants spread retries of many clients over time, so that a recovering
/// service is not hit by all of them at once ("Exponential Backoff And Jitter",
/// AWS Architecture Blog, 2015).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Backoff {
    /// Always `delay`.
    Fixed(Duration),
    /// `initial x multiplier^(n-1)`, capped at `max`.
    Exponential {
        /// Wait before the first retry.
        initial: Duration,
        /// Growth per retry (at least 1).
        multiplier: f64,
        /// Upper bound.
        max: Duration,
    },
    /// Uniform in `[0, min(max, initial x multiplier^(n-1))]`: "full jitter".
    ExponentialJitter {
        /// Upper bound of the first wait.
        initial: Duration,
        /// Growth per retry (at least 1).
        multiplier: f64,
        /// Upper bound.
        max: Duration,
    },
    /// Uniform in `[base, 3 x previous wait]`, capped at `max`: "decorrelated jitter".
    DecorrelatedJitter {
        /// Smallest wait, and the first upper bound's third.
        base: Duration,
        /// Upper bound.
        max: Duration,
    },
}

impl Default for Backoff {
    /// Full jitter from 50 ms, doubling, capped at 5 s.
    fn default() -> Self {
        Backoff::ExponentialJitter {
            initial: Duration::from_millis(50),
            multiplier: 2.0,
            max: Duration::from_secs(5),
        }
    }
}

impl Backoff {
    /// The wait before retry `n` (1-based), given the previous wait.
    pub fn delay(&self, n: u32, previous: Duration, rng: &mut fastrand::Rng) -> Duration {
        match *self {
            Backoff::Fixed(d) => d,
            Backoff::Exponential {
                initial,
                multiplier,
                max,
            } => exponential(initial, multiplier, max, n),
            Backoff::ExponentialJitter {
                initial,
                multiplier,
                max,
            } => uniform(rng, Duration::ZERO, exponential(initial, multiplier, max, n)),
            Backoff::DecorrelatedJitter { base, max } => {
                let upper = previous.max(base).saturating_mul(3).min(max);
                uniform(rng, base.min(upper), upper)
            }
        }
    }

    /// Checks the numbers; returns (field, problem) pairs.
    pub fn problems(&self) -> Vec<(&'static str, &'static str)> {
        let mut out = Vec::new();
        match *self {
            Backoff::Fixed(_) => {}
            Backoff::Exponential {
                initial,
                multiplier,
                max,
            }
            | Backoff::ExponentialJitter {
                initial,
                multiplier,
                max,
            } => {
                if !(multiplier.is_finite() && multiplier >= 1.0) {
                    out.push(("backoff.multiplier", "must be a number >= 1"));
                }
                if max < initial {
                    out.push(("backoff.max", "must be at least backoff.initial"));
                }
            }
            Backoff::DecorrelatedJitter { base, max } => {
                if base.is_zero() {
                    out.push(("backoff.base", "must be greater than zero"));
                }
                if max < base {
                    out.push(("backoff.max", "must be at least backoff.base"));
                }
            }
        }
        out
    }
}

/// `initial x multiplier^(n-1)`, capped at `max` (also the breaker's open backoff).
pub(crate) fn exponential(initial: Duration, multiplier: f64, max: Duration, n: u32) -> Duration {
    let exp = n.saturating_sub(1).min(1024) as i32;
    let secs = initial.as_secs_f64() * multiplier.powi(exp);
    if !secs.is_finite() || secs >= max.as_secs_f64() {
        max
    } else {
        Duration::from_secs_f64(secs)
    }
}

fn uniform(rng: &mut fastrand::Rng, low: Duration, high: Duration) -> Duration {
    if high <= low {
        return low;
    }
    let span = u64::try_from((high - low).as_nanos()).unwrap_or(u64::MAX);
    low + Duration::from_nanos(rng.u64(0..=span))
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn exponential_doubles_and_caps() {
        let b = Backoff::Exponential {
            initial: 100 * MS,
            multiplier: 2.0,
            max: 500 * MS,
        };
        let mut rng = fastrand::Rng::with_seed(1);
        let got: Vec<_> = (1..=5).map(|n| b.delay(n, Duration::ZERO, &mut rng)).collect();
        assert_eq!(got, [100 * MS, 200 * MS, 400 * MS, 500 * MS, 500 * MS]);
    }

    #[test]
    fn full_jitter_stays_under_the_exponential_curve() {
        let b = Backoff::ExponentialJitter {
            initial: 100 * MS,
            multiplier: 2.0,
            max: 1000 * MS,
        };
        let mut rng = fastrand::Rng::with_seed(7);
        for n in 1..=10 {
            let cap = (100 * MS * 2u32.pow(n - 1)).min(1000 * MS);
            let spread: Vec<_> = (0..200).map(|_| b.delay(n, Duration::ZERO, &mut rng)).collect();
            assert!(spread.iter().all(|d| *d <= cap));
            // Jitter really spreads: both halves of the range are used.
            assert!(spread.iter().any(|d| *d < cap / 2) && spread.iter().any(|d| *d > cap / 2));
        }
    }

    #[test]
    fn decorrelated_jitter_is_bounded_by_three_times_the_previous() {
        let b = Backoff::DecorrelatedJitter {
            base: 10 * MS,
            max: 2000 * MS,
        };
        let mut rng = fastrand::Rng::with_seed(3);
        let mut prev = Duration::ZERO;
        for n in 1..=50 {
            let d = b.delay(n, prev, &mut rng);
            assert!(
                d >= 10 * MS && d <= (prev.max(10 * MS) * 3).min(2000 * MS),
                "{d:?} after {prev:?}"
            );
            prev = d;
        }
    }
}
