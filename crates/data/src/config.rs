//! The data layer's settings, as a service's configuration file writes them.
//!
//! Every problem is reported at once, each naming its field
//! (`replicas[1]`, `shards.eu.url`), so `palisade check` and start-up agree.

use std::str::FromStr;
use std::time::Duration;

use palisade_core::config::Dur;
use palisade_core::{ConfigError, ConfigErrors};
use palisade_resilience::breaker::{BreakerConfig, OpenDuration};
use serde::Deserialize;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// Where reads go when no replica can serve them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WhenNoReplica {
    /// Read the primary (counted as a fallback).
    #[default]
    Primary,
    /// Refuse the read with [`DataError::NoReplica`](crate::DataError::NoReplica):
    /// for a primary that must be kept for writes.
    Refuse,
}

/// How reads are spread over the replicas that may serve them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReadBalance {
    /// Each replica in turn.
    RoundRobin,
    /// The replica with fewer reads in flight of two picked at random.
    #[default]
    LeastRequest,
}

/// A connection pool's size and patience, and the breaker in front of its server.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Connections per server.
    pub max_connections: u32,
    /// How long a call waits for a connection (a server that does not answer is
    /// given up on after this long).
    pub acquire_timeout: Dur,
    /// Failures in a row (the server unreachable, not a query's error) that open
    /// the server's breaker.
    pub breaker_failures: u32,
    /// How long an open breaker refuses before one call tries the server again.
    pub breaker_open: Dur,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_connections: 10,
            acquire_timeout: Dur(Duration::from_secs(2)),
            breaker_failures: 3,
            breaker_open: Dur(Duration::from_secs(5)),
        }
    }
}

impl PoolConfig {
    /// The pool options every server's pool is made with.
    pub(crate) fn options(&self) -> PgPoolOptions {
        PgPoolOptions::new()
            .max_connections(self.max_connections)
            .acquire_timeout(self.acquire_timeout.get())
    }

    /// The breaker each server gets.
    pub(crate) fn breaker(&self) -> BreakerConfig {
        BreakerConfig::empty()
            .consecutive_failures(self.breaker_failures)
            .open_duration(OpenDuration::Fixed(self.breaker_open.get()))
            .half_open(1, 1)
    }

    pub(crate) fn validate(&self, errors: &mut Vec<ConfigError>) {
        if self.max_connections == 0 {
            errors.push(ConfigError::new("pool.max_connections", "must be at least 1"));
        }
        if self.acquire_timeout.is_zero() {
            errors.push(ConfigError::new("pool.acquire_timeout", "must be more than zero"));
        }
        if self.breaker_failures == 0 {
            errors.push(ConfigError::new("pool.breaker_failures", "must be at least 1"));
        }
        if self.breaker_open.is_zero() {
            errors.push(ConfigError::new("pool.breaker_open", "must be more than zero"));
        } else if self.breaker_failures > 0
            && let Err(e) = self.breaker().validate()
        {
            errors.extend(e.under("pool.breaker").0);
        }
    }
}

/// A primary and its streaming replicas ([`ReplicaSet`](crate::ReplicaSet)).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicaSetConfig {
    /// The set's name, in metrics and errors.
    pub name: String,
    /// The primary's URL (`postgres://user@host:port/db`).
    pub primary: String,
    /// The replicas' URLs, addressed over TCP, each a hot standby of the primary.
    pub replicas: Vec<String>,
    /// A replica further behind than this gets no reads until it catches up.
    pub max_lag: Dur,
    /// How often replica lag is measured.
    pub lag_interval: Dur,
    /// Where reads go when no replica can serve them.
    pub when_no_replica: WhenNoReplica,
    /// How long a read given a causality token waits for a replica to replay it
    /// before reading the primary (zero: never wait).
    pub causal_wait: Dur,
    /// How reads are spread.
    pub balance: ReadBalance,
    /// Every server's pool and breaker.
    pub pool: PoolConfig,
}

impl Default for ReplicaSetConfig {
    fn default() -> Self {
        ReplicaSetConfig {
            name: "main".into(),
            primary: String::new(),
            replicas: Vec::new(),
            max_lag: Dur(Duration::from_secs(1)),
            lag_interval: Dur(Duration::from_millis(250)),
            when_no_replica: WhenNoReplica::Primary,
            causal_wait: Dur(Duration::from_millis(50)),
            balance: ReadBalance::LeastRequest,
            pool: PoolConfig::default(),
        }
    }
}

/// A server's URL, parsed, and the TCP address it names.
#[derive(Clone, Debug)]
pub(crate) struct Server {
    pub options: PgConnectOptions,
    /// `host:port`, the server's name in metrics.
    pub authority: String,
}

/// Parses `url` as a PostgreSQL URL of a server reached over TCP.
pub(crate) fn server(url: &str) -> Result<Server, String> {
    if url.trim().is_empty() {
        return Err("is required (a postgres:// URL)".into());
    }
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err("must be a postgres:// or postgresql:// URL".into());
    }
    let options = PgConnectOptions::from_str(url).map_err(|e| format!("not a PostgreSQL URL: {e}"))?;
    let host = options.get_host();
    if host.starts_with('/') || options.get_socket().is_some() {
        return Err(format!(
            "{host} is a Unix socket; servers are addressed over TCP (host:port)"
        ));
    }
    let authority = if host.contains(':') {
        format!("[{host}]:{}", options.get_port())
    } else {
        format!("{host}:{}", options.get_port())
    };
    Ok(Server { options, authority })
}

impl ReplicaSetConfig {
    /// Every problem with the settings, each naming its field; on success the
    /// parsed primary and replicas.
    pub(crate) fn check(&self) -> Result<(Server, Vec<Server>), ConfigErrors> {
        let mut errors = Vec::new();
        if self.name.is_empty() {
            errors.push(ConfigError::new("name", "must not be empty"));
        }
        let primary = server(&self.primary).map_err(|p| errors.push(ConfigError::new("primary", p)));
        let mut replicas: Vec<Server> = Vec::new();
        for (i, url) in self.replicas.iter().enumerate() {
            let field = format!("replicas[{i}]");
            match server(url) {
                Err(p) => errors.push(ConfigError::new(field, p)),
                Ok(r) if primary.as_ref().is_ok_and(|p| p.authority == r.authority) => {
                    errors.push(ConfigError::new(
                        field,
                        format!(
                            "{} is the primary; a replica must be a standby of it",
                            r.authority
                        ),
                    ))
                }
                Ok(r) if replicas.iter().any(|o| o.authority == r.authority) => errors.push(
                    ConfigError::new(field, format!("{} is listed twice", r.authority)),
                ),
                Ok(r) => replicas.push(r),
            }
        }
        if self.max_lag.is_zero() {
            errors.push(ConfigError::new("max_lag", "must be more than zero"));
        }
        if self.lag_interval.is_zero() {
            errors.push(ConfigError::new("lag_interval", "must be more than zero"));
        } else if self.lag_interval > self.max_lag {
            errors.push(ConfigError::new(
                "lag_interval",
                format!(
                    "must not be longer than max_lag ({}): lag is measured no finer than it",
                    self.max_lag
                ),
            ));
        }
        self.pool.validate(&mut errors);
        ConfigErrors::result(errors)?;
        // A primary that did not parse has been reported above.
        primary
            .map(|p| (p, replicas))
            .map_err(|()| ConfigErrors::one("primary", "is not a PostgreSQL URL"))
    }

    /// Every problem with the settings, each naming its field.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        self.check().map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(primary: &str, replicas: &[&str]) -> ReplicaSetConfig {
        ReplicaSetConfig {
            primary: primary.into(),
            replicas: replicas.iter().map(|r| r.to_string()).collect(),
            ..ReplicaSetConfig::default()
        }
    }

    #[test]
    fn a_replica_that_is_the_primary_or_listed_twice_is_named() {
        let c = config(
            "postgres://u@10.0.0.1:5432/app",
            &[
                "postgres://u@10.0.0.2:5432/app",
                "postgres://other@10.0.0.1:5432/app",
                "postgres://u@10.0.0.2:5432/app",
            ],
        );
        let e = c.validate().unwrap_err();
        assert_eq!(e.fields(), ["replicas[1]", "replicas[2]"]);
        assert!(e.0[0].problem.contains("is the primary"), "{e}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let mut c = config("", &["not a url", "postgres:///app?host=/var/run/postgresql"]);
        c.max_lag = Dur(Duration::from_millis(100));
        c.pool.max_connections = 0;
        let e = c.validate().unwrap_err();
        assert_eq!(
            e.fields(),
            [
                "primary",
                "replicas[0]",
                "replicas[1]",
                "lag_interval",
                "pool.max_connections"
            ]
        );
    }

    #[test]
    fn from_toml_with_unknown_fields_named() {
        let c: ReplicaSetConfig = palisade_core::config::from_toml(
            "primary = \"postgres://u@db1/app\"\nreplicas = [\"postgres://u@db2/app\"]\nmax_lag = \"2s\"\nwhen_no_replica = \"refuse\"\n",
            "X_",
            [],
        )
        .unwrap();
        assert_eq!(c.max_lag.get(), Duration::from_secs(2));
        assert_eq!(c.when_no_replica, WhenNoReplica::Refuse);
        c.validate().unwrap();
        let e = palisade_core::config::from_toml::<ReplicaSetConfig>(
            "primary = \"x\"\nmax_lagg = \"1s\"\n",
            "X_",
            [],
        )
        .unwrap_err();
        assert_eq!(e.fields(), ["max_lagg"]);
    }
}
