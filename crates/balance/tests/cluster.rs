//! A cluster's picks follow health, ejections, breakers and tiers, on a manual
//! clock: traffic leaves an endpoint when it should and comes back when it should.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use palisade_balance::failover::FailoverConfig;
use palisade_balance::hash::mix;
use palisade_balance::health::HealthConfig;
use palisade_balance::outlier::{CallResult, OutlierConfig};
use palisade_balance::{Cluster, ClusterConfig, EndpointInfo, LbPolicy, PickError};
use palisade_core::SharedClock;
use palisade_core::{Clock, ManualClock};
use palisade_resilience::breaker::{BreakerConfig, CircuitBreaker, Outcome};

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn cluster(config: ClusterConfig, clock: &ManualClock) -> Cluster {
    Cluster::with_clock(config, SharedClock::new(clock.clone()))
}

fn outlier() -> OutlierConfig {
    OutlierConfig {
        consecutive_5xx: Some(3),
        consecutive_gateway_failure: None,
        failure_rate: None,
        base_ejection_time: Duration::from_secs(10),
        max_ejection_time: Duration::from_secs(100),
        max_ejection_percent: 50,
    }
}

/// Counts which port each of `n` picks went to.
fn spread(c: &Cluster, n: usize) -> HashMap<u16, usize> {
    let mut m = HashMap::new();
    for _ in 0..n {
        *m.entry(c.pick(None, &[]).unwrap().endpoint.addr().port())
            .or_default() += 1;
    }
    m
}

#[test]
fn an_empty_cluster_says_so() {
    let clock = ManualClock::new();
    let c = cluster(ClusterConfig::new("empty"), &clock);
    assert_eq!(c.pick(None, &[]).unwrap_err(), PickError::NoEndpoints);
    assert!(!c.has_healthy_endpoint());
}

#[test]
fn an_ejected_endpoint_gets_no_traffic_until_its_time_is_up() {
    let clock = ManualClock::new();
    let mut config = ClusterConfig::new("ejection");
    config.outlier = Some(outlier());
    config.lb = LbPolicy::RoundRobin;
    let c = cluster(config, &clock);
    c.set_endpoints([addr(1), addr(2), addr(3)].map(EndpointInfo::new));
    let bad = c.endpoints()[1].clone();
    for _ in 0..3 {
        c.record(&bad, CallResult::ServerError, Duration::from_millis(5));
    }
    assert!(bad.is_ejected(clock.now()));
    let s = spread(&c, 60);
    assert_eq!(s.get(&2), None, "{s:?}");
    assert_eq!(s[&1] + s[&3], 60);
    clock.advance(Duration::from_secs(10));
    assert_eq!(spread(&c, 60)[&2], 20, "back after base_ejection_time");
}

#[test]
fn ejection_respects_max_ejection_percent() {
    let clock = ManualClock::new();
    let mut config = ClusterConfig::new("cap");
    config.outlier = Some(outlier());
    let c = cluster(config, &clock);
    c.set_endpoints([addr(1), addr(2), addr(3), addr(4)].map(EndpointInfo::new));
    for e in c.endpoints() {
        for _ in 0..3 {
            c.record(&e, CallResult::ServerError, Duration::from_millis(5));
        }
    }
    let ejected = c.endpoints().iter().filter(|e| e.is_ejected(clock.now())).count();
    assert_eq!(ejected, 2, "50% of 4");
}

#[test]
fn an_open_breaker_takes_its_endpoint_out_of_rotation() {
    let clock = ManualClock::new();
    let mut config = ClusterConfig::new("breakers");
    config.outlier = None;
    let breaker_clock = clock.clone();
    let c = cluster(config, &clock).with_breakers(move |info| {
        CircuitBreaker::builder(info.addr.to_string())
            .config(BreakerConfig::empty().consecutive_failures(2))
            .clock(breaker_clock.clone())
            .build()
            .unwrap()
    });
    c.set_endpoints([addr(1), addr(2)].map(EndpointInfo::new));
    let first = c.endpoints()[0].clone();
    for _ in 0..2 {
        first
            .breaker()
            .unwrap()
            .try_acquire()
            .unwrap()
            .record(Outcome::Failure);
    }
    let s = spread(&c, 20);
    assert_eq!(s.get(&1), None, "{s:?}");
    // The breaker's open duration (30 s default) ends: half-open lets it back in.
    clock.advance(Duration::from_secs(30));
    assert!(c.endpoints()[0].is_available(clock.now()));
}

#[test]
fn retries_avoid_endpoints_already_tried_while_others_are_available() {
    let clock = ManualClock::new();
    let c = cluster(ClusterConfig::new("tried"), &clock);
    c.set_endpoints([addr(1), addr(2), addr(3)].map(EndpointInfo::new));
    for _ in 0..50 {
        let p = c.pick(None, &[addr(1), addr(2)]).unwrap();
        assert_eq!(p.endpoint.addr(), addr(3));
    }
    // Everything tried: the same endpoints are used again rather than failing.
    assert!(c.pick(None, &[addr(1), addr(2), addr(3)]).is_ok());
}

#[test]
fn panic_mode_ignores_health_below_the_threshold_and_says_so() {
    let clock = ManualClock::new();
    let mut config = ClusterConfig::new("panic");
    config.health = Some(HealthConfig {
        unhealthy_threshold: 1,
        ..HealthConfig::default()
    });
    config.panic_threshold = 0.5;
    let c = cluster(config, &clock);
    c.set_endpoints([addr(1), addr(2), addr(3), addr(4)].map(EndpointInfo::new));
    let eps = c.endpoints();
    c.record_probe(&eps[0], false);
    c.record_probe(&eps[1], false);
    // 50% healthy: not in panic, only the healthy two get traffic.
    let s = spread(&c, 40);
    assert!(!c.is_panicking());
    assert_eq!(
        s.get(&1).copied().unwrap_or(0) + s.get(&2).copied().unwrap_or(0),
        0
    );
    c.record_probe(&eps[2], false);
    // 25% healthy: panic; traffic spreads over all four.
    let p = c.pick(None, &[]).unwrap();
    assert!(p.panic && c.is_panicking());
    let s = spread(&c, 400);
    assert_eq!(s.len(), 4, "{s:?}");
}

#[test]
fn with_panic_off_an_all_unhealthy_cluster_refuses() {
    let clock = ManualClock::new();
    let mut config = ClusterConfig::new("no-panic");
    config.health = Some(HealthConfig {
        unhealthy_threshold: 1,
        ..HealthConfig::default()
    });
    config.panic_threshold = 0.0;
    let c = cluster(config, &clock);
    c.set_endpoints([addr(1)].map(EndpointInfo::new));
    c.record_probe(&c.endpoints()[0], false);
    assert_eq!(c.pick(None, &[]).unwrap_err(), PickError::NoHealthyEndpoint);
}

#[test]
fn tiers_fail_over_and_fail_back_after_the_stable_period() {
    let clock = ManualClock::new();
    let mut config = ClusterConfig::new("tiers");
    config.health = Some(HealthConfig {
        unhealthy_threshold: 1,
        healthy_threshold: 1,
        ..HealthConfig::default()
    });
    config.failover = FailoverConfig {
        healthy_threshold: 0.5,
        stable_period: Duration::from_secs(60),
    };
    config.panic_threshold = 0.0;
    let c = cluster(config, &clock);
    c.set_endpoints([
        EndpointInfo::new(addr(1)),
        EndpointInfo::new(addr(2)),
        EndpointInfo::new(addr(11)).tier(1),
    ]);
    assert!(spread(&c, 20).keys().all(|&p| p < 10), "primary tier serves");
    let eps = c.endpoints();
    c.record_probe(&eps[0], false);
    c.record_probe(&eps[1], false);
    assert_eq!(spread(&c, 20)[&11], 20, "standby serves");
    assert_eq!(c.active_tier(), Some(1));
    clock.advance(Duration::from_secs(5));
    c.record_probe(&eps[0], true);
    c.record_probe(&eps[1], true);
    assert_eq!(spread(&c, 5)[&11], 5, "primary healthy but not yet stable");
    clock.advance(Duration::from_secs(59));
    assert_eq!(spread(&c, 5)[&11], 5);
    clock.advance(Duration::from_secs(1));
    assert!(spread(&c, 20).keys().all(|&p| p < 10), "failed back after 60 s");
    assert_eq!(c.active_tier(), Some(0));
}

#[test]
fn replacing_endpoints_keeps_the_state_of_those_that_stay() {
    let clock = ManualClock::new();
    let mut config = ClusterConfig::new("discovery");
    config.outlier = Some(outlier());
    let c = cluster(config, &clock);
    c.set_endpoints([addr(1), addr(2)].map(EndpointInfo::new));
    let one = c.endpoints()[0].clone();
    let guard = one.start();
    for _ in 0..3 {
        c.record(&one, CallResult::ServerError, Duration::from_millis(1));
    }
    c.set_endpoints([addr(1), addr(3), addr(3)].map(EndpointInfo::new));
    let now = c.endpoints();
    assert_eq!(now.len(), 2, "duplicates dropped");
    assert!(std::sync::Arc::ptr_eq(&now[0], &one), "same state object");
    assert!(now[0].is_ejected(clock.now()));
    assert_eq!(now[0].in_flight(), 1);
    drop(guard);
    assert_eq!(spread(&c, 10)[&3], 10);
}

#[test]
fn consistent_hashing_keeps_keys_on_their_endpoint_across_an_unrelated_removal() {
    let clock = ManualClock::new();
    let mut config = ClusterConfig::new("hash");
    config.lb = LbPolicy::Maglev { table_size: 1021 };
    let c = cluster(config, &clock);
    c.set_endpoints([addr(1), addr(2), addr(3)].map(EndpointInfo::new));
    let before: Vec<u16> = (0..300u64)
        .map(|k| c.pick(Some(mix(k)), &[]).unwrap().endpoint.addr().port())
        .collect();
    c.set_endpoints([addr(1), addr(2)].map(EndpointInfo::new));
    let kept = before
        .iter()
        .enumerate()
        .filter(|&(k, &b)| b != 3 && c.pick(Some(mix(k as u64)), &[]).unwrap().endpoint.addr().port() == b)
        .count();
    let eligible = before.iter().filter(|&&b| b != 3).count();
    assert!(kept * 10 >= eligible * 9, "{kept} of {eligible}");
}
