//! [`RateLimitLayer`]: a rate limiter in front of a service.
//!
//! Any limiter works: [`RateLimiter`] (token bucket, pacing, sliding window),
//! [`WarmUpLimiter`], or a [`KeyedRateLimiter`] keyed by a function of the request
//! ([`RateLimitLayer::keyed`]). A refused request fails at once with
//! [`AdmitError::Rejected`] carrying [`RateLimited`] (`Retry-After` and the
//! `X-RateLimit-*` values); a pacing limiter's admitted request waits its turn.

use std::hash::{BuildHasher, Hash};
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::admit::{Admission, Admit, AdmitError, Admitted};
use super::bulkhead::ByKey;
use crate::ratelimit::{Algorithm, Allowed, KeyedRateLimiter, RateLimited, RateLimiter, WarmUpLimiter};

/// The error of a service behind a rate limit.
pub type RateLimitError<E> = AdmitError<RateLimited, E>;

/// Applies a rate limiter to the services it builds (all share it).
///
/// ```
/// use palisade_resilience::ratelimit::{Quota, RateLimiter, KeyedRateLimiter, Gcra};
/// use palisade_resilience::layer::ratelimit::RateLimitLayer;
/// use tower::{ServiceBuilder, service_fn};
///
/// // 1000 requests per second in all, 10 per second per client.
/// let global = RateLimiter::gcra(Quota::per_second(1000)).unwrap();
/// let per_client: KeyedRateLimiter<String> =
///     KeyedRateLimiter::new(Gcra::new(Quota::per_second(10)).unwrap(), 100_000);
/// let svc = ServiceBuilder::new()
///     .layer(RateLimitLayer::new(global))
///     .layer(RateLimitLayer::keyed(per_client, |req: &(String, u32)| req.0.clone()))
///     .service(service_fn(|_req: (String, u32)| async { Ok::<_, std::io::Error>("ok") }));
/// # drop(svc);
/// ```
#[derive(Clone, Debug)]
pub struct RateLimitLayer<L> {
    limiter: L,
}

impl<L> RateLimitLayer<L> {
    /// A layer applying `limiter`.
    pub fn new(limiter: L) -> Self {
        RateLimitLayer { limiter }
    }
}

impl<K, A, S> RateLimitLayer<ByKey<KeyedRateLimiter<K, A, S>, ()>> {
    /// A layer applying one limit per `key(&request)`.
    pub fn keyed<F>(
        limiter: KeyedRateLimiter<K, A, S>,
        key: F,
    ) -> RateLimitLayer<ByKey<KeyedRateLimiter<K, A, S>, F>> {
        RateLimitLayer {
            limiter: ByKey::new(Arc::new(limiter), key),
        }
    }
}

impl<S, L: Clone> Layer<S> for RateLimitLayer<L> {
    type Service = Admitted<S, L>;

    fn layer(&self, inner: S) -> Self::Service {
        Admitted::new(inner, self.limiter.clone())
    }
}

#[inline]
fn admission(decision: Result<Allowed, RateLimited>) -> Admit<(), RateLimited> {
    match decision {
        Ok(allowed) if allowed.is_immediate() => Admit::Now(()),
        Ok(allowed) => Admit::Later(Box::pin(paced(allowed.wait()))),
        Err(limited) => Admit::Rejected(limited),
    }
}

async fn paced(wait: Duration) -> Result<(), RateLimited> {
    tokio::time::sleep(wait).await;
    Ok(())
}

impl<Req, A: Algorithm> Admission<Req> for RateLimiter<A> {
    type Guard = ();
    type Rejection = RateLimited;

    #[inline]
    fn admit(&self, _: &mut Req) -> Admit<(), RateLimited> {
        admission(self.check())
    }
}

impl<Req> Admission<Req> for WarmUpLimiter {
    type Guard = ();
    type Rejection = RateLimited;

    fn admit(&self, _: &mut Req) -> Admit<(), RateLimited> {
        admission(self.check())
    }
}

impl<Req, K, A, S, F> Admission<Req> for ByKey<KeyedRateLimiter<K, A, S>, F>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    A: Algorithm,
    S: BuildHasher + Clone,
    F: Fn(&Req) -> K,
{
    type Guard = ();
    type Rejection = RateLimited;

    #[inline]
    fn admit(&self, req: &mut Req) -> Admit<(), RateLimited> {
        admission(self.policy().check(&(self.key_fn())(req)))
    }
}
