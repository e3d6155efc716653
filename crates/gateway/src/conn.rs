//! Client connection timeouts: a connection that is slow to send a request's head
//! (`client_header_timeout`, from its first byte, or from the connection's start for
//! its first request) or that sits with no request in progress
//! (`client_idle_timeout`) is closed, and never touches endpoint health.
//!
//! Each connection has an [`Activity`]: its socket ([`Watched`]) notes bytes that
//! arrive while no request is in progress (a head being sent), each request holds an
//! [`ActiveGuard`] until its answer is complete, and [`Activity::expired`] resolves
//! when one of the timeouts has passed. Nothing wakes the watcher: it looks again at
//! least every `min(header, idle)`, which is never later than a deadline that moved
//! in between (a deadline is at least that far from the event that set it), so
//! requests pay a few atomic operations, two reads of the CPU's clock and no
//! wake-up; and [`until_expired`] polls the watcher only when its own timer woke
//! it, not on each of the connection's reads and writes. HTTP/2 connections have no head to time
//! (their streams are bounded by HTTP/2's own limits): only the idle timeout applies,
//! with keep-alive pings for dead peers.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use palisade_core::{Instant, SharedClock};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const NONE: u64 = u64::MAX;

/// What a client connection is doing, for its timeouts.
#[derive(Debug)]
pub struct Activity {
    /// The clock the stamps are read from: the CPU's counter, a few instructions
    /// a read (the tokio clock under paused time in tests).
    clock: SharedClock,
    epoch: Instant,
    /// Requests in progress.
    active: AtomicU32,
    /// When the last request ended, or the connection opened (ms since `epoch`).
    idle_since: AtomicU64,
    /// When the first byte came while no request was in progress (ms), or `NONE`.
    head_since: AtomicU64,
    /// A request has been served (the idle timeout applies, not the first head's).
    served: AtomicBool,
    /// HTTP/2: no head timeout.
    h2: AtomicBool,
    /// The first read has been looked at (for the HTTP/2 preface).
    seen: AtomicBool,
}

impl Activity {
    /// A connection opened now.
    pub fn new() -> Arc<Activity> {
        Self::with_clock(SharedClock::system())
    }

    /// A connection opened now, timed by `clock`.
    pub fn with_clock(clock: SharedClock) -> Arc<Activity> {
        Arc::new(Activity {
            epoch: clock.now(),
            clock,
            active: AtomicU32::new(0),
            idle_since: AtomicU64::new(0),
            head_since: AtomicU64::new(NONE),
            served: AtomicBool::new(false),
            h2: AtomicBool::new(false),
            seen: AtomicBool::new(false),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from((self.clock.now() - self.epoch).as_millis()).unwrap_or(NONE - 1)
    }

    /// Marks the connection as HTTP/2 (from ALPN): no head timeout.
    pub fn set_h2(&self) {
        self.h2.store(true, Ordering::Relaxed);
        self.seen.store(true, Ordering::Relaxed);
    }

    /// A request has started; it is in progress until the guard is dropped.
    pub fn start(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::AcqRel);
        self.head_since.store(NONE, Ordering::Relaxed);
        self.served.store(true, Ordering::Relaxed);
        ActiveGuard(self.clone())
    }

    fn on_read(&self, bytes: &[u8]) {
        if !self.seen.load(Ordering::Relaxed) {
            self.seen.store(true, Ordering::Relaxed);
            if bytes.starts_with(b"PRI * HTTP/2") {
                self.h2.store(true, Ordering::Relaxed);
                self.served.store(true, Ordering::Relaxed);
                self.idle_since.store(self.now_ms(), Ordering::Relaxed);
                return;
            }
        }
        if self.active.load(Ordering::Acquire) == 0
            && !self.h2.load(Ordering::Relaxed)
            && self.head_since.load(Ordering::Relaxed) == NONE
        {
            self.head_since.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// When the connection is due to be closed, as things stand, in milliseconds
    /// since `epoch` (`None`: a request is in progress).
    fn deadline_ms(&self, header: Duration, idle: Duration) -> Option<u64> {
        if self.active.load(Ordering::Acquire) > 0 {
            return None;
        }
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(NONE - 1);
        let head = self.head_since.load(Ordering::Relaxed);
        let idle_since = self.idle_since.load(Ordering::Relaxed);
        Some(if head != NONE {
            head.saturating_add(ms(header))
        } else if self.served.load(Ordering::Relaxed) {
            idle_since.saturating_add(ms(idle))
        } else {
            idle_since.saturating_add(ms(header))
        })
    }

    /// Resolves when the connection has been slow with a head for `header`, or
    /// idle for `idle`. Returns which.
    pub async fn expired(&self, header: Duration, idle: Duration) -> &'static str {
        let tick = header.min(idle);
        let sleep = tokio::time::sleep(tick);
        tokio::pin!(sleep);
        loop {
            let now = self.now_ms();
            let wait = match self.deadline_ms(header, idle) {
                Some(d) if d <= now => {
                    return if self.head_since.load(Ordering::Relaxed) != NONE
                        || !self.served.load(Ordering::Relaxed)
                    {
                        "header_timeout"
                    } else {
                        "idle_timeout"
                    };
                }
                Some(d) => Duration::from_millis(d - now).min(tick),
                None => tick,
            };
            sleep.as_mut().reset(tokio::time::Instant::now() + wait);
            sleep.as_mut().await;
        }
    }
}

/// What [`until_expired`] came to.
#[derive(Debug)]
pub enum Ended<C, T> {
    /// The connection ended.
    Connection(C),
    /// The timer did first.
    Expired(T),
}

/// Runs `conn` until it ends or `timer` does, polling `timer` only when its own
/// waker fired (and on the first poll). A `select!` would poll the timer's sleep on
/// every wake-up of the connection (each read, each write, twice or more a
/// request), registering its waker again each time.
pub async fn until_expired<C: Future, T: Future>(conn: C, timer: T) -> Ended<C::Output, T::Output> {
    let flag = Arc::new(TimerFlag {
        fired: AtomicBool::new(true),
        task: Mutex::new(None),
    });
    let waker = Waker::from(flag.clone());
    let mut conn = std::pin::pin!(conn);
    let mut timer = std::pin::pin!(timer);
    // The task's waker as last handed to the flag: the lock is taken only when the
    // waker changes (for a tokio task, once).
    let mut registered: Option<Waker> = None;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = conn.as_mut().poll(cx) {
            return Poll::Ready(Ended::Connection(out));
        }
        if !registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            registered = Some(cx.waker().clone());
            *flag.task.lock().unwrap_or_else(|e| e.into_inner()) = registered.clone();
        }
        if flag.fired.swap(false, Ordering::AcqRel)
            && let Poll::Ready(out) = timer.as_mut().poll(&mut Context::from_waker(&waker))
        {
            return Poll::Ready(Ended::Expired(out));
        }
        Poll::Pending
    })
    .await
}

/// The timer side's waker: notes that the timer fired and wakes the task.
struct TimerFlag {
    fired: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for TimerFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        if let Some(task) = self.task.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            task.wake_by_ref();
        }
    }
}

/// A request in progress on a connection; dropped when its answer is complete.
#[derive(Debug)]
pub struct ActiveGuard(Arc<Activity>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        let a = &self.0;
        // Stored before the count drops (released with it): a watcher that sees no
        // request in progress sees when the last one ended.
        a.idle_since.store(a.now_ms(), Ordering::Relaxed);
        a.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A client socket that tells its [`Activity`] what it reads.
#[derive(Debug)]
pub struct Watched<IO> {
    io: IO,
    activity: Arc<Activity>,
}

impl<IO> Watched<IO> {
    /// Watches `io`.
    pub fn new(io: IO, activity: Arc<Activity>) -> Self {
        Watched { io, activity }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.on_read(&buf.filled()[before..]);
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use palisade_core::TokioClock;
    use tokio::time::Instant;

    use super::*;

    /// An activity on tokio's (paused) clock.
    fn activity() -> Arc<Activity> {
        Activity::with_clock(SharedClock::new(TokioClock::new()))
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_gets_the_header_timeout() {
        let a = activity();
        let started = Instant::now();
        let why = a.expired(Duration::from_secs(10), Duration::from_secs(60)).await;
        assert_eq!(why, "header_timeout");
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_progress_holds_the_connection_and_idle_follows_it() {
        let a = activity();
        let guard = a.start();
        let waiter = {
            let a = a.clone();
            tokio::spawn(async move { a.expired(Duration::from_secs(10), Duration::from_secs(60)).await })
        };
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(!waiter.is_finished(), "no timeout while a request is in progress");
        let ended = Instant::now();
        drop(guard);
        assert_eq!(waiter.await.unwrap(), "idle_timeout");
        assert_eq!(ended.elapsed(), Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_started_while_idle_gets_the_header_timeout() {
        let a = activity();
        drop(a.start());
        tokio::time::sleep(Duration::from_secs(5)).await;
        a.on_read(b"G");
        let head = Instant::now();
        let why = a.expired(Duration::from_secs(10), Duration::from_secs(60)).await;
        assert_eq!(why, "header_timeout");
        assert_eq!(head.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn http2_connections_have_only_the_idle_timeout() {
        let a = activity();
        a.on_read(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        a.on_read(b"ping");
        let start = Instant::now();
        let why = a.expired(Duration::from_secs(10), Duration::from_secs(60)).await;
        assert_eq!(why, "idle_timeout");
        assert_eq!(start.elapsed(), Duration::from_secs(60));
    }

    /// A future that counts its polls and is ready after `ready_after` of them.
    struct Counted<'a> {
        polls: &'a std::cell::Cell<u32>,
        ready_after: u32,
    }

    impl Future for Counted<'_> {
        type Output = u32;
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<u32> {
            self.polls.set(self.polls.get() + 1);
            if self.polls.get() >= self.ready_after {
                Poll::Ready(self.polls.get())
            } else {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }

    #[tokio::test]
    async fn the_timer_is_not_polled_when_only_the_connection_woke() {
        let (conn_polls, timer_polls) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
        // The connection wakes its task on each of 50 polls; the timer never does.
        let conn = Counted {
            polls: &conn_polls,
            ready_after: 50,
        };
        let timer = std::future::poll_fn(|_| {
            timer_polls.set(timer_polls.get() + 1);
            Poll::<()>::Pending
        });
        assert!(matches!(until_expired(conn, timer).await, Ended::Connection(50)));
        assert_eq!(timer_polls.get(), 1, "polled once, to register its timer");
    }

    #[tokio::test(start_paused = true)]
    async fn the_timer_ends_a_connection_that_does_not() {
        let conn = std::future::pending::<()>();
        let timer = async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            "expired"
        };
        assert!(matches!(
            until_expired(conn, timer).await,
            Ended::Expired("expired")
        ));
    }
}
