//! One upstream endpoint: what it is ([`EndpointInfo`]) and what is known about it
//! right now ([`EndpointState`]: requests in flight, latency, health, ejection, its
//! circuit breaker).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use palisade_core::Instant;
use palisade_resilience::breaker::{CircuitBreaker, State};

use crate::health::HealthState;
use crate::outlier::{OutlierConfig, OutlierState};

/// What an endpoint is: where, how much traffic it should get, which failover tier.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EndpointInfo {
    /// Its address.
    pub addr: SocketAddr,
    /// Relative weight for the weighted balancers and the hash rings (at least 1).
    pub weight: u32,
    /// Failover tier: 0 is the primary; higher tiers take traffic only when the tiers
    /// before them are not healthy enough.
    pub tier: u8,
}

impl EndpointInfo {
    /// An endpoint of weight 1 in tier 0.
    pub fn new(addr: SocketAddr) -> Self {
        EndpointInfo {
            addr,
            weight: 1,
            tier: 0,
        }
    }

    /// With this weight.
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = weight.max(1);
        self
    }

    /// In this failover tier.
    pub fn tier(mut self, tier: u8) -> Self {
        self.tier = tier;
        self
    }
}

/// What is known about an endpoint now. Shared by every request; all counters are
/// atomics, so reading it never blocks a request.
#[derive(Debug)]
pub struct EndpointState {
    info: EndpointInfo,
    in_flight: AtomicU32,
    ewma: PeakEwma,
    pub(crate) health: HealthState,
    pub(crate) outlier: OutlierState,
    breaker: Option<CircuitBreaker>,
    requests: AtomicU64,
    failures: AtomicU64,
}

impl EndpointState {
    pub(crate) fn new(
        info: EndpointInfo,
        breaker: Option<CircuitBreaker>,
        default_rtt: Duration,
        outlier: Option<&OutlierConfig>,
    ) -> Self {
        EndpointState {
            info,
            in_flight: AtomicU32::new(0),
            ewma: PeakEwma::new(default_rtt),
            health: HealthState::new(),
            outlier: OutlierState::new(outlier),
            breaker,
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }

    /// What the endpoint is.
    pub fn info(&self) -> &EndpointInfo {
        &self.info
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.info.addr
    }

    /// Its circuit breaker, if the cluster gives endpoints one.
    pub fn breaker(&self) -> Option<&CircuitBreaker> {
        self.breaker.as_ref()
    }

    /// Requests sent to it and not yet finished.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Marks a request as started; the guard marks it finished when dropped.
    pub fn start(&self) -> InFlight<'_> {
        self.count_start();
        InFlight { endpoint: self }
    }

    /// Like [`start`](Self::start), with a guard that owns its endpoint: for a
    /// request that ends after the call returns (a response body still streaming).
    pub fn start_owned(self: &Arc<Self>) -> OwnedInFlight {
        self.count_start();
        OwnedInFlight {
            endpoint: self.clone(),
        }
    }

    fn count_start(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Peak-EWMA latency estimate.
    pub fn latency(&self) -> Duration {
        Duration::from_nanos(self.ewma.value() as u64)
    }

    /// Requests started and requests that failed, since the endpoint appeared.
    pub fn totals(&self) -> (u64, u64) {
        (
            self.requests.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
        )
    }

    /// Whether active health checks consider it healthy (true when there are none).
    pub fn is_healthy(&self) -> bool {
        self.health.is_healthy()
    }

    /// Whether outlier detection has ejected it at `now`.
    pub fn is_ejected(&self, now: Instant) -> bool {
        self.outlier.is_ejected(now)
    }

    /// How many times outlier detection has ejected it (the multiplier of the next
    /// ejection's duration).
    pub fn ejections(&self) -> u32 {
        self.outlier.ejections()
    }

    /// Its breaker's state (closed when it has none).
    pub fn breaker_state(&self) -> State {
        self.breaker.as_ref().map_or(State::Closed, CircuitBreaker::state)
    }

    /// Whether it should get traffic at `now`: healthy, not ejected, and its breaker
    /// would let a call through.
    #[inline]
    pub fn is_available(&self, now: Instant) -> bool {
        self.health.is_healthy()
            && !self.outlier.is_ejected(now)
            && self.breaker.as_ref().is_none_or(CircuitBreaker::would_admit)
    }

    /// The load a balancer weighs: peak-EWMA latency times (requests in flight + 1).
    #[inline]
    pub(crate) fn ewma_cost(&self, now: Instant) -> f64 {
        self.ewma.decayed(now) * f64::from(self.in_flight() + 1)
    }

    pub(crate) fn observe(&self, now: Instant, latency: Duration, failed: bool) {
        self.ewma.observe(now, latency);
        if failed {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A request in flight on an endpoint; dropping it ends the request.
#[derive(Debug)]
pub struct InFlight<'a> {
    endpoint: &'a EndpointState,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request in flight on an endpoint, owning the endpoint; dropping it ends the
/// request. See [`EndpointState::start_owned`].
#[derive(Debug)]
pub struct OwnedInFlight {
    endpoint: Arc<EndpointState>,
}

impl OwnedInFlight {
    /// The endpoint.
    pub fn endpoint(&self) -> &Arc<EndpointState> {
        &self.endpoint
    }
}

impl Drop for OwnedInFlight {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Peak EWMA (Finagle, linkerd): a latency estimate that jumps up to any slower
/// observation at once and decays towards faster ones with time constant `TAU`.
#[derive(Debug)]
struct PeakEwma {
    /// Nanoseconds, as `f64` bits.
    value: AtomicU64,
    /// When `value` was last updated.
    stamp: AtomicU64,
}

/// Decay time constant: an observation's weight halves in about 7 s.
const TAU_NANOS: f64 = 10e9;

impl PeakEwma {
    fn new(initial: Duration) -> Self {
        PeakEwma {
            value: AtomicU64::new((initial.as_nanos() as f64).to_bits()),
            stamp: AtomicU64::new(0),
        }
    }

    fn value(&self) -> f64 {
        f64::from_bits(self.value.load(Ordering::Relaxed))
    }

    /// The estimate at `now` (no new observation; idle time does not lower it, as in
    /// linkerd: an endpoint that got no traffic has told us nothing new).
    fn decayed(&self, _now: Instant) -> f64 {
        self.value()
    }

    /// Concurrent observers race benignly: the last writer wins, each writer's
    /// value is a valid estimate.
    fn observe(&self, now: Instant, latency: Duration) {
        let rtt = latency.as_nanos() as f64;
        let prev = self.value();
        let last = self.stamp.swap(now.as_nanos(), Ordering::Relaxed);
        let next = if rtt > prev {
            rtt
        } else {
            let elapsed = now.as_nanos().saturating_sub(last) as f64;
            let w = (-elapsed / TAU_NANOS).exp();
            prev * w + rtt * (1.0 - w)
        };
        self.value.store(next.to_bits(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_ewma_jumps_up_and_decays_down() {
        let e = PeakEwma::new(Duration::from_millis(1));
        e.observe(Instant::from_nanos(1_000_000_000), Duration::from_millis(100));
        assert_eq!(e.value(), 100e6, "a slower observation is taken at once");
        // 10 s later a 10 ms observation pulls it about 63% of the way down.
        e.observe(Instant::from_nanos(11_000_000_000), Duration::from_millis(10));
        let v = e.value() / 1e6;
        assert!(
            (v - (100.0 * (-1f64).exp() + 10.0 * (1.0 - (-1f64).exp()))).abs() < 1e-6,
            "{v}"
        );
    }

    #[test]
    fn in_flight_guard_counts_and_releases() {
        let s = EndpointState::new(
            EndpointInfo::new("127.0.0.1:1".parse().unwrap()),
            None,
            Duration::from_millis(1),
            None,
        );
        let a = s.start();
        let b = s.start();
        assert_eq!(s.in_flight(), 2);
        drop(a);
        assert_eq!(s.in_flight(), 1);
        drop(b);
        assert_eq!(s.in_flight(), 0);
        assert_eq!(s.totals(), (2, 0));
    }
}
