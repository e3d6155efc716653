//! The inventory and orders databases on the run's PostgreSQL (a database of each
//! test's own) and on SQLite files: stock never below zero under concurrent
//! takes, every move once per reservation, one order per reservation and per user
//! unit; the naive design's one transaction per attempt keeps the per-user limit
//! under concurrent attempts.

mod support;

use std::sync::Arc;

use palisade_flash_sale::{Inventory, NewOrder, OrderState, Orders, Placed, Taken};

use support::{fresh_pool, fresh_sqlite};

fn order(reservation: &str, user: &str, unit: u32) -> NewOrder {
    NewOrder {
        reservation: reservation.into(),
        item: "phone".into(),
        user: user.into(),
        unit,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_takes_stop_at_zero_and_each_reservation_moves_once() {
    for db in [
        fresh_pool("fs_inventory").await.into(),
        fresh_sqlite("inventory").await,
    ] {
        takes_stop_at_zero(Arc::new(Inventory::new(db).await.unwrap())).await;
    }
}

async fn takes_stop_at_zero(inv: Arc<Inventory>) {
    inv.open(&support::sale("phone", 30, 1)).await.unwrap();
    let mut takes = Vec::new();
    for r in 0..100 {
        let inv = inv.clone();
        takes.push(tokio::spawn(async move {
            inv.take("phone", &format!("r{r}")).await.unwrap()
        }));
    }
    let mut taken = 0;
    for t in takes {
        match t.await.unwrap() {
            Taken::Taken => taken += 1,
            Taken::SoldOut => {}
            Taken::Already => panic!("every reservation is new"),
        }
    }
    assert_eq!(taken, 30);
    assert_eq!(inv.stock("phone").await.unwrap(), Some(0));
    // Again for a reservation that took: nothing more.
    let took = (0..100).map(|r| format!("r{r}"));
    let mut first = None;
    for r in took {
        if inv.take("phone", &r).await.unwrap() == Taken::Already {
            first = Some(r);
            break;
        }
    }
    let first = first.expect("a reservation that took");
    // Given back once, and only by a reservation that took.
    assert!(inv.give_back("phone", &first).await.unwrap());
    assert!(!inv.give_back("phone", &first).await.unwrap());
    assert!(!inv.give_back("phone", "never-took").await.unwrap());
    assert_eq!(inv.stock("phone").await.unwrap(), Some(1));
}

#[tokio::test]
async fn an_order_per_reservation_and_per_user_unit() {
    for db in [fresh_pool("fs_orders").await.into(), fresh_sqlite("orders").await] {
        one_order_per_unit(Orders::new(db).await.unwrap()).await;
    }
}

async fn one_order_per_unit(orders: Orders) {
    let Placed::New(id) = orders.place(&order("r1", "ann", 1)).await.unwrap() else {
        panic!("a new order")
    };
    assert_eq!(
        orders.place(&order("r1", "ann", 1)).await.unwrap(),
        Placed::Existing(id)
    );
    // Another reservation for a unit the user holds is refused by the index.
    assert_eq!(
        orders.place(&order("r2", "ann", 1)).await.unwrap(),
        Placed::Duplicate
    );
    assert!(matches!(
        orders.place(&order("r3", "ann", 2)).await.unwrap(),
        Placed::New(_)
    ));
    assert_eq!(orders.live("phone").await.unwrap(), 2);
    // Cancelled, its unit is free again; a paid order is not cancelled.
    assert!(orders.cancel("r1").await.unwrap());
    assert!(!orders.cancel("r1").await.unwrap());
    assert_eq!(orders.state("r1").await.unwrap(), Some(OrderState::Cancelled));
    assert!(matches!(
        orders.place(&order("r4", "ann", 1)).await.unwrap(),
        Placed::New(_)
    ));
    assert!(orders.pay("r3").await.unwrap());
    assert!(!orders.cancel("r3").await.unwrap());
    assert_eq!(orders.state("r3").await.unwrap(), Some(OrderState::Paid));
    assert_eq!(orders.state("none").await.unwrap(), None);
    assert_eq!(orders.live("phone").await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_naive_design_keeps_the_limit_under_one_users_concurrent_attempts() {
    for db in [fresh_pool("fs_naive").await.into(), fresh_sqlite("naive").await] {
        let naive = Arc::new(palisade_flash_sale::naive::Naive::new(db).await.unwrap());
        naive.open(&support::sale("pen", 100, 2)).await.unwrap();
        let mut attempts = Vec::new();
        for k in 0..40 {
            let naive = naive.clone();
            attempts.push(tokio::spawn(async move {
                let now = support::now_ms();
                naive
                    .buy("pen", "ann", &format!("ann~{}", k % 30), now)
                    .await
                    .unwrap()
            }));
        }
        let mut bought = 0;
        for a in attempts {
            bought += u32::from(a.await.unwrap());
        }
        assert_eq!(bought, 2, "ann's limit is two");
        assert!(naive.buy("pen", "bob", "bob~0", support::now_ms()).await.unwrap());
    }
}
