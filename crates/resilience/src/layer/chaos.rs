//! [`ChaosLayer`]: inject faults, latency and made-up outcomes into calls, at rates
//! that can be changed while the service runs, so users can test their own
//! resilience (Polly's Simmy, Netflix's Chaos Monkey at the call level).
//!
//! Injected errors are built by a function the user gives, so they have the inner
//! service's own error type and travel through every outer layer (classifiers,
//! breakers, retries) exactly like real failures. A [`Chaos`] handle is shared by
//! every service the layer builds: flip it from an admin endpoint or a test.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_layer::Layer;
use tower_service::Service;

use crate::sync::{AtomicBool, AtomicU64, Ordering};
use crate::{ConfigError, ConfigErrors};

/// The run-time switchboard of a [`ChaosLayer`]. Clones share it. Starts disabled
/// with every rate at zero.
///
/// ```
/// use palisade_resilience::layer::chaos::Chaos;
/// use std::time::Duration;
///
/// let chaos = Chaos::seeded(42);
/// chaos.set_error_rate(0.1).unwrap();
/// chaos.set_latency(0.5, Duration::from_millis(200)).unwrap();
/// chaos.enable();
/// assert!(chaos.set_error_rate(1.5).is_err());
/// ```
#[derive(Clone, Debug, Default)]
pub struct Chaos {
    inner: Arc<Switches>,
}

#[derive(Debug, Default)]
struct Switches {
    enabled: AtomicBool,
    error_rate: AtomicU64,
    outcome_rate: AtomicU64,
    latency_rate: AtomicU64,
    latency_nanos: AtomicU64,
    rng: AtomicU64,
}

fn check_rate(field: &str, rate: f64) -> Result<(), ConfigErrors> {
    if (0.0..=1.0).contains(&rate) {
        Ok(())
    } else {
        Err(ConfigErrors(vec![ConfigError::new(
            field,
            "must be between 0 and 1",
        )]))
    }
}

/// What chaos decided for one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Injection {
    /// Call the service untouched.
    None,
    /// Fail with an injected error, without calling the service.
    Error,
    /// Answer with an injected response, without calling the service.
    Outcome,
    /// Call the service after this delay.
    Latency(Duration),
}

impl Chaos {
    /// A disabled switchboard with a random seed.
    pub fn new() -> Self {
        Self::seeded(fastrand::u64(..))
    }

    /// A disabled switchboard whose draws are a fixed sequence (for reproducible tests).
    pub fn seeded(seed: u64) -> Self {
        let chaos = Chaos::default();
        chaos.inner.rng.store(seed, Ordering::Relaxed);
        chaos
    }

    /// Starts injecting.
    pub fn enable(&self) {
        self.inner.enabled.store(true, Ordering::Relaxed);
    }

    /// Stops injecting (calls pass untouched).
    pub fn disable(&self) {
        self.inner.enabled.store(false, Ordering::Relaxed);
    }

    /// True while injecting.
    pub fn is_enabled(&self) -> bool {
        self.inner.enabled.load(Ordering::Relaxed)
    }

    /// Share of calls failed with an injected error.
    pub fn set_error_rate(&self, rate: f64) -> Result<(), ConfigErrors> {
        check_rate("error_rate", rate)?;
        self.inner.error_rate.store(rate.to_bits(), Ordering::Relaxed);
        Ok(())
    }

    /// Share of calls answered with an injected response (needs
    /// [`ChaosLayer::outcome`]).
    pub fn set_outcome_rate(&self, rate: f64) -> Result<(), ConfigErrors> {
        check_rate("outcome_rate", rate)?;
        self.inner.outcome_rate.store(rate.to_bits(), Ordering::Relaxed);
        Ok(())
    }

    /// Share of calls delayed by `latency` before they are sent.
    pub fn set_latency(&self, rate: f64, latency: Duration) -> Result<(), ConfigErrors> {
        check_rate("latency_rate", rate)?;
        self.inner
            .latency_nanos
            .store(crate::clock::duration_nanos(latency), Ordering::Relaxed);
        self.inner.latency_rate.store(rate.to_bits(), Ordering::Relaxed);
        Ok(())
    }

    /// A uniform draw in [0, 1): wyrand on an atomic counter, lock-free and
    /// reproducible from the seed.
    fn draw(&self) -> f64 {
        const STEP: u64 = 0xa076_1d64_78bd_642f;
        let s = self
            .inner
            .rng
            .fetch_add(STEP, Ordering::Relaxed)
            .wrapping_add(STEP);
        let t = u128::from(s) * u128::from(s ^ 0xe703_7ed1_a0b4_28db);
        let x = ((t >> 64) as u64) ^ (t as u64);
        (x >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    fn rate(cell: &AtomicU64) -> f64 {
        f64::from_bits(cell.load(Ordering::Relaxed))
    }

    /// Decides one call.
    pub fn decide(&self) -> Injection {
        if !self.is_enabled() {
            return Injection::None;
        }
        let s = &*self.inner;
        let fault = self.draw();
        let error_rate = Self::rate(&s.error_rate);
        if fault < error_rate {
            return Injection::Error;
        }
        if fault < error_rate + Self::rate(&s.outcome_rate) {
            return Injection::Outcome;
        }
        if self.draw() < Self::rate(&s.latency_rate) {
            return Injection::Latency(Duration::from_nanos(s.latency_nanos.load(Ordering::Relaxed)));
        }
        Injection::None
    }
}

/// Injects chaos into the services it builds. `error` builds injected errors;
/// [`outcome`](Self::outcome) optionally builds injected responses.
///
/// ```
/// use palisade_resilience::layer::chaos::{Chaos, ChaosLayer};
/// use tower::{Layer, ServiceExt, service_fn};
///
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
/// let chaos = Chaos::seeded(1);
/// let svc = ChaosLayer::new(chaos.clone(), || "injected")
///     .layer(service_fn(|x: u32| async move { Ok::<_, &str>(x) }));
/// assert_eq!(svc.clone().oneshot(1).await, Ok(1), "disabled: untouched");
/// chaos.set_error_rate(1.0).unwrap();
/// chaos.enable();
/// assert_eq!(svc.oneshot(1).await, Err("injected"));
/// # });
/// ```
#[derive(Clone, Debug)]
pub struct ChaosLayer<FE, FO = NoOutcome> {
    chaos: Chaos,
    error: FE,
    outcome: FO,
}

/// No injected responses.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoOutcome;

/// Builds an injected response, if the layer has one.
pub trait MakeOutcome<T> {
    /// An injected response, or `None` to call the service instead.
    fn make(&self) -> Option<T>;
}

impl<T> MakeOutcome<T> for NoOutcome {
    fn make(&self) -> Option<T> {
        None
    }
}

impl<T, F: Fn() -> T> MakeOutcome<T> for F {
    fn make(&self) -> Option<T> {
        Some(self())
    }
}

impl<FE> ChaosLayer<FE> {
    /// Chaos driven by `chaos`, injecting errors made by `error`.
    pub fn new(chaos: Chaos, error: FE) -> Self {
        ChaosLayer {
            chaos,
            error,
            outcome: NoOutcome,
        }
    }

    /// Also injects responses made by `outcome`, at [`Chaos::set_outcome_rate`].
    pub fn outcome<FO>(self, outcome: FO) -> ChaosLayer<FE, FO> {
        ChaosLayer {
            chaos: self.chaos,
            error: self.error,
            outcome,
        }
    }
}

impl<S, FE: Clone, FO: Clone> Layer<S> for ChaosLayer<FE, FO> {
    type Service = ChaosService<S, FE, FO>;

    fn layer(&self, inner: S) -> Self::Service {
        ChaosService {
            inner,
            layer: self.clone(),
        }
    }
}

/// A service with chaos injected. Built by [`ChaosLayer`].
#[derive(Clone, Debug)]
pub struct ChaosService<S, FE, FO> {
    inner: S,
    layer: ChaosLayer<FE, FO>,
}

impl<S, FE, FO, Req> Service<Req> for ChaosService<S, FE, FO>
where
    S: Service<Req> + Clone,
    FE: Fn() -> S::Error,
    FO: MakeOutcome<S::Response>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S, Req>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let injection = self.layer.chaos.decide();
        if injection != Injection::None {
            metrics::counter!("palisade_chaos_injected_total", "kind" => match injection {
                Injection::Error => "error",
                Injection::Outcome => "outcome",
                _ => "latency",
            })
            .increment(1);
        }
        let state = match injection {
            Injection::Error => State::Injected {
                result: Some(Err((self.layer.error)())),
            },
            Injection::Outcome => match self.layer.outcome.make() {
                Some(response) => State::Injected {
                    result: Some(Ok(response)),
                },
                None => State::Calling {
                    fut: self.inner.call(req),
                },
            },
            Injection::Latency(delay) => {
                let clone = self.inner.clone();
                let ready = std::mem::replace(&mut self.inner, clone);
                State::Delayed {
                    sleep: tokio::time::sleep(delay),
                    pending: Some((ready, req)),
                }
            }
            Injection::None => State::Calling {
                fut: self.inner.call(req),
            },
        };
        ResponseFuture { state }
    }
}

pin_project! {
    /// The response future of a [`ChaosService`].
    pub struct ResponseFuture<S: Service<Req>, Req> {
        #[pin]
        state: State<S, Req>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S: Service<Req>, Req> {
        Calling { #[pin] fut: S::Future },
        Delayed { #[pin] sleep: Sleep, pending: Option<(S, Req)> },
        Injected { result: Option<Result<S::Response, S::Error>> },
    }
}

impl<S: Service<Req>, Req> std::fmt::Debug for ResponseFuture<S, Req> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<S: Service<Req>, Req> Future for ResponseFuture<S, Req> {
    type Output = Result<S::Response, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Calling { fut } => return fut.poll(cx),
                StateProj::Injected { result } => {
                    return Poll::Ready(result.take().expect("ResponseFuture polled after completion"));
                }
                StateProj::Delayed { sleep, pending } => {
                    ready!(sleep.poll(cx));
                    let (mut svc, req) = pending.take().expect("ResponseFuture polled after completion");
                    let fut = svc.call(req);
                    this.state.set(State::Calling { fut });
                }
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use tower::{ServiceExt, service_fn};

    #[tokio::test(start_paused = true)]
    async fn latency_and_outcomes_are_injected_and_switched_off_at_run_time() {
        let chaos = Chaos::seeded(7);
        let svc = ChaosLayer::new(chaos.clone(), || "injected")
            .outcome(|| 999u32)
            .layer(service_fn(|x: u32| async move { Ok::<_, &str>(x) }));
        chaos.enable();
        chaos.set_latency(1.0, Duration::from_millis(300)).unwrap();
        let start = tokio::time::Instant::now();
        assert_eq!(svc.clone().oneshot(1).await, Ok(1));
        assert_eq!(start.elapsed(), Duration::from_millis(300));
        chaos.set_outcome_rate(1.0).unwrap();
        assert_eq!(svc.clone().oneshot(1).await, Ok(999));
        chaos.disable();
        assert_eq!(svc.oneshot(1).await, Ok(1));
    }

    #[test]
    fn rates_are_respected_over_many_draws() {
        let chaos = Chaos::seeded(3);
        chaos.set_error_rate(0.2).unwrap();
        chaos.enable();
        let errors = (0..10_000).filter(|_| chaos.decide() == Injection::Error).count();
        // A fixed seed makes this exact; the bound says what it means.
        assert!((1800..2200).contains(&errors), "{errors}");
    }
}
