//! Database helpers every crate on sqlx shares (feature `sqlx`): transactions
//! that a cancelled caller cannot leave open.

/// Begins a transaction on `pool` so that cancelling the caller (a client gone,
/// a timeout, an aborted task) cannot leave it open.
///
/// sqlx's `Pool::begin` is not cancel-safe on PostgreSQL (sqlx 0.9.0,
/// transact-rs/sqlx#4393): a future dropped during the `BEGIN` round trip returns
/// the connection to the pool inside a transaction nothing will end, and the next
/// borrower's writes run in it and are lost when the connection closes. Here the
/// `BEGIN` runs in a task of its own, which finishes it whatever happens to the
/// caller: the transaction is handed over, or, once begun, rolled back by its
/// drop. Statements after it are cancel-safe as sqlx makes them (a dropped
/// transaction queues its rollback).
pub async fn begin<DB: sqlx::Database>(
    pool: &sqlx::Pool<DB>,
) -> Result<sqlx::Transaction<'static, DB>, sqlx::Error> {
    let pool = pool.clone();
    match tokio::spawn(async move { pool.begin().await }).await {
        Ok(tx) => tx,
        Err(e) => Err(sqlx::Error::Protocol(format!(
            "the task beginning a transaction failed: {e}"
        ))),
    }
}
