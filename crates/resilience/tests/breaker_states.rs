//! State-machine tests with the manual clock: every transition, every override,
//! and the pattern's worked scenario tables.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use palisade_resilience::ManualClock;
use palisade_resilience::breaker::{
    BreakerConfig, Cause, CircuitBreaker, OpenDuration, Outcome, State, StateChange, Trip,
};
use palisade_resilience::window::WindowConfig;

fn breaker(config: BreakerConfig) -> (CircuitBreaker, ManualClock, Arc<Mutex<Vec<StateChange>>>) {
    let clock = ManualClock::new();
    let b = CircuitBreaker::builder("test")
        .config(config)
        .clock(clock.clone())
        .build()
        .unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    b.on_state_change(move |c| sink.lock().unwrap().push(c.clone()));
    (b, clock, events)
}

fn transitions(events: &Mutex<Vec<StateChange>>) -> Vec<(State, State)> {
    events.lock().unwrap().iter().map(|c| (c.from, c.to)).collect()
}

fn run(b: &CircuitBreaker, outcome: Outcome) {
    b.try_acquire().expect("call should be allowed").record(outcome);
}

const S: Outcome = Outcome::Success;
const F: Outcome = Outcome::Failure;

#[test]
fn the_failure_rate_table_trips_on_the_fifth_request() {
    // Failure-rate scenario: threshold 50%; S S F F F -> 0%, 0%, 33%, 50%, 60% -> Open at T5.
    // The table stays closed at T4 (50% of 4 calls), so the minimum volume is 5 calls.
    let (b, _clock, events) = breaker(
        BreakerConfig::empty()
            .failure_rate(0.5, 5)
            .window(WindowConfig::Count { size: 10 }),
    );
    let table = [
        (S, State::Closed),
        (S, State::Closed),
        (F, State::Closed),
        (F, State::Closed),
        (F, State::Open),
    ];
    for (i, (outcome, expected)) in table.into_iter().enumerate() {
        run(&b, outcome);
        assert_eq!(b.state(), expected, "after request {}", i + 1);
    }
    let e = events.lock().unwrap();
    assert_eq!(e.len(), 1);
    assert_eq!(
        e[0].cause,
        Cause::Tripped(Trip::FailureRate { rate: 0.6, calls: 5 })
    );
}

#[test]
fn the_consecutive_failure_table_trips_on_the_eighth_request() {
    // Consecutive-failure scenario: threshold 5; F F S F F F F F -> Open at request 8.
    let (b, _clock, _events) = breaker(BreakerConfig::empty().consecutive_failures(5));
    let outcomes = [F, F, S, F, F, F, F, F];
    for (i, outcome) in outcomes.into_iter().enumerate() {
        assert_eq!(b.state(), State::Closed, "before request {}", i + 1);
        run(&b, outcome);
    }
    assert_eq!(b.state(), State::Open);
    assert_eq!(b.stats().consecutive_failures, 5);
}

#[test]
fn full_cycle_closed_open_half_open_closed() {
    let (b, clock, events) = breaker(
        BreakerConfig::empty()
            .consecutive_failures(2)
            .open_duration(OpenDuration::Fixed(Duration::from_secs(30)))
            .half_open(2, 3),
    );
    run(&b, F);
    run(&b, F);
    assert_eq!(b.state(), State::Open);

    // Open: rejected, with the time to the next probe.
    clock.advance(Duration::from_secs(10));
    let err = b.try_acquire().unwrap_err();
    assert_eq!(err.state, State::Open);
    assert_eq!(err.retry_after, Some(Duration::from_secs(20)));

    // After the open period the next call becomes a probe.
    clock.advance(Duration::from_secs(20));
    let p1 = b.try_acquire().unwrap();
    assert!(p1.is_probe());
    assert_eq!(b.state(), State::HalfOpen);
    let p2 = b.try_acquire().unwrap();
    // At most 2 probes at once.
    let err = b.try_acquire().unwrap_err();
    assert_eq!(err.state, State::HalfOpen);
    p1.success();
    p2.success();
    assert_eq!(b.state(), State::HalfOpen, "2 of 3 successes so far");
    run(&b, S);
    assert_eq!(b.state(), State::Closed);
    // The window starts empty after closing.
    assert_eq!(b.stats().window.total, 0);
    assert_eq!(
        transitions(&events),
        [
            (State::Closed, State::Open),
            (State::Open, State::HalfOpen),
            (State::HalfOpen, State::Closed)
        ]
    );
}

#[test]
fn any_probe_failure_reopens_with_growing_backoff() {
    let (b, clock, events) = breaker(
        BreakerConfig::empty()
            .consecutive_failures(1)
            .open_duration(OpenDuration::backoff(
                Duration::from_secs(10),
                2.0,
                Duration::from_secs(25),
            ))
            .half_open(3, 3),
    );
    run(&b, F);
    let mut expected_open = [10, 20, 25, 25].into_iter();
    let mut open_for = expected_open.next().unwrap();
    for _ in 0..3 {
        assert_eq!(b.stats().open_remaining, Some(Duration::from_secs(open_for)));
        clock.advance(Duration::from_secs(open_for) - Duration::from_millis(1));
        assert!(b.try_acquire().is_err(), "still open 1 ms before the end");
        clock.advance(Duration::from_millis(1));
        let probe = b.try_acquire().unwrap();
        run(&b, S); // one success first...
        probe.failure(); // ...then a failure re-opens
        assert_eq!(b.state(), State::Open);
        open_for = expected_open.next().unwrap();
    }
    assert_eq!(b.stats().reopens, 3);
    // Closing resets the backoff.
    clock.advance(Duration::from_secs(25));
    for _ in 0..3 {
        run(&b, S);
    }
    assert_eq!(b.state(), State::Closed);
    run(&b, F);
    assert_eq!(b.stats().open_remaining, Some(Duration::from_secs(10)));
    let causes: Vec<_> = events.lock().unwrap().iter().map(|c| c.cause).collect();
    assert!(causes.contains(&Cause::ProbeFailed));
}

#[test]
fn a_dropped_probe_frees_its_slot_and_counts_as_cancelled() {
    let (b, clock, _events) = breaker(BreakerConfig::empty().consecutive_failures(1).half_open(1, 1));
    run(&b, F);
    clock.advance(Duration::from_secs(30));
    let probe = b.try_acquire().unwrap();
    assert!(b.try_acquire().is_err(), "the only probe slot is taken");
    drop(probe); // cancelled: neither success nor failure
    assert_eq!(b.state(), State::HalfOpen);
    assert_eq!(b.stats().probes_in_flight, 0);
    let probe = b.try_acquire().expect("slot given back");
    probe.record(Outcome::Ignored);
    assert_eq!(b.state(), State::HalfOpen, "ignored outcomes decide nothing");
    run(&b, S);
    assert_eq!(b.state(), State::Closed);
}

#[test]
fn dropped_closed_permits_are_not_counted() {
    let (b, _clock, _events) = breaker(BreakerConfig::empty().failure_rate(0.5, 1));
    for _ in 0..10 {
        drop(b.try_acquire().unwrap());
    }
    assert_eq!(b.stats().window.total, 0);
    assert_eq!(b.state(), State::Closed);
}

#[test]
fn outcomes_from_before_a_trip_are_ignored() {
    let (b, clock, _events) = breaker(BreakerConfig::empty().consecutive_failures(1).half_open(1, 1));
    let slow_call = b.try_acquire().unwrap(); // started while closed
    run(&b, F); // trips
    clock.advance(Duration::from_secs(30));
    run(&b, S); // probe closes it again
    assert_eq!(b.state(), State::Closed);
    slow_call.failure(); // belongs to the earlier closed period
    assert_eq!(b.state(), State::Closed);
    assert_eq!(b.stats().window.total, 0);
}

#[test]
fn slow_calls_trip_and_slow_probes_reopen() {
    let (b, clock, events) = breaker(
        BreakerConfig::empty()
            .slow_calls(Duration::from_secs(1), 0.5, 4)
            .window(WindowConfig::Count { size: 4 })
            .half_open(1, 1),
    );
    let slow = |b: &CircuitBreaker| {
        let p = b.try_acquire().unwrap();
        clock.advance(Duration::from_secs(2));
        p.success();
    };
    run(&b, S);
    run(&b, S);
    slow(&b);
    assert_eq!(b.state(), State::Closed, "3 calls is under the minimum of 4");
    slow(&b);
    assert_eq!(b.state(), State::Open, "2 of 4 slow = 50%");
    assert!(matches!(
        events.lock().unwrap()[0].cause,
        Cause::Tripped(Trip::SlowCallRate { rate, calls: 4 }) if rate == 0.5
    ));
    clock.advance(Duration::from_secs(30));
    slow(&b); // a slow successful probe counts as a failed probe
    assert_eq!(b.state(), State::Open);
}

#[test]
fn time_window_forgets_old_failures() {
    let (b, clock, _events) = breaker(BreakerConfig::empty().failure_rate(0.5, 4).window(
        WindowConfig::Time {
            length: Duration::from_secs(10),
            buckets: 10,
        },
    ));
    run(&b, F);
    run(&b, F);
    run(&b, F);
    clock.advance(Duration::from_secs(11)); // those three have left the window
    run(&b, S);
    run(&b, S);
    run(&b, S);
    run(&b, F);
    assert_eq!(b.state(), State::Closed, "1 of 4 recent calls failed");
    assert_eq!(b.stats().window.total, 4);
}

#[test]
fn forced_open_disabled_and_reset() {
    let (b, _clock, events) = breaker(BreakerConfig::empty().consecutive_failures(1));
    b.force_open();
    assert_eq!(b.try_acquire().unwrap_err().state, State::ForcedOpen);
    b.disable();
    for _ in 0..10 {
        run(&b, F); // disabled: nothing is recorded, nothing trips
    }
    assert_eq!(b.state(), State::Disabled);
    assert_eq!(b.stats().window.total, 0);
    b.reset();
    assert_eq!(b.state(), State::Closed);
    run(&b, F);
    assert_eq!(b.state(), State::Open);
    b.reset();
    assert_eq!(b.state(), State::Closed);
    assert!(b.try_acquire().is_ok());
    let causes: Vec<_> = events.lock().unwrap().iter().map(|c| (c.to, c.cause)).collect();
    assert_eq!(causes[0], (State::ForcedOpen, Cause::Manual));
    assert_eq!(causes[1], (State::Disabled, Cause::Manual));
}

#[test]
fn metrics_only_mode_decides_but_never_rejects() {
    let (b, clock, events) = breaker(BreakerConfig::empty().consecutive_failures(2).half_open(1, 1));
    b.set_metrics_only(true);
    run(&b, F);
    run(&b, F);
    assert_eq!(b.state(), State::Open, "it trips as if live");
    for _ in 0..5 {
        // would be rejected; let through, outcome not counted
        run(&b, S);
    }
    assert_eq!(b.state(), State::Open);
    clock.advance(Duration::from_secs(30));
    let probe = b.try_acquire().unwrap();
    assert!(probe.is_probe());
    run(&b, F); // not a probe: a shadow call, not counted
    assert_eq!(b.state(), State::HalfOpen);
    probe.success();
    assert_eq!(b.state(), State::Closed);
    assert_eq!(transitions(&events).len(), 3);
}

#[test]
fn call_api_classifies_and_rejects() {
    let (b, _clock, _events) = breaker(BreakerConfig::empty().consecutive_failures(2));
    let ok: Result<u32, _> = b.call(|| Ok::<_, &str>(1));
    assert_eq!(ok.unwrap(), 1);
    // A custom classifier: this error is the caller's fault, not the dependency's.
    for _ in 0..5 {
        let r = b.call_with(|_| Outcome::Ignored, || Err::<u32, _>("404"));
        assert_eq!(r.unwrap_err().into_inner(), Some("404"));
    }
    assert_eq!(b.state(), State::Closed);
    let _ = b.call(|| Err::<u32, _>("boom"));
    let _ = b.call(|| Err::<u32, _>("boom"));
    let err = b.call(|| Ok::<u32, &str>(1)).unwrap_err();
    assert!(err.to_string().contains("circuit breaker is open"), "{err}");
}

#[tokio::test]
async fn async_call_cancelled_mid_flight_frees_the_probe() {
    let (b, clock, _events) = breaker(BreakerConfig::empty().consecutive_failures(1).half_open(1, 1));
    run(&b, F);
    clock.advance(Duration::from_secs(30));
    {
        let fut = b.call_async(std::future::pending::<Result<(), ()>>);
        let mut fut = std::pin::pin!(fut);
        // Poll once so the probe is taken, then drop the future.
        assert!(futures::poll!(fut.as_mut()).is_pending());
        assert_eq!(b.stats().probes_in_flight, 1);
    }
    assert_eq!(b.stats().probes_in_flight, 0);
    let r = b.call_async(|| async { Ok::<_, ()>(7) }).await;
    assert_eq!(r.unwrap(), 7);
    assert_eq!(b.state(), State::Closed);
}

#[test]
fn would_admit_predicts_acquire_without_changing_state() {
    let (b, clock, events) = breaker(
        BreakerConfig::empty()
            .consecutive_failures(1)
            .half_open(1, 1)
            .open_duration(OpenDuration::Fixed(Duration::from_secs(10))),
    );
    assert!(b.would_admit());
    run(&b, F);
    assert!(!b.would_admit(), "open");
    clock.advance(Duration::from_secs(10));
    assert!(b.would_admit(), "open time over: the next call is a probe");
    assert_eq!(b.state(), State::Open, "asking changed nothing");
    let probe = b.try_acquire().unwrap();
    assert!(!b.would_admit(), "the only probe slot is taken");
    probe.record(S);
    assert!(b.would_admit());
    b.force_open();
    assert!(!b.would_admit());
    assert_eq!(transitions(&events).len(), 4);
}
