//! The sweeper and the reconciliation on real Redis and PostgreSQL: expired
//! reservations go back (a converted one is left alone); a gate that drifted from
//! the inventory is set from it, counting live reservations, and an item with an
//! order saga mid-way is left for the next run; a sale the gate lost is opened
//! again from the inventory.

mod support;

use std::time::Duration;

use palisade_flash_sale::order::ORDER_SAGA;
use palisade_flash_sale::upkeep::{StockReconciliation, sweep};
use palisade_flash_sale::{Gate, GateError, Reserve, StockCount};
use palisade_flow::reconcile::reconcile;

use support::sale;

#[tokio::test]
async fn the_sweeper_returns_expired_reservations_and_leaves_converted_ones() {
    let (services, _) = support::services().await;
    services.gate.open(&sale("cam", 5, 5)).await.unwrap();
    services.inventory.open(&sale("cam", 5, 5)).await.unwrap();
    let gate = &services.gate;
    for (key, ttl) in [
        ("gone", Duration::ZERO),
        ("kept", Duration::from_secs(60)),
        ("ordered", Duration::ZERO),
    ] {
        assert!(matches!(
            gate.reserve("cam", "cy", key, ttl).await.unwrap(),
            Reserve::Reserved { .. }
        ));
    }
    assert!(gate.convert("cam", "ordered").await.unwrap());
    assert_eq!(sweep(&services, 100).await.unwrap(), 1);
    assert_eq!(gate.count("cam").await.unwrap(), StockCount { stock: 3, live: 1 });
    assert_eq!(sweep(&services, 100).await.unwrap(), 0, "nothing twice");
    assert!(
        !gate.convert("cam", "gone").await.unwrap(),
        "a swept reservation is never ordered"
    );
}

#[tokio::test]
async fn a_drifted_gate_is_set_from_the_inventory_unless_a_saga_is_mid_way() {
    let (services, pool) = support::services().await;
    // The saga table the busy check reads.
    let (_sagas, _transitions, runner) = support::sagas(&services, pool.clone()).await;
    // The gate believes in 10 units; the inventory holds 8 (sold elsewhere, or a
    // Redis restored from an old snapshot).
    services.gate.open(&sale("tv", 10, 5)).await.unwrap();
    services.inventory.open(&sale("tv", 8, 5)).await.unwrap();
    assert!(matches!(
        services
            .gate
            .reserve("tv", "ann", "k", Duration::from_secs(60))
            .await
            .unwrap(),
        Reserve::Reserved { .. }
    ));
    let r = StockReconciliation::new(services.clone());

    // A saga of this item before its take (its reservation converted by the
    // purchase, or by its first step): not this run.
    for step in [0, 1] {
        sqlx::query("DELETE FROM palisade_sagas")
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query("INSERT INTO palisade_sagas (name, input, state, step) VALUES ($1, $2, 'running', $3)")
            .bind(ORDER_SAGA)
            .bind(serde_json::json!({"item": "tv"}))
            .bind(step)
            .execute(&pool)
            .await
            .unwrap();
        let report = reconcile(&r).await.unwrap();
        assert_eq!(
            (report.compared, report.differences.len()),
            (0, 0),
            "step {step}: {report:?}"
        );
    }

    sqlx::query("UPDATE palisade_sagas SET state = 'done'")
        .execute(&pool)
        .await
        .unwrap();
    let report = reconcile(&r).await.unwrap();
    assert_eq!(
        (report.compared, report.differences.len(), report.repaired),
        (1, 1, 1),
        "{report:?}"
    );
    // 8 units in the inventory, one held by the live reservation: 7 left to sell.
    assert_eq!(
        services.gate.count("tv").await.unwrap(),
        StockCount { stock: 7, live: 1 }
    );
    let again = reconcile(&r).await.unwrap();
    assert!(again.differences.is_empty(), "{again:?}");
    runner.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_sale_the_gate_lost_is_opened_again_from_the_inventory() {
    let (services, pool) = support::services().await;
    let (_sagas, _transitions, runner) = support::sagas(&services, pool.clone()).await;
    let before = sale("lamp", 6, 2);
    services.gate.open(&before).await.unwrap();
    services.inventory.open(&before).await.unwrap();
    // Two units gone from the inventory (orders placed), then the gate's Redis
    // restarted empty: its keys are gone.
    for r in ["r1", "r2"] {
        services.inventory.take("lamp", r).await.unwrap();
    }
    let Gate::Redis { conn, prefix } = &services.gate else {
        panic!("the test gate is in Redis")
    };
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    assert!(matches!(
        services.gate.count("lamp").await,
        Err(GateError::NoSale(_))
    ));

    let r = StockReconciliation::new(services.clone());
    let report = reconcile(&r).await.unwrap();
    assert_eq!((report.differences.len(), report.repaired), (1, 1), "{report:?}");
    // Open again with the inventory's four units, its window and limit as set up.
    assert_eq!(
        services.gate.count("lamp").await.unwrap(),
        StockCount { stock: 4, live: 0 }
    );
    let late = services
        .gate
        .reserve("lamp", "ann", "k1", Duration::from_secs(60))
        .await
        .unwrap();
    assert!(matches!(late, Reserve::Reserved { left: 3, unit: 1 }), "{late:?}");
    let _ = services
        .gate
        .reserve("lamp", "ann", "k2", Duration::from_secs(60))
        .await;
    let third = services
        .gate
        .reserve("lamp", "ann", "k3", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(third, Reserve::OverLimit);
    assert_eq!(r.reopen_missing().await.unwrap(), 0, "nothing is missing now");
    runner.shutdown(Duration::from_secs(5)).await;
}
