//! Shadow candidates on live calls: they never change what the live call gets, and
//! they count what they would have done, in their report and as metrics; a
//! candidate breaker goes through open, half-open and closed on its own clock.

use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use palisade_resilience::ManualClock;
use palisade_resilience::breaker::{BreakerConfig, CircuitBreaker, OpenDuration, Outcome};
use palisade_resilience::ratelimit::{Quota, RateLimiter};
use palisade_resilience::replay::{Shadow, ShadowReport};

fn report(shadow: &Shadow, name: &str) -> ShadowReport {
    shadow
        .report()
        .into_iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no candidate {name}"))
}

#[test]
fn a_breaker_candidate_counts_what_it_would_have_rejected_through_open_half_open_and_closed() {
    let clock = ManualClock::new();
    let candidate = CircuitBreaker::builder("strict")
        .config(
            BreakerConfig::empty()
                .consecutive_failures(2)
                .open_duration(OpenDuration::Fixed(Duration::from_secs(10)))
                .half_open(1, 1),
        )
        .clock(clock.clone())
        .build()
        .unwrap();
    let shadow = Shadow::new();
    shadow.add_breaker_instance("strict", candidate);

    // Two live failures: the candidate would open, having rejected nothing yet.
    for _ in 0..2 {
        shadow.start().finish(Outcome::Failure);
    }
    assert_eq!(
        report(&shadow, "strict"),
        ShadowReport {
            name: "strict".into(),
            would_reject: 0,
            would_open: 1
        }
    );
    // While it would be open, every live call is one it would have rejected.
    for _ in 0..3 {
        shadow.start().finish(Outcome::Success);
    }
    assert_eq!(report(&shadow, "strict").would_reject, 3);
    // After its open period it would probe, and a success would close it.
    clock.advance(Duration::from_secs(10));
    shadow.start().finish(Outcome::Success);
    shadow.start().finish(Outcome::Success);
    let r = report(&shadow, "strict");
    assert_eq!((r.would_reject, r.would_open), (3, 1), "{r:?}");
}

#[test]
fn a_limiter_candidate_counts_calls_over_its_quota_and_candidates_are_independent() {
    let clock = ManualClock::new();
    let shadow = Shadow::new();
    let limiter = RateLimiter::gcra(Quota::per_second(2).burst(2))
        .unwrap()
        .with_clock(clock.clone());
    shadow.add_limiter("two-a-second", limiter);
    shadow
        .add_breaker("lenient", BreakerConfig::empty().consecutive_failures(100))
        .unwrap();
    for _ in 0..5 {
        shadow.start().finish(Outcome::Success);
    }
    assert_eq!(report(&shadow, "two-a-second").would_reject, 3);
    assert_eq!(
        report(&shadow, "lenient"),
        ShadowReport {
            name: "lenient".into(),
            would_reject: 0,
            would_open: 0
        }
    );
    clock.advance(Duration::from_secs(1));
    shadow.start().finish(Outcome::Success);
    assert_eq!(report(&shadow, "two-a-second").would_reject, 3);
}

#[test]
fn what_candidates_would_have_done_is_exported_as_metrics() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let shadow = Shadow::new();
        shadow
            .add_breaker(
                "m",
                BreakerConfig::empty()
                    .consecutive_failures(1)
                    .open_duration(OpenDuration::Fixed(Duration::from_secs(3600))),
            )
            .unwrap();
        shadow.start().finish(Outcome::Failure);
        shadow.start().finish(Outcome::Success);
        shadow.start().finish(Outcome::Success);
    });
    // One snapshot: taking one resets the recorder's counters.
    let snapshot = snapshotter.snapshot().into_vec();
    let counter = |name: &str| {
        snapshot
            .iter()
            .find(|(key, ..)| {
                let k = key.key();
                k.name() == name && k.labels().any(|l| l.key() == "candidate" && l.value() == "m")
            })
            .map(|(.., v)| match v {
                DebugValue::Counter(n) => *n,
                other => panic!("{name} is not a counter: {other:?}"),
            })
            .unwrap_or_else(|| panic!("no metric {name}"))
    };
    assert_eq!(counter("palisade_shadow_would_open_total"), 1);
    assert_eq!(counter("palisade_shadow_would_reject_total"), 2);
}

#[test]
fn calls_from_many_threads_are_all_counted() {
    let shadow = Shadow::new();
    shadow
        .add_breaker(
            "open",
            BreakerConfig::empty()
                .consecutive_failures(1)
                .open_duration(OpenDuration::Fixed(Duration::from_secs(3600))),
        )
        .unwrap();
    shadow.start().finish(Outcome::Failure);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..1000 {
                    shadow.start().finish(Outcome::Success);
                }
            });
        }
    });
    assert_eq!(report(&shadow, "open").would_reject, 4000);
}
