//! The shape shared by every layer that admits or refuses a request before calling
//! the inner service (bulkhead, rate limit, load shedding): decide in `call`, refuse
//! at once with a typed error, or hold a guard for as long as the call runs.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tower_service::Service;

/// A boxed admission that must wait (a bulkhead's bounded wait, a pacing limiter's
/// turn). Only the waiting path allocates.
pub type Wait<G, R> = Pin<Box<dyn Future<Output = Result<G, R>> + Send>>;

/// What an [`Admission`] decides for one request.
pub enum Admit<G, R> {
    /// Go ahead, holding this guard until the call ends.
    Now(G),
    /// Wait for this future, then go ahead or be refused.
    Later(Wait<G, R>),
    /// Refused.
    Rejected(R),
}

/// Something held while a call runs, told how the call ended.
pub trait Guard<T, E> {
    /// The call ended with `result`. Dropping a guard without completing it means
    /// the call was cancelled.
    fn complete(self, result: Result<&T, &E>);
}

impl<T, E> Guard<T, E> for () {
    fn complete(self, _: Result<&T, &E>) {}
}

/// A policy that admits or refuses requests.
pub trait Admission<Req> {
    /// Held while an admitted call runs.
    type Guard;
    /// Why a request was refused.
    type Rejection;
    /// Decides for `req` (which it may mark, e.g. as to be served degraded).
    fn admit(&self, req: &mut Req) -> Admit<Self::Guard, Self::Rejection>;
}

/// The error of a service behind an admission layer.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError<R, E> {
    /// The policy refused the request; the inner service was not called.
    #[error(transparent)]
    Rejected(R),
    /// The inner service failed.
    #[error("{0}")]
    Inner(E),
}

impl<R, E> AdmitError<R, E> {
    /// The inner service's error, if that is what this is.
    pub fn into_inner(self) -> Option<E> {
        match self {
            AdmitError::Inner(e) => Some(e),
            AdmitError::Rejected(_) => None,
        }
    }

    /// True if the policy refused the request.
    pub fn is_rejected(&self) -> bool {
        matches!(self, AdmitError::Rejected(_))
    }
}

/// A service behind an [`Admission`].
#[derive(Clone, Debug)]
pub struct Admitted<S, A> {
    inner: S,
    admission: A,
}

impl<S, A> Admitted<S, A> {
    /// Wraps `inner`.
    pub fn new(inner: S, admission: A) -> Self {
        Admitted { inner, admission }
    }

    /// The admission policy.
    pub fn admission(&self) -> &A {
        &self.admission
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, A, Req> Service<Req> for Admitted<S, A>
where
    S: Service<Req> + Clone,
    A: Admission<Req>,
    A::Guard: Guard<S::Response, S::Error>,
{
    type Response = S::Response;
    type Error = AdmitError<A::Rejection, S::Error>;
    type Future = AdmitFuture<S, Req, A::Guard, A::Rejection>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(AdmitError::Inner)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        let mut req = req;
        let state = match self.admission.admit(&mut req) {
            Admit::Now(guard) => State::Running {
                fut: self.inner.call(req),
                guard: Some(guard),
            },
            Admit::Rejected(rejection) => State::Rejected {
                rejection: Some(rejection),
            },
            Admit::Later(wait) => {
                // Keep the service that was polled ready; leave a clone in its place.
                let clone = self.inner.clone();
                let ready = std::mem::replace(&mut self.inner, clone);
                State::Waiting {
                    wait,
                    pending: Some((ready, req)),
                }
            }
        };
        AdmitFuture { state }
    }
}

pin_project! {
    /// The response future of an [`Admitted`] service.
    pub struct AdmitFuture<S: Service<Req>, Req, G, R> {
        #[pin]
        state: State<S, Req, G, R>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S: Service<Req>, Req, G, R> {
        Running {
            #[pin]
            fut: S::Future,
            guard: Option<G>,
        },
        Waiting {
            wait: Wait<G, R>,
            pending: Option<(S, Req)>,
        },
        Rejected {
            rejection: Option<R>,
        },
    }
}

impl<S: Service<Req>, Req, G, R> std::fmt::Debug for AdmitFuture<S, Req, G, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdmitFuture").finish_non_exhaustive()
    }
}

impl<S, Req, G, R> Future for AdmitFuture<S, Req, G, R>
where
    S: Service<Req>,
    G: Guard<S::Response, S::Error>,
{
    type Output = Result<S::Response, AdmitError<R, S::Error>>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Running { fut, guard } => {
                    let result = ready!(fut.poll(cx));
                    if let Some(guard) = guard.take() {
                        guard.complete(result.as_ref());
                    }
                    return Poll::Ready(result.map_err(AdmitError::Inner));
                }
                StateProj::Rejected { rejection } => {
                    let rejection = rejection.take().expect("AdmitFuture polled after completion");
                    return Poll::Ready(Err(AdmitError::Rejected(rejection)));
                }
                StateProj::Waiting { wait, pending } => {
                    let admitted = ready!(wait.as_mut().poll(cx));
                    let (mut svc, req) = pending.take().expect("AdmitFuture polled after completion");
                    let next = match admitted {
                        Ok(guard) => State::Running {
                            fut: svc.call(req),
                            guard: Some(guard),
                        },
                        Err(rejection) => State::Rejected {
                            rejection: Some(rejection),
                        },
                    };
                    this.state.set(next);
                }
            }
        }
    }
}
