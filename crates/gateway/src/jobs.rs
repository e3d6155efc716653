//! Queue-based load leveling at the gateway: a `mode = "async"` route stores each
//! request as an HTTP delivery job in `[gateway.queue]` and answers `202 Accepted`
//! with a status URL; the queue's runner delivers it to the route's cluster (its
//! breakers and per-try timeout), retrying on the queue's backoff until it is
//! answered. The status URL (`<status_path>/<id>.<token>`, the token random, so
//! nobody reads another client's answer by counting ids) reports the job's state
//! and, once delivered, the upstream's answer.
//!
//! The queue is connected in the background: a database that is down at start (or
//! later) makes the async routes answer `503 queue_unavailable`, and the rest of
//! the gateway serves on.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use palisade_queue::{JobContext, JobError, Queue, QueueConfig, Runner, RunnerConfig, Worker};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::QueueSection;
use crate::runtime::Runtime;

/// The gateway's queue once connected (shared by every runtime a reload builds).
#[derive(Debug, Default)]
pub struct QueueSlot {
    queue: ArcSwapOption<Queue>,
    connected: tokio::sync::Notify,
}

impl QueueSlot {
    /// The queue, if connected.
    pub fn get(&self) -> Option<Arc<Queue>> {
        self.queue.load_full()
    }

    /// Waits until the queue is connected.
    pub async fn connected(&self) {
        loop {
            let notified = self.connected.notified();
            if self.queue.load().is_some() {
                return;
            }
            notified.await;
        }
    }

    fn set(&self, queue: Queue) {
        self.queue.store(Some(Arc::new(queue)));
        self.connected.notify_waiters();
    }
}

/// The kind of the stored requests' jobs.
pub const HTTP_DELIVERY: &str = "http_delivery";
/// The queue they are stored on.
pub const HTTP_QUEUE: &str = "http";

/// A request stored to be delivered: what the route received, as it is sent upstream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRequest {
    /// The route whose cluster it goes to.
    pub route: String,
    /// Its method.
    pub method: String,
    /// Its path and query.
    pub path: String,
    /// Its headers (hop-by-hop ones gone, forwarding ones set); values that are not
    /// UTF-8 are left out.
    pub headers: Vec<(String, String)>,
    /// Its body.
    pub body: StoredBody,
    /// The secret part of its status URL.
    pub token: String,
}

/// A stored body: text when it is UTF-8, bytes otherwise.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StoredBody {
    /// UTF-8 text.
    Text(String),
    /// Anything else.
    Bytes(Vec<u8>),
}

impl StoredBody {
    /// `bytes` as text if they are UTF-8.
    pub fn new(bytes: &[u8]) -> Self {
        match std::str::from_utf8(bytes) {
            Ok(t) => StoredBody::Text(t.to_string()),
            Err(_) => StoredBody::Bytes(bytes.to_vec()),
        }
    }

    /// The bytes.
    pub fn into_bytes(self) -> bytes::Bytes {
        match self {
            StoredBody::Text(t) => t.into(),
            StoredBody::Bytes(b) => b.into(),
        }
    }
}

/// The upstream's answer to a delivered request, kept as the job's output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredAnswer {
    /// Its status.
    pub status: u16,
    /// Its headers (values that are not UTF-8 left out).
    pub headers: Vec<(String, String)>,
    /// Its body, up to `gateway.max_body_bytes`.
    pub body: StoredBody,
    /// Whether the body was longer and cut there.
    pub truncated: bool,
    /// The endpoint that answered.
    pub endpoint: String,
}

/// Delivers stored requests with the runtime serving now (a reload's routes and
/// clusters included).
struct HttpDelivery {
    runtime: Arc<ArcSwap<Runtime>>,
}

impl Worker for HttpDelivery {
    const KIND: &'static str = HTTP_DELIVERY;
    type Args = StoredRequest;

    async fn work(&self, job: JobContext, stored: StoredRequest) -> Result<(), JobError> {
        let rt = self.runtime.load_full();
        let Some(route) = rt.routes.iter().find(|r| r.name == stored.route) else {
            return Err(JobError::discard(format!(
                "route {} is no longer configured",
                stored.route
            )));
        };
        let answer = crate::proxy::deliver(&rt, route, stored)
            .await
            .map_err(JobError::Failed)?;
        // The endpoint failed or is overloaded: try again later (the answer is the
        // last error, kept in the job's history).
        if answer.status >= 500 || answer.status == 429 {
            return Err(JobError::failed(format!(
                "{} answered {}",
                answer.endpoint, answer.status
            )));
        }
        job.set_output(&answer).map_err(JobError::failed)?;
        Ok(())
    }
}

/// Connects the gateway's queue (again and again until it answers), then delivers
/// stored requests with `workers` at once until `stop`; its runner hands back what
/// is unfinished at `drain`.
pub(crate) async fn run(
    slot: Arc<QueueSlot>,
    runtime: Arc<ArcSwap<Runtime>>,
    section: QueueSection,
    drain: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut failures = 0u32;
    let queue = loop {
        let connect = tokio::select! {
            c = Queue::connect(&section.database) => c,
            _ = stop.changed() => return,
        };
        match connect {
            Ok(q) => break q,
            Err(e) => {
                failures += 1;
                metrics::counter!("palisade_queue_connect_failures_total").increment(1);
                tracing::warn!(error = %e, database = %redact(&section.database), "the gateway's queue is unavailable; async routes answer 503 until it is back");
                let wait = Duration::from_millis(250u64 << failures.min(6));
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    };
    tracing::info!(backend = queue.backend(), "the gateway's queue is connected");
    slot.set(queue.clone());
    if section.workers == 0 {
        let _ = stop.changed().await;
        return;
    }
    let config = RunnerConfig {
        queues: vec![QueueConfig::new(HTTP_QUEUE, section.workers)],
        ..RunnerConfig::default()
    };
    let runner = loop {
        let started = Runner::new(queue.clone(), config.clone())
            .register(HttpDelivery {
                runtime: runtime.clone(),
            })
            .start()
            .await;
        match started {
            Ok(r) => break r,
            Err(e) => {
                tracing::warn!(error = %e, "the delivery runner did not start; requests are stored, not yet delivered");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    };
    let _ = stop.changed().await;
    let report = runner.shutdown(drain).await;
    tracing::info!(handed_back = report.handed_back, "deliveries stopped");
}

/// Runs the deliveries of a gateway configuration's routes until `until` ends,
/// without serving (`palisade worker`): workers share the queue with the gateways
/// that store the requests.
pub async fn work(
    runtime: Arc<ArcSwap<Runtime>>,
    section: QueueSection,
    until: impl std::future::Future<Output = ()>,
) -> Result<(), palisade_queue::QueueError> {
    let queue = Queue::connect(&section.database).await?;
    let config = RunnerConfig {
        queues: vec![QueueConfig::new(HTTP_QUEUE, section.workers.max(1))],
        ..RunnerConfig::default()
    };
    let runner = Runner::new(queue, config)
        .register(HttpDelivery { runtime })
        .start()
        .await?;
    until.await;
    runner.shutdown(Duration::from_secs(30)).await;
    Ok(())
}

/// A database URL without its password, for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// A random token for a status URL: 128 bits, hex.
pub(crate) fn token() -> String {
    format!("{:032x}", fastrand::u128(..))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(
            redact("postgres://app:s3cret@db:5432/app"),
            "postgres://app:***@db:5432/app"
        );
        assert_eq!(redact("sqlite:jobs.db"), "sqlite:jobs.db");
    }

    #[test]
    fn bodies_are_text_when_they_can_be() {
        assert_eq!(StoredBody::new(b"hi"), StoredBody::Text("hi".into()));
        assert_eq!(StoredBody::new(&[0xff, 0]), StoredBody::Bytes(vec![0xff, 0]));
        let json = serde_json::to_string(&StoredBody::new(&[0xff])).unwrap();
        assert_eq!(
            serde_json::from_str::<StoredBody>(&json).unwrap(),
            StoredBody::Bytes(vec![0xff])
        );
    }
}
