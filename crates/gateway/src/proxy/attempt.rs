//! The attempt phase: an endpoint picked (the ones tried avoided), its breaker
//! asked, the attempt's timeout within what is left of the route's; and the state
//! the decide phase keeps between attempts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use palisade_balance::{EndpointState, PickError};
use palisade_core::{Clock, SystemClock};
use palisade_resilience::breaker::{CircuitBreaker, Outcome, Permit};
use palisade_resilience::retry::{RetryState, StopReason};
use palisade_resilience::timeout::AdaptiveTimeout;
use tokio::time::Instant;

use super::admit::Prepared;
use super::answer::Verdict;
use super::classify::classify;
use super::client_body::ClientSide;
use super::decide::{self, Tried};
use super::{AttemptResult, Attempted, Cause, Classified, Failure, Picked, Sent, retry_after, take_lease};
use crate::Body;
use crate::config::RetryOn;
use crate::route::Route;
use crate::trace::{AttemptTrace, TRACEPARENT, TraceCtx};
use crate::upstream::Upstream;

/// The attempts of one request: its deadline, the endpoints tried, its retry state.
pub(super) struct Attempts {
    deadline: Instant,
    refusals: usize,
    tried: Vec<SocketAddr>,
    /// `None` on a route that does not retry.
    retry: Option<RetryState>,
    /// Attempts launched (for their spans).
    launched: u32,
    /// What the last attempt came to, when another follows it (for the next span).
    retry_reason: Option<&'static str>,
    /// The request's trace, when the gateway traces.
    pub(super) trace: Option<TraceCtx>,
}

impl Attempts {
    /// The first attempt's state; counts the request in the route's retry budget.
    /// The route's timeout, or the time the client gave (`client_deadline`) when
    /// shorter, starts now.
    pub(super) fn new(route: &Route, client_deadline: Option<Duration>) -> Self {
        let total = client_deadline.map_or(route.timeout, |d| d.min(route.timeout));
        Attempts {
            deadline: Instant::now() + total,
            refusals: 0,
            tried: Vec::new(),
            retry: route.retry.as_ref().map(|r| r.policy.begin(None)),
            launched: 0,
            retry_reason: None,
            trace: None,
        }
    }

    /// Picks an endpoint and asks its breaker. `None`: the breaker refused and
    /// another endpoint may be tried at once (a refusal sends nothing and is not an
    /// attempt; bounded by the number of endpoints).
    pub(super) fn pick(
        &mut self,
        route: &Route,
        up: &Upstream,
        hash_key: Option<u64>,
    ) -> Result<Option<Picked>, Failure> {
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

    /// A hedge for the attempt running on `first`: another endpoint, if the
    /// route's budget allows a hedge and one is available (a hedge that cannot go
    /// is no failure: the first attempt runs on).
    pub(super) fn hedge(
        &mut self,
        route: &Route,
        up: &Upstream,
        req: &mut Prepared,
        first: SocketAddr,
    ) -> Option<Launch> {
        let budget = route.retry.as_ref().and_then(|r| r.policy.budget_ref());
        if budget.is_some_and(|b| !b.try_withdraw()) {
            metrics::counter!("palisade_retry_budget_exhausted_total", "route" => route.name.clone())
                .increment(1);
            return None;
        }
        self.tried.push(first);
        let (ep, permit) = self.pick(route, up, req.hash_key).ok()??;
        let request = req.next_request(ep.addr(), up, self.last_chance(route));
        Some(self.timed(route, ep, permit, request))
    }

    /// The attempt of `request` to `ep`: its timeout (the endpoint's adaptive one
    /// when the route has them) and the deadline it tells the endpoint.
    pub(super) fn timed(
        &mut self,
        route: &Route,
        ep: Arc<EndpointState>,
        permit: Option<Permit<CircuitBreaker>>,
        mut request: Request<Body>,
    ) -> Launch {
        let adaptive = route.adaptive.as_ref().map(|a| a.for_endpoint(ep.addr()));
        let per_try = self.per_try(route, adaptive.as_deref());
        if let Some(d) = &route.deadline {
            d.outgoing(request.headers_mut(), per_try);
        }
        self.launched += 1;
        let trace = self.trace.as_ref().map(|ctx| {
            let (trace, parent) = ctx.attempt(self.launched, self.retry_reason);
            request.headers_mut().insert(&TRACEPARENT, parent);
            trace
        });
        Launch {
            ep,
            permit,
            request,
            per_try,
            adaptive,
            trace,
        }
    }

    /// Whether this attempt is the last one allowed.
    pub(super) fn last_chance(&self, route: &Route) -> bool {
        match (&self.retry, &route.retry) {
            (Some(state), Some(r)) => state.attempts() >= r.policy.max_attempts(),
            _ => true,
        }
    }

    /// The attempt's timeout: the per-attempt one (the endpoint's adaptive one when
    /// the route has them), within what is left of the total.
    pub(super) fn per_try(&self, route: &Route, adaptive: Option<&AdaptiveTimeout>) -> Duration {
        let remaining = self.deadline.saturating_duration_since(Instant::now());
        adaptive
            .map_or(route.per_try_timeout, AdaptiveTimeout::timeout)
            .min(remaining)
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
            Ok(delay) => {
                self.retry_reason = Some(outcome_name(result, outcome));
                Some(delay)
            }
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

/// One attempt ready to go: its endpoint and the breaker's permit, its request,
/// its timeout.
pub(super) struct Launch {
    ep: Arc<EndpointState>,
    permit: Option<Permit<CircuitBreaker>>,
    request: Request<Body>,
    per_try: Duration,
    adaptive: Option<Arc<AdaptiveTimeout>>,
    /// Its span, when the gateway traces.
    trace: Option<AttemptTrace>,
}

impl Launch {
    /// The endpoint it goes to.
    pub(super) fn addr(&self) -> SocketAddr {
        self.ep.addr()
    }

    /// Sends the attempt within its timeout and judges what it came to. Dropped
    /// before it ends (a hedge lost), the request is cancelled and the breaker
    /// counts nothing.
    pub(super) async fn send(
        self,
        up: &Arc<Upstream>,
        client: Option<&ClientSide>,
    ) -> Result<Attempted, Failure> {
        let Launch {
            ep,
            permit,
            request,
            per_try,
            adaptive,
            trace,
        } = self;
        let addr = ep.addr();
        let trace = trace.filter(AttemptTrace::sampled);
        let breaker = trace.as_ref().map(|_| ep.breaker_state());
        let start = SystemClock.now();
        let in_flight = ep.start_owned();
        let result = tokio::time::timeout(per_try, up.pool().send(addr, request)).await;
        let latency = SystemClock.now() - start;
        // A failure the client's body caused (or a timeout while the gateway waited
        // for it) is the client's: the endpoint is not judged, and dropping the
        // breaker's permit counts the call as cancelled.
        if !matches!(result, Ok(Ok(_)))
            && let Some(fault) = client.and_then(|s| s.fault(result.is_err()))
        {
            drop((permit, in_flight));
            return Err(fault.failure());
        }
        if let Some(t) = &adaptive {
            record_latency(t, &result, latency, per_try);
        }
        let (result, lease) = take_lease(result);
        let outcome = classify(up, &result);
        if let (Some(t), Some(b)) = (trace, breaker) {
            end_span(t, (addr, b), &result, &outcome, latency);
        }
        let verdict = Verdict::new(up, permit, &outcome, latency, in_flight, lease);
        Ok(Attempted {
            addr,
            verdict: verdict.judged_now_or_at_body_end(&result),
            result,
            outcome,
            per_try,
            latency,
        })
    }
}

/// What an attempt came to, in a word: `ok`, `failed` (an answer its breaker
/// counts as a failure), or the cause of its failure (`timeout`, `connect_failure`).
fn outcome_name(result: &AttemptResult, outcome: &Classified) -> &'static str {
    match (result, outcome.cause) {
        (Ok(Ok(_)), _) if outcome.breaker == Outcome::Failure => "failed",
        (Ok(Ok(_)), _) => "ok",
        (Err(_), _) => "timeout",
        (Ok(Err(_)), Some(cause)) => cause.as_str(),
        (Ok(Err(_)), None) => "error",
    }
}

/// Records an attempt's span: to `addr` while its breaker was `breaker`.
fn end_span(
    t: AttemptTrace,
    (addr, breaker): (SocketAddr, palisade_resilience::breaker::State),
    result: &AttemptResult,
    outcome: &Classified,
    latency: Duration,
) {
    use crate::trace::Value;
    let mut attributes = vec![
        ("server.address", Value::Str(addr.ip().to_string())),
        ("server.port", Value::Int(i64::from(addr.port()))),
        ("palisade.breaker", Value::Str(breaker.as_str().to_owned())),
        (
            "palisade.outcome",
            Value::Str(outcome_name(result, outcome).to_owned()),
        ),
    ];
    if let Ok(Ok(resp)) = result {
        attributes.push((
            "http.response.status_code",
            Value::Int(i64::from(resp.status().as_u16())),
        ));
    }
    let error = !matches!(result, Ok(Ok(_))) || outcome.breaker == Outcome::Failure;
    t.end(latency, attributes, error);
}

/// The endpoint's latency for its adaptive timeout: an answer's time, or the whole
/// timeout for an attempt it cut off (it took at least that long); a failed
/// connection says nothing of its latency.
fn record_latency(t: &AdaptiveTimeout, sent: &Sent, latency: Duration, per_try: Duration) {
    match sent {
        Ok(Ok(_)) => t.record(latency),
        Err(_) => t.record(per_try),
        Ok(Err(_)) => {}
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use palisade_balance::EndpointInfo;

    use super::*;
    use crate::config::Config;
    use crate::runtime::Runtime;

    const A: &str = "127.0.0.1:9001";
    const B: &str = "127.0.0.1:9002";

    /// A compiled runtime (no socket: nothing is resolved or started) whose one
    /// route `r` has `route` added, to a cluster of endpoints A and B whose breakers
    /// open on one failure for a minute.
    fn runtime(route: &str) -> Runtime {
        let text = format!(
            "[[routes]]\nname = \"r\"\ncluster = \"c\"\ntimeout = \"10s\"\nper_try_timeout = \"2s\"\n{route}\n\n\
             [clusters.c]\nendpoints = [\"{A}\", \"{B}\"]\nlb = \"round-robin\"\n\
             breaker = {{ consecutive_failures = 1, failure_rate = 0.0, open = \"60s\", max_open = \"60s\" }}\n"
        );
        let rt = Runtime::compile(Config::from_toml(&text).unwrap()).unwrap();
        let infos = [A, B].map(|a| EndpointInfo::new(a.parse::<SocketAddr>().unwrap()));
        rt.clusters["c"].cluster.set_endpoints(infos);
        rt
    }

    /// Opens the breaker of the endpoint at `addr` by one failed call.
    fn trip(rt: &Runtime, addr: &str) {
        let eps = rt.clusters["c"].cluster.endpoints();
        let ep = eps.iter().find(|e| e.addr().to_string() == addr).unwrap();
        ep.breaker().unwrap().try_acquire().unwrap().failure();
    }

    #[test]
    fn an_endpoint_whose_breaker_is_open_is_not_picked() {
        let rt = runtime("retry = { attempts = 2, retry_on = [\"refused\"] }");
        trip(&rt, A);
        let route = &rt.routes[0];
        for _ in 0..4 {
            let mut attempts = Attempts::new(route, None);
            let (ep, _permit) = attempts
                .pick(route, route.upstream.as_ref().unwrap(), None)
                .ok()
                .flatten()
                .unwrap();
            assert_eq!(ep.addr().to_string(), B);
            assert!(!attempts.last_chance(route), "the first of two attempts");
        }
    }

    #[test]
    fn without_a_retry_on_refusals_an_open_breaker_is_a_503_saying_when_to_come_back() {
        let rt = runtime("");
        trip(&rt, A);
        trip(&rt, B);
        let route = &rt.routes[0];
        let mut attempts = Attempts::new(route, None);
        let failure = match attempts.pick(route, route.upstream.as_ref().unwrap(), None) {
            Err(f) => f,
            Ok(_) => panic!("an endpoint was picked through an open breaker"),
        };
        assert_eq!(failure.cause, Cause::CircuitOpen);
        let retry_after = failure.headers.iter().find(|(k, _)| *k == "retry-after");
        assert_eq!(retry_after.map(|(_, v)| v.as_str()), Some("60"));
        assert!(
            attempts.last_chance(route),
            "a route without retries has one attempt"
        );
    }

    #[test]
    fn an_attempt_gets_the_per_try_timeout_within_what_is_left_of_the_total() {
        let rt = runtime("");
        let route = &rt.routes[0];
        let attempts = Attempts::new(route, None);
        assert_eq!(attempts.per_try(route, None), Duration::from_secs(2));
        let late = Attempts {
            deadline: Instant::now() + Duration::from_millis(500),
            ..Attempts::new(route, None)
        };
        assert!(late.per_try(route, None) <= Duration::from_millis(500));
    }

    #[test]
    fn an_empty_cluster_is_no_healthy_endpoint() {
        let rt = runtime("");
        rt.clusters["c"].cluster.set_endpoints([]);
        let route = &rt.routes[0];
        match Attempts::new(route, None).pick(route, route.upstream.as_ref().unwrap(), None) {
            Err(f) => assert_eq!(f.cause, Cause::NoHealthyEndpoint),
            Ok(_) => panic!("picked from an empty cluster"),
        }
    }
}
