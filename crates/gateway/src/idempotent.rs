//! Idempotency keys on routes (`idempotency = { ... }`), kept in the store of
//! `[gateway.idempotency]` (PostgreSQL or Redis, `palisade_flow::idempotency`).
//! The store is connected in the background, again and again until it answers:
//! until then, and whenever it fails, a request with a key does as its route's
//! `when_store_down` says. The request path is `proxy::idempotent`.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::{HeaderName, Method, Request};
use palisade_flow::idempotency::{AnyStore, Concurrent, Idempotency, IdempotencyConfig as Keys};
use tokio::sync::watch;

use crate::config::{
    ConfigError, IdempotencyConfig, IdempotencySection, RouteConfig, StoreDown, header_name,
};

/// The gateway's store of idempotency keys, once connected (one for the
/// gateway's life, handed from runtime to runtime by reloads).
#[derive(Debug, Default)]
pub struct IdempotencySlot {
    store: ArcSwapOption<AnyStore>,
    connected: tokio::sync::Notify,
}

impl IdempotencySlot {
    /// The store, if connected.
    pub fn get(&self) -> Option<Arc<AnyStore>> {
        self.store.load_full()
    }

    /// Waits until the store is connected.
    pub async fn connected(&self) {
        loop {
            let notified = self.connected.notified();
            if self.store.load().is_some() {
                return;
            }
            notified.await;
        }
    }
}

/// Connects the store `section` names (again, with a growing pause, until it
/// answers or `stop`) and puts it in `slot`.
pub(crate) async fn connect(
    slot: Arc<IdempotencySlot>,
    section: IdempotencySection,
    mut stop: watch::Receiver<bool>,
) {
    let mut failures = 0u32;
    loop {
        let attempt = tokio::select! {
            c = AnyStore::connect(&section.store, &section.prefix, section.timeout.get()) => c,
            _ = stop.changed() => return,
        };
        match attempt {
            Ok(store) => {
                tracing::info!(
                    store = store.kind().as_str(),
                    "the gateway's idempotency store is connected"
                );
                slot.store.store(Some(Arc::new(store)));
                slot.connected.notify_waiters();
                return;
            }
            Err(e) => {
                failures += 1;
                metrics::counter!("palisade_idempotency_connect_failures_total").increment(1);
                tracing::warn!(error = %e, "the gateway's idempotency store is unavailable; idempotent routes do as their when_store_down says until it is back");
                let wait = Duration::from_millis(250u64 << failures.min(6));
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }
}

/// A route's idempotency keys, compiled.
#[derive(Debug)]
pub struct RouteIdempotency {
    /// The header carrying the key.
    pub header: HeaderName,
    /// The methods keys apply to.
    pub methods: Vec<Method>,
    /// Whether a request of those methods needs a key.
    pub required: bool,
    /// The largest request body (within `gateway.max_body_bytes`), and the
    /// largest answer body kept.
    pub max_body: usize,
    /// What a request does while the store is down.
    pub when_store_down: StoreDown,
    keys: Keys,
    bound: OnceLock<Idempotency<AnyStore>>,
}

impl RouteIdempotency {
    /// Compiles route `r`'s table `c` (`at`: its path in the file), its problems
    /// reported to `p`.
    pub(crate) fn compile(
        c: &IdempotencyConfig,
        r: &RouteConfig,
        at: &str,
        p: &mut Vec<ConfigError>,
    ) -> Option<RouteIdempotency> {
        let before = p.len();
        let header = header_name(&c.header, &format!("{at}.header"), p);
        let mut methods = Vec::new();
        for (i, m) in c.methods.iter().enumerate() {
            match Method::from_bytes(m.as_bytes()) {
                Ok(m) => methods.push(m),
                Err(_) => p.push(ConfigError::new(
                    format!("{at}.methods[{i}]"),
                    format!("`{m}` is not a method"),
                )),
            }
        }
        if c.methods.is_empty() {
            p.push(ConfigError::new(
                format!("{at}.methods"),
                "name at least one method",
            ));
        }
        if c.ttl.get().is_zero() {
            p.push(ConfigError::new(format!("{at}.ttl"), "must be more than 0"));
        }
        let timeout = r.timeout.get();
        let lock = c.lock.map_or(timeout + Duration::from_secs(10), |d| d.get());
        if lock < timeout {
            p.push(ConfigError::new(
                format!("{at}.lock"),
                format!("must be at least the route's timeout ({timeout:?}): a key whose lock ran out while its request runs could run it twice"),
            ));
        }
        if c.wait.is_some_and(|w| w.get().is_zero()) {
            p.push(ConfigError::new(
                format!("{at}.wait"),
                "must be more than 0 (leave it out to answer a repeat 409 at once)",
            ));
        }
        let max_body = usize::try_from(c.max_body_bytes).ok().filter(|&b| b > 0);
        if max_body.is_none() {
            p.push(ConfigError::new(
                format!("{at}.max_body_bytes"),
                "must be at least 1",
            ));
        }
        if p.len() > before {
            return None;
        }
        let keys = Keys {
            scope: r.name.clone(),
            ttl: c.ttl.get(),
            lock,
            concurrent: c.wait.map_or(Concurrent::Conflict, |w| Concurrent::Wait(w.get())),
            store_server_errors: c.store_server_errors,
        };
        Some(RouteIdempotency {
            header: header?,
            methods,
            required: c.required,
            max_body: max_body?,
            when_store_down: c.when_store_down,
            keys,
            bound: OnceLock::new(),
        })
    }

    /// Whether keys apply to `req` (by its method).
    pub fn applies<B>(&self, req: &Request<B>) -> bool {
        self.methods.contains(req.method())
    }

    /// The route's keys in the gateway's store, once it is connected.
    pub fn keys(&self, slot: &IdempotencySlot) -> Option<&Idempotency<AnyStore>> {
        if let Some(keys) = self.bound.get() {
            return Some(keys);
        }
        let store = slot.get()?;
        Some(
            self.bound
                .get_or_init(|| Idempotency::new((*store).clone(), self.keys.clone())),
        )
    }
}
