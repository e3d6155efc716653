//! Optimistic locking under contention, on a real PostgreSQL.

mod support;

use palisade_flow::{Attempt, OptimisticError, OptimisticRetry};
use sqlx::PgPool;
use support::fresh_pool;

async fn pool() -> PgPool {
    let pool = fresh_pool("optimistic", 60).await;
    sqlx::query(
        "CREATE TABLE account (id int PRIMARY KEY, balance bigint NOT NULL, version bigint NOT NULL)",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("INSERT INTO account VALUES (1, 0, 0)")
        .execute(&pool)
        .await
        .unwrap();
    pool
}

/// One read-modify-write of the balance, guarded by its version.
async fn deposit(pool: &PgPool, amount: i64) -> Result<Attempt<i64>, sqlx::Error> {
    let (balance, version): (i64, i64) = sqlx::query_as("SELECT balance, version FROM account WHERE id = 1")
        .fetch_one(pool)
        .await?;
    // Computed outside any lock: another writer may change the row meanwhile.
    let new = balance + amount;
    let done =
        sqlx::query("UPDATE account SET balance = $1, version = version + 1 WHERE id = 1 AND version = $2")
            .bind(new)
            .bind(version)
            .execute(pool)
            .await?;
    Ok(Attempt::from_rows(done.rows_affected(), new))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_writers_lose_no_update() {
    let pool = pool().await;
    let retry = OptimisticRetry::new("deposits").attempts(1_000);
    let writers: Vec<_> = (0..50)
        .map(|_| {
            let (pool, retry) = (pool.clone(), retry.clone());
            tokio::spawn(async move {
                let mut conflicts = 0u32;
                for _ in 0..10 {
                    retry
                        .run(|n| {
                            conflicts += u32::from(n > 1);
                            deposit(&pool, 1)
                        })
                        .await
                        .unwrap();
                }
                conflicts
            })
        })
        .collect();
    let mut conflicts = 0;
    for w in writers {
        conflicts += w.await.unwrap();
    }
    let (balance, version): (i64, i64) = sqlx::query_as("SELECT balance, version FROM account WHERE id = 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        (balance, version),
        (500, 500),
        "an update was lost ({conflicts} conflicts retried)"
    );
}

#[tokio::test]
async fn a_conflict_every_time_gives_up_after_the_bound() {
    let retry = OptimisticRetry::new("always").attempts(3);
    let mut tries = 0;
    let result = retry
        .run(|_| {
            tries += 1;
            async { Ok::<Attempt<()>, sqlx::Error>(Attempt::Conflict) }
        })
        .await;
    assert!(matches!(result, Err(OptimisticError::Exhausted { attempts: 3 })));
    assert_eq!(tries, 3);
}
