//! Sharding against two real PostgreSQL servers (scripts/services.sh
//! `start_postgres_data`). One test stops and restarts a shard server, so nextest
//! runs this file's tests one at a time (.config/nextest.toml, group `shards`).

mod support;

use std::collections::HashMap;

use palisade_core::config::Dur;
use palisade_data::{DataError, Gather, Placement, ShardConfig, Shards, ShardsConfig};
use support::*;

/// A sharded set over a fresh database on each shard server, with a `kv` table.
async fn sharded(placement: Placement) -> (ShardsConfig, Vec<String>) {
    let mut urls = Vec::new();
    for server in shard_urls() {
        let db = fresh_db(&server, "shard").await;
        exec(&db, "CREATE TABLE kv (k text PRIMARY KEY, v int NOT NULL)").await;
        urls.push(db);
    }
    let config = ShardsConfig {
        name: unique("shards"),
        placement,
        shards: vec![
            ShardConfig {
                name: "a".into(),
                url: urls[0].clone(),
            },
            ShardConfig {
                name: "b".into(),
                url: urls[1].clone(),
            },
        ],
        ..ShardsConfig::default()
    };
    (config, urls)
}

async fn put(shards: &Shards, key: &str, v: i32) -> Result<(), DataError> {
    shards
        .write(key.as_bytes(), |conn| {
            let k = key.to_string();
            Box::pin(async move {
                sqlx::query("INSERT INTO kv VALUES ($1, $2) ON CONFLICT (k) DO UPDATE SET v = excluded.v")
                    .bind(k)
                    .bind(v)
                    .execute(&mut *conn)
                    .await
                    .map(drop)
            })
        })
        .await
}

#[tokio::test]
async fn every_key_lives_on_its_shard_and_scatter_gathers_them_all() {
    for placement in [Placement::Ring, Placement::Jump, Placement::Rendezvous] {
        let (config, urls) = sharded(placement).await;
        let shards = Shards::connect(&config).await.unwrap();
        for i in 0..500 {
            put(&shards, &format!("user:{i}"), i).await.unwrap();
        }
        // Read each server directly: every row is where the map says.
        for (name, url) in ["a", "b"].iter().zip(&urls) {
            let pool = sqlx::PgPool::connect(url).await.unwrap();
            let keys: Vec<String> = sqlx::query_scalar("SELECT k FROM kv")
                .fetch_all(&pool)
                .await
                .unwrap();
            assert!(
                keys.len() > 150,
                "{placement:?}: only {} keys on {name}",
                keys.len()
            );
            for k in keys {
                assert_eq!(shards.shard_for(k.as_bytes()), *name, "{placement:?}: {k}");
            }
        }
        let counts = shards
            .scatter(Gather::All, |_, pool| async move {
                sqlx::query_scalar::<_, i64>("SELECT count(*) FROM kv")
                    .fetch_one(&pool)
                    .await
            })
            .await
            .unwrap();
        let total: i64 = counts.answers.iter().map(|(_, n)| n).sum();
        assert_eq!(total, 500);
        assert_eq!(
            counts.answers.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
    }
}

#[tokio::test]
async fn a_query_error_is_the_query_s_and_leaves_the_shard_up() {
    let (config, _) = sharded(Placement::Ring).await;
    let shards = Shards::connect(&config).await.unwrap();
    for _ in 0..10 {
        match shards
            .run(b"k", |pool| async move {
                sqlx::query("SELECT * FROM missing").execute(&pool).await
            })
            .await
        {
            Err(DataError::Query(_)) => {}
            other => panic!("expected the query's error, got {other:?}"),
        }
    }
    put(&shards, "k", 1).await.unwrap();
}

#[tokio::test]
async fn a_shard_down_fails_its_keys_fast_by_name_while_the_other_serves() {
    let (mut config, _) = sharded(Placement::Ring).await;
    config.timeout = Dur(std::time::Duration::from_secs(5));
    let shards = Shards::connect(&config).await.unwrap();
    let keys: Vec<String> = (0..200).map(|i| format!("order:{i}")).collect();
    let mut by_shard: HashMap<String, Vec<&String>> = HashMap::new();
    for k in &keys {
        by_shard
            .entry(shards.shard_for(k.as_bytes()))
            .or_default()
            .push(k);
    }
    let ctl = &shard_ctls()[1];
    pg_ctl(ctl, "-m immediate stop").await;

    let mut reasons = Vec::new();
    for k in &by_shard["b"] {
        match put(&shards, k, 1).await {
            Err(DataError::ShardUnavailable { shard, reason }) => {
                assert_eq!(shard, "b");
                reasons.push(reason);
            }
            other => panic!("{k} on the stopped shard: {other:?}"),
        }
    }
    // Three failures open the breaker: the rest are refused without a connection.
    assert!(
        reasons[..3].iter().all(|r| !r.contains("breaker")),
        "{:?}",
        &reasons[..3]
    );
    assert!(reasons[3..].iter().all(|r| r.contains("breaker")), "{reasons:?}");
    for k in &by_shard["a"] {
        put(&shards, k, 1).await.unwrap();
    }
    let count = |_: &str, pool: sqlx::PgPool| async move {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM kv")
            .fetch_one(&pool)
            .await
    };
    match shards.scatter(Gather::All, count).await {
        Err(DataError::Partial {
            failed: 1, total: 2, ..
        }) => {}
        other => panic!("expected a partial failure, got {other:?}"),
    }
    let partial = shards.scatter(Gather::Partial, count).await.unwrap();
    assert_eq!(partial.answers.len(), 1);
    assert_eq!(partial.answers[0], ("a".to_string(), by_shard["a"].len() as i64));
    assert_eq!(partial.failures[0].0, "b");
    assert!(shards.scatter(Gather::AtLeast(1), count).await.is_ok());
    assert!(shards.scatter(Gather::AtLeast(2), count).await.is_err());
    pg_ctl(ctl, "start").await;
}

#[tokio::test]
async fn a_bad_shard_set_is_refused_naming_every_field() {
    let mut config = ShardsConfig {
        placement: Placement::Ranges,
        shards: vec![
            ShardConfig {
                name: "a".into(),
                url: "postgres://u@h1/db".into(),
            },
            ShardConfig {
                name: "a".into(),
                url: "mysql://u@h2/db".into(),
            },
        ],
        ..ShardsConfig::default()
    };
    config.timeout = Dur(std::time::Duration::ZERO);
    match Shards::connect(&config).await {
        Err(DataError::Config(e)) => assert_eq!(
            e.fields(),
            ["shards[1].url", "timeout", "shards[1].name", "ranges"]
        ),
        other => panic!("expected config errors, got {other:?}"),
    }
}
