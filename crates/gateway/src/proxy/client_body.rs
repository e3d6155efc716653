//! The client's request body on its way upstream, watched so that a failure on the
//! client's side of the exchange is known as the client's: a malformed or truncated
//! body, one over `max_body_bytes`, or a client that stops sending for
//! `request_body_idle_timeout`. Such a failure is answered `400` / `413` / `408`
//! and never held against the endpoint (its breaker and outlier detection hear
//! nothing), so a hostile client cannot take a healthy endpoint out.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;

use crate::BoxError;
use crate::cause::Cause;

use super::Failure;
use super::idle::IdleTimer;

const SENDING: u8 = 0;
const WAITING: u8 = 1;
const DONE: u8 = 2;
const MALFORMED: u8 = 3;
const TRUNCATED: u8 = 4;
const TOO_LARGE: u8 = 5;
const TOO_SLOW: u8 = 6;

/// Where a request body stands, shared between the body (on its way upstream)
/// and the request path (judging the attempt).
#[derive(Debug, Default)]
pub(super) struct ClientSide(AtomicU8);

/// A failure on the client's side of an exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientFault {
    /// The body broke the protocol (a bad chunk size, ...).
    Malformed,
    /// The body ended before its end (the client went away).
    Truncated,
    /// The body is over `max_body_bytes`.
    TooLarge,
    /// Nothing came from the client for `request_body_idle_timeout`, or the
    /// attempt's time ran out while the gateway waited for the client's body.
    TooSlow,
}

impl ClientFault {
    /// The label of `palisade_client_failures_total`.
    pub fn reason(self) -> &'static str {
        match self {
            ClientFault::Malformed => "malformed",
            ClientFault::Truncated => "truncated",
            ClientFault::TooLarge => "too_large",
            ClientFault::TooSlow => "too_slow",
        }
    }

    /// Counts it and turns it into the gateway's answer.
    pub(super) fn failure(self) -> Failure {
        metrics::counter!("palisade_client_failures_total", "reason" => self.reason()).increment(1);
        let (cause, detail) = match self {
            ClientFault::Malformed => (Cause::BadRequest, "the request body is malformed"),
            ClientFault::Truncated => (Cause::BadRequest, "the request body ended early"),
            ClientFault::TooLarge => (Cause::BodyTooLarge, "the request body is over the limit"),
            ClientFault::TooSlow => (
                Cause::ClientTimeout,
                "the client was too slow to send its request body",
            ),
        };
        Failure::new(cause, detail)
    }
}

impl ClientSide {
    /// The client's fault in the attempt, if any. `timed_out`: the attempt's time
    /// ran out, which is the client's doing when the gateway was waiting on it.
    pub(super) fn fault(&self, timed_out: bool) -> Option<ClientFault> {
        match self.0.load(Ordering::Acquire) {
            MALFORMED => Some(ClientFault::Malformed),
            TRUNCATED => Some(ClientFault::Truncated),
            TOO_LARGE => Some(ClientFault::TooLarge),
            TOO_SLOW => Some(ClientFault::TooSlow),
            WAITING if timed_out => Some(ClientFault::TooSlow),
            _ => None,
        }
    }

    fn set(&self, state: u8) {
        self.0.store(state, Ordering::Release);
    }
}

/// The client's body, watched (see the module's documentation).
pub(super) struct ClientBody {
    inner: Incoming,
    side: Arc<ClientSide>,
    read: u64,
    max: u64,
    idle: IdleTimer,
    /// A frame read ahead by [`ClientBody::prime`].
    peeked: Option<Frame<Bytes>>,
}

/// Why a client body failed (the error the upstream connection sees).
#[derive(Debug, thiserror::Error)]
#[error("client request body: {}", .0.reason())]
pub struct ClientBodyError(pub ClientFault);

impl ClientBody {
    /// Watches `inner`, allowing `max` bytes and pauses up to `idle`.
    pub(super) fn new(inner: Incoming, max: u64, idle: Duration) -> (ClientBody, Arc<ClientSide>) {
        let side = Arc::new(ClientSide::default());
        let body = ClientBody {
            inner,
            side: side.clone(),
            read: 0,
            max,
            idle: IdleTimer::new(idle),
            peeked: None,
        };
        (body, side)
    }

    /// Reads the first frame ahead, so a body that is bad from its start (a
    /// malformed first chunk, a client that sends nothing) is refused before
    /// anything goes upstream.
    pub(super) async fn prime(&mut self) -> Result<(), ClientFault> {
        if self.inner.is_end_stream() {
            return Ok(());
        }
        let mut this = Pin::new(self);
        match std::future::poll_fn(|cx| this.as_mut().poll_frame(cx)).await {
            Some(Ok(frame)) => {
                this.peeked = Some(frame);
                Ok(())
            }
            Some(Err(e)) => Err(e
                .downcast_ref::<ClientBodyError>()
                .map_or(ClientFault::Malformed, |e| e.0)),
            None => Ok(()),
        }
    }

    fn fail(&mut self, fault: ClientFault) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.side.set(match fault {
            ClientFault::Malformed => MALFORMED,
            ClientFault::Truncated => TRUNCATED,
            ClientFault::TooLarge => TOO_LARGE,
            ClientFault::TooSlow => TOO_SLOW,
        });
        Poll::Ready(Some(Err(ClientBodyError(fault).into())))
    }
}

impl HttpBody for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(frame) = this.peeked.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) else {
            this.side.set(WAITING);
            ready!(this.idle.poll_paused(cx));
            return this.fail(ClientFault::TooSlow);
        };
        this.idle.moved();
        match frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.read += data.len() as u64;
                    if this.read > this.max {
                        return this.fail(ClientFault::TooLarge);
                    }
                }
                this.side
                    .set(if this.inner.is_end_stream() { DONE } else { SENDING });
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => this.fail(if e.is_incomplete_message() {
                ClientFault::Truncated
            } else {
                ClientFault::Malformed
            }),
            None => {
                this.side.set(DONE);
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.peeked.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let Some(n) = self
            .peeked
            .as_ref()
            .and_then(Frame::data_ref)
            .map(|d| d.len() as u64)
        else {
            return inner;
        };
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + n);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + n);
        }
        hint
    }
}
