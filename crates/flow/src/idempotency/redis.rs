//! Idempotency keys in Redis: one key per idempotency key, each step one script.
//!
//! The value is `R` + fingerprint + token while the request runs (expiring after
//! the lock), `D` + fingerprint + the answer once it is stored (expiring after
//! the TTL).

use std::time::Duration;

use redis::Script;
use redis::aio::ConnectionManager;

use super::{Claim, IdempotencyStore, StoreError, Stored, millis};

const BEGIN: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], 'R' .. ARGV[1] .. ARGV[2], 'PX', ARGV[3])
  return false
end
return v
";

const COMPLETE: &str = r"
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, 1) == 'R' and string.sub(v, 34) == ARGV[1] then
  redis.call('SET', KEYS[1], 'D' .. string.sub(v, 2, 33) .. ARGV[2], 'PX', ARGV[3])
end
return 1
";

const RELEASE: &str = r"
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, 1) == 'R' and string.sub(v, 34) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
return 1
";

/// Keys and answers in Redis under a prefix.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    scripts: [Script; 3],
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// The store on the Redis at `url`, its keys under `prefix`
    /// (`palisade:idempotency:` when `None`). Reconnects by itself.
    pub async fn connect(url: &str, prefix: Option<&str>) -> Result<Self, StoreError> {
        let client = redis::Client::open(url)?;
        let conn = ConnectionManager::new(client).await?;
        Ok(RedisStore {
            conn,
            prefix: prefix.unwrap_or("palisade:idempotency:").to_string(),
            scripts: [Script::new(BEGIN), Script::new(COMPLETE), Script::new(RELEASE)],
        })
    }

    fn key(&self, scope: &str, key: &str) -> String {
        format!("{}{scope}:{key}", self.prefix)
    }
}

impl IdempotencyStore for RedisStore {
    async fn begin(
        &self,
        scope: &str,
        key: &str,
        fingerprint: &[u8; 32],
        lock: Duration,
    ) -> Result<Claim, StoreError> {
        let token = fastrand::u64(1..);
        let value: Option<Vec<u8>> = self.scripts[0]
            .key(self.key(scope, key))
            .arg(&fingerprint[..])
            .arg(token.to_be_bytes().as_slice())
            .arg(millis(lock))
            .invoke_async(&mut self.conn.clone())
            .await?;
        let Some(v) = value else {
            return Ok(Claim::Acquired { token });
        };
        let (kind, rest) = v.split_first().ok_or(StoreError::Corrupt)?;
        let (fp, payload) = rest.split_at_checked(32).ok_or(StoreError::Corrupt)?;
        if fp != fingerprint {
            return Ok(Claim::Mismatch);
        }
        match kind {
            b'R' => Ok(Claim::Running),
            b'D' => Stored::decode(payload)
                .map(Claim::Done)
                .ok_or(StoreError::Corrupt),
            _ => Err(StoreError::Corrupt),
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
        let _: i64 = self.scripts[1]
            .key(self.key(scope, key))
            .arg(token.to_be_bytes().as_slice())
            .arg(answer.encode())
            .arg(millis(ttl))
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    async fn release(&self, scope: &str, key: &str, token: u64) -> Result<(), StoreError> {
        let _: i64 = self.scripts[2]
            .key(self.key(scope, key))
            .arg(token.to_be_bytes().as_slice())
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }
}
