//! [`BulkheadLayer`]: a [`Bulkhead`] in front of a service.

use std::sync::Arc;

use tower_layer::Layer;

use super::admit::{Admission, Admit, AdmitError, Admitted, Guard};
use crate::bulkhead::{Bulkhead, BulkheadFull, BulkheadPermit, KeyedBulkhead};

/// The error of a service behind a bulkhead.
pub type BulkheadError<E> = AdmitError<BulkheadFull, E>;

/// Caps the calls in flight through the services it builds (all share one
/// [`Bulkhead`]). A full bulkhead refuses in `call`, at once, with
/// [`AdmitError::Rejected`]; with a `max_wait` the call waits at most that long.
///
/// ```
/// use palisade_resilience::bulkhead::{Bulkhead, BulkheadConfig};
/// use palisade_resilience::layer::bulkhead::BulkheadLayer;
/// use tower::{ServiceBuilder, service_fn};
///
/// let bulkhead = Bulkhead::new("inventory", BulkheadConfig::new(64)).unwrap();
/// let svc = ServiceBuilder::new()
///     .layer(BulkheadLayer::new(bulkhead))
///     .service(service_fn(|_req: ()| async { Ok::<_, std::io::Error>("ok") }));
/// # drop(svc);
/// ```
#[derive(Clone, Debug)]
pub struct BulkheadLayer {
    bulkhead: Bulkhead,
}

impl BulkheadLayer {
    /// A layer around `bulkhead`.
    pub fn new(bulkhead: Bulkhead) -> Self {
        BulkheadLayer { bulkhead }
    }
}

impl<S> Layer<S> for BulkheadLayer {
    type Service = Admitted<S, Bulkhead>;

    fn layer(&self, inner: S) -> Self::Service {
        Admitted::new(inner, self.bulkhead.clone())
    }
}

impl<T, E> Guard<T, E> for BulkheadPermit {
    #[inline]
    fn complete(self, _: Result<&T, &E>) {}
}

impl<Req> Admission<Req> for Bulkhead {
    type Guard = BulkheadPermit;
    type Rejection = BulkheadFull;

    #[inline]
    fn admit(&self, _: &mut Req) -> Admit<BulkheadPermit, BulkheadFull> {
        if let Some(permit) = self.take() {
            Admit::Now(permit)
        } else if self.config().max_wait.is_zero() {
            Admit::Rejected(self.full())
        } else {
            // Only a full bulkhead with a bounded wait pays for the boxed wait.
            let bulkhead = self.clone();
            Admit::Later(Box::pin(async move { bulkhead.acquire().await }))
        }
    }
}

/// One policy per key: the key is read from each request by `F`.
pub struct ByKey<P, F> {
    policy: Arc<P>,
    key: F,
}

impl<P, F: Clone> Clone for ByKey<P, F> {
    fn clone(&self) -> Self {
        ByKey {
            policy: self.policy.clone(),
            key: self.key.clone(),
        }
    }
}

impl<P: std::fmt::Debug, F> std::fmt::Debug for ByKey<P, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ByKey")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl<P, F> ByKey<P, F> {
    /// `policy`, keyed by `key(&request)`.
    pub fn new(policy: Arc<P>, key: F) -> Self {
        ByKey { policy, key }
    }

    /// The keyed policy.
    pub fn policy(&self) -> &P {
        &self.policy
    }

    /// The function reading the key.
    pub fn key_fn(&self) -> &F {
        &self.key
    }
}

impl<S, P, F: Clone> Layer<S> for ByKey<P, F> {
    type Service = Admitted<S, ByKey<P, F>>;

    fn layer(&self, inner: S) -> Self::Service {
        Admitted::new(inner, self.clone())
    }
}

impl<Req, K, F> Admission<Req> for ByKey<KeyedBulkhead<K>, F>
where
    K: std::hash::Hash + Eq + Clone + std::fmt::Display,
    F: Fn(&Req) -> K,
{
    type Guard = BulkheadPermit;
    type Rejection = BulkheadFull;

    fn admit(&self, req: &mut Req) -> Admit<BulkheadPermit, BulkheadFull> {
        let bulkhead = self.policy.get(&(self.key)(req));
        <Bulkhead as Admission<Req>>::admit(&bulkhead, req)
    }
}
