//! What keeps the gate and the inventory agreeing over time:
//!
//! * **The sweeper** releases reservations past their expiry. One whose order
//!   saga converted it first is left alone (a release only takes a live one), so
//!   the sweeper and a late saga can race safely.
//! * **Reconciliation** (`palisade-flow`'s [`Reconciliation`]) compares, per item,
//!   the inventory database's stock (the truth) with the gate's stock plus its
//!   live reservations (the units not yet taken in the database). When they differ,
//!   it sets the gate's stock from the truth, with a compare-and-set that never
//!   overwrites a reservation made meanwhile. Items with an order saga before its
//!   take (its reservation may be converted already: the purchase converts it
//!   once the saga is started), or compensating, are skipped in that run: the two
//!   sides legitimately differ by those units until the saga moves on.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use palisade_flow::reconcile::{BoxError, Difference, Reconciliation};

use crate::gate::{GateError, StockCount};
use crate::order::{ORDER_SAGA, Services};

/// Releases up to `limit` expired reservations of each item; how many it
/// released.
pub async fn sweep(services: &Services, limit: usize) -> Result<u64, BoxError> {
    let mut released = 0;
    for (item, _) in services.inventory.items().await? {
        for reservation in services.gate.expired(&item, limit).await? {
            if services.gate.release(&item, &reservation).await? {
                released += 1;
            }
        }
    }
    metrics::counter!("palisade_flash_sale_reservations_expired_total").increment(released);
    Ok(released)
}

/// The gate against the inventory.
#[derive(Debug)]
pub struct StockReconciliation {
    services: Arc<Services>,
}

impl StockReconciliation {
    /// The reconciliation of `services`' gate with their inventory (the order
    /// sagas are recorded beside the orders).
    pub fn new(services: Arc<Services>) -> StockReconciliation {
        StockReconciliation { services }
    }

    /// Items with an order saga in a window where the sides differ.
    async fn busy(&self) -> Result<HashSet<String>, BoxError> {
        let items = self
            .services
            .orders
            .db()
            .strings(
                "SELECT DISTINCT input->>'item' FROM palisade_sagas
                 WHERE name = $1 AND (state = 'compensating' OR (state = 'running' AND step <= 1))",
                ORDER_SAGA,
            )
            .await?;
        Ok(items.into_iter().collect())
    }

    /// Opens again, from the inventory, every quiet item's sale the gate does not
    /// hold (a Redis restarted empty, an embedded process restarted); how many.
    pub async fn reopen_missing(&self) -> Result<usize, BoxError> {
        let mut reopened = 0;
        for (item, _) in self.quiet_items().await? {
            if let Err(GateError::NoSale(_)) = self.services.gate.count(&item).await {
                self.services.reopen(&item).await?;
                reopened += 1;
            }
        }
        Ok(reopened)
    }

    /// The items to compare this run, with the database's stock.
    async fn quiet_items(&self) -> Result<Vec<(String, i64)>, BoxError> {
        let busy = self.busy().await?;
        let items = self.services.inventory.items().await?;
        Ok(items.into_iter().filter(|(i, _)| !busy.contains(i)).collect())
    }
}

/// An item's units as one side counts them; the gate's also as it saw them
/// (`None`, and -1 units, when the gate holds no sale of it). Two are equal when
/// their units are.
#[derive(Clone, Copy, Debug)]
pub struct Units {
    /// Units not yet taken in the database.
    pub units: i64,
    /// The gate's stock and live reservations read (not compared).
    pub seen: Option<StockCount>,
}

impl PartialEq for Units {
    fn eq(&self, other: &Units) -> bool {
        self.units == other.units
    }
}

impl Reconciliation for StockReconciliation {
    const NAME: &'static str = "flash_sale_stock";
    type Key = String;
    type Value = Units;

    async fn truth(&self) -> Result<BTreeMap<String, Units>, BoxError> {
        let items = self.quiet_items().await?;
        Ok(items
            .into_iter()
            .map(|(i, units)| (i, Units { units, seen: None }))
            .collect())
    }

    async fn copy(&self) -> Result<BTreeMap<String, Units>, BoxError> {
        let mut out = BTreeMap::new();
        for (item, _) in self.quiet_items().await? {
            let units = match self.services.gate.count(&item).await {
                Ok(seen) => Units {
                    units: i64::from(seen.stock) + i64::from(seen.live),
                    seen: Some(seen),
                },
                // Never equal to the truth's count: the repair opens it again.
                Err(GateError::NoSale(_)) => Units {
                    units: -1,
                    seen: None,
                },
                Err(e) => return Err(e.into()),
            };
            out.insert(item, units);
        }
        Ok(out)
    }

    async fn repair(&self, d: &Difference<String, Units>) -> Result<(), BoxError> {
        match d {
            Difference::Differs { key, truth, copy } => {
                let Some(seen) = copy.seen else {
                    return self.services.reopen(key).await.map(drop);
                };
                let truth = u32::try_from(truth.units.max(0)).unwrap_or(u32::MAX);
                match self.services.gate.repair(key, seen, truth).await {
                    Ok(true) => Ok(()),
                    Ok(false) => Err("the gate changed meanwhile: the next run looks again".into()),
                    // Lost since it was read: the next run opens it again.
                    Err(e) => Err(e.into()),
                }
            }
            // Both sides are read for the same items: neither is missing one.
            Difference::Missing { .. } | Difference::Extra { .. } => Ok(()),
        }
    }
}

/// The sweeper as a queue job (scheduled by a [`palisade_queue::Periodic`], so one
/// process sweeps per period).
#[derive(Debug)]
pub struct SweepJob(pub Arc<Services>);

/// Reservations released per item and sweep, at most.
const SWEEP_BATCH: usize = 1000;

impl palisade_queue::Worker for SweepJob {
    const KIND: &'static str = "flash_sale_sweep";
    type Args = serde_json::Value;

    async fn work(
        &self,
        job: palisade_queue::JobContext,
        _: serde_json::Value,
    ) -> Result<(), palisade_queue::JobError> {
        let released = sweep(&self.0, SWEEP_BATCH)
            .await
            .map_err(palisade_queue::JobError::failed)?;
        let _ = job.set_output(serde_json::json!({ "released": released }));
        Ok(())
    }
}
