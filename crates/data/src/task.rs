//! Background work tied to a handle's life.

use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// Runs `work` every `interval` (the first after one interval) for as long as the
/// value behind `weak` is alive; a run that overruns delays the next rather than
/// bunching them.
pub(crate) async fn every<T, F, Fut>(weak: Weak<T>, interval: Duration, work: F)
where
    F: Fn(Arc<T>) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Some(alive) = weak.upgrade() else { return };
        work(alive).await;
    }
}
