//! A reservation becomes an order through a durable saga (`palisade-flow`), one
//! step per service, each idempotent on the reservation:
//!
//! 1. **convert** the reservation in the gate (refused if it was released: it
//!    expired first, and its unit is already back); undone by cancelling it, which
//!    returns the unit to the gate's stock;
//! 2. **take** a unit in the inventory database (`WHERE stock > 0`: refused when
//!    the database has none, whatever the gate said); undone by giving it back;
//! 3. **place** the order (one per reservation, one per user unit); undone by
//!    cancelling it;
//! 4. **await payment** until the order's deadline, asleep (a queue snooze, no
//!    attempt spent, no polling), unless the payment wakes it first
//!    ([`Sagas::wake`](palisade_flow::saga::Sagas::wake)); a paid order ends the
//!    saga, and one unpaid at the deadline is cancelled (unless the payment won
//!    the race) and the saga compensates 3, 2 and 1: the unit goes back
//!    everywhere.
//!
//! A worker can die anywhere: the queue runs the step again, and each step finds
//! its own earlier effect.

use std::sync::Arc;
use std::time::Duration;

use palisade_flow::saga::{Saga, Step, StepContext, StepError};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::gate::{Gate, now_ms};
use crate::store::{Inventory, NewOrder, OrderState, Orders, Placed, Taken};

/// The saga's name.
pub const ORDER_SAGA: &str = "flash_sale_order";

/// What the saga is started with: the reservation the gate made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderInput {
    /// The item.
    pub item: String,
    /// The buyer.
    pub user: String,
    /// The buyer's unit number, from the gate.
    pub unit: u32,
    /// The reservation.
    pub reservation: String,
    /// When an unpaid order is cancelled, in milliseconds since the Unix epoch.
    pub pay_by_ms: u64,
}

/// The services the steps call.
#[derive(Debug)]
pub struct Services {
    /// The stock gate.
    pub gate: Gate,
    /// The inventory database.
    pub inventory: Inventory,
    /// The orders database.
    pub orders: Orders,
}

impl Services {
    /// Opens `item`'s sale again in the gate when the gate lost it (its Redis
    /// restarted empty, an embedded process restarted), as the inventory keeps it
    /// now: the reservations lost with the gate are gone, and their units are
    /// still the inventory's. A check-and-set in the gate, so instances racing
    /// open it once, and each opening is counted
    /// (`palisade_flash_sale_sales_reopened_total`). Whether the inventory has
    /// a sale of `item`.
    pub async fn reopen(&self, item: &str) -> Result<bool, palisade_flow::reconcile::BoxError> {
        let Some(sale) = self.inventory.sale(item).await? else {
            return Ok(false);
        };
        if self.gate.open_missing(&sale).await? {
            metrics::counter!("palisade_flash_sale_sales_reopened_total").increment(1);
            tracing::warn!(
                item,
                stock = sale.stock,
                "the gate had lost the sale: opened again from the inventory"
            );
        }
        Ok(true)
    }
}

/// The order saga over `services`.
pub fn order_saga(services: &Arc<Services>) -> Saga {
    let s = |kind| Kind {
        kind,
        services: services.clone(),
    };
    Saga::new(ORDER_SAGA)
        .attempts(10)
        .step(s(StepKind::Convert))
        .step(s(StepKind::Take))
        .step(s(StepKind::Place))
        .step(s(StepKind::AwaitPayment))
}

#[derive(Clone, Copy, Debug)]
enum StepKind {
    Convert,
    Take,
    Place,
    AwaitPayment,
}

struct Kind {
    kind: StepKind,
    services: Arc<Services>,
}

fn input(ctx: &StepContext) -> Result<OrderInput, StepError> {
    serde_json::from_value(ctx.input.clone()).map_err(|e| StepError::Abort(format!("bad order input: {e}")))
}

fn retry(e: impl std::fmt::Display) -> StepError {
    StepError::Retry(e.to_string())
}

impl Kind {
    async fn run(&self, o: OrderInput) -> Result<Value, StepError> {
        let s = &self.services;
        match self.kind {
            StepKind::Convert => match s.gate.convert(&o.item, &o.reservation).await.map_err(retry)? {
                true => Ok(Value::Null),
                false => Err(StepError::Abort(
                    "the reservation expired before its order".into(),
                )),
            },
            StepKind::Take => match s.inventory.take(&o.item, &o.reservation).await.map_err(retry)? {
                Taken::Taken | Taken::Already => Ok(Value::Null),
                Taken::SoldOut => Err(StepError::Abort("the inventory has no unit left".into())),
            },
            StepKind::Place => {
                let order = NewOrder {
                    reservation: o.reservation.clone(),
                    item: o.item.clone(),
                    user: o.user.clone(),
                    unit: o.unit,
                };
                match s.orders.place(&order).await.map_err(retry)? {
                    Placed::New(id) | Placed::Existing(id) => Ok(json!(id)),
                    Placed::Duplicate => Err(StepError::Abort("the user already holds this unit".into())),
                }
            }
            StepKind::AwaitPayment => self.await_payment(&o).await,
        }
    }

    /// Paid: done. Pending before the deadline: wait. Pending after it: cancel
    /// the order, unless the payment won the race.
    async fn await_payment(&self, o: &OrderInput) -> Result<Value, StepError> {
        let orders = &self.services.orders;
        let state = orders.state(&o.reservation).await.map_err(retry)?;
        match state {
            Some(OrderState::Paid) => return Ok(json!("paid")),
            Some(OrderState::Cancelled) => return Err(StepError::Abort("the order was cancelled".into())),
            None => return Err(retry("the order is missing")),
            Some(OrderState::Pending) => {}
        }
        let now = now_ms();
        if now < o.pay_by_ms {
            let left = Duration::from_millis(o.pay_by_ms - now);
            // Asleep until the deadline: a payment meanwhile is the order's
            // state, seen when the step wakes; waiting costs nothing until then.
            return Err(StepError::Wait(left));
        }
        if orders.cancel(&o.reservation).await.map_err(retry)? {
            return Err(StepError::Abort("not paid in time".into()));
        }
        // Not pending any more: paid at the last moment (or cancelled by hand).
        match orders.state(&o.reservation).await.map_err(retry)? {
            Some(OrderState::Paid) => Ok(json!("paid")),
            _ => Err(StepError::Abort("the order was cancelled".into())),
        }
    }

    async fn undo(&self, o: OrderInput) -> Result<(), StepError> {
        let s = &self.services;
        match self.kind {
            StepKind::Convert => s
                .gate
                .cancel(&o.item, &o.reservation)
                .await
                .map(drop)
                .map_err(retry),
            StepKind::Take => s
                .inventory
                .give_back(&o.item, &o.reservation)
                .await
                .map(drop)
                .map_err(retry),
            StepKind::Place => s.orders.cancel(&o.reservation).await.map(drop).map_err(retry),
            // Its own cancellation is its whole effect.
            StepKind::AwaitPayment => Ok(()),
        }
    }
}

impl Step for Kind {
    fn name(&self) -> &str {
        match self.kind {
            StepKind::Convert => "convert",
            StepKind::Take => "take",
            StepKind::Place => "place",
            StepKind::AwaitPayment => "await_payment",
        }
    }

    fn run<'a>(
        &'a self,
        ctx: &'a StepContext,
    ) -> futures_util::future::BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move { self.run(input(ctx)?).await })
    }

    fn compensate<'a>(
        &'a self,
        ctx: &'a StepContext,
    ) -> futures_util::future::BoxFuture<'a, Result<(), StepError>> {
        Box::pin(async move { self.undo(input(ctx)?).await })
    }
}
