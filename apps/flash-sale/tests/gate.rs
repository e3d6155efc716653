//! The stock gate, in Redis (the run's throwaway server) and in process, held to
//! the same behaviour: concurrent buyers never take more than the stock, no user
//! more than the limit, a repeated key reserves once, the window is kept, and a
//! reservation is converted or released, never both.

mod support;

use std::sync::Arc;
use std::time::Duration;

use palisade_flash_sale::{Gate, Reserve, Sale, StockCount};

use support::{now_ms, sale};

const TTL: Duration = Duration::from_secs(60);

/// Both gates: Redis (keys under a prefix of the test's own) and local.
async fn gates() -> Vec<(&'static str, Arc<Gate>)> {
    vec![
        ("redis", Arc::new(support::redis_gate().await)),
        ("local", Arc::new(Gate::local())),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_buyers_never_take_more_than_the_stock() {
    for (name, gate) in gates().await {
        gate.open(&sale("phone", 50, 1)).await.unwrap();
        let mut buyers = Vec::new();
        for u in 0..400 {
            let gate = gate.clone();
            buyers.push(tokio::spawn(async move {
                gate.reserve("phone", &format!("user{u}"), &format!("user{u}-k"), TTL)
                    .await
                    .unwrap()
            }));
        }
        let mut reserved = 0;
        for b in buyers {
            match b.await.unwrap() {
                Reserve::Reserved { .. } => reserved += 1,
                Reserve::SoldOut => {}
                other => panic!("{name}: {other:?}"),
            }
        }
        assert_eq!(reserved, 50, "{name}");
        assert_eq!(
            gate.count("phone").await.unwrap(),
            StockCount { stock: 0, live: 50 },
            "{name}"
        );
    }
}

#[tokio::test]
async fn a_user_gets_at_most_the_limit_and_a_repeated_key_reserves_once() {
    for (name, gate) in gates().await {
        gate.open(&sale("shoe", 10, 2)).await.unwrap();
        let mut outcomes = Vec::new();
        for k in ["a", "a", "b", "c", "d"] {
            outcomes.push(gate.reserve("shoe", "ann", k, TTL).await.unwrap());
        }
        assert_eq!(
            outcomes,
            [
                Reserve::Reserved { left: 9, unit: 1 },
                Reserve::Replayed { unit: 1 },
                Reserve::Reserved { left: 8, unit: 2 },
                Reserve::OverLimit,
                Reserve::OverLimit
            ],
            "{name}"
        );
        assert_eq!(gate.count("shoe").await.unwrap().stock, 8, "{name}");
    }
}

#[tokio::test]
async fn the_window_is_kept_and_an_unknown_sale_says_so() {
    for (name, gate) in gates().await {
        let now = now_ms();
        let early = Sale {
            opens_ms: now + 3_600_000,
            closes_ms: now + 7_200_000,
            ..sale("early", 5, 1)
        };
        let late = Sale {
            opens_ms: now - 7_200_000,
            closes_ms: now - 3_600_000,
            ..sale("late", 5, 1)
        };
        gate.open(&early).await.unwrap();
        gate.open(&late).await.unwrap();
        assert_eq!(
            gate.reserve("early", "u", "k", TTL).await.unwrap(),
            Reserve::NotOpen,
            "{name}"
        );
        assert_eq!(
            gate.reserve("late", "u", "k", TTL).await.unwrap(),
            Reserve::Closed,
            "{name}"
        );
        assert_eq!(
            gate.reserve("none", "u", "k", TTL).await.unwrap(),
            Reserve::NoSale,
            "{name}"
        );
        // Nothing was taken.
        assert_eq!(
            gate.count("early").await.unwrap(),
            StockCount { stock: 5, live: 0 },
            "{name}"
        );
    }
}

#[tokio::test]
async fn a_reservation_is_converted_or_released_never_both() {
    for (name, gate) in gates().await {
        gate.open(&sale("tv", 3, 3)).await.unwrap();
        for k in ["r1", "r2", "r3"] {
            assert!(matches!(
                gate.reserve("tv", "bob", k, TTL).await.unwrap(),
                Reserve::Reserved { .. }
            ));
        }
        // Converted first: a release is refused, the unit stays sold.
        assert!(gate.convert("tv", "r1").await.unwrap(), "{name}");
        assert!(
            gate.convert("tv", "r1").await.unwrap(),
            "{name}: converting again is no change"
        );
        assert!(!gate.release("tv", "r1").await.unwrap(), "{name}");
        // Released first: the unit is back once, and an order for it is refused.
        assert!(gate.release("tv", "r2").await.unwrap(), "{name}");
        assert!(!gate.release("tv", "r2").await.unwrap(), "{name}");
        assert!(!gate.convert("tv", "r2").await.unwrap(), "{name}");
        assert_eq!(
            gate.count("tv").await.unwrap(),
            StockCount { stock: 1, live: 1 },
            "{name}"
        );
        // The released unit went back to the user's allowance too: r2 never
        // became an order, so its unit number (2) is free again, and r3's (3)
        // is not.
        assert_eq!(
            gate.reserve("tv", "bob", "r4", TTL).await.unwrap(),
            Reserve::Reserved { left: 0, unit: 2 },
            "{name}"
        );
        // r1's order cancelled: its unit comes back once, and its unit number (1)
        // is free; a reservation not converted cannot be cancelled.
        assert!(gate.cancel("tv", "r1").await.unwrap(), "{name}");
        assert!(!gate.cancel("tv", "r1").await.unwrap(), "{name}");
        assert!(!gate.cancel("tv", "r3").await.unwrap(), "{name}: r3 is live");
        assert_eq!(
            gate.count("tv").await.unwrap(),
            StockCount { stock: 1, live: 2 },
            "{name}"
        );
        assert_eq!(
            gate.reserve("tv", "bob", "r5", TTL).await.unwrap(),
            Reserve::Reserved { left: 0, unit: 1 },
            "{name}"
        );
        // Unknown reservations are neither.
        assert!(!gate.convert("tv", "nope").await.unwrap(), "{name}");
        assert!(!gate.release("tv", "nope").await.unwrap(), "{name}");
        assert!(!gate.cancel("tv", "nope").await.unwrap(), "{name}");
    }
}

#[tokio::test]
async fn expired_reservations_are_listed_for_the_sweeper() {
    for (name, gate) in gates().await {
        gate.open(&sale("cam", 5, 5)).await.unwrap();
        assert!(matches!(
            gate.reserve("cam", "cy", "gone", Duration::ZERO).await.unwrap(),
            Reserve::Reserved { .. }
        ));
        assert!(matches!(
            gate.reserve("cam", "cy", "kept", TTL).await.unwrap(),
            Reserve::Reserved { .. }
        ));
        assert_eq!(gate.expired("cam", 10).await.unwrap(), ["gone"], "{name}");
        assert!(gate.release("cam", "gone").await.unwrap(), "{name}");
        assert!(gate.expired("cam", 10).await.unwrap().is_empty(), "{name}");
        assert_eq!(
            gate.count("cam").await.unwrap(),
            StockCount { stock: 4, live: 1 },
            "{name}"
        );
    }
}
