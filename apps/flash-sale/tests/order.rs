//! The order saga on real Redis and PostgreSQL (the inventory and the orders each
//! in a database of their own, the queue and the sagas beside the orders): a paid
//! order keeps its unit everywhere; an unpaid one is cancelled after its deadline
//! and its unit comes back in the database, in the gate and to the user; a
//! reservation released before its order is never ordered.

mod support;

use std::sync::Arc;
use std::time::Duration;

use palisade_flash_sale::order::{ORDER_SAGA, OrderInput, Services};
use palisade_flash_sale::{OrderState, Reserve, Sale, StockCount};
use palisade_flow::saga::{SagaState, Sagas, Transition};
use tokio::sync::mpsc;

use support::now_ms;

const STOCK: u32 = 5;

/// A sale of `STOCK` units of `item` in every store, the saga's runner started.
struct World {
    services: Arc<Services>,
    sagas: Sagas,
    ended: mpsc::UnboundedReceiver<(i64, Transition)>,
    runner: palisade_queue::RunnerHandle,
}

async fn world(item: &str) -> World {
    let (services, pool) = support::services().await;
    let now = now_ms();
    let sale = Sale {
        item: item.into(),
        stock: STOCK,
        opens_ms: now - 60_000,
        closes_ms: now + 3_600_000,
        per_user: 1,
    };
    services.gate.open(&sale).await.unwrap();
    services.inventory.open(&sale).await.unwrap();
    let (sagas, ended, runner) = support::sagas(&services, pool).await;
    World {
        services,
        sagas,
        ended,
        runner,
    }
}

impl World {
    /// Reserves one unit for `user` and starts its order saga, payable until
    /// `pay_within` from now.
    async fn buy(&self, item: &str, user: &str, pay_within: Duration) -> (i64, String) {
        let reservation = format!("{user}-key");
        let Reserve::Reserved { unit, .. } = self
            .services
            .gate
            .reserve(item, user, &reservation, Duration::from_secs(60))
            .await
            .unwrap()
        else {
            panic!("no unit reserved")
        };
        let pay_by_ms = now_ms() + u64::try_from(pay_within.as_millis()).unwrap();
        let input = OrderInput {
            item: item.into(),
            user: user.into(),
            unit,
            reservation: reservation.clone(),
            pay_by_ms,
        };
        (self.sagas.start(ORDER_SAGA, &input).await.unwrap(), reservation)
    }

    /// Waits until saga `id` reaches `state`.
    async fn until(&mut self, id: i64, state: SagaState) {
        tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                if self
                    .sagas
                    .status(id)
                    .await
                    .unwrap()
                    .is_some_and(|s| s.state == state)
                {
                    return;
                }
                self.ended.recv().await.unwrap();
            }
        })
        .await
        .unwrap_or_else(|_| panic!("saga {id} never reached {state:?}"));
    }

    /// The item's units in the gate and the database, and its live orders.
    async fn units(&self, item: &str) -> (StockCount, Option<i64>, i64) {
        let s = &self.services;
        (
            s.gate.count(item).await.unwrap(),
            s.inventory.stock(item).await.unwrap(),
            s.orders.live(item).await.unwrap(),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paid_order_keeps_its_unit_everywhere() {
    let mut w = world("phone").await;
    // An hour to pay: the payment wakes the saga, which ends at once.
    let (id, reservation) = w.buy("phone", "ann", Duration::from_secs(3600)).await;
    // Placed and waiting for its payment: the unit is out of both stores.
    let placed = async {
        loop {
            if w.services.orders.state(&reservation).await.unwrap() == Some(OrderState::Pending) {
                return;
            }
            w.ended.recv().await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(60), placed)
        .await
        .unwrap();
    assert!(w.services.orders.pay(&reservation).await.unwrap());
    // Usually the payment step is asleep by now and the wake runs it; if its
    // first look came after the payment, the saga has ended and there is
    // nothing to wake. Either way it ends now, not in an hour.
    if !w.sagas.wake(id).await.unwrap() {
        let state = w.sagas.status(id).await.unwrap().map(|s| s.state);
        assert_eq!(state, Some(SagaState::Done));
    }
    w.until(id, SagaState::Done).await;
    assert_eq!(
        w.units("phone").await,
        (
            StockCount {
                stock: STOCK - 1,
                live: 0
            },
            Some(i64::from(STOCK - 1)),
            1
        )
    );
    assert_eq!(
        w.services.orders.state(&reservation).await.unwrap(),
        Some(OrderState::Paid)
    );
    w.runner.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpaid_order_is_cancelled_and_its_unit_comes_back_everywhere() {
    let mut w = world("shoe").await;
    let (id, reservation) = w.buy("shoe", "bob", Duration::from_millis(300)).await;
    w.until(id, SagaState::Compensated).await;
    let status = w.sagas.status(id).await.unwrap().unwrap();
    assert!(
        status
            .error
            .as_deref()
            .is_some_and(|e| e.contains("not paid in time")),
        "{status:?}"
    );
    assert_eq!(
        w.services.orders.state(&reservation).await.unwrap(),
        Some(OrderState::Cancelled)
    );
    assert_eq!(
        w.units("shoe").await,
        (
            StockCount {
                stock: STOCK,
                live: 0
            },
            Some(i64::from(STOCK)),
            0
        )
    );
    // A late payment is refused.
    assert!(!w.services.orders.pay(&reservation).await.unwrap());
    // The user's allowance (one unit) is back too.
    let again = w
        .services
        .gate
        .reserve("shoe", "bob", "bob-second", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        again,
        Reserve::Reserved {
            left: STOCK - 1,
            unit: 1
        }
    );
    w.runner.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_released_before_its_order_is_never_ordered() {
    let mut w = world("cam").await;
    let reservation = "cy-key";
    let Reserve::Reserved { unit, .. } = w
        .services
        .gate
        .reserve("cam", "cy", reservation, Duration::from_secs(60))
        .await
        .unwrap()
    else {
        panic!("no unit reserved")
    };
    // The sweeper got there first (the reservation expired).
    assert!(w.services.gate.release("cam", reservation).await.unwrap());
    let input = OrderInput {
        item: "cam".into(),
        user: "cy".into(),
        unit,
        reservation: reservation.into(),
        pay_by_ms: now_ms() + 600_000,
    };
    let id = w.sagas.start(ORDER_SAGA, &input).await.unwrap();
    w.until(id, SagaState::Compensated).await;
    assert_eq!(w.services.orders.state(reservation).await.unwrap(), None);
    assert_eq!(
        w.units("cam").await,
        (
            StockCount {
                stock: STOCK,
                live: 0
            },
            Some(i64::from(STOCK)),
            0
        )
    );
    w.runner.shutdown(Duration::from_secs(5)).await;
}
