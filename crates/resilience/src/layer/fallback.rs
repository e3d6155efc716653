//! [`FallbackLayer`]: when a call fails, answer from somewhere else.
//!
//! The fallback is a fixed value ([`FallbackLayer::value`]), a function of the error
//! ([`FallbackLayer::from_fn`]), or another service ([`FallbackLayer::service`],
//! which is sent a clone of the request). Which errors fall back is up to a
//! predicate ([`FallbackLayer::when`]; all of them by default).
//!
//! The fallback path can be rate limited ([`FallbackLayer::limit`]): when it is
//! exhausted the original error is returned. A fallback that calls another
//! dependency must not become the next thing to fall over.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::ratelimit::RateLimiter;

/// Where a fallback answer comes from.
pub trait Fallback<Req, T, E>: Clone + FallbackAnswer<Self::Keep, E, Future = Self::Answer> {
    /// What must be kept from the request before the primary call (a clone of it
    /// for a fallback service; nothing otherwise).
    type Keep;
    /// The fallback's answer.
    type Answer: Future<Output = Result<T, E>>;
    /// Keeps what the fallback will need.
    fn keep(&self, req: &Req) -> Self::Keep;
}

/// A fixed fallback value.
#[derive(Clone, Debug)]
pub struct Value<T>(pub T);

impl<Req, T: Clone, E> Fallback<Req, T, E> for Value<T> {
    type Keep = ();
    type Answer = std::future::Ready<Result<T, E>>;
    fn keep(&self, _: &Req) {}
}

/// A fallback computed from the error (it may return the error, or another).
#[derive(Clone, Debug)]
pub struct FromFn<F>(pub F);

impl<Req, T, E, F: Fn(E) -> Result<T, E> + Clone> Fallback<Req, T, E> for FromFn<F> {
    type Keep = ();
    type Answer = std::future::Ready<Result<T, E>>;
    fn keep(&self, _: &Req) {}
}

/// Another service answers, sent a clone of the request.
#[derive(Clone, Debug)]
pub struct ServiceFallback<S>(pub S);

impl<Req, T, E, S> Fallback<Req, T, E> for ServiceFallback<S>
where
    Req: Clone,
    S: Service<Req, Response = T, Error = E> + Clone,
{
    type Keep = Req;
    type Answer = Oneshot<S, Req>;
    fn keep(&self, req: &Req) -> Req {
        req.clone()
    }
}

pin_project! {
    /// Waits for a service to be ready, then calls it once.
    pub struct Oneshot<S: Service<Req>, Req> {
        svc: S,
        #[pin]
        state: OneshotState<S::Future, Req>,
    }
}

pin_project! {
    #[project = OneshotProj]
    enum OneshotState<F, Req> {
        NotReady { req: Option<Req> },
        Called { #[pin] fut: F },
    }
}

impl<S: Service<Req>, Req> Future for Oneshot<S, Req> {
    type Output = Result<S::Response, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                OneshotProj::NotReady { req } => {
                    ready!(this.svc.poll_ready(cx))?;
                    let req = req.take().expect("Oneshot polled after completion");
                    let fut = this.svc.call(req);
                    this.state.set(OneshotState::Called { fut });
                }
                OneshotProj::Called { fut } => return fut.poll(cx),
            }
        }
    }
}

/// Which errors fall back: all of them.
#[derive(Clone, Copy, Debug, Default)]
pub struct AnyError;

/// Decides whether an error falls back.
pub trait FallbackPredicate<E>: Clone {
    /// True if `error` should be answered by the fallback.
    fn falls_back(&self, error: &E) -> bool;
}

impl<E> FallbackPredicate<E> for AnyError {
    fn falls_back(&self, _: &E) -> bool {
        true
    }
}

impl<E, F: Fn(&E) -> bool + Clone> FallbackPredicate<E> for F {
    fn falls_back(&self, error: &E) -> bool {
        self(error)
    }
}

/// Answers failed calls from a [`Fallback`]. See the [module docs](self).
///
/// ```
/// use palisade_resilience::layer::fallback::FallbackLayer;
/// use palisade_resilience::ratelimit::{Quota, RateLimiter};
/// use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let recommendations = ServiceBuilder::new()
///     .layer(FallbackLayer::value(vec!["bestseller"]).limit(RateLimiter::gcra(Quota::per_second(100)).unwrap()))
///     .service(service_fn(|_user: u64| async { Err::<Vec<&str>, _>("recommender down") }));
/// assert_eq!(recommendations.oneshot(7).await, Ok(vec!["bestseller"]));
/// # });
/// ```
#[derive(Clone, Debug)]
pub struct FallbackLayer<F, P = AnyError> {
    fallback: F,
    predicate: P,
    limiter: Option<RateLimiter>,
}

impl<T> FallbackLayer<Value<T>> {
    /// Falls back to a clone of `value`.
    pub fn value(value: T) -> Self {
        Self::new(Value(value))
    }
}

impl<F> FallbackLayer<FromFn<F>> {
    /// Falls back to `f(error)`.
    pub fn from_fn(f: F) -> Self {
        Self::new(FromFn(f))
    }
}

impl<S> FallbackLayer<ServiceFallback<S>> {
    /// Falls back to calling `service` with a clone of the request.
    pub fn service(service: S) -> Self {
        Self::new(ServiceFallback(service))
    }
}

impl<F> FallbackLayer<F> {
    /// Falls back to `fallback`.
    pub fn new(fallback: F) -> Self {
        FallbackLayer {
            fallback,
            predicate: AnyError,
            limiter: None,
        }
    }
}

impl<F, P> FallbackLayer<F, P> {
    /// Falls back only on errors for which `predicate` is true.
    pub fn when<P2>(self, predicate: P2) -> FallbackLayer<F, P2> {
        FallbackLayer {
            fallback: self.fallback,
            predicate,
            limiter: self.limiter,
        }
    }

    /// Rate limits the fallback path: over the limit, the original error is returned.
    pub fn limit(mut self, limiter: RateLimiter) -> Self {
        self.limiter = Some(limiter);
        self
    }
}

impl<S, F: Clone, P: Clone> Layer<S> for FallbackLayer<F, P> {
    type Service = WithFallback<S, F, P>;

    fn layer(&self, inner: S) -> Self::Service {
        WithFallback {
            inner,
            fallback: self.fallback.clone(),
            predicate: self.predicate.clone(),
            limiter: self.limiter.clone().map(Arc::new),
        }
    }
}

/// A service whose failures are answered by a fallback. Built by [`FallbackLayer`].
#[derive(Clone, Debug)]
pub struct WithFallback<S, F, P> {
    inner: S,
    fallback: F,
    predicate: P,
    limiter: Option<Arc<RateLimiter>>,
}

impl<S, F, P, Req> Service<Req> for WithFallback<S, F, P>
where
    S: Service<Req>,
    F: Fallback<Req, S::Response, S::Error>,
    P: FallbackPredicate<S::Error>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, F::Answer, F, P, F::Keep>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let keep = self.fallback.keep(&req);
        ResponseFuture {
            state: State::Primary {
                fut: self.inner.call(req),
            },
            keep: Some(keep),
            fallback: self.fallback.clone(),
            predicate: self.predicate.clone(),
            limiter: self.limiter.clone(),
        }
    }
}

pin_project! {
    /// The response future of a [`WithFallback`] service.
    pub struct ResponseFuture<Fut, FF, F, P, K> {
        #[pin]
        state: State<Fut, FF>,
        keep: Option<K>,
        fallback: F,
        predicate: P,
        limiter: Option<Arc<RateLimiter>>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<Fut, FF> {
        Primary { #[pin] fut: Fut },
        Fallback { #[pin] fut: FF },
    }
}

impl<Fut, FF, F, P, K> std::fmt::Debug for ResponseFuture<Fut, FF, F, P, K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<Fut, FF, F, P, K, T, E> Future for ResponseFuture<Fut, FF, F, P, K>
where
    Fut: Future<Output = Result<T, E>>,
    FF: Future<Output = Result<T, E>>,
    F: FallbackAnswer<K, E, Future = FF>,
    P: FallbackPredicate<E>,
{
    type Output = Result<T, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Primary { fut } => {
                    let error = match ready!(fut.poll(cx)) {
                        Ok(response) => return Poll::Ready(Ok(response)),
                        Err(error) => error,
                    };
                    if !this.predicate.falls_back(&error) {
                        return Poll::Ready(Err(error));
                    }
                    if let Some(limiter) = this.limiter
                        && limiter.check().is_err()
                    {
                        metrics::counter!("palisade_fallback_total", "outcome" => "limited").increment(1);
                        return Poll::Ready(Err(error));
                    }
                    metrics::counter!("palisade_fallback_total", "outcome" => "served").increment(1);
                    let keep = this.keep.take().expect("ResponseFuture polled after completion");
                    let fut = this.fallback.answer_with(keep, error);
                    this.state.set(State::Fallback { fut });
                }
                StateProj::Fallback { fut } => return fut.poll(cx),
            }
        }
    }
}

/// The answering half of a [`Fallback`], without naming the request type, so the response future
/// need not carry it.
pub trait FallbackAnswer<K, E> {
    /// The fallback's answer.
    type Future;
    /// Answers instead of the failed call.
    fn answer_with(&mut self, keep: K, error: E) -> Self::Future;
}

impl<T: Clone, E> FallbackAnswer<(), E> for Value<T> {
    type Future = std::future::Ready<Result<T, E>>;
    fn answer_with(&mut self, (): (), _: E) -> Self::Future {
        std::future::ready(Ok(self.0.clone()))
    }
}

impl<T, E, F: Fn(E) -> Result<T, E>> FallbackAnswer<(), E> for FromFn<F> {
    type Future = std::future::Ready<Result<T, E>>;
    fn answer_with(&mut self, (): (), error: E) -> Self::Future {
        std::future::ready((self.0)(error))
    }
}

impl<Req, E, S: Service<Req, Error = E> + Clone> FallbackAnswer<Req, E> for ServiceFallback<S> {
    type Future = Oneshot<S, Req>;
    fn answer_with(&mut self, req: Req, _: E) -> Self::Future {
        Oneshot {
            svc: self.0.clone(),
            state: OneshotState::NotReady { req: Some(req) },
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::ManualClock;
    use crate::ratelimit::Quota;
    use std::time::Duration;
    use tower::{ServiceExt, service_fn};

    #[tokio::test]
    async fn a_fallback_service_gets_the_request_and_the_predicate_filters() {
        let backup = service_fn(|n: u32| async move { Ok::<_, String>(n * 10) });
        let svc = FallbackLayer::service(backup)
            .when(|e: &String| e != "bad request")
            .layer(service_fn(|n: u32| async move {
                if n == 0 {
                    Err("bad request".to_string())
                } else {
                    Err("down".to_string())
                }
            }));
        assert_eq!(svc.clone().oneshot(4).await, Ok(40));
        assert_eq!(
            svc.oneshot(0).await,
            Err("bad request".into()),
            "a client error is not masked"
        );
    }

    #[tokio::test]
    async fn an_exhausted_fallback_path_returns_the_original_error() {
        let clock = ManualClock::new();
        let limiter = RateLimiter::gcra(Quota::per_second(2))
            .unwrap()
            .with_clock(clock.clone());
        let svc = FallbackLayer::from_fn(|e: String| if e == "down" { Ok(0u32) } else { Err(e) })
            .limit(limiter)
            .layer(service_fn(|_: ()| async { Err::<u32, _>("down".to_string()) }));
        let mut answers = Vec::new();
        for _ in 0..4 {
            answers.push(svc.clone().oneshot(()).await);
        }
        assert_eq!(answers, [Ok(0), Ok(0), Err("down".into()), Err("down".into())]);
        clock.advance(Duration::from_secs(1));
        assert_eq!(svc.oneshot(()).await, Ok(0), "the fallback budget refills");
    }
}
