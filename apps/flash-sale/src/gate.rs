//! The stock gate: a purchase attempt becomes a reservation of one unit, or a
//! refusal that says why, in one atomic step.
//!
//! A reservation is `live` until it is `converted` (its order was written) or
//! `released` (it expired without one, or its order was cancelled), and only a
//! live reservation can become either: [`Gate::convert`] and [`Gate::release`]
//! race safely, so a unit is never both sold and returned. The same idempotency
//! key reserves once: a repeat is `Replayed`.
//!
//! Two stores with one behaviour: Redis (one Lua script per step, timed by Redis's
//! clock, every key of an item under one hash tag so a cluster keeps them on one
//! shard) for several instances, and a mutex in process for the embedded sale.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, SystemTime};

use redis::aio::ConnectionManager;
use tokio::sync::Mutex;

/// A sale of one item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sale {
    /// The item.
    pub item: String,
    /// Units for sale.
    pub stock: u32,
    /// When it opens and closes, in milliseconds since the Unix epoch.
    pub opens_ms: u64,
    /// See `opens_ms`; attempts at or after this are refused.
    pub closes_ms: u64,
    /// Units one user may reserve.
    pub per_user: u32,
}

/// What a purchase attempt came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reserve {
    /// A unit is reserved; `left` remain.
    Reserved {
        /// Units left after it.
        left: u32,
        /// The user's unit number for this item (1 up to the limit): with the
        /// user and the item, unique among orders not cancelled.
        unit: u32,
    },
    /// This idempotency key already reserved (nothing taken again): its unit.
    Replayed {
        /// The user's unit number the first reservation got.
        unit: u32,
    },
    /// No stock left.
    SoldOut,
    /// Before the sale opens.
    NotOpen,
    /// After it closed.
    Closed,
    /// The user has reserved as many as allowed.
    OverLimit,
    /// No such sale.
    NoSale,
}

/// An item's units: in stock, and reserved but not yet ordered or released.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StockCount {
    /// Units that may still be reserved.
    pub stock: u32,
    /// Live reservations.
    pub live: u32,
}

/// Why the gate could not answer.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// Redis failed or could not be reached.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The gate holds no sale of this item.
    #[error("no sale of {0}")]
    NoSale(String),
    /// Redis answered something the scripts never return.
    #[error("unexpected answer from the stock script: {0}")]
    Unexpected(i64),
}

/// Reserves: `{code, left, unit}`: 1 reserved, 2 replayed, 0 sold out, -1 no sale,
/// -2 not open, -3 closed, -4 over the user's limit. KEYS: the sale, the user's
/// units (a set of the unit numbers its live and converted reservations hold),
/// the reservation, the live set; ARGV: user, reservation id, its time to live
/// and how long its state is kept after, in milliseconds. A reservation takes
/// the user's lowest free unit number, so one released frees its number again.
const RESERVE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local sale = redis.call('HMGET', KEYS[1], 'stock', 'opens', 'closes', 'per_user')
if not sale[1] then return {-1, 0, 0} end
local stock = tonumber(sale[1])
if redis.call('EXISTS', KEYS[3]) == 1 then return {2, stock, tonumber(redis.call('HGET', KEYS[3], 'unit') or '0')} end
if now < tonumber(sale[2]) then return {-2, stock, 0} end
if now >= tonumber(sale[3]) then return {-3, stock, 0} end
if stock <= 0 then return {0, 0, 0} end
local limit = tonumber(sale[4])
if redis.call('SCARD', KEYS[2]) >= limit then return {-4, stock, 0} end
local unit = 1
while redis.call('SISMEMBER', KEYS[2], unit) == 1 do unit = unit + 1 end
local ttl = tonumber(ARGV[3])
redis.call('HINCRBY', KEYS[1], 'stock', -1)
redis.call('SADD', KEYS[2], unit)
redis.call('PEXPIREAT', KEYS[2], tonumber(sale[3]) + tonumber(ARGV[4]))
redis.call('HSET', KEYS[3], 'user', ARGV[1], 'state', 'live', 'unit', unit)
redis.call('PEXPIRE', KEYS[3], ttl + tonumber(ARGV[4]))
redis.call('ZADD', KEYS[4], now + ttl, ARGV[2])
return {1, stock - 1, unit}
";

/// Converts a live reservation (1; also 1 when already converted) or refuses a
/// released or unknown one (0). KEYS: the reservation, the live set; ARGV: its id.
const CONVERT: &str = r"
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'live' then
  redis.call('HSET', KEYS[1], 'state', 'converted')
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 1
end
if state == 'converted' then return 1 end
return 0
";

/// Releases a live reservation, its unit back in stock and its unit number free
/// (1), or does nothing to one already converted or released (0). KEYS: the sale,
/// the user's units, the reservation, the live set; ARGV: its id, its user.
const RELEASE: &str = r"
local r = redis.call('HMGET', KEYS[3], 'state', 'user', 'unit')
if r[1] ~= 'live' or r[2] ~= ARGV[2] then
  if not r[1] then redis.call('ZREM', KEYS[4], ARGV[1]) end
  return 0
end
redis.call('HSET', KEYS[3], 'state', 'released')
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'stock', 1)
redis.call('SREM', KEYS[2], r[3])
return 1
";

/// Cancels a converted reservation whose order was cancelled: its unit back in
/// stock and its unit number free (1), or nothing for one in any other state
/// (0). KEYS and ARGV as for RELEASE.
const CANCEL: &str = r"
local r = redis.call('HMGET', KEYS[3], 'state', 'user', 'unit')
if r[1] ~= 'converted' or r[2] ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[3], 'state', 'cancelled')
redis.call('HINCRBY', KEYS[1], 'stock', 1)
redis.call('SREM', KEYS[2], r[3])
return 1
";

/// Sets the stock to `truth - live` if the stock and the live reservations are
/// still what the caller saw (1), else nothing (0; -1 for no sale): a repair
/// never overwrites a reservation made meanwhile. KEYS: the sale, the live set; ARGV: the stock
/// and live count seen, the truth.
const REPAIR: &str = r"
local s = redis.call('HGET', KEYS[1], 'stock')
if not s then return -1 end
local stock = tonumber(s)
local live = redis.call('ZCARD', KEYS[2])
if stock ~= tonumber(ARGV[1]) or live ~= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'stock', math.max(0, tonumber(ARGV[3]) - live))
return 1
";

/// Opens a sale the gate does not hold (1), or does nothing (0): two instances
/// opening a lost sale at once open it once, and a reservation made after the
/// first is not overwritten. KEYS: the sale; ARGV: stock, opens, closes, per_user.
const OPEN_MISSING: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'stock', ARGV[1], 'opens', ARGV[2], 'closes', ARGV[3], 'per_user', ARGV[4])
return 1
";

/// The live reservations past their expiry by Redis's clock, oldest first, at
/// most ARGV[1]. KEYS: the live set.
const EXPIRED: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGE', KEYS[1], '-inf', now, 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[1]))
";

/// How long a reservation's state is kept after its expiry, so a late order job
/// or sweep still finds it.
const KEEP_MS: u64 = 24 * 3600 * 1000;

/// Where reservations are kept.
#[derive(Debug)]
pub enum Gate {
    /// In Redis, shared by every instance; keys under `prefix`.
    Redis {
        /// The connection (multiplexed, reconnecting).
        conn: ConnectionManager,
        /// The keys' prefix.
        prefix: String,
    },
    /// In this process (the embedded sale).
    Local(Mutex<HashMap<String, LocalSale>>),
}

/// A sale kept in process.
#[derive(Debug)]
pub struct LocalSale {
    sale: Sale,
    stock: u32,
    /// Each user's unit numbers held by live and converted reservations.
    units: HashMap<String, BTreeSet<u32>>,
    /// Reservation id: (user, unit, state, expiry ms).
    reservations: HashMap<String, (String, u32, State, u64)>,
    /// (expiry ms, reservation id) of the live ones.
    live: BTreeSet<(u64, String)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Live,
    Converted,
    Released,
    Cancelled,
}

/// Milliseconds since the Unix epoch, by this process's clock.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Gate {
    /// A gate in Redis through `conn`, its keys under `prefix`.
    pub fn redis(conn: ConnectionManager, prefix: impl Into<String>) -> Gate {
        Gate::Redis {
            conn,
            prefix: prefix.into(),
        }
    }

    /// A gate in this process.
    pub fn local() -> Gate {
        Gate::Local(Mutex::new(HashMap::new()))
    }

    /// The item's keys: `{item}` is the hash tag that keeps them on one shard.
    fn keys(prefix: &str, item: &str) -> String {
        format!("{prefix}{{{item}}}")
    }

    /// Opens (or replaces) `sale`, its stock set to `sale.stock`.
    pub async fn open(&self, sale: &Sale) -> Result<(), GateError> {
        match self {
            Gate::Redis { conn, prefix } => {
                let k = Self::keys(prefix, &sale.item);
                let mut c = conn.clone();
                redis::cmd("HSET")
                    .arg(&k)
                    .arg(&[
                        ("stock", u64::from(sale.stock)),
                        ("opens", sale.opens_ms),
                        ("closes", sale.closes_ms),
                        ("per_user", u64::from(sale.per_user)),
                    ])
                    .query_async::<()>(&mut c)
                    .await?;
                Ok(())
            }
            Gate::Local(m) => {
                m.lock().await.insert(sale.item.clone(), LocalSale::new(sale));
                Ok(())
            }
        }
    }

    /// Opens `sale` unless the gate holds a sale of its item: `true` when it did.
    pub async fn open_missing(&self, sale: &Sale) -> Result<bool, GateError> {
        match self {
            Gate::Redis { conn, prefix } => {
                let opened: i64 = redis::Script::new(OPEN_MISSING)
                    .key(Self::keys(prefix, &sale.item))
                    .arg(sale.stock)
                    .arg(sale.opens_ms)
                    .arg(sale.closes_ms)
                    .arg(sale.per_user)
                    .invoke_async(&mut conn.clone())
                    .await?;
                Ok(opened == 1)
            }
            Gate::Local(m) => {
                let mut sales = m.lock().await;
                if sales.contains_key(&sale.item) {
                    return Ok(false);
                }
                sales.insert(sale.item.clone(), LocalSale::new(sale));
                Ok(true)
            }
        }
    }

    /// Reserves one unit of `item` for `user` under `reservation` (the purchase's
    /// idempotency key, unique per user), live for `ttl`.
    pub async fn reserve(
        &self,
        item: &str,
        user: &str,
        reservation: &str,
        ttl: Duration,
    ) -> Result<Reserve, GateError> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        match self {
            Gate::Redis { conn, prefix } => {
                let k = Self::keys(prefix, item);
                let (code, left, unit): (i64, i64, i64) = redis::Script::new(RESERVE)
                    .key(&k)
                    .key(format!("{k}:u:{user}"))
                    .key(format!("{k}:r:{reservation}"))
                    .key(format!("{k}:live"))
                    .arg(user)
                    .arg(reservation)
                    .arg(ttl_ms)
                    .arg(KEEP_MS)
                    .invoke_async(&mut conn.clone())
                    .await?;
                let (left, unit) = (u32::try_from(left).unwrap_or(0), u32::try_from(unit).unwrap_or(0));
                Ok(match code {
                    1 => Reserve::Reserved { left, unit },
                    2 => Reserve::Replayed { unit },
                    0 => Reserve::SoldOut,
                    -1 => Reserve::NoSale,
                    -2 => Reserve::NotOpen,
                    -3 => Reserve::Closed,
                    -4 => Reserve::OverLimit,
                    other => return Err(GateError::Unexpected(other)),
                })
            }
            Gate::Local(m) => {
                let mut sales = m.lock().await;
                let Some(s) = sales.get_mut(item) else {
                    return Ok(Reserve::NoSale);
                };
                Ok(s.reserve(user, reservation, now_ms(), ttl_ms))
            }
        }
    }

    /// Turns a live reservation into an order's unit: `true` when it is (or
    /// already was) converted, `false` when it was released first (expired).
    pub async fn convert(&self, item: &str, reservation: &str) -> Result<bool, GateError> {
        match self {
            Gate::Redis { conn, prefix } => {
                let k = Self::keys(prefix, item);
                let done: i64 = redis::Script::new(CONVERT)
                    .key(format!("{k}:r:{reservation}"))
                    .key(format!("{k}:live"))
                    .arg(reservation)
                    .invoke_async(&mut conn.clone())
                    .await?;
                Ok(done == 1)
            }
            Gate::Local(m) => Ok(m
                .lock()
                .await
                .get_mut(item)
                .is_some_and(|s| s.convert(reservation))),
        }
    }

    /// Returns a live reservation's unit to stock: `true` when it did, `false`
    /// when the reservation was already converted or released.
    pub async fn release(&self, item: &str, reservation: &str) -> Result<bool, GateError> {
        match self {
            Gate::Redis { conn, prefix } => Self::give_back(conn, prefix, RELEASE, (item, reservation)).await,
            Gate::Local(m) => Ok(m
                .lock()
                .await
                .get_mut(item)
                .is_some_and(|s| s.release(reservation))),
        }
    }

    /// Returns a converted reservation's unit to stock when its order was
    /// cancelled: `true` when it did, `false` when it was not converted (or was
    /// cancelled before).
    pub async fn cancel(&self, item: &str, reservation: &str) -> Result<bool, GateError> {
        match self {
            Gate::Redis { conn, prefix } => Self::give_back(conn, prefix, CANCEL, (item, reservation)).await,
            Gate::Local(m) => Ok(m
                .lock()
                .await
                .get_mut(item)
                .is_some_and(|s| s.cancel(reservation))),
        }
    }

    /// Runs `script` (RELEASE or CANCEL) for the reservation's unit.
    async fn give_back(
        conn: &ConnectionManager,
        prefix: &str,
        script: &str,
        (item, reservation): (&str, &str),
    ) -> Result<bool, GateError> {
        let k = Self::keys(prefix, item);
        let mut c = conn.clone();
        let res = format!("{k}:r:{reservation}");
        let user: Option<String> = redis::cmd("HGET")
            .arg(&res)
            .arg("user")
            .query_async(&mut c)
            .await?;
        let user = user.unwrap_or_default();
        let done: i64 = redis::Script::new(script)
            .key(&k)
            .key(format!("{k}:u:{user}"))
            .key(&res)
            .key(format!("{k}:live"))
            .arg(reservation)
            .arg(&user)
            .invoke_async(&mut c)
            .await?;
        Ok(done == 1)
    }

    /// Live reservations of `item` past their expiry now (by the clock that set
    /// it: Redis's, or this process's for the local gate), oldest first, at most
    /// `limit`: the sweeper releases them.
    pub async fn expired(&self, item: &str, limit: usize) -> Result<Vec<String>, GateError> {
        match self {
            Gate::Redis { conn, prefix } => {
                let k = Self::keys(prefix, item);
                // Expired by Redis's clock, which set the expiries.
                let ids: Vec<String> = redis::Script::new(EXPIRED)
                    .key(format!("{k}:live"))
                    .arg(limit)
                    .invoke_async(&mut conn.clone())
                    .await?;
                Ok(ids)
            }
            Gate::Local(m) => {
                let sales = m.lock().await;
                let now = now_ms();
                Ok((sales.get(item).into_iter())
                    .flat_map(|s| {
                        s.live
                            .iter()
                            .take_while(|(at, _)| *at <= now)
                            .map(|(_, id)| id.clone())
                    })
                    .take(limit)
                    .collect())
            }
        }
    }

    /// Sets `item`'s stock so that it and its live reservations add up to
    /// `truth` (the inventory's units), if both are still `seen`: `false` when
    /// they changed meanwhile (the next reconciliation looks again).
    pub async fn repair(&self, item: &str, seen: StockCount, truth: u32) -> Result<bool, GateError> {
        match self {
            Gate::Redis { conn, prefix } => {
                let k = Self::keys(prefix, item);
                let done: i64 = redis::Script::new(REPAIR)
                    .key(&k)
                    .key(format!("{k}:live"))
                    .arg(seen.stock)
                    .arg(seen.live)
                    .arg(truth)
                    .invoke_async(&mut conn.clone())
                    .await?;
                match done {
                    -1 => Err(GateError::NoSale(item.to_owned())),
                    d => Ok(d == 1),
                }
            }
            Gate::Local(m) => {
                let mut sales = m.lock().await;
                let Some(s) = sales.get_mut(item) else {
                    return Err(GateError::NoSale(item.to_owned()));
                };
                let live = u32::try_from(s.live.len()).unwrap_or(u32::MAX);
                if s.stock != seen.stock || live != seen.live {
                    return Ok(false);
                }
                s.stock = truth.saturating_sub(live);
                Ok(true)
            }
        }
    }

    /// `item`'s stock and live reservations now (`NoSale` when the gate holds
    /// no sale of it: never opened, or lost with a Redis restarted empty).
    pub async fn count(&self, item: &str) -> Result<StockCount, GateError> {
        match self {
            Gate::Redis { conn, prefix } => {
                let k = Self::keys(prefix, item);
                let mut c = conn.clone();
                let stock: Option<i64> = redis::cmd("HGET")
                    .arg(&k)
                    .arg("stock")
                    .query_async(&mut c)
                    .await?;
                let live: u64 = redis::cmd("ZCARD")
                    .arg(format!("{k}:live"))
                    .query_async(&mut c)
                    .await?;
                let stock = stock.ok_or_else(|| GateError::NoSale(item.to_owned()))?;
                Ok(StockCount {
                    stock: u32::try_from(stock).unwrap_or(0),
                    live: u32::try_from(live).unwrap_or(u32::MAX),
                })
            }
            Gate::Local(m) => m
                .lock()
                .await
                .get(item)
                .map(|s| StockCount {
                    stock: s.stock,
                    live: u32::try_from(s.live.len()).unwrap_or(u32::MAX),
                })
                .ok_or_else(|| GateError::NoSale(item.to_owned())),
        }
    }
}

impl LocalSale {
    fn new(sale: &Sale) -> LocalSale {
        LocalSale {
            sale: sale.clone(),
            stock: sale.stock,
            units: HashMap::new(),
            reservations: HashMap::new(),
            live: BTreeSet::new(),
        }
    }

    fn reserve(&mut self, user: &str, reservation: &str, now: u64, ttl_ms: u64) -> Reserve {
        if let Some((_, unit, _, _)) = self.reservations.get(reservation) {
            return Reserve::Replayed { unit: *unit };
        }
        if now < self.sale.opens_ms {
            return Reserve::NotOpen;
        }
        if now >= self.sale.closes_ms {
            return Reserve::Closed;
        }
        if self.stock == 0 {
            return Reserve::SoldOut;
        }
        let units = self.units.entry(user.to_owned()).or_default();
        if units.len() >= self.sale.per_user as usize {
            return Reserve::OverLimit;
        }
        // The lowest free unit number.
        let unit = (1..).find(|u| !units.contains(u)).unwrap_or(1);
        units.insert(unit);
        self.stock -= 1;
        let expires = now.saturating_add(ttl_ms);
        self.reservations.insert(
            reservation.to_owned(),
            (user.to_owned(), unit, State::Live, expires),
        );
        self.live.insert((expires, reservation.to_owned()));
        Reserve::Reserved {
            left: self.stock,
            unit,
        }
    }

    /// Moves `reservation` from state `from` to `to`: its user and unit if it
    /// was in `from` (and off the live set if it was live).
    fn settle(&mut self, reservation: &str, from: State, to: State) -> Option<(String, u32)> {
        let (user, unit, state, expires) = self.reservations.get_mut(reservation)?;
        if *state != from {
            return None;
        }
        *state = to;
        let held = (user.clone(), *unit);
        if from == State::Live {
            let expires = *expires;
            self.live.remove(&(expires, reservation.to_owned()));
        }
        Some(held)
    }

    fn convert(&mut self, reservation: &str) -> bool {
        let converted = matches!(
            self.reservations.get(reservation),
            Some((_, _, State::Converted, _))
        );
        converted || self.settle(reservation, State::Live, State::Converted).is_some()
    }

    /// Moves `reservation` from `from` to `to` and its unit back to stock, its
    /// unit number free; whether it was in `from`.
    fn give_back(&mut self, reservation: &str, from: State, to: State) -> bool {
        let Some((user, unit)) = self.settle(reservation, from, to) else {
            return false;
        };
        self.stock += 1;
        if let Some(units) = self.units.get_mut(&user) {
            units.remove(&unit);
        }
        true
    }

    fn release(&mut self, reservation: &str) -> bool {
        self.give_back(reservation, State::Live, State::Released)
    }

    fn cancel(&mut self, reservation: &str) -> bool {
        self.give_back(reservation, State::Converted, State::Cancelled)
    }
}
