//! Load-shedding layers: [`AdaptiveConcurrencyLayer`] and [`TieredShedLayer`].

use tower_layer::Layer;

use super::admit::{Admission, Admit, AdmitError, Admitted, Guard};
use super::breaker::{Classify, DefaultClassifier};
use crate::breaker::Outcome;
use crate::shed::{AdaptiveConcurrency, Priority, Shed, ShedPermit, TieredShedder};

/// The error of a service behind a load shedder.
pub type ShedError<E> = AdmitError<Shed, E>;

/// Limits concurrency to what an [`AdaptiveConcurrency`] has learned the service can
/// take; requests above it are shed at once.
///
/// The classifier says which results are overload signals: `Outcome::Failure`
/// lowers the limit (by default every `Err`), `Outcome::Success` is a latency
/// sample, `Outcome::Ignored` is neither.
#[derive(Clone, Debug)]
pub struct AdaptiveConcurrencyLayer<C = DefaultClassifier> {
    admission: AdaptiveShed<C>,
}

/// The admission policy of an [`AdaptiveConcurrencyLayer`].
#[derive(Clone, Debug)]
pub struct AdaptiveShed<C> {
    limit: AdaptiveConcurrency,
    classifier: C,
}

impl AdaptiveConcurrencyLayer {
    /// A layer around `limit`, counting every `Err` as an overload signal.
    pub fn new(limit: AdaptiveConcurrency) -> Self {
        AdaptiveConcurrencyLayer {
            admission: AdaptiveShed {
                limit,
                classifier: DefaultClassifier,
            },
        }
    }
}

impl<C> AdaptiveConcurrencyLayer<C> {
    /// Replaces the classifier.
    pub fn classify<C2>(self, classifier: C2) -> AdaptiveConcurrencyLayer<C2> {
        AdaptiveConcurrencyLayer {
            admission: AdaptiveShed {
                limit: self.admission.limit,
                classifier,
            },
        }
    }
}

impl<S, C: Clone> Layer<S> for AdaptiveConcurrencyLayer<C> {
    type Service = Admitted<S, AdaptiveShed<C>>;

    fn layer(&self, inner: S) -> Self::Service {
        Admitted::new(inner, self.admission.clone())
    }
}

/// A slot of an adaptive limit plus the classifier that reports on it.
#[derive(Debug)]
pub struct ShedGuard<C> {
    permit: ShedPermit,
    classifier: C,
}

impl<T, E, C: Classify<T, E>> Guard<T, E> for ShedGuard<C> {
    fn complete(self, result: Result<&T, &E>) {
        match self.classifier.classify(result) {
            Outcome::Success => self.permit.success(),
            Outcome::Failure => self.permit.dropped(),
            Outcome::Ignored => drop(self.permit),
        }
    }
}

impl<Req, C: Clone> Admission<Req> for AdaptiveShed<C> {
    type Guard = ShedGuard<C>;
    type Rejection = Shed;

    #[inline]
    fn admit(&self, _: &mut Req) -> Admit<ShedGuard<C>, Shed> {
        match self.limit.try_acquire() {
            Ok(permit) => Admit::Now(ShedGuard {
                permit,
                classifier: self.classifier.clone(),
            }),
            Err(shed) => Admit::Rejected(shed),
        }
    }
}

/// Admits requests by priority and load level ([`TieredShedder`]): `priority`
/// reads each request's priority, `degrade` marks a request to be served in its
/// degraded form (for an `http::Request`, insert an extension the handler reads).
///
/// ```
/// use palisade_resilience::shed::{LoadGauge, Priority, Tiers, TieredShedder};
/// use palisade_resilience::layer::shed::TieredShedLayer;
/// use tower::{ServiceBuilder, service_fn};
///
/// struct Req { path: &'static str, degraded: bool }
/// let cpu = LoadGauge::new();
/// let shedder = TieredShedder::new(cpu.clone(), Tiers::default()).unwrap();
/// let svc = ServiceBuilder::new()
///     .layer(TieredShedLayer::new(
///         shedder,
///         |r: &Req| if r.path.starts_with("/checkout") { Priority::Critical } else { Priority::Normal },
///         |r: &mut Req| r.degraded = true,
///     ))
///     .service(service_fn(|r: Req| async move { Ok::<_, std::io::Error>(r.degraded) }));
/// # drop(svc);
/// ```
#[derive(Clone, Debug)]
pub struct TieredShedLayer<P, M> {
    admission: Tiered<P, M>,
}

/// The admission policy of a [`TieredShedLayer`].
#[derive(Clone, Debug)]
pub struct Tiered<P, M> {
    shedder: TieredShedder,
    priority: P,
    degrade: M,
}

impl<P, M> TieredShedLayer<P, M> {
    /// A layer reading priorities with `priority` and marking degraded requests with
    /// `degrade`.
    pub fn new(shedder: TieredShedder, priority: P, degrade: M) -> Self {
        TieredShedLayer {
            admission: Tiered {
                shedder,
                priority,
                degrade,
            },
        }
    }
}

impl<S, P: Clone, M: Clone> Layer<S> for TieredShedLayer<P, M> {
    type Service = Admitted<S, Tiered<P, M>>;

    fn layer(&self, inner: S) -> Self::Service {
        Admitted::new(inner, self.admission.clone())
    }
}

impl<Req, P, M> Admission<Req> for Tiered<P, M>
where
    P: Fn(&Req) -> Priority,
    M: Fn(&mut Req),
{
    type Guard = ();
    type Rejection = Shed;

    fn admit(&self, req: &mut Req) -> Admit<(), Shed> {
        match self.shedder.check((self.priority)(req)) {
            Ok(degraded) => {
                if degraded {
                    (self.degrade)(req);
                }
                Admit::Now(())
            }
            Err(shed) => Admit::Rejected(shed),
        }
    }
}
