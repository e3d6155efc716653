//! Idempotency keys in front of an HTTP service (axum, hyper, tonic's HTTP).
//!
//! A request without the key header passes through untouched. A request with one
//! is read whole (up to a bound), fingerprinted (method, path and query, body),
//! and run at most once per key: a repeat gets the stored answer (with
//! `idempotent-replayed: true`), a repeat while the first runs a 409, the key with
//! another request a 422, a malformed key a 400, a body over the bound a 413, and
//! the store unreachable a 503 (the request is not run: running it could run it
//! twice).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Either, Full, Limited};
use tower_layer::Layer;
use tower_service::Service;

use super::{Idempotency, IdempotencyStore, Outcome, RunError, Stored, fingerprint, valid_key};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The layer: [`Idempotency`] in front of a service, keyed by a header.
#[derive(Clone, Debug)]
pub struct IdempotencyLayer<S: IdempotencyStore> {
    idem: Idempotency<S>,
    header: HeaderName,
    max_body: usize,
}

impl<S: IdempotencyStore> IdempotencyLayer<S> {
    /// Keys from the `Idempotency-Key` header; bodies up to 1 MiB.
    pub fn new(idem: Idempotency<S>) -> Self {
        IdempotencyLayer {
            idem,
            header: HeaderName::from_static("idempotency-key"),
            max_body: 1 << 20,
        }
    }

    /// Keys from header `name`.
    pub fn header(mut self, name: HeaderName) -> Self {
        self.header = name;
        self
    }

    /// The largest request (and stored answer) body, in bytes.
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }
}

impl<S: IdempotencyStore, Inner> Layer<Inner> for IdempotencyLayer<S> {
    type Service = IdempotencyService<Inner, S>;

    fn layer(&self, inner: Inner) -> Self::Service {
        IdempotencyService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`IdempotencyLayer`] makes.
#[derive(Clone, Debug)]
pub struct IdempotencyService<Inner, S: IdempotencyStore> {
    inner: Inner,
    layer: IdempotencyLayer<S>,
}

/// The answer's body: the service's own (a request without a key, untouched), or
/// one read whole (stored, replayed, or the layer's own refusal).
pub type IdempotentBody<B> = Either<B, Full<Bytes>>;

/// Why the handler (the inner service and its body) gave no answer.
enum Failed<E> {
    Service(E),
    Body,
}

impl<Inner, S, ReqB, ResB> Service<Request<ReqB>> for IdempotencyService<Inner, S>
where
    S: IdempotencyStore,
    Inner: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    Inner::Future: Send,
    Inner::Error: Send,
    ReqB: Body + From<Bytes> + Send + 'static,
    ReqB::Data: Send,
    ReqB::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<IdempotentBody<ResB>>;
    type Error = Inner::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        // The ready service answers this call; its clone waits for the next.
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        let Some(key) = req.headers().get(&self.layer.header).cloned() else {
            return Box::pin(async move {
                let resp = inner.call(req).await?;
                Ok(resp.map(Either::Left))
            });
        };
        let layer = self.layer.clone();
        Box::pin(async move {
            let Some(key) = valid_key(&key) else {
                return Ok(refusal(
                    StatusCode::BAD_REQUEST,
                    "the idempotency key must be 1 to 255 visible ASCII characters",
                ));
            };
            let (parts, body) = req.into_parts();
            let bytes = match Limited::new(body, layer.max_body).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    return Ok(refusal(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "the request body is too large for an idempotent request",
                    ));
                }
                Err(_) => {
                    return Ok(refusal(
                        StatusCode::BAD_REQUEST,
                        "the request body could not be read",
                    ));
                }
            };
            let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            let fp = fingerprint([parts.method.as_str().as_bytes(), path.as_bytes(), &bytes[..]]);
            let max_body = layer.max_body;
            let handler = || async move {
                let resp = inner
                    .call(Request::from_parts(parts, ReqB::from(bytes)))
                    .await
                    .map_err(Failed::Service)?;
                let (head, body) = resp.into_parts();
                let body = Limited::new(body, max_body)
                    .collect()
                    .await
                    .map_err(|_| Failed::Body)?
                    .to_bytes();
                Ok(Stored::of(&head, body))
            };
            match layer.idem.run(&key, &fp, handler).await {
                Ok(Outcome::Fresh(answer)) => Ok(response(answer, false)),
                Ok(Outcome::Replayed(answer)) => Ok(response(answer, true)),
                Ok(Outcome::Running) => Ok(refusal(
                    StatusCode::CONFLICT,
                    "a request with this idempotency key is still running",
                )),
                Ok(Outcome::Mismatch) => Ok(refusal(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "this idempotency key was used with a different request",
                )),
                Err(RunError::Handler(Failed::Service(e))) => Err(e),
                Err(RunError::Handler(Failed::Body)) => Ok(refusal(
                    StatusCode::BAD_GATEWAY,
                    "the answer's body could not be read whole",
                )),
                Err(RunError::Store(e)) => {
                    tracing::warn!(error = %e, "idempotency store unavailable; the request was not run");
                    Ok(refusal(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the idempotency store is unavailable",
                    ))
                }
            }
        })
    }
}

fn response<B>(answer: Stored, replayed: bool) -> Response<IdempotentBody<B>> {
    answer.into_response(replayed).map(Either::Right)
}

fn refusal<B>(status: StatusCode, message: &str) -> Response<IdempotentBody<B>> {
    let body = format!("{{\"error\":\"{message}\"}}");
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}
