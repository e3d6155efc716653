//! Reconciliation: two sources that should agree (a cached counter and the table
//! it summarises, a search index and its rows, a ledger and a provider's report)
//! compared now and then, every difference counted and repaired by the caller's
//! policy.
//!
//! A [`Reconciliation`] says how to read both sides and how to repair a
//! difference; [`reconcile`] compares them once; [`ReconcileJob`] runs it as a
//! job of `palisade-queue`, so that a periodic schedule
//! ([`palisade_queue::Periodic`]) runs it once per period across every process.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::future::Future;

use palisade_queue::{JobContext, JobError, Worker};

/// The error either side, or a repair, may fail with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One key on which the two sides disagree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Difference<K, V> {
    /// The truth has it; the copy does not.
    Missing {
        /// The key.
        key: K,
        /// The truth's value.
        truth: V,
    },
    /// The copy has it; the truth does not.
    Extra {
        /// The key.
        key: K,
        /// The copy's value.
        copy: V,
    },
    /// Both have it, with different values.
    Differs {
        /// The key.
        key: K,
        /// The truth's value.
        truth: V,
        /// The copy's value.
        copy: V,
    },
}

impl<K, V> Difference<K, V> {
    fn kind(&self) -> &'static str {
        match self {
            Difference::Missing { .. } => "missing",
            Difference::Extra { .. } => "extra",
            Difference::Differs { .. } => "differs",
        }
    }
}

/// Two sources to compare, and what to do about a difference.
pub trait Reconciliation: Send + Sync + 'static {
    /// Its name: the job kind of [`ReconcileJob`] and the metrics' label.
    const NAME: &'static str;
    /// What keys the entries.
    type Key: Ord + Clone + Debug + Send + Sync;
    /// What the sides hold per key.
    type Value: PartialEq + Clone + Debug + Send + Sync;

    /// The source of truth, read whole.
    fn truth(&self) -> impl Future<Output = Result<BTreeMap<Self::Key, Self::Value>, BoxError>> + Send;

    /// The copy that should agree with it, read whole.
    fn copy(&self) -> impl Future<Output = Result<BTreeMap<Self::Key, Self::Value>, BoxError>> + Send;

    /// Repairs one difference (the policy: overwrite the copy, alert, or leave it
    /// and only count it).
    fn repair(
        &self,
        difference: &Difference<Self::Key, Self::Value>,
    ) -> impl Future<Output = Result<(), BoxError>> + Send;
}

/// What a comparison found and did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report<K, V> {
    /// Keys compared (on either side).
    pub compared: usize,
    /// The differences, by key.
    pub differences: Vec<Difference<K, V>>,
    /// Differences repaired.
    pub repaired: usize,
    /// Repairs that failed, with why.
    pub failed: Vec<(K, String)>,
}

/// Compares both sides of `r` once and repairs each difference; counts them in
/// `palisade_reconcile_differences_total{name, kind}` and
/// `palisade_reconcile_repairs_total{name, result}`.
pub async fn reconcile<R: Reconciliation>(r: &R) -> Result<Report<R::Key, R::Value>, BoxError> {
    let (truth, copy) = futures_util::future::try_join(r.truth(), r.copy()).await?;
    let mut differences = Vec::new();
    let mut compared = 0;
    for (key, t) in &truth {
        compared += 1;
        match copy.get(key) {
            None => differences.push(Difference::Missing {
                key: key.clone(),
                truth: t.clone(),
            }),
            Some(c) if c != t => differences.push(Difference::Differs {
                key: key.clone(),
                truth: t.clone(),
                copy: c.clone(),
            }),
            Some(_) => {}
        }
    }
    for (key, c) in copy.iter().filter(|(k, _)| !truth.contains_key(*k)) {
        compared += 1;
        differences.push(Difference::Extra {
            key: key.clone(),
            copy: c.clone(),
        });
    }
    let mut report = Report {
        compared,
        differences: Vec::new(),
        repaired: 0,
        failed: Vec::new(),
    };
    for d in differences {
        metrics::counter!("palisade_reconcile_differences_total", "name" => R::NAME, "kind" => d.kind())
            .increment(1);
        match r.repair(&d).await {
            Ok(()) => report.repaired += 1,
            Err(e) => {
                let key = match &d {
                    Difference::Missing { key, .. }
                    | Difference::Extra { key, .. }
                    | Difference::Differs { key, .. } => key.clone(),
                };
                report.failed.push((key, e.to_string()));
            }
        }
        report.differences.push(d);
    }
    metrics::counter!("palisade_reconcile_repairs_total", "name" => R::NAME, "result" => "repaired")
        .increment(report.repaired as u64);
    metrics::counter!("palisade_reconcile_repairs_total", "name" => R::NAME, "result" => "failed")
        .increment(report.failed.len() as u64);
    if !report.differences.is_empty() {
        tracing::warn!(
            name = R::NAME,
            differences = report.differences.len(),
            repaired = report.repaired,
            "reconciliation found differences"
        );
    }
    Ok(report)
}

/// A [`Reconciliation`] as a queue job of kind [`Reconciliation::NAME`]: schedule
/// it with [`palisade_queue::Periodic`]. A job whose repairs failed is retried.
#[derive(Debug)]
pub struct ReconcileJob<R>(pub R);

impl<R: Reconciliation> Worker for ReconcileJob<R> {
    const KIND: &'static str = R::NAME;
    type Args = serde_json::Value;

    async fn work(&self, job: JobContext, _: serde_json::Value) -> Result<(), JobError> {
        let report = reconcile(&self.0).await.map_err(JobError::failed)?;
        let _ = job.set_output(serde_json::json!({
            "compared": report.compared,
            "differences": report.differences.len(),
            "repaired": report.repaired,
            "failed": report.failed.len(),
        }));
        if report.failed.is_empty() {
            Ok(())
        } else {
            Err(JobError::failed(format!(
                "{} repairs failed",
                report.failed.len()
            )))
        }
    }
}
