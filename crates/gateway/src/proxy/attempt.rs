//! The attempt phase: an endpoint picked (the ones tried avoided), its breaker
//! asked, the attempt's timeout within what is left of the route's; and the state
//! the decide phase keeps between attempts.

use std::net::SocketAddr;
use std::time::Duration;

use palisade_balance::PickError;
use palisade_resilience::retry::{RetryState, StopReason};
use tokio::time::Instant;

use super::decide::{self, Tried};
use super::{AttemptResult, Cause, Classified, Failure, Picked, retry_after};
use crate::config::RetryOn;
use crate::route::Route;

/// The attempts of one request: its deadline, the endpoints tried, its retry state.
pub(super) struct Attempts {
    deadline: Instant,
    refusals: usize,
    tried: Vec<SocketAddr>,
    /// `None` on a route that does not retry.
    retry: Option<RetryState>,
}

impl Attempts {
    /// The first attempt's state; counts the request in the route's retry budget.
    pub(super) fn new(route: &Route) -> Self {
        Attempts {
            deadline: Instant::now() + route.timeout,
            refusals: 0,
            tried: Vec::new(),
            retry: route.retry.as_ref().map(|r| r.policy.begin(None)),
        }
    }

    /// Picks an endpoint and asks its breaker. `None`: the breaker refused and
    /// another endpoint may be tried at once (a refusal sends nothing and is not an
    /// attempt; bounded by the number of endpoints).
    pub(super) fn pick(&mut self, route: &Route, hash_key: Option<u64>) -> Result<Option<Picked>, Failure> {
        let up = &route.upstream;
        let pick = up.cluster.pick(hash_key, &self.tried).map_err(|e| match e {
            PickError::NoEndpoints => Failure::new(
                Cause::NoHealthyEndpoint,
                format!("cluster {} has no endpoints", up.name),
            ),
            PickError::NoHealthyEndpoint => Failure::new(
                Cause::NoHealthyEndpoint,
                format!("no healthy endpoint in cluster {}", up.name),
            ),
        })?;
        let ep = pick.endpoint;
        let addr = ep.addr();
        let permit = match ep.breaker().map(|b| b.try_acquire_owned()) {
            Some(Err(rejected)) => {
                self.tried.push(addr);
                self.refusals += 1;
                let may_retry = route
                    .retry
                    .as_ref()
                    .is_some_and(|r| r.retry_on.contains(&RetryOn::Refused));
                if may_retry && self.refusals < up.cluster.len() && Instant::now() < self.deadline {
                    return Ok(None);
                }
                let mut f = Failure::new(Cause::CircuitOpen, format!("circuit open for {addr}")).at(addr);
                if let Some(after) = rejected.retry_after {
                    let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
                    f.headers.push(("retry-after", secs.max(1).to_string()));
                }
                return Err(f);
            }
            Some(Ok(p)) => Some(p),
            None => None,
        };
        Ok(Some((ep, permit)))
    }

    /// Whether this attempt is the last one allowed.
    pub(super) fn last_chance(&self, route: &Route) -> bool {
        match (&self.retry, &route.retry) {
            (Some(state), Some(r)) => state.attempts() >= r.policy.max_attempts(),
            _ => true,
        }
    }

    /// The attempt's timeout: the per-attempt one, within what is left of the total.
    pub(super) fn per_try(&self, route: &Route) -> Duration {
        let remaining = self.deadline.saturating_duration_since(Instant::now());
        route.per_try_timeout.min(remaining)
    }

    /// The decide phase for this request's last attempt: the wait before another,
    /// if one is to be made (see [`decide::retry_delay`]).
    pub(super) fn retry_delay(
        &mut self,
        route: &Route,
        replayable: bool,
        result: &AttemptResult,
        outcome: &Classified,
    ) -> Option<Duration> {
        let (r, state) = (route.retry.as_ref()?, self.retry.as_mut()?);
        let (status, hint) = match result {
            Ok(Ok(resp)) => (Some(resp.status()), Some(resp.headers())),
            _ => (None, None),
        };
        let tried = Tried {
            status,
            met: &outcome.retry_on,
            replayable,
        };
        if !decide::wanted(r, &tried) {
            return None;
        }
        let hint = hint.and_then(retry_after);
        let time_left = self.deadline.saturating_duration_since(Instant::now());
        match decide::retry_delay(r, state, hint, time_left) {
            Ok(delay) => Some(delay),
            Err(stop) => {
                if stop == StopReason::BudgetExhausted {
                    metrics::counter!("palisade_retry_budget_exhausted_total", "route" => route.name.clone())
                        .increment(1);
                }
                None
            }
        }
    }

    /// Notes a retry away from `addr`: it is not picked again.
    pub(super) fn retrying(&mut self, addr: SocketAddr) {
        self.tried.push(addr);
    }
}
