//! The pause timer of a body passed through: it runs from the start of each pause
//! and is made at a body's first pause only (most bodies are whole at once).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// Times the current pause of a body against `idle`.
pub(super) struct IdleTimer {
    idle: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    /// The timer runs from the current pause (data since disarms it).
    armed: bool,
}

impl IdleTimer {
    /// A timer for pauses up to `idle`.
    pub(super) fn new(idle: Duration) -> Self {
        IdleTimer {
            idle,
            timer: None,
            armed: false,
        }
    }

    /// The longest pause allowed.
    pub(super) fn idle(&self) -> Duration {
        self.idle
    }

    /// Called when the body has nothing: ready once the pause has lasted `idle`.
    pub(super) fn poll_paused(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.armed {
            let deadline = Instant::now() + self.idle;
            match &mut self.timer {
                Some(t) => t.as_mut().reset(deadline),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            self.armed = true;
        }
        match &mut self.timer {
            Some(t) => t.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }

    /// The body moved: the next pause starts afresh.
    pub(super) fn moved(&mut self) {
        self.armed = false;
    }
}
