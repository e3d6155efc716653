//! proptest: random sequences of calls, cancellations and clock moves, run through
//! the breaker and through a plain sequential model written from the docs; they must
//! agree on every decision and every state.

use std::collections::VecDeque;
use std::time::Duration;

use palisade_resilience::breaker::{BreakerConfig, CircuitBreaker, OpenDuration, Outcome, State};
use palisade_resilience::window::WindowConfig;
use palisade_resilience::{Clock, ManualClock};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    /// Acquire, let `ms` pass, record `outcome`.
    Call(Outcome, u64),
    /// Acquire and drop the permit unrecorded.
    Cancel,
    /// Let time pass.
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (prop_oneof![Just(Outcome::Success), Just(Outcome::Failure), Just(Outcome::Ignored)], 0u64..2_500)
            .prop_map(|(o, ms)| Op::Call(o, ms)),
        1 => Just(Op::Cancel),
        2 => (0u64..25_000).prop_map(Op::Advance),
    ]
}

fn config() -> impl Strategy<Value = BreakerConfig> {
    let window = prop_oneof![
        (1u32..12).prop_map(|size| WindowConfig::Count { size }),
        (1u32..6).prop_map(|buckets| WindowConfig::Time {
            length: Duration::from_secs(10),
            buckets
        }),
    ];
    let open = prop_oneof![
        Just(OpenDuration::Fixed(Duration::from_secs(5))),
        Just(OpenDuration::backoff(
            Duration::from_secs(5),
            2.0,
            Duration::from_secs(20)
        )),
    ];
    (
        window,
        proptest::option::of(1u32..6),
        proptest::option::of((prop_oneof![Just(0.25), Just(0.5), Just(1.0)], 1u32..8)),
        proptest::option::of((prop_oneof![Just(0.5), Just(1.0)], 1u32..5)),
        open,
        1u32..3,
        1u32..4,
    )
        .prop_filter_map(
            "needs a detector",
            |(window, consecutive, rate, slow, open, probes, successes)| {
                let mut c = BreakerConfig::empty()
                    .window(window)
                    .open_duration(open)
                    .half_open(probes, successes);
                c.consecutive_failures = consecutive;
                if let Some((threshold, min)) = rate {
                    c = c.failure_rate(threshold, min);
                }
                if let Some((rate, min)) = slow {
                    c = c.slow_calls(Duration::from_secs(1), rate, min);
                }
                c.validate().is_ok().then_some(c)
            },
        )
}

/// The reference: the documented behaviour, written as plainly as possible.
struct Model {
    c: BreakerConfig,
    state: State,
    window: VecDeque<(u64, bool, bool)>, // (end time ns, failed, slow)
    consecutive: u32,
    open_until: u64,
    reopens: u32,
    successes: u32,
}

impl Model {
    fn new(c: BreakerConfig) -> Self {
        Model {
            c,
            state: State::Closed,
            window: VecDeque::new(),
            consecutive: 0,
            open_until: 0,
            reopens: 0,
            successes: 0,
        }
    }

    fn snapshot(&self, now: u64) -> (u64, u64, u64) {
        let live: Vec<_> = match self.c.window {
            WindowConfig::Count { .. } => self.window.iter().collect(),
            WindowConfig::Time { length, buckets } => {
                let width = length.as_nanos() as u64 / u64::from(buckets);
                let current = now / width;
                self.window
                    .iter()
                    .filter(|(t, ..)| t / width + u64::from(buckets) > current)
                    .collect()
            }
        };
        let total = live.len() as u64;
        let failures = live.iter().filter(|e| e.1).count() as u64;
        let slow = live.iter().filter(|e| e.2).count() as u64;
        (total, failures, slow)
    }

    /// Returns whether the call may proceed, and whether it is a probe.
    fn acquire(&mut self, now: u64) -> Option<bool> {
        if self.state == State::Open && now >= self.open_until {
            self.state = State::HalfOpen;
            self.successes = 0;
        }
        match self.state {
            State::Closed => Some(false),
            // sequential: no other probe is ever in flight
            State::HalfOpen => Some(true),
            _ => None,
        }
    }

    fn open(&mut self, now: u64, reopens: u32) {
        self.state = State::Open;
        let until = now + self.c.open_duration.after_reopens(reopens).as_nanos() as u64;
        self.open_until = self.open_until.max(until);
    }

    fn record(&mut self, probe: bool, start: u64, now: u64, outcome: Outcome) {
        let slow = self
            .c
            .slow_call
            .is_some_and(|s| now - start >= s.duration.as_nanos() as u64);
        if probe {
            match outcome {
                Outcome::Ignored => {}
                Outcome::Failure => {
                    self.open(now, self.reopens + 1);
                    self.reopens += 1;
                }
                Outcome::Success if slow => {
                    self.open(now, self.reopens + 1);
                    self.reopens += 1;
                }
                Outcome::Success => {
                    self.successes += 1;
                    if self.successes >= self.c.success_threshold {
                        self.state = State::Closed;
                        self.window.clear();
                        self.consecutive = 0;
                        self.reopens = 0;
                    }
                }
            }
            return;
        }
        let failed = match outcome {
            Outcome::Ignored => return,
            o => o == Outcome::Failure,
        };
        self.window.push_back((now, failed, slow));
        if let WindowConfig::Count { size } = self.c.window
            && self.window.len() > size as usize
        {
            self.window.pop_front();
        }
        self.consecutive = if failed { self.consecutive + 1 } else { 0 };
        let mut trip = self.c.consecutive_failures.is_some_and(|n| self.consecutive >= n);
        if !trip && (failed || slow) {
            let (total, failures, slow_n) = self.snapshot(now);
            let judge = |part: u64, threshold: f64, min: u32| {
                total >= u64::from(min) && total > 0 && part as f64 / total as f64 >= threshold
            };
            trip = self
                .c
                .failure_rate
                .is_some_and(|r| judge(failures, r.threshold, r.min_calls))
                || self
                    .c
                    .slow_call
                    .is_some_and(|s| judge(slow_n, s.rate, s.min_calls));
        }
        if trip {
            self.open(now, 0);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn breaker_matches_the_sequential_model(config in config(), ops in proptest::collection::vec(op(), 1..120)) {
        let clock = ManualClock::new();
        let breaker = CircuitBreaker::builder("model").config(config.clone()).clock(clock.clone()).build().unwrap();
        let mut model = Model::new(config);
        for (i, op) in ops.into_iter().enumerate() {
            let now = clock.now().as_nanos();
            match op {
                Op::Advance(ms) => clock.advance(Duration::from_millis(ms)),
                Op::Cancel => {
                    let real = breaker.try_acquire().ok().map(|p| p.is_probe());
                    prop_assert_eq!(real, model.acquire(now), "acquire at op {}", i);
                }
                Op::Call(outcome, ms) => {
                    let permit = breaker.try_acquire();
                    let expected = model.acquire(now);
                    prop_assert_eq!(permit.as_ref().ok().map(|p| p.is_probe()), expected, "acquire at op {}", i);
                    clock.advance(Duration::from_millis(ms));
                    if let Ok(permit) = permit {
                        permit.record(outcome);
                        model.record(expected.unwrap(), now, clock.now().as_nanos(), outcome);
                    }
                }
            }
            prop_assert_eq!(breaker.state(), model.state, "state after op {}", i);
            if model.state == State::Closed {
                let (total, failures, slow) = model.snapshot(clock.now().as_nanos());
                let real = breaker.stats().window;
                prop_assert_eq!((real.total, real.failures, real.slow), (total, failures, slow), "window after op {}", i);
            }
        }
    }
}
