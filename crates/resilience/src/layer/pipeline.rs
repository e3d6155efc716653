//! [`PipelineBuilder`]: the policies composed in the documented order from one value,
//! with one error type.
//!
//! ```text
//! [fallback] > timeout (total) > retry > breaker > bulkhead > timeout (attempt) > rate limit > service
//! ```
//!
//! Every stage is optional and decided at run time (from a configuration file, say),
//! so a pipeline built from any configuration has the same type: a disabled stage
//! costs one branch. The typed errors of the stages are flattened into one
//! [`PolicyError<E>`], which names the policy that refused ([`PolicyError::cause`]).
//!
//! By default the breaker counts the service's errors and per-attempt timeouts as
//! failures and ignores refusals by the bulkhead or rate limit beneath it (they are
//! not the dependency's fault); the retry retries the service's errors and
//! per-attempt timeouts and never a refusal or the total deadline. Both can be
//! replaced ([`PipelineBuilder::classify`], [`PipelineBuilder::retry_if`]).
//!
//! ```
//! use std::time::Duration;
//! use palisade_resilience::breaker::CircuitBreaker;
//! use palisade_resilience::layer::pipeline::{PipelineBuilder, PolicyError};
//! use palisade_resilience::layer::fallback::FallbackLayer;
//! use palisade_resilience::retry::RetryPolicy;
//! use tower_service::Service;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let svc = tower::service_fn(|n: u32| async move {
//!     if n == 0 { Err("zero") } else { Ok(n * 2) }
//! });
//! let mut svc = PipelineBuilder::new()
//!     .total_timeout(Duration::from_secs(2))
//!     .retry(RetryPolicy::new(2))
//!     .breaker(CircuitBreaker::builder("doubler").build().unwrap())
//!     .attempt_timeout(Duration::from_millis(500))
//!     .fallback(FallbackLayer::from_fn(|e: PolicyError<&'static str>| match e {
//!         PolicyError::Inner(_) => Ok(0),
//!         other => Err(other),
//!     }))
//!     .build(svc);
//! assert_eq!(svc.call(21).await.unwrap(), 42);
//! assert_eq!(svc.call(0).await.unwrap(), 0);
//! # }
//! ```

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tower_layer::{Identity, Layer};
use tower_service::Service;

use super::admit::{AdmitError, Admitted};
use super::breaker::{CircuitBreakerService, Classify};
use super::retry::{Retry, RetryPredicate};
use super::timeout::{Elapsed, Timeout, TimeoutError, TimeoutSource};
use crate::Cause;
use crate::breaker::{BreakerError, CircuitBreaker, Outcome, Rejected};
use crate::bulkhead::{Bulkhead, BulkheadFull};
use crate::clock::TokioClock;
use crate::ratelimit::{RateLimited, RateLimiter};
use crate::retry::{RetryAction, RetryPolicy};
use crate::timeout::AdaptiveTimeout;

/// Why a call through a pipeline failed: the service's own error, or the policy that
/// refused or cut it short.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError<E> {
    /// The service was called and failed.
    #[error("{0}")]
    Inner(E),
    /// The circuit breaker refused the call.
    #[error(transparent)]
    CircuitOpen(Rejected),
    /// A timeout (total or per attempt) cut the call short.
    #[error(transparent)]
    Timeout(Elapsed),
    /// The bulkhead was full.
    #[error(transparent)]
    BulkheadFull(BulkheadFull),
    /// The rate limiter refused the call.
    #[error(transparent)]
    RateLimited(RateLimited),
}

impl<E> PolicyError<E> {
    /// Why: [`Cause::Upstream`], `CircuitOpen`, `Timeout`, `BulkheadFull` or
    /// `RateLimited`, the vocabulary the gateway's `x-palisade-cause` speaks too
    /// ([`Cause::as_str`] for logs, metric labels, headers).
    pub fn cause(&self) -> Cause {
        match self {
            PolicyError::Inner(_) => Cause::Upstream,
            PolicyError::CircuitOpen(_) => Cause::CircuitOpen,
            PolicyError::Timeout(_) => Cause::Timeout,
            PolicyError::BulkheadFull(_) => Cause::BulkheadFull,
            PolicyError::RateLimited(_) => Cause::RateLimited,
        }
    }

    /// True when a policy refused the call before it reached the service (nothing
    /// was sent, so it is always safe to try elsewhere).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            PolicyError::CircuitOpen(_) | PolicyError::BulkheadFull(_) | PolicyError::RateLimited(_)
        )
    }

    /// The service's own error, if that is what this is.
    pub fn into_inner(self) -> Option<E> {
        match self {
            PolicyError::Inner(e) => Some(e),
            _ => None,
        }
    }

    /// How long the caller should wait before trying again, when the refusing
    /// policy knows (an open breaker, a rate limit).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            PolicyError::CircuitOpen(r) => r.retry_after,
            PolicyError::RateLimited(r) => Some(r.retry_after()),
            _ => None,
        }
    }
}

/// An error that flattens into a [`PolicyError`].
pub trait Flatten {
    /// The service's own error type.
    type Inner;
    /// Flattens it.
    fn flatten(self) -> PolicyError<Self::Inner>;
}

impl<E> Flatten for PolicyError<E> {
    type Inner = E;
    #[inline]
    fn flatten(self) -> PolicyError<E> {
        self
    }
}

/// `Flatten` for a stage's error: its refusal becomes the named `PolicyError`
/// variant, its inner `PolicyError` passes through.
macro_rules! flatten {
    ($($error:ty { $refused:path => $variant:ident, $inner:path })*) => {$(
        impl<E> Flatten for $error {
            type Inner = E;
            #[inline]
            fn flatten(self) -> PolicyError<E> {
                match self {
                    $refused(r) => PolicyError::$variant(r),
                    $inner(e) => e,
                }
            }
        }
    )*};
}

flatten! {
    BreakerError<PolicyError<E>> { BreakerError::Rejected => CircuitOpen, BreakerError::Inner }
    TimeoutError<PolicyError<E>> { TimeoutError::Elapsed => Timeout, TimeoutError::Inner }
    AdmitError<BulkheadFull, PolicyError<E>> { AdmitError::Rejected => BulkheadFull, AdmitError::Inner }
    AdmitError<RateLimited, PolicyError<E>> { AdmitError::Rejected => RateLimited, AdmitError::Inner }
}

/// The pipeline's default breaker classifier: the service's errors and timeouts are
/// failures, refusals from the stages beneath are ignored, responses are successes.
#[derive(Clone, Copy, Debug, Default)]
pub struct PolicyClassifier;

impl<T, E> Classify<T, PolicyError<E>> for PolicyClassifier {
    #[inline]
    fn classify(&self, result: Result<&T, &PolicyError<E>>) -> Outcome {
        match result {
            Ok(_) => Outcome::Success,
            Err(PolicyError::Inner(_) | PolicyError::Timeout(_)) => Outcome::Failure,
            Err(_) => Outcome::Ignored,
        }
    }
}

/// The pipeline's default retry predicate: retry the service's errors and
/// per-attempt timeouts; never a refusal (the same policy would refuse again) and
/// never the caller's own deadline.
#[derive(Clone, Copy, Debug, Default)]
pub struct RetryTransient;

impl<T, E> RetryPredicate<T, PolicyError<E>> for RetryTransient {
    #[inline]
    fn check(&self, result: Result<&T, &PolicyError<E>>) -> RetryAction {
        match result {
            Err(PolicyError::Inner(_)) => RetryAction::RETRY,
            Err(PolicyError::Timeout(e)) if !e.by_deadline => RetryAction::RETRY,
            _ => RetryAction::Return,
        }
    }
}

/// How a [`Flat`] service turns its inner error into a [`PolicyError`].
pub trait ErrorMap<X> {
    /// The service's own error type.
    type Inner;
    /// Maps the error.
    fn map(error: X) -> PolicyError<Self::Inner>;
}

/// Flattens a policy's typed error ([`Flatten`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct Flattening;

impl<X: Flatten> ErrorMap<X> for Flattening {
    type Inner = X::Inner;
    #[inline]
    fn map(error: X) -> PolicyError<X::Inner> {
        error.flatten()
    }
}

/// Wraps the service's own error as [`PolicyError::Inner`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Lifting;

impl<X> ErrorMap<X> for Lifting {
    type Inner = X;
    #[inline]
    fn map(error: X) -> PolicyError<X> {
        PolicyError::Inner(error)
    }
}

/// Wraps a service so its error is a [`PolicyError`]: a policy's typed error is
/// flattened ([`Flattening`]), the service's own is lifted ([`Lift`]).
#[derive(Clone, Debug)]
pub struct Flat<S, M = Flattening> {
    inner: S,
    map: PhantomData<M>,
}

/// The bottom of a pipeline: the service's error becomes [`PolicyError::Inner`].
pub type Lift<S> = Flat<S, Lifting>;

impl<S, M> Flat<S, M> {
    fn new(inner: S) -> Self {
        Flat {
            inner,
            map: PhantomData,
        }
    }
}

impl<S, M, Req> Service<Req> for Flat<S, M>
where
    S: Service<Req>,
    M: ErrorMap<S::Error>,
{
    type Response = S::Response;
    type Error = PolicyError<M::Inner>;
    type Future = FlatFuture<S::Future, M>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(M::map)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        FlatFuture {
            fut: self.inner.call(req),
            map: PhantomData,
        }
    }
}

pin_project! {
    /// The response future of [`Flat`].
    #[derive(Debug)]
    pub struct FlatFuture<F, M> {
        #[pin]
        fut: F,
        map: PhantomData<M>,
    }
}

impl<F, M, T, X> Future for FlatFuture<F, M>
where
    F: Future<Output = Result<T, X>>,
    M: ErrorMap<X>,
{
    type Output = Result<T, PolicyError<M::Inner>>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().fut.poll(cx).map_err(M::map)
    }
}

/// A pipeline stage that is either on (the policy wraps the stage beneath) or off
/// (the stage beneath is called directly).
#[derive(Clone, Debug)]
pub enum Stage<On, Off> {
    /// The policy is configured.
    On(On),
    /// The policy is not configured.
    Off(Off),
}

impl<On, Off, Req> Service<Req> for Stage<On, Off>
where
    On: Service<Req>,
    Off: Service<Req, Response = On::Response, Error = On::Error>,
{
    type Response = On::Response;
    type Error = On::Error;
    type Future = StageFuture<On::Future, Off::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match self {
            Stage::On(s) => s.poll_ready(cx),
            Stage::Off(s) => s.poll_ready(cx),
        }
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        match self {
            Stage::On(s) => StageFuture {
                fut: Either::On { fut: s.call(req) },
            },
            Stage::Off(s) => StageFuture {
                fut: Either::Off { fut: s.call(req) },
            },
        }
    }
}

pin_project! {
    /// The response future of a [`Stage`].
    #[derive(Debug)]
    pub struct StageFuture<A, B> {
        #[pin]
        fut: Either<A, B>,
    }
}

pin_project! {
    #[project = EitherProj]
    #[derive(Debug)]
    enum Either<A, B> {
        On { #[pin] fut: A },
        Off { #[pin] fut: B },
    }
}

impl<A, B, T> Future for StageFuture<A, B>
where
    A: Future<Output = T>,
    B: Future<Output = T>,
{
    type Output = T;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        match self.project().fut.project() {
            EitherProj::On { fut } => fut.poll(cx),
            EitherProj::Off { fut } => fut.poll(cx),
        }
    }
}

type RateStage<S, L> = Stage<Flat<Admitted<Lift<S>, L>>, Lift<S>>;
type AttemptStage<S, L> = Stage<Flat<Timeout<RateStage<S, L>>>, RateStage<S, L>>;
type BulkheadStage<S, L> = Stage<Flat<Admitted<AttemptStage<S, L>, Bulkhead>>, AttemptStage<S, L>>;
type BreakerStage<S, C, L> = Stage<Flat<CircuitBreakerService<BulkheadStage<S, L>, C>>, BulkheadStage<S, L>>;
type RetryStage<S, C, P, L> = Stage<Retry<BreakerStage<S, C, L>, P>, BreakerStage<S, C, L>>;
type TotalStage<S, C, P, L> = Stage<Flat<Timeout<RetryStage<S, C, P, L>>>, RetryStage<S, C, P, L>>;

/// A service with the pipeline's policies around it (built by [`PipelineBuilder`]);
/// its error is [`PolicyError<E>`].
#[derive(Clone, Debug)]
pub struct Pipeline<S, C = PolicyClassifier, P = RetryTransient, L = RateLimiter> {
    inner: TotalStage<S, C, P, L>,
}

impl<S, C, P, L, Req> Service<Req> for Pipeline<S, C, P, L>
where
    TotalStage<S, C, P, L>: Service<Req>,
{
    type Response = <TotalStage<S, C, P, L> as Service<Req>>::Response;
    type Error = <TotalStage<S, C, P, L> as Service<Req>>::Error;
    type Future = <TotalStage<S, C, P, L> as Service<Req>>::Future;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        self.inner.call(req)
    }
}

/// Builds a [`Pipeline`]: set the stages you want, in any order; they are always
/// composed in the documented order.
#[derive(Clone, Debug)]
pub struct PipelineBuilder<C = PolicyClassifier, P = RetryTransient, L = RateLimiter, F = Identity> {
    stages: Stages,
    rate_limit: Option<L>,
    classifier: C,
    predicate: P,
    fallback: F,
}

/// The stages whose types do not depend on the builder's type parameters.
#[derive(Clone, Debug, Default)]
struct Stages {
    total: Option<TimeoutSource>,
    retry: Option<Arc<RetryPolicy>>,
    breaker: Option<CircuitBreaker>,
    bulkhead: Option<Bulkhead>,
    attempt: Option<TimeoutSource>,
}

impl Default for PipelineBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl PipelineBuilder {
    /// A builder with every stage off.
    pub fn new() -> Self {
        PipelineBuilder {
            stages: Stages::default(),
            rate_limit: None,
            classifier: PolicyClassifier,
            predicate: RetryTransient,
            fallback: Identity::new(),
        }
    }
}

impl<C, P, L, F> PipelineBuilder<C, P, L, F> {
    /// A timeout on the whole call, retries included; inner stages honour it as a
    /// deadline.
    pub fn total_timeout(mut self, timeout: Duration) -> Self {
        self.stages.total = Some(TimeoutSource::Fixed(timeout));
        self
    }

    /// A timeout per attempt, fixed.
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.stages.attempt = Some(TimeoutSource::Fixed(timeout));
        self
    }

    /// A timeout per attempt that follows observed latency.
    pub fn adaptive_attempt_timeout(mut self, timeout: Arc<AdaptiveTimeout>) -> Self {
        self.stages.attempt = Some(TimeoutSource::Adaptive(timeout));
        self
    }

    /// Retries with this policy (and its budget, if it has one).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.stages.retry = Some(Arc::new(policy));
        self
    }

    /// A circuit breaker around each attempt.
    pub fn breaker(mut self, breaker: CircuitBreaker) -> Self {
        self.stages.breaker = Some(breaker);
        self
    }

    /// A bulkhead around each attempt (a slot is held for one attempt, not across
    /// retry back-offs).
    pub fn bulkhead(mut self, bulkhead: Bulkhead) -> Self {
        self.stages.bulkhead = Some(bulkhead);
        self
    }

    /// Replaces what the breaker counts as a failure.
    pub fn classify<C2>(self, classifier: C2) -> PipelineBuilder<C2, P, L, F> {
        PipelineBuilder {
            stages: self.stages,
            rate_limit: self.rate_limit,
            classifier,
            predicate: self.predicate,
            fallback: self.fallback,
        }
    }

    /// Replaces what the retry retries.
    pub fn retry_if<P2>(self, predicate: P2) -> PipelineBuilder<C, P2, L, F> {
        PipelineBuilder {
            stages: self.stages,
            rate_limit: self.rate_limit,
            classifier: self.classifier,
            predicate,
            fallback: self.fallback,
        }
    }

    /// A rate limit on every attempt (any admission policy refusing with
    /// [`RateLimited`]: a [`RateLimiter`], a keyed limiter, a warm-up limiter).
    pub fn rate_limit<L2>(self, limiter: L2) -> PipelineBuilder<C, P, L2, F> {
        PipelineBuilder {
            stages: self.stages,
            rate_limit: Some(limiter),
            classifier: self.classifier,
            predicate: self.predicate,
            fallback: self.fallback,
        }
    }

    /// The outermost stage: usually a
    /// [`FallbackLayer`](super::fallback::FallbackLayer) over [`PolicyError`].
    pub fn fallback<F2>(self, fallback: F2) -> PipelineBuilder<C, P, L, F2> {
        PipelineBuilder {
            stages: self.stages,
            rate_limit: self.rate_limit,
            classifier: self.classifier,
            predicate: self.predicate,
            fallback,
        }
    }

    /// Wraps `service` in the configured stages.
    pub fn build<S>(&self, service: S) -> F::Service
    where
        C: Clone,
        P: Clone,
        L: Clone,
        F: Layer<Pipeline<S, C, P, L>>,
    {
        let lift = Lift::new(service);
        let rate = match &self.rate_limit {
            Some(l) => Stage::On(Flat::new(Admitted::new(lift, l.clone()))),
            None => Stage::Off(lift),
        };
        let attempt = match &self.stages.attempt {
            Some(t) => Stage::On(Flat::new(Timeout::new(rate, t.clone()))),
            None => Stage::Off(rate),
        };
        let bulkhead = match &self.stages.bulkhead {
            Some(b) => Stage::On(Flat::new(Admitted::new(attempt, b.clone()))),
            None => Stage::Off(attempt),
        };
        let breaker = match &self.stages.breaker {
            Some(b) => Stage::On(Flat::new(CircuitBreakerService::new(
                bulkhead,
                b.clone(),
                self.classifier.clone(),
            ))),
            None => Stage::Off(bulkhead),
        };
        let retry = match &self.stages.retry {
            Some(policy) => Stage::On(Retry::new(
                breaker,
                policy.clone(),
                self.predicate.clone(),
                TokioClock::new(),
            )),
            None => Stage::Off(breaker),
        };
        let total = match &self.stages.total {
            Some(t) => Stage::On(Flat::new(Timeout::new(retry, t.clone()))),
            None => Stage::Off(retry),
        };
        self.fallback.layer(Pipeline { inner: total })
    }
}
