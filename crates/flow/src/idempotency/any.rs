//! Either store, chosen by a URL at run time, every call bounded by a timeout: what
//! a program configured by a file (the gateway) holds.

use std::time::Duration;

use sqlx::postgres::PgPoolOptions;

use super::{Claim, IdempotencyStore, PgStore, RedisStore, StoreError, Stored};

/// [`PgStore`] or [`RedisStore`], picked by the URL's scheme, each call given up
/// after a timeout ([`StoreError::Timeout`]) so a hung store costs a bounded wait.
#[derive(Clone, Debug)]
pub struct AnyStore {
    backend: Backend,
    timeout: Duration,
}

#[derive(Clone, Debug)]
enum Backend {
    Postgres(PgStore),
    Redis(RedisStore),
}

/// The stores a URL can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    /// `postgres://` or `postgresql://`.
    Postgres,
    /// `redis://` or `rediss://`.
    Redis,
}

impl StoreKind {
    /// Its name, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            StoreKind::Postgres => "postgres",
            StoreKind::Redis => "redis",
        }
    }
}

/// The kind of store a URL names, or why it names none.
pub fn store_kind(url: &str) -> Result<StoreKind, String> {
    match url.split_once("://").map(|(scheme, _)| scheme) {
        Some("postgres" | "postgresql") => Ok(StoreKind::Postgres),
        Some("redis" | "rediss") => Ok(StoreKind::Redis),
        _ => Err("must be a postgres://... or redis://... URL".into()),
    }
}

impl AnyStore {
    /// Connects to the store at `url` (`postgres://` or `redis://`), Redis keys
    /// under `prefix`, every call bounded by `timeout`.
    pub async fn connect(url: &str, prefix: &str, timeout: Duration) -> Result<Self, StoreError> {
        let connect = async {
            let backend = match store_kind(url).map_err(StoreError::Url)? {
                StoreKind::Postgres => {
                    let pool = PgPoolOptions::new()
                        .max_connections(16)
                        .acquire_timeout(timeout)
                        .connect(url)
                        .await?;
                    Backend::Postgres(PgStore::new(pool).await?)
                }
                StoreKind::Redis => Backend::Redis(RedisStore::connect(url, Some(prefix)).await?),
            };
            Ok::<_, StoreError>(backend)
        };
        let backend = tokio::time::timeout(timeout.max(Duration::from_secs(5)), connect)
            .await
            .map_err(|_| StoreError::Timeout)??;
        Ok(AnyStore { backend, timeout })
    }

    /// Which store it is.
    pub fn kind(&self) -> StoreKind {
        match self.backend {
            Backend::Postgres(_) => StoreKind::Postgres,
            Backend::Redis(_) => StoreKind::Redis,
        }
    }

    async fn timed<T>(&self, call: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| StoreError::Timeout)?
    }
}

impl IdempotencyStore for AnyStore {
    async fn begin(
        &self,
        scope: &str,
        key: &str,
        fingerprint: &[u8; 32],
        lock: Duration,
    ) -> Result<Claim, StoreError> {
        match &self.backend {
            Backend::Postgres(s) => self.timed(s.begin(scope, key, fingerprint, lock)).await,
            Backend::Redis(s) => self.timed(s.begin(scope, key, fingerprint, lock)).await,
        }
    }

    async fn complete(
        &self,
        scope: &str,
        key: &str,
        token: u64,
        answer: &Stored,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Postgres(s) => self.timed(s.complete(scope, key, token, answer, ttl)).await,
            Backend::Redis(s) => self.timed(s.complete(scope, key, token, answer, ttl)).await,
        }
    }

    async fn release(&self, scope: &str, key: &str, token: u64) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Postgres(s) => self.timed(s.release(scope, key, token)).await,
            Backend::Redis(s) => self.timed(s.release(scope, key, token)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{StoreKind, store_kind};

    #[test]
    fn urls_name_their_store() {
        assert_eq!(store_kind("postgres://u@h/db"), Ok(StoreKind::Postgres));
        assert_eq!(store_kind("postgresql://h/db"), Ok(StoreKind::Postgres));
        assert_eq!(store_kind("redis://127.0.0.1:6379/0"), Ok(StoreKind::Redis));
        assert_eq!(store_kind("rediss://h"), Ok(StoreKind::Redis));
        assert!(store_kind("mysql://h").is_err());
        assert!(store_kind("127.0.0.1:6379").is_err());
    }
}
