use std::time::Duration;

use super::{Backoff, RetryBudget};
use crate::clock::Instant;
use crate::{ConfigError, ConfigErrors};

/// What a finished attempt asks of the retry loop (the caller's predicate decides).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryAction {
    /// Done: hand the result to the caller (a success, or a failure not worth retrying).
    Return,
    /// A transient failure: retry, after the backoff or after `after` if the
    /// response said when (e.g. `Retry-After`).
    Retry {
        /// The server's own hint for the next delay.
        after: Option<Duration>,
    },
}

impl RetryAction {
    /// Retry after the policy's backoff.
    pub const RETRY: RetryAction = RetryAction::Retry { after: None };
}

/// Why the retry loop stopped retrying.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StopReason {
    /// `max_attempts` attempts were made.
    AttemptsExhausted,
    /// The next attempt would start after `max_elapsed`.
    ElapsedExceeded,
    /// The caller's deadline leaves no time for another attempt.
    DeadlineTooClose,
    /// The shared retry budget is spent.
    BudgetExhausted,
}

impl StopReason {
    /// Lower-case name, as used in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::AttemptsExhausted => "attempts_exhausted",
            StopReason::ElapsedExceeded => "elapsed_exceeded",
            StopReason::DeadlineTooClose => "deadline_too_close",
            StopReason::BudgetExhausted => "budget_exhausted",
        }
    }
}

/// The retry loop's answer to a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Wait this long, then try again.
    Retry(Duration),
    /// Give up; return the last result.
    Stop(StopReason),
}

/// When and how often to retry.
///
/// ```
/// use palisade_resilience::retry::{Backoff, Decision, RetryPolicy, StopReason};
/// use palisade_resilience::Instant;
/// use std::time::Duration;
///
/// let policy = RetryPolicy::new(3).backoff(Backoff::Fixed(Duration::from_millis(100)));
/// let mut r = policy.start(Instant::ZERO);
/// assert_eq!(r.on_failure(Instant::ZERO, None, None), Decision::Retry(Duration::from_millis(100)));
/// assert_eq!(r.on_failure(Instant::ZERO, None, None), Decision::Retry(Duration::from_millis(100)));
/// assert_eq!(r.on_failure(Instant::ZERO, None, None), Decision::Stop(StopReason::AttemptsExhausted));
/// ```
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    max_attempts: u32,
    max_elapsed: Option<Duration>,
    backoff: Backoff,
    budget: Option<RetryBudget>,
    min_attempt_time: Duration,
}

impl Default for RetryPolicy {
    /// 3 attempts in all, full-jitter backoff from 50 ms, no budget.
    fn default() -> Self {
        RetryPolicy::new(3)
    }
}

impl RetryPolicy {
    /// At most `max_attempts` attempts in all (the first one included).
    pub fn new(max_attempts: u32) -> Self {
        RetryPolicy {
            max_attempts,
            max_elapsed: None,
            backoff: Backoff::default(),
            budget: None,
            min_attempt_time: Duration::ZERO,
        }
    }

    /// Sets the backoff.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// No attempt starts later than `max` after the first one started.
    pub fn max_elapsed(mut self, max: Duration) -> Self {
        self.max_elapsed = Some(max);
        self
    }

    /// Draws retries from a (possibly shared) budget.
    pub fn budget(mut self, budget: RetryBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Under a deadline, start an attempt only if at least this long remains after
    /// the backoff (default zero: any time left).
    pub fn min_attempt_time(mut self, min: Duration) -> Self {
        self.min_attempt_time = min;
        self
    }

    /// The most attempts, first included.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The budget, if any.
    pub fn budget_ref(&self) -> Option<&RetryBudget> {
        self.budget.as_ref()
    }

    /// Checks every field; the errors name them.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut errors: Vec<ConfigError> = self
            .backoff
            .problems()
            .into_iter()
            .map(|(f, p)| ConfigError::new(f, p))
            .collect();
        if self.max_attempts == 0 {
            errors.push(ConfigError::new(
                "max_attempts",
                "must be at least 1 (the first attempt)",
            ));
        }
        if let Some(b) = &self.budget {
            let c = b.config();
            if !(c.ratio.is_finite() && c.ratio >= 0.0) {
                errors.push(ConfigError::new("budget.ratio", "must be a number >= 0"));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Starts the retry loop of one request whose first attempt starts at `now`.
    /// Counts the request in the budget.
    pub fn start(&self, now: Instant) -> Retrying<'_> {
        Retrying {
            policy: self,
            state: self.begin(Some(now)),
        }
    }

    /// Begins one request's retry state without borrowing the policy (for futures
    /// that hold the policy in an `Arc`). `now` may be `None` when no
    /// `max_elapsed` is set ([`needs_start_time`](Self::needs_start_time)).
    pub fn begin(&self, now: Option<Instant>) -> RetryState {
        if let Some(b) = &self.budget {
            b.deposit();
        }
        RetryState {
            started: now.unwrap_or(Instant::ZERO),
            attempts: 1,
            previous: Duration::ZERO,
            rng: None,
        }
    }

    /// True if [`begin`](Self::begin) needs the start time.
    pub fn needs_start_time(&self) -> bool {
        self.max_elapsed.is_some()
    }

    /// Decides after a retryable failure of the attempt that ended at `now`; `hint`
    /// is the server's own delay (e.g. `Retry-After`), `time_left` what remains of
    /// the caller's deadline, if any.
    pub fn decide(
        &self,
        state: &mut RetryState,
        now: Instant,
        hint: Option<Duration>,
        time_left: Option<Duration>,
    ) -> Decision {
        if state.attempts >= self.max_attempts {
            return Decision::Stop(StopReason::AttemptsExhausted);
        }
        let delay = match hint {
            Some(d) => d,
            None => {
                let rng = state.rng.get_or_insert_with(fastrand::Rng::new);
                self.backoff.delay(state.attempts, state.previous, rng)
            }
        };
        if let Some(max) = self.max_elapsed
            && (now + delay) - state.started > max
        {
            return Decision::Stop(StopReason::ElapsedExceeded);
        }
        if let Some(left) = time_left
            && (delay >= left || left - delay < self.min_attempt_time)
        {
            return Decision::Stop(StopReason::DeadlineTooClose);
        }
        if let Some(b) = &self.budget
            && !b.try_withdraw()
        {
            return Decision::Stop(StopReason::BudgetExhausted);
        }
        state.attempts += 1;
        state.previous = delay;
        Decision::Retry(delay)
    }
}

/// The retry state of one request, kept apart from its policy.
#[derive(Debug, Clone)]
pub struct RetryState {
    started: Instant,
    attempts: u32,
    previous: Duration,
    rng: Option<fastrand::Rng>,
}

impl RetryState {
    /// Attempts made so far (1 after `begin`).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Seeds the jitter, for reproducible tests.
    pub fn seed(&mut self, seed: u64) {
        self.rng = Some(fastrand::Rng::with_seed(seed));
    }
}

/// The retry state of one request, with its policy. See [`RetryPolicy::start`].
#[derive(Debug)]
pub struct Retrying<'a> {
    policy: &'a RetryPolicy,
    state: RetryState,
}

impl Retrying<'_> {
    /// Attempts made so far (1 after `start`).
    pub fn attempts(&self) -> u32 {
        self.state.attempts
    }

    /// Seeds the jitter, for reproducible tests.
    pub fn seed(&mut self, seed: u64) {
        self.state.seed(seed);
    }

    /// The attempt that just ended at `now` failed in a retryable way; `hint` is the
    /// server's own delay (e.g. `Retry-After`), `time_left` what remains of the
    /// caller's deadline, if any.
    pub fn on_failure(
        &mut self,
        now: Instant,
        hint: Option<Duration>,
        time_left: Option<Duration>,
    ) -> Decision {
        self.policy.decide(&mut self.state, now, hint, time_left)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::ManualClock;
    use crate::retry::BudgetConfig;

    const MS: Duration = Duration::from_millis(1);

    fn at(ms: u64) -> Instant {
        Instant::from_nanos(ms * 1_000_000)
    }

    #[test]
    fn max_elapsed_counts_the_coming_delay() {
        let p = RetryPolicy::new(10)
            .backoff(Backoff::Fixed(100 * MS))
            .max_elapsed(250 * MS);
        let mut r = p.start(at(0));
        assert_eq!(r.on_failure(at(50), None, None), Decision::Retry(100 * MS));
        // next would start at 260 ms > 250 ms
        assert_eq!(
            r.on_failure(at(160), None, None),
            Decision::Stop(StopReason::ElapsedExceeded)
        );
    }

    #[test]
    fn retry_after_hint_replaces_the_backoff() {
        let p = RetryPolicy::new(3).backoff(Backoff::Fixed(10 * MS));
        let mut r = p.start(at(0));
        assert_eq!(
            r.on_failure(at(1), Some(2000 * MS), None),
            Decision::Retry(2000 * MS)
        );
    }

    #[test]
    fn no_attempt_starts_that_cannot_finish_before_the_deadline() {
        let p = RetryPolicy::new(5)
            .backoff(Backoff::Fixed(100 * MS))
            .min_attempt_time(50 * MS);
        let mut r = p.start(at(0));
        assert_eq!(
            r.on_failure(at(10), None, Some(290 * MS)),
            Decision::Retry(100 * MS)
        );
        // 200 + 100 = 300: nothing left before the deadline
        assert_eq!(
            r.on_failure(at(200), None, Some(100 * MS)),
            Decision::Stop(StopReason::DeadlineTooClose)
        );
        // 120 + 100 = 220, 80 ms left >= 50 ms
        assert_eq!(
            r.on_failure(at(120), None, Some(180 * MS)),
            Decision::Retry(100 * MS)
        );
        // 160 + 100 = 260, 40 ms left < 50 ms
        assert_eq!(
            r.on_failure(at(160), None, Some(140 * MS)),
            Decision::Stop(StopReason::DeadlineTooClose)
        );
    }

    #[test]
    fn a_shared_budget_caps_retries_across_policies() {
        let budget = RetryBudget::with_clock(
            BudgetConfig {
                ratio: 0.5,
                min_per_second: 0,
                window: Duration::from_secs(10),
            },
            ManualClock::new(),
        );
        let a = RetryPolicy::new(10)
            .backoff(Backoff::Fixed(MS))
            .budget(budget.clone());
        let b = RetryPolicy::new(10).backoff(Backoff::Fixed(MS)).budget(budget);
        // 4 requests (2 through each policy) earn 2 retries between them.
        let mut ra = [a.start(at(0)), a.start(at(0))];
        let mut rb = [b.start(at(0)), b.start(at(0))];
        let mut retries = 0;
        for r in ra.iter_mut().chain(rb.iter_mut()) {
            loop {
                match r.on_failure(at(0), None, None) {
                    Decision::Retry(_) => retries += 1,
                    Decision::Stop(reason) => {
                        assert_eq!(reason, StopReason::BudgetExhausted);
                        break;
                    }
                }
            }
        }
        assert_eq!(retries, 2);
    }

    #[test]
    fn validation_names_fields() {
        let p = RetryPolicy::new(0).backoff(Backoff::Exponential {
            initial: 10 * MS,
            multiplier: 0.0,
            max: MS,
        });
        let fields: Vec<_> = p.validate().unwrap_err().0.into_iter().map(|e| e.field).collect();
        assert_eq!(fields, ["backoff.multiplier", "backoff.max", "max_attempts"]);
    }
}
