//! Idempotency keys with Stripe's semantics.
//!
//! A client sends a key with a request it may have to retry (a payment, an
//! order). The first request with a key runs and its answer is stored; a repeat
//! with the same key and the same request (by fingerprint) gets the stored answer
//! without running again; the same key with a different request is refused
//! ([`Outcome::Mismatch`], a 422); a repeat while the first is still running is
//! refused too ([`Outcome::Running`], a 409), or, with [`Concurrent::Wait`], waits
//! for the first to finish and gets its answer. Keys expire after a TTL.
//!
//! An answer is not stored when the handler fails (an error, a panic, the caller
//! giving up) or answers with a server error (5xx, unless
//! [`IdempotencyConfig::store_server_errors`]): the key is released and a retry
//! runs again. A claim whose process died is released when its `lock` runs out.
//!
//! Two stores: [`PgStore`] (a table, the database's clock) and [`RedisStore`] (one
//! key per idempotency key, an atomic script per step). [`IdempotencyLayer`] puts it
//! in front of an HTTP service.

mod any;
mod layer;
mod postgres;
mod redis;

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest, Sha256};

pub use any::{AnyStore, StoreKind, store_kind};
pub use layer::{IdempotencyLayer, IdempotencyService, IdempotentBody};
pub use postgres::PgStore;
pub use redis::RedisStore;

/// A stored answer: status, headers and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    /// The HTTP status (or any code the caller gives meaning to).
    pub status: u16,
    /// Header names and values.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body.
    pub body: Bytes,
}

impl Stored {
    /// Status, headers and body as one byte string (status, header lines, a blank
    /// line, the body).
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.body.len());
        out.extend_from_slice(&self.status.to_be_bytes());
        for (name, value) in &self.headers {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.body);
        out
    }

    /// The inverse of [`encode`](Self::encode); `None` for bytes it did not make.
    pub(crate) fn decode(bytes: &[u8]) -> Option<Stored> {
        let status = u16::from_be_bytes(bytes.get(..2)?.try_into().ok()?);
        let mut rest = &bytes[2..];
        let mut headers = Vec::new();
        loop {
            let end = rest.windows(2).position(|w| w == b"\r\n")?;
            let line = &rest[..end];
            rest = &rest[end + 2..];
            if line.is_empty() {
                break;
            }
            let colon = line.windows(2).position(|w| w == b": ")?;
            let name = std::str::from_utf8(&line[..colon]).ok()?.to_string();
            headers.push((name, line[colon + 2..].to_vec()));
        }
        Some(Stored {
            status,
            headers,
            body: Bytes::copy_from_slice(rest),
        })
    }
}

impl Stored {
    /// An HTTP answer as stored: its status, its headers but those of the
    /// connection and the body's framing, its body.
    pub fn of(head: &http::response::Parts, body: Bytes) -> Stored {
        let headers = head
            .headers
            .iter()
            .filter(|(name, _)| {
                !matches!(
                    name.as_str(),
                    "connection" | "transfer-encoding" | "content-length" | "keep-alive"
                )
            })
            .map(|(name, value)| (name.as_str().to_string(), value.as_bytes().to_vec()))
            .collect();
        Stored {
            status: head.status.as_u16(),
            headers,
            body,
        }
    }

    /// The stored answer as an HTTP answer, marked `idempotent-replayed: true`
    /// when it is a `replayed` one (headers that no longer parse are left out).
    pub fn into_response(self, replayed: bool) -> http::Response<http_body_util::Full<Bytes>> {
        use http::{HeaderName, HeaderValue};
        let mut resp = http::Response::new(http_body_util::Full::new(self.body));
        *resp.status_mut() =
            http::StatusCode::from_u16(self.status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
        for (name, value) in self.headers {
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_bytes(&value),
            ) {
                resp.headers_mut().append(n, v);
            }
        }
        if replayed {
            resp.headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
        }
        resp
    }
}

/// The key a header carries, if it is 1 to 255 visible ASCII characters.
pub fn valid_key(v: &http::HeaderValue) -> Option<String> {
    let bytes = v.as_bytes();
    let ok = (1..=255).contains(&bytes.len()) && bytes.iter().all(|b| b.is_ascii_graphic());
    ok.then(|| String::from_utf8_lossy(bytes).into_owned())
}

/// A duration in whole milliseconds, at least one (what both stores' expiries take).
pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1)
}

/// What a store says when a request with a key arrives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// This request runs; the token proves it when storing or releasing.
    Acquired {
        /// The claim's token.
        token: u64,
    },
    /// The key's request ran already: its answer.
    Done(Stored),
    /// The key's request is running now.
    Running,
    /// The key was used with a different request.
    Mismatch,
}

/// A store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// PostgreSQL.
    #[error("idempotency store (PostgreSQL): {0}")]
    Postgres(#[from] sqlx::Error),
    /// Redis.
    #[error("idempotency store (Redis): {0}")]
    Redis(#[from] ::redis::RedisError),
    /// A stored answer that does not decode.
    #[error("idempotency store: a stored answer does not decode")]
    Corrupt,
    /// The store did not answer in time.
    #[error("idempotency store: no answer in time")]
    Timeout,
    /// The store's URL names no store.
    #[error("idempotency store URL {0}")]
    Url(String),
}

/// Where keys and answers are kept: a handle, cheap to clone.
pub trait IdempotencyStore: Clone + Send + Sync + 'static {
    /// Claims `key` in `scope` for a request of `fingerprint` for `lock` (after
    /// which a claim nobody completed may be taken again), or says why not.
    fn begin(
        &self,
        scope: &str,
        key: &str,
        fingerprint: &[u8; 32],
        lock: Duration,
    ) -> impl Future<Output = Result<Claim, StoreError>> + Send;

    /// Stores the answer of the claim `token` for `ttl`.
    fn complete(
        &self,
        scope: &str,
        key: &str,
        token: u64,
        answer: &Stored,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Gives the claim `token` up: the next request with the key runs.
    fn release(
        &self,
        scope: &str,
        key: &str,
        token: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// What a repeat does while the first request with its key is running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Concurrent {
    /// Refused at once ([`Outcome::Running`], a 409), as Stripe does.
    Conflict,
    /// Waits up to this long for the first to finish and gets its answer (or, after
    /// it, [`Outcome::Running`]).
    Wait(Duration),
}

/// How keys are kept.
#[derive(Clone, Debug)]
pub struct IdempotencyConfig {
    /// Keys of different scopes (services, endpoints) never meet.
    pub scope: String,
    /// How long an answer is kept.
    pub ttl: Duration,
    /// How long a running request's claim lasts if it is never completed (its
    /// process died): longer than the handler's longest run.
    pub lock: Duration,
    /// Repeats while the first runs.
    pub concurrent: Concurrent,
    /// Whether a 5xx answer is stored (by default it is not, so a retry runs again).
    pub store_server_errors: bool,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        IdempotencyConfig {
            scope: "default".into(),
            ttl: Duration::from_secs(24 * 3600),
            lock: Duration::from_secs(60),
            concurrent: Concurrent::Conflict,
            store_server_errors: false,
        }
    }
}

/// What came of a request with a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It ran now: its answer.
    Fresh(Stored),
    /// It had run: the stored answer.
    Replayed(Stored),
    /// The first request with the key is still running (a 409).
    Running,
    /// The key was used with a different request (a 422).
    Mismatch,
}

/// The fingerprint of a request: a SHA-256 over its parts, each length-prefixed.
pub fn fingerprint<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    h.finalize().into()
}

/// Idempotency keys over a store.
#[derive(Debug)]
pub struct Idempotency<S> {
    store: S,
    config: IdempotencyConfig,
    replays: metrics::Counter,
    conflicts: metrics::Counter,
    mismatches: metrics::Counter,
    store_failures: metrics::Counter,
    waits: metrics::Counter,
}

impl<S: IdempotencyStore> Clone for Idempotency<S> {
    fn clone(&self) -> Self {
        Idempotency {
            store: self.store.clone(),
            config: self.config.clone(),
            replays: self.replays.clone(),
            conflicts: self.conflicts.clone(),
            mismatches: self.mismatches.clone(),
            store_failures: self.store_failures.clone(),
            waits: self.waits.clone(),
        }
    }
}

impl<S: IdempotencyStore> Idempotency<S> {
    /// Keys in `store` kept as `config` says.
    pub fn new(store: S, config: IdempotencyConfig) -> Self {
        let outcome = |o: &'static str| metrics::counter!("palisade_idempotency_total", "scope" => config.scope.clone(), "outcome" => o);
        Idempotency {
            replays: outcome("replayed"),
            conflicts: outcome("running"),
            mismatches: outcome("mismatch"),
            store_failures: outcome("not_kept"),
            waits: outcome("waited"),
            store,
            config,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &IdempotencyConfig {
        &self.config
    }

    /// Runs `handler` for the request `fingerprint` unless `key` has an answer or
    /// a running request already. A handler's error releases the key and is
    /// returned; so does the future being dropped before the handler ends. Once
    /// the handler has run, its answer is returned even when the store then fails
    /// to keep it (logged, and counted as `outcome="not_kept"`).
    pub async fn run<F, Fut, E>(
        &self,
        key: &str,
        fingerprint: &[u8; 32],
        handler: F,
    ) -> Result<Outcome, RunError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Stored, E>>,
    {
        let c = &self.config;
        let token = match self.claim(key, fingerprint).await? {
            Claim::Acquired { token } => token,
            Claim::Done(answer) => {
                self.replays.increment(1);
                return Ok(Outcome::Replayed(answer));
            }
            Claim::Running => {
                self.conflicts.increment(1);
                return Ok(Outcome::Running);
            }
            Claim::Mismatch => {
                self.mismatches.increment(1);
                return Ok(Outcome::Mismatch);
            }
        };
        let mut guard = Release {
            store: self.store.clone(),
            scope: c.scope.clone(),
            key: key.to_string(),
            token,
            armed: true,
        };
        let result = handler().await;
        guard.armed = false;
        // The handler has run: a store failing now costs the key, never the answer
        // (a claim left behind frees itself when its lock runs out).
        let answer = match result {
            Ok(answer) => answer,
            Err(e) => {
                self.settle(key, self.store.release(&c.scope, key, token).await);
                return Err(RunError::Handler(e));
            }
        };
        let kept = if answer.status >= 500 && !c.store_server_errors {
            self.store.release(&c.scope, key, token).await
        } else {
            self.store.complete(&c.scope, key, token, &answer, c.ttl).await
        };
        self.settle(key, kept);
        Ok(Outcome::Fresh(answer))
    }

    /// Logs and counts a store failure after the handler ran.
    fn settle(&self, key: &str, result: Result<(), StoreError>) {
        if let Err(e) = result {
            self.store_failures.increment(1);
            tracing::warn!(scope = %self.config.scope, key, error = %e, "idempotency: the answer could not be kept; the key frees itself when its lock runs out");
        }
    }

    /// The store's claim, waiting for a running request if so configured.
    async fn claim(&self, key: &str, fingerprint: &[u8; 32]) -> Result<Claim, StoreError> {
        let c = &self.config;
        let claim = self.store.begin(&c.scope, key, fingerprint, c.lock).await?;
        let Concurrent::Wait(patience) = c.concurrent else {
            return Ok(claim);
        };
        if claim != Claim::Running {
            return Ok(claim);
        }
        self.waits.increment(1);
        let deadline = tokio::time::Instant::now() + patience;
        let mut pause = Duration::from_millis(1);
        loop {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(Claim::Running);
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(Duration::from_millis(50));
            match self.store.begin(&c.scope, key, fingerprint, c.lock).await? {
                Claim::Running => continue,
                other => return Ok(other),
            }
        }
    }
}

/// Why [`Idempotency::run`] returned no outcome.
#[derive(Debug, thiserror::Error)]
pub enum RunError<E> {
    /// The handler failed (the key was released).
    #[error("handler failed: {0}")]
    Handler(E),
    /// The store failed before the handler ran: it did not run.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Releases a claim whose handler never finished (an error or a drop).
struct Release<S: IdempotencyStore + Clone> {
    store: S,
    scope: String,
    key: String,
    token: u64,
    armed: bool,
}

impl<S: IdempotencyStore + Clone> Drop for Release<S> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // Not awaitable here: the release runs on a task of its own. (Without a
        // runtime, the claim frees itself when its lock runs out.)
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (store, scope, key, token) = (
            self.store.clone(),
            std::mem::take(&mut self.scope),
            std::mem::take(&mut self.key),
            self.token,
        );
        handle.spawn(async move {
            if let Err(e) = store.release(&scope, &key, token).await {
                tracing::warn!(scope = %scope, error = %e, "idempotency: releasing an unfinished claim failed; it frees itself when its lock runs out");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_round_trip_through_their_encoding() {
        let a = Stored {
            status: 201,
            headers: vec![
                ("content-type".into(), b"application/json".to_vec()),
                ("x-id".into(), b"7".to_vec()),
            ],
            body: Bytes::from_static(b"{\"id\":7}\r\n\r\nrest"),
        };
        assert_eq!(Stored::decode(&a.encode()), Some(a));
        assert_eq!(Stored::decode(b"x"), None);
    }

    #[test]
    fn fingerprints_separate_their_parts() {
        assert_ne!(fingerprint([&b"ab"[..], b"c"]), fingerprint([&b"a"[..], b"bc"]));
        assert_eq!(fingerprint([&b"a"[..]]), fingerprint([&b"a"[..]]));
    }
}
