//! The decide phase: whether an attempt's result is tried again, and after how
//! long. The route's conditions say what is worth retrying; the resilience crate's
//! retry policy says whether another attempt may be made (attempts, the route's
//! budget, time left) and after how long (full-jitter exponential backoff, or the
//! server's `Retry-After`).
//!
//! A `Retry-After` is honoured as it is, never shortened to `max_backoff`: a server
//! that asks for 5 s and is retried after 100 ms is hammered against its word, which
//! is what retry storms are made of. When the wait it asks for does not fit in what
//! is left of the route's timeout, there is no retry: its answer, `Retry-After` and
//! all, goes to the client, who can wait longer than one request can.

use std::time::Duration;

use http::StatusCode;
use palisade_resilience::Instant;
use palisade_resilience::retry::{Decision, RetryState, StopReason};

use crate::config::RetryOn;
use crate::route::RouteRetry;

/// What the decide phase sees of an attempt.
#[derive(Debug)]
pub(super) struct Tried<'a> {
    /// The answer's status, when there was an answer.
    pub status: Option<StatusCode>,
    /// The retry conditions the result meets, as classified.
    pub met: &'a [RetryOn],
    /// Whether the request can be sent again (its method, its body kept).
    pub replayable: bool,
}

/// Whether the route retries this result (a request that can be sent again, with
/// a status the route lists or a failure of a kind it names). Asked first, so a
/// result that is not retried costs no clock read and no header lookup.
pub(super) fn wanted(r: &RouteRetry, tried: &Tried<'_>) -> bool {
    let listed = tried
        .status
        .is_some_and(|s| r.retry_on.contains(&RetryOn::RetriableStatus) && r.statuses.contains(&s.as_u16()));
    tried.replayable && (listed || tried.met.iter().any(|c| r.retry_on.contains(c)))
}

/// For a result the route retries: the wait before another attempt, or why the
/// policy makes none. `hint` is the answer's `Retry-After`, `time_left` what is
/// left of the route's timeout.
pub(super) fn retry_delay(
    r: &RouteRetry,
    state: &mut RetryState,
    hint: Option<Duration>,
    time_left: Duration,
) -> Result<Duration, StopReason> {
    // The policy has no `max_elapsed` (the route's deadline is `time_left`), so the
    // instant it is given is not read.
    match r.policy.decide(state, Instant::ZERO, hint, Some(time_left)) {
        Decision::Retry(delay) => Ok(delay),
        Decision::Stop(reason) => Err(reason),
    }
}

#[cfg(test)]
mod tests {
    use palisade_resilience::retry::{Backoff, BudgetConfig, RetryBudget, RetryPolicy};

    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const SEC: Duration = Duration::from_secs(1);

    /// Three attempts on 503 and on connect failures, backoff 10 ms doubling to
    /// 40 ms, a budget of `min_per_second` retries a second and no ratio.
    fn retry(min_per_second: u32) -> RouteRetry {
        let budget = RetryBudget::new(BudgetConfig {
            ratio: 0.0,
            min_per_second,
            window: Duration::from_secs(10),
        });
        RouteRetry {
            retry_on: vec![RetryOn::ConnectFailure, RetryOn::RetriableStatus],
            statuses: vec![503],
            non_idempotent: false,
            buffer_bytes: 0,
            policy: RetryPolicy::new(3)
                .backoff(Backoff::ExponentialJitter {
                    initial: 10 * MS,
                    multiplier: 2.0,
                    max: 40 * MS,
                })
                .budget(budget),
        }
    }

    fn answered(status: u16) -> Tried<'static> {
        Tried {
            status: Some(StatusCode::from_u16(status).unwrap()),
            met: &[],
            replayable: true,
        }
    }

    #[test]
    fn a_listed_status_is_retried_after_a_jittered_backoff_until_attempts_run_out() {
        let r = retry(100);
        let mut state = r.policy.begin(None);
        assert!(wanted(&r, &answered(503)));
        let first = retry_delay(&r, &mut state, None, SEC).unwrap();
        assert!(first <= 10 * MS, "{first:?}");
        let second = retry_delay(&r, &mut state, None, SEC).unwrap();
        assert!(second <= 20 * MS, "{second:?}");
        assert_eq!(state.attempts(), 3);
        assert_eq!(
            retry_delay(&r, &mut state, None, SEC),
            Err(StopReason::AttemptsExhausted)
        );
    }

    #[test]
    fn what_the_route_does_not_list_is_answered_at_once() {
        let r = retry(100);
        assert!(!wanted(&r, &answered(500)));
        let reset = Tried {
            status: None,
            met: &[RetryOn::Reset],
            replayable: true,
        };
        assert!(!wanted(&r, &reset));
        let refused = Tried {
            met: &[RetryOn::ConnectFailure],
            ..reset
        };
        assert!(wanted(&r, &refused));
    }

    #[test]
    fn a_request_that_cannot_be_sent_again_is_not_retried() {
        let r = retry(100);
        let tried = Tried {
            replayable: false,
            ..answered(503)
        };
        assert!(!wanted(&r, &tried));
    }

    #[test]
    fn retry_after_is_waited_in_full_when_it_fits_and_ends_the_retries_when_not() {
        let r = retry(100);
        let mut state = r.policy.begin(None);
        // Longer than max_backoff (40 ms): honoured, not shortened.
        assert_eq!(retry_delay(&r, &mut state, Some(2 * SEC), 3 * SEC), Ok(2 * SEC));
        // Longer than the time left: the answer goes to the client.
        assert_eq!(
            retry_delay(&r, &mut state, Some(5 * SEC), 3 * SEC),
            Err(StopReason::DeadlineTooClose)
        );
    }

    #[test]
    fn a_spent_budget_stops_retries() {
        let r = retry(0);
        let mut state = r.policy.begin(None);
        assert_eq!(
            retry_delay(&r, &mut state, None, SEC),
            Err(StopReason::BudgetExhausted)
        );
    }
}
