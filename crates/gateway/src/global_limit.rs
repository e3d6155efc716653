//! A route's rate limit shared by every gateway instance through Redis
//! (`rate_limit = { ..., global = { redis, when_redis_down } }`): GCRA in one Lua
//! script, timed by Redis's own clock so the instances' clocks do not matter.
//!
//! A key refused is remembered until its retry time, so further requests for it
//! are refused without a round trip. Every call is bounded by a timeout and a
//! circuit breaker (open after 3 failures in a row, for 5 s, then one probe);
//! while Redis cannot answer, the route does as its `when_redis_down` says:
//! `fail-open` (every request passes, counted) or `local` (each instance applies
//! its share of the quota on its own), never every request refused.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use palisade_resilience::breaker::{BreakerConfig, CircuitBreaker, OpenDuration};
use palisade_resilience::ratelimit::{RateLimitHeaders, RateLimited};

use crate::script_conn::{Script, ScriptConn, Timeouts};

use crate::config::{ConfigError, GlobalLimitConfig, LimitKey, RateLimitConfig, WhenRedisDown};
use crate::route::RouteLimiter;

/// GCRA on Redis's clock: `{1, remaining, reset_us}` (the gateway sends limit
/// headers with refusals only, as its local limiter does) or `{0, retry_after_us,
/// reset_us}`. ARGV: the emission interval and the burst, in microseconds and
/// requests.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - burst * interval
if now < allow_at then
  return {0, allow_at - now, tat - now}
end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, math.floor((now - allow_at) / interval), new_tat - now}
";

/// A route's global limit.
pub struct GlobalLimit {
    route: String,
    conn: ScriptConn,
    breaker: CircuitBreaker,
    prefix: String,
    /// `X-RateLimit-Limit`: the requests per period, as the local GCRA says.
    limit: u32,
    key: LimitKey,
    /// The instance's share of the quota (`local`).
    local: Option<RouteLimiter>,
    /// Keys refused, until when.
    over: Mutex<HashMap<String, Instant>>,
    max_keys: usize,
    /// `palisade_global_limit_total` by outcome, registered once.
    counters: Counters,
}

/// The limit's counters by outcome.
struct Counters {
    allowed: metrics::Counter,
    refused: metrics::Counter,
    refused_locally: metrics::Counter,
    fail_open: metrics::Counter,
    local: metrics::Counter,
}

impl Counters {
    fn new(route: &str) -> Self {
        let c = |outcome: &'static str| metrics::counter!("palisade_global_limit_total", "route" => route.to_owned(), "outcome" => outcome);
        Counters {
            allowed: c("allowed"),
            refused: c("refused"),
            refused_locally: c("refused_locally"),
            fail_open: c("fail_open"),
            local: c("local"),
        }
    }
}

impl std::fmt::Debug for GlobalLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GlobalLimit")
            .field("route", &self.route)
            .finish_non_exhaustive()
    }
}

/// What Redis said, or that it could not be asked.
enum Verdict {
    Allowed,
    Refused(RateLimited),
    Unavailable,
}

/// The limit each instance applies on its own while Redis is down
/// (`when_redis_down = "local"`): its share of the requests and of the burst.
fn local_share(
    (l, g): (&RateLimitConfig, &GlobalLimitConfig),
    burst: u32,
    at: &str,
    p: &mut Vec<ConfigError>,
) -> Option<RouteLimiter> {
    let share = |n: u32| n.div_ceil(g.instances.max(1)).max(1);
    let mut local = l.clone();
    local.global = None;
    local.requests = share(l.requests);
    local.burst = Some(share(burst));
    RouteLimiter::compile(&local, at, p)
}

impl GlobalLimit {
    /// Builds route `route`'s global limit from its `rate_limit` table `l` (`at`:
    /// its path), with a Redis connection per worker (`workers`), problems to `p`.
    pub(crate) fn compile(
        route: &str,
        (l, g): (&RateLimitConfig, &GlobalLimitConfig),
        at: &str,
        workers: usize,
        p: &mut Vec<ConfigError>,
    ) -> Option<GlobalLimit> {
        let before = p.len();
        if l.algorithm != crate::config::LimitAlgorithm::Gcra {
            p.push(ConfigError::new(
                format!("{at}.algorithm"),
                "a global limit is GCRA (the default)",
            ));
        }
        if g.timeout.get().is_zero() {
            p.push(ConfigError::new(
                format!("{at}.global.timeout"),
                "must be more than 0",
            ));
        }
        if g.instances == 0 {
            p.push(ConfigError::new(
                format!("{at}.global.instances"),
                "must be at least 1",
            ));
        }
        let burst = l.burst.unwrap_or(l.requests);
        let interval_us =
            u64::try_from(l.per.get().as_micros() / u128::from(l.requests.max(1))).unwrap_or(u64::MAX);
        let script = Script {
            text: GCRA,
            args: [interval_us, u64::from(burst)],
        };
        let timeouts = Timeouts {
            call: g.timeout.get(),
            connect: g.timeout.get().max(Duration::from_millis(250)),
        };
        let conn = ScriptConn::new(&g.redis, script, timeouts, workers)
            .map_err(|e| p.push(ConfigError::new(format!("{at}.global.redis"), e)))
            .ok();
        if l.requests == 0 || burst == 0 || interval_us == 0 {
            p.push(ConfigError::new(
                format!("{at}.requests"),
                "requests and burst must be at least 1, and requests per `per` at most a million a second",
            ));
        }
        let local = match g.when_redis_down {
            WhenRedisDown::Local => local_share((l, g), burst, at, p),
            WhenRedisDown::FailOpen => None,
        };
        if p.len() > before {
            return None;
        }
        let breaker = CircuitBreaker::builder(format!("ratelimit:{route}:redis"))
            .config(
                BreakerConfig::empty()
                    .consecutive_failures(3)
                    .open_duration(OpenDuration::Fixed(Duration::from_secs(5)))
                    .half_open(1, 1),
            )
            .build()
            .map_err(|e| p.push(ConfigError::new(format!("{at}.global"), e.to_string())))
            .ok()?;
        Some(GlobalLimit {
            route: route.to_owned(),
            conn: conn?,
            breaker,
            prefix: format!("{}{route}:", g.prefix),
            limit: l.requests,
            key: l.key.clone(),
            local,
            over: Mutex::new(HashMap::new()),
            max_keys: l.max_keys,
            counters: Counters::new(route),
        })
    }

    /// Asks the limit for `req` from `client`: `Err` with the refusal's headers
    /// when it is over.
    pub async fn check<B>(&self, req: &http::Request<B>, client: IpAddr) -> Result<(), RateLimitHeaders> {
        let key = match &self.key {
            LimitKey::Global => String::new(),
            LimitKey::ClientIp => client.to_string(),
            LimitKey::Header(name) => (req.headers().get(name))
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned(),
        };
        let now = Instant::now();
        if let Some(until) = self.refused_until(&key, now) {
            self.counters.refused_locally.increment(1);
            let wait = u64::try_from((until - now).as_nanos()).unwrap_or(u64::MAX);
            return Err(RateLimitHeaders::from(&RateLimited::new(self.limit, wait, wait)));
        }
        match self.ask(&key).await {
            Verdict::Allowed => {
                self.counters.allowed.increment(1);
                Ok(())
            }
            Verdict::Refused(r) => {
                self.counters.refused.increment(1);
                self.remember(key, now + r.retry_after());
                Err(RateLimitHeaders::from(&r))
            }
            Verdict::Unavailable => self.when_unavailable(req, client),
        }
    }

    fn when_unavailable<B>(&self, req: &http::Request<B>, client: IpAddr) -> Result<(), RateLimitHeaders> {
        match &self.local {
            Some(local) => {
                self.counters.local.increment(1);
                local
                    .check(req, client)
                    .map(drop)
                    .map_err(|r| RateLimitHeaders::from(&r))
            }
            None => {
                self.counters.fail_open.increment(1);
                Ok(())
            }
        }
    }

    /// One call of the script, through the breaker and the timeout.
    async fn ask(&self, key: &str) -> Verdict {
        let Ok(permit) = self.breaker.try_acquire() else {
            return Verdict::Unavailable;
        };
        match self.conn.call([self.prefix.as_bytes(), key.as_bytes()]).await {
            Ok([allowed, n, reset_us]) => {
                permit.success();
                let us = |v: i64| u64::try_from(v).unwrap_or(0).saturating_mul(1000);
                if allowed == 1 {
                    Verdict::Allowed
                } else {
                    Verdict::Refused(RateLimited::new(self.limit, us(n), us(reset_us)))
                }
            }
            Err(e) => {
                permit.failure();
                tracing::debug!(route = %self.route, error = %e, "global rate limit: Redis call failed");
                Verdict::Unavailable
            }
        }
    }

    fn refused_until(&self, key: &str, now: Instant) -> Option<Instant> {
        let over = self
            .over
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        over.get(key).copied().filter(|until| *until > now)
    }

    fn remember(&self, key: String, until: Instant) {
        let mut over = self
            .over
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if over.len() >= self.max_keys {
            let now = Instant::now();
            over.retain(|_, t| *t > now);
            if over.len() >= self.max_keys {
                return;
            }
        }
        over.insert(key, until);
    }

    /// The breaker in front of Redis.
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }
}
