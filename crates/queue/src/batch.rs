//! Batching: items sent one at a time, handled in groups. A group closes when it
//! holds `max` items or `linger` after its first item arrived, whichever is first,
//! so a busy stream is handled in full batches and a quiet one waits at most
//! `linger`. The queue's runner completes jobs this way (one `UPDATE` for many);
//! services use it for their own flushes.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

/// The receiving end: yields the batches.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use palisade_queue::batch::batcher;
/// use std::time::Duration;
///
/// let (tx, mut batches) = batcher::<u32>(100, 3, Duration::from_millis(5));
/// for i in 0..4 {
///     tx.send(i).await.unwrap();
/// }
/// assert_eq!(batches.next().await, Some(vec![0, 1, 2]), "full at 3");
/// assert_eq!(batches.next().await, Some(vec![3]), "the rest after the linger");
/// # }
/// ```
#[derive(Debug)]
pub struct Batcher<T> {
    rx: mpsc::Receiver<T>,
    max: usize,
    linger: Duration,
}

/// A channel of capacity `capacity` whose items come out in batches of at most
/// `max` (at least 1), each closed at most `linger` after its first item.
pub fn batcher<T>(capacity: usize, max: usize, linger: Duration) -> (mpsc::Sender<T>, Batcher<T>) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (
        tx,
        Batcher {
            rx,
            max: max.max(1),
            linger,
        },
    )
}

impl<T> Batcher<T> {
    /// The next batch; `None` once every sender is gone and every item handed out.
    pub async fn next(&mut self) -> Option<Vec<T>> {
        let first = self.rx.recv().await?;
        let mut batch = Vec::with_capacity(self.max.min(1024));
        batch.push(first);
        let deadline = Instant::now() + self.linger;
        while batch.len() < self.max {
            match self.rx.try_recv() {
                Ok(item) => batch.push(item),
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                        Ok(Some(item)) => batch.push(item),
                        Ok(None) | Err(_) => break,
                    }
                }
            }
        }
        Some(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_quiet_stream_waits_at_most_the_linger() {
        let (tx, mut b) = batcher::<u32>(10, 100, Duration::from_millis(50));
        tx.send(1).await.unwrap();
        let started = Instant::now();
        let sender = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            tx.send(2).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            tx.send(3).await.unwrap();
        });
        assert_eq!(b.next().await, Some(vec![1, 2]));
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(50),
            "closed by the linger"
        );
        assert_eq!(b.next().await, Some(vec![3]));
        sender.await.unwrap();
        assert_eq!(b.next().await, None, "closed and drained");
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_stream_comes_in_full_batches_without_waiting() {
        let (tx, mut b) = batcher::<u32>(100, 4, Duration::from_secs(60));
        for i in 0..10 {
            tx.send(i).await.unwrap();
        }
        let started = Instant::now();
        assert_eq!(b.next().await, Some(vec![0, 1, 2, 3]));
        assert_eq!(b.next().await, Some(vec![4, 5, 6, 7]));
        assert_eq!(started.elapsed(), Duration::ZERO);
        drop(tx);
        assert_eq!(b.next().await, Some(vec![8, 9]), "the senders gone: no linger");
    }
}
