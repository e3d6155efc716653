//! A page's Server-Sent Events body: the samples kept, then each new one, until the
//! dashboard closes at shutdown or the page goes away.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame};
use tokio::sync::mpsc;

/// The body of `/dashboard/events`.
#[derive(Debug)]
pub struct EventStream {
    history: Option<Bytes>,
    rx: mpsc::Receiver<Bytes>,
}

impl EventStream {
    pub(super) fn new(history: Bytes, rx: mpsc::Receiver<Bytes>) -> Self {
        EventStream {
            // An SSE comment first, so the page's stream opens at once even
            // with no sample kept yet.
            history: Some(if history.is_empty() {
                Bytes::from_static(b": palisade\n\n")
            } else {
                history
            }),
            rx,
        }
    }
}

impl Body for EventStream {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(h) = self.history.take() {
            return Poll::Ready(Some(Ok(Frame::data(h))));
        }
        self.rx.poll_recv(cx).map(|m| m.map(|b| Ok(Frame::data(b))))
    }
}
