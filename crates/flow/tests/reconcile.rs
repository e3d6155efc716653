//! Reconciliation of a Redis copy against the PostgreSQL table it caches, on the
//! real servers, directly and as a queue job.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use palisade_flow::reconcile::{BoxError, Difference, ReconcileJob, Reconciliation, reconcile};
use palisade_queue::{JobState, NewJob, Queue, QueueConfig, Runner, RunnerConfig};
use redis::AsyncCommands;
use sqlx::PgPool;
use support::{env, fresh_pool, unique};

/// Stock counts: the table is the truth, a Redis hash the copy; repairs make the
/// copy the truth's.
struct Stock {
    pool: PgPool,
    redis: redis::aio::MultiplexedConnection,
    hash: String,
}

impl Reconciliation for Stock {
    const NAME: &'static str = "stock";
    type Key = String;
    type Value = i64;

    async fn truth(&self) -> Result<BTreeMap<String, i64>, BoxError> {
        let rows: Vec<(String, i64)> = sqlx::query_as("SELECT product, qty FROM stock")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().collect())
    }

    async fn copy(&self) -> Result<BTreeMap<String, i64>, BoxError> {
        let all: BTreeMap<String, i64> = self.redis.clone().hgetall(&self.hash).await?;
        Ok(all)
    }

    async fn repair(&self, d: &Difference<String, i64>) -> Result<(), BoxError> {
        let mut redis = self.redis.clone();
        match d {
            Difference::Missing { key, truth } | Difference::Differs { key, truth, .. } => {
                let _: () = redis.hset(&self.hash, key, truth).await?;
            }
            Difference::Extra { key, .. } => {
                let _: () = redis.hdel(&self.hash, key).await?;
            }
        }
        Ok(())
    }
}

async fn stock() -> Stock {
    let pool = fresh_pool("reconcile", 5).await;
    sqlx::query("CREATE TABLE stock (product text PRIMARY KEY, qty bigint NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO stock VALUES ('a', 10), ('b', 20), ('c', 30), ('d', 40)")
        .execute(&pool)
        .await
        .unwrap();
    let redis = redis::Client::open(env("PALISADE_TEST_REDIS_URL"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    Stock {
        pool,
        redis,
        hash: unique("stock"),
    }
}

#[tokio::test]
async fn differences_are_found_by_kind_and_repaired_by_the_policy() {
    let s = stock().await;
    let mut r = s.redis.clone();
    let _: () = r
        .hset_multiple(&s.hash, &[("a", 10), ("b", 21), ("d", 40), ("z", 5)])
        .await
        .unwrap();
    let report = reconcile(&s).await.unwrap();
    assert_eq!(report.compared, 5);
    assert_eq!(
        report.differences,
        [
            Difference::Differs {
                key: "b".into(),
                truth: 20,
                copy: 21
            },
            Difference::Missing {
                key: "c".into(),
                truth: 30
            },
            Difference::Extra {
                key: "z".into(),
                copy: 5
            },
        ]
    );
    assert_eq!(report.repaired, 3);
    assert!(
        reconcile(&s).await.unwrap().differences.is_empty(),
        "the repairs did not hold"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconciliation_runs_as_a_queue_job() {
    let s = stock().await;
    let (pool, mut r, hash) = (s.pool.clone(), s.redis.clone(), s.hash.clone());
    let _: () = r.hset(&hash, "a", 999).await.unwrap();
    let queue = Queue::postgres(pool.clone()).await.unwrap();
    let job = queue
        .enqueue(NewJob::new("stock", &serde_json::Value::Null).unwrap())
        .await
        .unwrap();
    let config = RunnerConfig {
        queues: vec![QueueConfig::new("default", 1)],
        poll_interval: Duration::from_millis(20),
        ..RunnerConfig::default()
    };
    let runner = Runner::new(queue.clone(), config)
        .register(ReconcileJob(s))
        .start()
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while queue.job(job.id).await.unwrap().unwrap().state != JobState::Completed {
        assert!(
            std::time::Instant::now() < deadline,
            "the reconciliation job never completed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    runner.shutdown(Duration::from_secs(5)).await;
    let copy: BTreeMap<String, i64> = r.hgetall(&hash).await.unwrap();
    assert_eq!(
        copy,
        BTreeMap::from([
            ("a".into(), 10),
            ("b".into(), 20),
            ("c".into(), 30),
            ("d".into(), 40)
        ])
    );
}
