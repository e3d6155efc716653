//! [`HedgeLayer`]: when a call is slower than usual, send a second copy and take
//! whichever answers first (tail-latency hedging, as in "The Tail at Scale").
//!
//! The hedge goes out after a fixed delay or after a recent latency percentile
//! ([`HedgeDelay::Percentile`], an [`AdaptiveTimeout`] set to, say, p95 x 1). The
//! first success wins and the other call is cancelled (its future dropped). If one
//! copy fails while the other is still running, the other is awaited; only when
//! both have failed is the last error returned. A failed primary with no hedge in
//! flight is returned at once: re-sending failures is retry's job.
//!
//! Hedges spend the same [`RetryBudget`] as retries: every request deposits, every
//! hedge withdraws, so hedging can never more than `ratio` the load on a dependency
//! that is slow for everyone. Only idempotent requests should be hedged.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_layer::Layer;
use tower_service::Service;

use crate::retry::RetryBudget;
use crate::timeout::AdaptiveTimeout;

/// When the hedge is sent.
#[derive(Clone, Debug)]
pub enum HedgeDelay {
    /// After a fixed delay.
    Fixed(Duration),
    /// After the [`AdaptiveTimeout`]'s current value (a latency percentile times a
    /// multiplier); every successful call's latency is recorded into it.
    Percentile(Arc<AdaptiveTimeout>),
}

/// Sends a second copy of slow calls. See the [module docs](self).
///
/// ```
/// use palisade_resilience::layer::hedge::{HedgeDelay, HedgeLayer};
/// use palisade_resilience::retry::{BudgetConfig, RetryBudget};
/// use std::time::Duration;
/// use tower::{ServiceBuilder, service_fn};
///
/// let svc = ServiceBuilder::new()
///     .layer(HedgeLayer::new(HedgeDelay::Fixed(Duration::from_millis(50)))
///         .budget(RetryBudget::new(BudgetConfig::default())))
///     .service(service_fn(|key: String| async move { Ok::<_, std::io::Error>(key) }));
/// # drop(svc);
/// ```
#[derive(Clone, Debug)]
pub struct HedgeLayer {
    delay: HedgeDelay,
    budget: Option<RetryBudget>,
}

impl HedgeLayer {
    /// Hedges after `delay`, without a budget.
    pub fn new(delay: HedgeDelay) -> Self {
        HedgeLayer { delay, budget: None }
    }

    /// Spends `budget` (shared with retries) on hedges.
    pub fn budget(mut self, budget: RetryBudget) -> Self {
        self.budget = Some(budget);
        self
    }
}

impl<S> Layer<S> for HedgeLayer {
    type Service = Hedge<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Hedge {
            inner,
            delay: self.delay.clone(),
            budget: self.budget.clone(),
        }
    }
}

/// A service whose slow calls are hedged. Built by [`HedgeLayer`].
#[derive(Clone, Debug)]
pub struct Hedge<S> {
    inner: S,
    delay: HedgeDelay,
    budget: Option<RetryBudget>,
}

impl<S, Req> Service<Req> for Hedge<S>
where
    S: Service<Req> + Clone,
    Req: Clone,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S, Req>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        if let Some(budget) = &self.budget {
            budget.deposit();
        }
        let delay = match &self.delay {
            HedgeDelay::Fixed(d) => *d,
            HedgeDelay::Percentile(t) => t.timeout(),
        };
        let clone = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, clone);
        let primary = ready.call(req.clone());
        let start = Instant::now();
        ResponseFuture {
            primary: Slot::Running { fut: primary },
            hedge: Slot::Idle,
            sleep: Slot::Running {
                fut: tokio::time::sleep_until(start + delay),
            },
            pending: Some((ready, req)),
            error: None,
            start,
            delay: self.delay.clone(),
            budget: self.budget.clone(),
        }
    }
}

pin_project! {
    #[project = SlotProj]
    enum Slot<F> {
        Idle,
        Running { #[pin] fut: F },
        Done,
    }
}

pin_project! {
    /// The response future of a [`Hedge`] service.
    pub struct ResponseFuture<S: Service<Req>, Req> {
        #[pin]
        primary: Slot<S::Future>,
        #[pin]
        hedge: Slot<S::Future>,
        #[pin]
        sleep: Slot<Sleep>,
        pending: Option<(S, Req)>,
        error: Option<S::Error>,
        start: Instant,
        delay: HedgeDelay,
        budget: Option<RetryBudget>,
    }
}

impl<S: Service<Req>, Req> std::fmt::Debug for ResponseFuture<S, Req> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("start", &self.start)
            .finish_non_exhaustive()
    }
}

/// What one copy's poll said.
enum Copy<T, E> {
    Pending,
    Won(T),
    Failed(E),
}

fn poll_copy<F: Future<Output = Result<T, E>>, T, E>(
    mut slot: Pin<&mut Slot<F>>,
    cx: &mut Context<'_>,
) -> Copy<T, E> {
    let result = match slot.as_mut().project() {
        SlotProj::Running { fut } => match fut.poll(cx) {
            Poll::Ready(result) => result,
            Poll::Pending => return Copy::Pending,
        },
        _ => return Copy::Pending,
    };
    slot.set(Slot::Done);
    match result {
        Ok(response) => Copy::Won(response),
        Err(error) => Copy::Failed(error),
    }
}

impl<S: Service<Req>, Req> Future for ResponseFuture<S, Req> {
    type Output = Result<S::Response, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        // At most two rounds: the second polls a hedge sent in the first.
        loop {
            for hedge in [false, true] {
                let slot = if hedge {
                    this.hedge.as_mut()
                } else {
                    this.primary.as_mut()
                };
                match poll_copy(slot, cx) {
                    Copy::Pending => {}
                    Copy::Won(response) => {
                        if let HedgeDelay::Percentile(t) = &this.delay {
                            t.record(this.start.elapsed());
                        }
                        if hedge {
                            metrics::counter!("palisade_hedge_won_total").increment(1);
                        }
                        return Poll::Ready(Ok(response));
                    }
                    Copy::Failed(error) => *this.error = Some(error),
                }
            }
            let primary_done = matches!(*this.primary, Slot::Done);
            if primary_done && !matches!(*this.hedge, Slot::Running { .. }) {
                // Both failed, or the primary failed before any hedge went out.
                let error = this.error.take().expect("a finished copy left its error");
                return Poll::Ready(Err(error));
            }
            let SlotProj::Running { fut: sleep } = this.sleep.as_mut().project() else {
                return Poll::Pending;
            };
            if primary_done || sleep.poll(cx).is_pending() {
                return Poll::Pending;
            }
            if this.budget.as_ref().is_some_and(|b| !b.try_withdraw()) {
                this.sleep.set(Slot::Done);
                metrics::counter!("palisade_hedge_skipped_total", "reason" => "budget").increment(1);
                return Poll::Pending;
            }
            let (svc, _) = this
                .pending
                .as_mut()
                .expect("the hedge's service is kept until it is sent");
            match svc.poll_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(_)) => {
                    // The service cannot take a second copy: keep waiting for the first.
                    this.sleep.set(Slot::Done);
                    return Poll::Pending;
                }
                Poll::Ready(Ok(())) => {}
            }
            this.sleep.set(Slot::Done);
            let (mut svc, req) = this.pending.take().expect("checked above");
            this.hedge.set(Slot::Running { fut: svc.call(req) });
            metrics::counter!("palisade_hedge_sent_total").increment(1);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::ManualClock;
    use crate::retry::BudgetConfig;
    use std::sync::atomic::{AtomicU32, Ordering};
    use tower::{ServiceExt, service_fn};

    /// The first call takes `first`, later ones `rest`; counts calls.
    fn service(
        first: Duration,
        rest: Duration,
        calls: Arc<AtomicU32>,
    ) -> impl Service<u32, Response = u32, Error = &'static str, Future: Send> + Clone {
        service_fn(move |req: u32| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(if n == 0 { first } else { rest }).await;
                Ok(req + n)
            }
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_call_is_hedged_and_the_faster_copy_wins() {
        let calls = Arc::new(AtomicU32::new(0));
        let svc = HedgeLayer::new(HedgeDelay::Fixed(Duration::from_millis(50))).layer(service(
            Duration::from_secs(10),
            Duration::from_millis(10),
            calls.clone(),
        ));
        let start = Instant::now();
        assert_eq!(svc.oneshot(100).await, Ok(101), "the hedge (call #1) answered");
        assert_eq!(start.elapsed(), Duration::from_millis(60));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_fast_call_is_never_hedged() {
        let calls = Arc::new(AtomicU32::new(0));
        let svc = HedgeLayer::new(HedgeDelay::Fixed(Duration::from_millis(50))).layer(service(
            Duration::from_millis(10),
            Duration::from_millis(10),
            calls.clone(),
        ));
        assert_eq!(svc.oneshot(1).await, Ok(1));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_budget_sends_no_hedge() {
        let calls = Arc::new(AtomicU32::new(0));
        let budget = RetryBudget::with_clock(
            BudgetConfig {
                ratio: 0.0,
                min_per_second: 0,
                window: Duration::from_secs(10),
            },
            ManualClock::new(),
        );
        let svc = HedgeLayer::new(HedgeDelay::Fixed(Duration::from_millis(50)))
            .budget(budget)
            .layer(service(
                Duration::from_secs(1),
                Duration::from_millis(10),
                calls.clone(),
            ));
        assert_eq!(svc.oneshot(5).await, Ok(5), "the primary answered, late");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn when_the_hedge_fails_the_primary_is_still_awaited() {
        let calls = Arc::new(AtomicU32::new(0));
        let counter = calls.clone();
        let svc = service_fn(move |_: u32| {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Ok(7)
                } else {
                    Err("hedge failed")
                }
            }
        });
        let svc = HedgeLayer::new(HedgeDelay::Fixed(Duration::from_millis(50))).layer(svc);
        assert_eq!(svc.oneshot(0).await, Ok(7));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}
