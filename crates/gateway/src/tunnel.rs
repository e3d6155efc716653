//! Upgraded connections (WebSocket and the like) joined end to end: closed after an
//! idle time, counted for the drain, and closed when the drain time is over.
//!
//! Once hyper hands an upgraded connection over it no longer tracks it, so a
//! graceful shutdown that waited only for hyper's connections would return while
//! tunnels still carried traffic, and leave them running after it. [`Tunnels`] is
//! the gateway's own count of them.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

/// The open tunnels of one gateway, shared by every runtime a reload builds.
#[derive(Clone, Debug)]
pub struct Tunnels {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    open: AtomicUsize,
    none_open: Notify,
    close: watch::Sender<bool>,
}

impl Default for Tunnels {
    fn default() -> Self {
        Tunnels {
            inner: Arc::new(Inner {
                open: AtomicUsize::new(0),
                none_open: Notify::new(),
                close: watch::Sender::new(false),
            }),
        }
    }
}

impl Tunnels {
    /// Tunnels open now.
    pub fn open(&self) -> usize {
        self.inner.open.load(Ordering::Acquire)
    }

    /// Waits until no tunnel is open.
    pub async fn drained(&self) {
        loop {
            let notified = self.inner.none_open.notified();
            tokio::pin!(notified);
            // Registered before the check, so a close between the two is not missed.
            notified.as_mut().enable();
            if self.open() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Closes every open tunnel (and any opened later): the end of a drain.
    pub fn close_all(&self) {
        self.inner.close.send_replace(true);
    }

    fn enter(&self) -> Open {
        self.inner.open.fetch_add(1, Ordering::AcqRel);
        Open(self.inner.clone())
    }

    /// Copies bytes both ways between `a` and `b` until either side closes, nothing
    /// has moved for `idle`, or [`close_all`](Self::close_all) is called. Returns the
    /// bytes moved from `a` to `b` and from `b` to `a`.
    pub async fn join<A, B>(&self, a: A, b: B, idle: Duration) -> Result<(u64, u64), Ended>
    where
        A: AsyncRead + AsyncWrite + Unpin,
        B: AsyncRead + AsyncWrite + Unpin,
    {
        let _open = self.enter();
        let mut close = self.inner.close.subscribe();
        let start = Instant::now();
        let last = Arc::new(AtomicU64::new(0));
        let mut a = Active {
            io: a,
            start,
            last: last.clone(),
        };
        let mut b = Active {
            io: b,
            start,
            last: last.clone(),
        };
        let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
        tokio::pin!(copy);
        loop {
            let seen = last.load(Ordering::Relaxed);
            tokio::select! {
                done = &mut copy => return done.map_err(Ended::Io),
                _ = tokio::time::sleep_until(start + Duration::from_nanos(seen) + idle) => {
                    if last.load(Ordering::Relaxed) == seen {
                        return Err(Ended::Idle);
                    }
                }
                _ = close.wait_for(|c| *c) => return Err(Ended::Drained),
            }
        }
    }
}

/// Why a tunnel ended other than by a side closing.
#[derive(Debug, thiserror::Error)]
pub enum Ended {
    /// Reading or writing failed.
    #[error("{0}")]
    Io(io::Error),
    /// Nothing moved for the idle timeout.
    #[error("idle timeout")]
    Idle,
    /// The gateway's drain time ran out.
    #[error("closed at the end of the drain")]
    Drained,
}

/// One open tunnel; dropping it closes its count.
struct Open(Arc<Inner>);

impl Drop for Open {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.none_open.notify_waiters();
        }
    }
}

/// An I/O object that notes when it last read anything (every byte that moves
/// through a tunnel is read first).
struct Active<T> {
    io: T,
    start: Instant,
    last: Arc<AtomicU64>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Active<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            let at = self.start.elapsed().as_nanos() as u64;
            self.last.store(at, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Active<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    #[tokio::test(start_paused = true)]
    async fn an_idle_tunnel_closes_and_a_busy_one_does_not() {
        let tunnels = Tunnels::default();
        let (mut client, a) = duplex(64);
        let (b, mut server) = duplex(64);
        let t = tunnels.clone();
        let joined = tokio::spawn(async move { t.join(a, b, Duration::from_secs(10)).await });
        // Traffic every 6 s keeps it open past the 10 s idle time.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            client.write_all(b"ping").await.unwrap();
            let mut buf = [0u8; 4];
            server.read_exact(&mut buf).await.unwrap();
        }
        assert_eq!(tunnels.open(), 1);
        let started = Instant::now();
        assert!(matches!(joined.await.unwrap(), Err(Ended::Idle)));
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(10),
            "closed one idle time after the last byte"
        );
        assert_eq!(tunnels.open(), 0);
        tunnels.drained().await;
    }

    #[tokio::test(start_paused = true)]
    async fn close_all_ends_open_tunnels_and_drained_waits_for_them() {
        let tunnels = Tunnels::default();
        let (_client, a) = duplex(64);
        let (b, _server) = duplex(64);
        let t = tunnels.clone();
        let joined = tokio::spawn(async move { t.join(a, b, Duration::from_secs(3600)).await });
        tokio::task::yield_now().await;
        assert_eq!(tunnels.open(), 1);
        let waiting = tokio::spawn({
            let t = tunnels.clone();
            async move { t.drained().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "a tunnel is open");
        tunnels.close_all();
        assert!(matches!(joined.await.unwrap(), Err(Ended::Drained)));
        waiting.await.unwrap();
        assert_eq!(tunnels.open(), 0);
    }
}
