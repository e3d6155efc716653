//! The breaker's metrics reach a `metrics` recorder with the documented names and labels.

use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use palisade_resilience::ManualClock;
use palisade_resilience::breaker::{BreakerConfig, CircuitBreaker};

/// (name, labels, value) of every metric recorded.
type Snapshot = [(String, Vec<(String, String)>, DebugValue)];

fn value<'a>(snapshot: &'a Snapshot, name: &str, labels: &[(&str, &str)]) -> &'a DebugValue {
    snapshot
        .iter()
        .find(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, _, v)| v)
        .unwrap_or_else(|| panic!("no metric {name} {labels:?}"))
}

#[test]
fn calls_rejections_slow_calls_transitions_and_state_are_exported() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let clock = ManualClock::new();
        let b = CircuitBreaker::builder("orders")
            .config(BreakerConfig::empty().consecutive_failures(2).slow_calls(
                Duration::from_secs(1),
                1.0,
                100,
            ))
            .clock(clock.clone())
            .build()
            .unwrap();
        b.try_acquire().unwrap().success();
        let slow = b.try_acquire().unwrap();
        clock.advance(Duration::from_secs(2));
        slow.success();
        drop(b.try_acquire().unwrap());
        b.try_acquire().unwrap().failure();
        b.try_acquire().unwrap().failure();
        assert!(b.try_acquire().is_err());
        assert!(b.try_acquire().is_err());
    });
    let snapshot: Vec<_> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, v)| {
            let k = key.key();
            let labels = k
                .labels()
                .map(|l| (l.key().to_string(), l.value().to_string()))
                .collect();
            (k.name().to_string(), labels, v)
        })
        .collect();
    let b = ("breaker", "orders");
    let calls = "palisade_breaker_calls_total";
    assert_eq!(
        value(&snapshot, calls, &[b, ("outcome", "success")]),
        &DebugValue::Counter(2)
    );
    assert_eq!(
        value(&snapshot, calls, &[b, ("outcome", "failure")]),
        &DebugValue::Counter(2)
    );
    assert_eq!(
        value(&snapshot, calls, &[b, ("outcome", "cancelled")]),
        &DebugValue::Counter(1)
    );
    assert_eq!(
        value(&snapshot, "palisade_breaker_slow_calls_total", &[b]),
        &DebugValue::Counter(1)
    );
    assert_eq!(
        value(&snapshot, "palisade_breaker_rejections_total", &[b]),
        &DebugValue::Counter(2)
    );
    assert_eq!(
        value(
            &snapshot,
            "palisade_breaker_transitions_total",
            &[b, ("from", "closed"), ("to", "open")]
        ),
        &DebugValue::Counter(1)
    );
    let state = value(&snapshot, "palisade_breaker_state", &[b]);
    assert!(
        matches!(state, DebugValue::Gauge(g) if g.0 == 1.0),
        "state gauge should be 1 (open): {state:?}"
    );
}
