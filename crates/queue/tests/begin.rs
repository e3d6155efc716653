//! `palisade_queue::begin` on a real PostgreSQL: a caller cancelled while the
//! `BEGIN` is on its way leaves no transaction open on the pooled connection. (A
//! bare `Pool::begin` does, in sqlx 0.9.0: the next borrower's writes run inside
//! it, unseen by anyone else, and are lost with the connection.)

mod support;

use std::future::Future;
use std::task::Poll;

use sqlx::postgres::PgPoolOptions;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_begin_cancelled_on_its_way_leaves_no_transaction_open() {
    let url = support::postgres_admin_url();
    // One connection: every borrower gets the one the cancelled caller had.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap();
    let other = PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap();
    let table = palisade_testkit::unique("begin_probe");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE TABLE {table} (n int)")))
        .execute(&pool)
        .await
        .unwrap();
    // Twenty callers cancelled with the BEGIN on its way, each followed by a
    // write that must be committed.
    let (mut cancelled, mut n) = (0i64, 0i64);
    while cancelled < 20 {
        n += 1;
        assert!(
            n <= 200,
            "the begin finished within one poll {} times",
            n - 1 - cancelled
        );
        // Polled once (the BEGIN goes out), then dropped. On a busy machine the
        // task it runs in can finish first: nothing was cancelled mid-way, and
        // the round does not count.
        let mut begin = Box::pin(palisade_queue::begin(&pool));
        let first = std::future::poll_fn(|cx| Poll::Ready(begin.as_mut().poll(cx).map(drop))).await;
        cancelled += i64::from(first.is_pending());
        drop(begin);
        // The next borrower's write is committed: another connection sees it.
        sqlx::query(sqlx::AssertSqlSafe(format!("INSERT INTO {table} VALUES ({n})")))
            .execute(&pool)
            .await
            .unwrap();
        let seen: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
            .fetch_one(&other)
            .await
            .unwrap();
        assert_eq!(seen, n, "a write ran inside the cancelled caller's transaction");
    }
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {table}")))
        .execute(&other)
        .await
        .unwrap();
}
