//! Replay and shadow: try policy configurations on real traffic without risking it.
//!
//! * **Replay** feeds a recorded trace of calls (start time, latency, outcome)
//!   through a [`PolicySet`] offline, on a manual clock, and returns every decision
//!   and the breaker's state timeline. Two configurations replayed over the same
//!   trace show side by side what each would have done (`examples/replay.rs`).
//! * **Shadow** ([`Shadow`]) runs candidate breakers and limiters next to the live
//!   ones on live traffic. Candidates never reject anything; they only count what
//!   they *would* have rejected and when they *would* have opened, in memory
//!   ([`ShadowReport`]) and as metrics (`palisade_shadow_would_reject_total`,
//!   `palisade_shadow_would_open_total`, labelled by candidate).
//!
//! No peer library offers either: tuning a breaker usually means changing it in
//! production and watching.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::breaker::{BreakerConfig, CircuitBreaker, ConfigError, ConfigErrors, Outcome, Permit, State};
use crate::clock::{Clock, Instant, ManualClock, duration_nanos};
use crate::ratelimit::{Gcra, Quota, RateLimiter};
use crate::sync::{AtomicU64, Ordering};

/// One recorded call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceEvent {
    /// When the call started, from the start of the trace.
    pub at: Duration,
    /// How long it took.
    pub latency: Duration,
    /// How it ended.
    pub outcome: Outcome,
}

/// Parses a trace: one call per line, `start_ms,latency_ms,outcome` with outcome
/// `ok`, `fail` or `ignore`; blank lines and `#` comments are skipped. Lines need
/// not be sorted.
///
/// ```
/// use palisade_resilience::replay::parse_trace;
///
/// let trace = parse_trace("# start,latency,outcome\n0,12,ok\n5,900,fail\n").unwrap();
/// assert_eq!(trace.len(), 2);
/// assert!(parse_trace("0,12,maybe").unwrap_err().to_string().contains("line 1"));
/// ```
pub fn parse_trace(text: &str) -> Result<Vec<TraceEvent>, ConfigErrors> {
    let mut events = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let field = format!("line {}", i + 1);
        let parts: Vec<&str> = line.split(',').map(str::trim).collect();
        let [at, latency, outcome] = parts[..] else {
            errors.push(ConfigError::new(field, "expected start_ms,latency_ms,outcome"));
            continue;
        };
        let outcome = match outcome {
            "ok" => Outcome::Success,
            "fail" => Outcome::Failure,
            "ignore" => Outcome::Ignored,
            other => {
                errors.push(ConfigError::new(
                    field,
                    format!("outcome {other:?} is not ok, fail or ignore"),
                ));
                continue;
            }
        };
        match (at.parse::<f64>(), latency.parse::<f64>()) {
            (Ok(at), Ok(latency)) if at >= 0.0 && latency >= 0.0 && at.is_finite() && latency.is_finite() => {
                events.push(TraceEvent {
                    at: Duration::from_secs_f64(at / 1000.0),
                    latency: Duration::from_secs_f64(latency / 1000.0),
                    outcome,
                });
            }
            _ => errors.push(ConfigError::new(
                field,
                "start and latency must be non-negative milliseconds",
            )),
        }
    }
    ConfigErrors::result(errors)?;
    events.sort_by_key(|e| e.at);
    Ok(events)
}

/// The policies a replay runs, each optional. Checked in the order a pipeline
/// applies them: rate limit, then bulkhead, then breaker.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicySet {
    /// A circuit breaker.
    pub breaker: Option<BreakerConfig>,
    /// A token-bucket rate limit.
    pub rate_limit: Option<Quota>,
    /// A bulkhead of this many concurrent calls.
    pub bulkhead: Option<u32>,
}

/// What a policy set decided for one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// The call went through.
    Admitted,
    /// The rate limit refused it.
    RateLimited,
    /// The bulkhead was full.
    BulkheadFull,
    /// The breaker rejected it.
    BreakerOpen,
}

/// One call of the replay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    /// When it started.
    pub at: Duration,
    /// What was decided.
    pub verdict: Verdict,
    /// The breaker's state when it was decided (Closed without a breaker).
    pub breaker: State,
}

/// The result of a replay.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Timeline {
    /// Every call, in trace order.
    pub steps: Vec<Step>,
    /// Every breaker transition: when, from, to.
    pub transitions: Vec<(Duration, State, State)>,
}

impl Timeline {
    /// How many calls got `verdict`.
    pub fn count(&self, verdict: Verdict) -> usize {
        self.steps.iter().filter(|s| s.verdict == verdict).count()
    }

    /// Of the calls that failed in the trace, how many the policies kept away from
    /// the dependency, and of those that succeeded, how many they refused.
    pub fn failures_avoided_and_successes_lost(&self, trace: &[TraceEvent]) -> (usize, usize) {
        let mut avoided = 0;
        let mut lost = 0;
        for (step, event) in self.steps.iter().zip(trace) {
            if step.verdict != Verdict::Admitted {
                match event.outcome {
                    Outcome::Failure => avoided += 1,
                    Outcome::Success => lost += 1,
                    Outcome::Ignored => {}
                }
            }
        }
        (avoided, lost)
    }
}

/// Replays `trace` (sorted by start, as [`parse_trace`] returns it) through
/// `policies`. Calls overlap as they did when recorded: a call holds its bulkhead
/// slot and breaker permit until `at + latency`, when its outcome is recorded.
pub fn replay(trace: &[TraceEvent], policies: &PolicySet) -> Result<Timeline, ConfigErrors> {
    let clock = ManualClock::new();
    let breaker = match &policies.breaker {
        Some(config) => Some(
            CircuitBreaker::builder("replay")
                .config(config.clone())
                .clock(clock.clone())
                .build()?,
        ),
        None => None,
    };
    let limiter = match policies.rate_limit {
        Some(quota) => Some(RateLimiter::new(Gcra::new(quota)?).with_clock(clock.clone())),
        None => None,
    };
    let transitions = Arc::new(Mutex::new(Vec::new()));
    if let Some(b) = &breaker {
        let sink = transitions.clone();
        b.on_state_change(move |c| {
            let at = Duration::from_nanos(c.at.as_nanos());
            sink.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((at, c.from, c.to));
        });
    }
    let mut in_flight: InFlight = BinaryHeap::new();
    let mut ends: Vec<Ending> = Vec::new();
    let mut steps = Vec::with_capacity(trace.len());
    let mut last = 0u64;
    for event in trace {
        let start = duration_nanos(event.at).max(last);
        last = start;
        finish_calls(&clock, &mut in_flight, &mut ends, start);
        set(&clock, start);
        let state = breaker.as_ref().map_or(State::Closed, CircuitBreaker::state);
        let verdict = if limiter
            .as_ref()
            .is_some_and(|l| l.check_n_at(clock.now(), 1).is_err())
        {
            Verdict::RateLimited
        } else if policies
            .bulkhead
            .is_some_and(|max| in_flight.len() >= max as usize)
        {
            Verdict::BulkheadFull
        } else {
            match breaker.as_ref().map(CircuitBreaker::try_acquire_owned) {
                Some(Err(_)) => Verdict::BreakerOpen,
                permit => {
                    let seq = ends.len();
                    ends.push(Some((permit.and_then(Result::ok), event.outcome)));
                    in_flight.push(Reverse((start + duration_nanos(event.latency), seq)));
                    Verdict::Admitted
                }
            }
        };
        steps.push(Step {
            at: event.at,
            verdict,
            breaker: state,
        });
    }
    finish_calls(&clock, &mut in_flight, &mut ends, u64::MAX);
    drop(breaker);
    let transitions = std::mem::take(&mut *transitions.lock().unwrap_or_else(|e| e.into_inner()));
    Ok(Timeline { steps, transitions })
}

/// Calls in flight, by end time: (end, index into the endings).
type InFlight = BinaryHeap<Reverse<(u64, usize)>>;
/// A call's breaker permit (if it has a breaker) and its recorded outcome.
type Ending = Option<(Option<Permit<CircuitBreaker>>, Outcome)>;

/// Records, in end order and at their end times, the outcome of every call in
/// flight that ended by `until`.
fn finish_calls(clock: &ManualClock, in_flight: &mut InFlight, ends: &mut [Ending], until: u64) {
    while let Some(&Reverse((end, seq))) = in_flight.peek() {
        if end > until {
            break;
        }
        in_flight.pop();
        set(clock, end);
        if let Some((Some(permit), outcome)) = ends[seq].take() {
            permit.record(outcome);
        }
    }
}

fn set(clock: &ManualClock, nanos: u64) {
    if nanos > clock.now().as_nanos() {
        clock.set(Instant::from_nanos(nanos));
    }
}

// --- shadow --------------------------------------------------------------------------

/// What a shadow candidate would have done so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShadowReport {
    /// The candidate's name.
    pub name: String,
    /// Calls it would have rejected.
    pub would_reject: u64,
    /// Times it would have opened (breakers only).
    pub would_open: u64,
}

struct Candidate {
    name: Arc<str>,
    breaker: Option<CircuitBreaker>,
    limiter: Option<RateLimiter>,
    would_reject: AtomicU64,
    would_open: Arc<AtomicU64>,
    reject_metric: metrics::Counter,
}

/// Candidate breakers and limiters run next to the live ones. See the
/// [module docs](self).
///
/// ```
/// use palisade_resilience::breaker::{BreakerConfig, Outcome};
/// use palisade_resilience::replay::Shadow;
///
/// let shadow = Shadow::new();
/// shadow.add_breaker("strict", BreakerConfig { consecutive_failures: Some(2), ..BreakerConfig::default() }).unwrap();
/// for _ in 0..2 {
///     let call = shadow.start();
///     call.finish(Outcome::Failure); // the live call failed
/// }
/// let report = &shadow.report()[0];
/// assert_eq!((report.would_open, report.would_reject), (1, 0));
/// shadow.start().finish(Outcome::Success);
/// assert_eq!(shadow.report()[0].would_reject, 1, "the strict breaker would have rejected this one");
/// ```
#[derive(Clone, Default)]
pub struct Shadow {
    candidates: Arc<Mutex<Vec<Arc<Candidate>>>>,
}

impl std::fmt::Debug for Shadow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shadow").field("report", &self.report()).finish()
    }
}

impl Shadow {
    /// No candidates yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn add(&self, name: &str, breaker: Option<CircuitBreaker>, limiter: Option<RateLimiter>) {
        let would_open = Arc::new(AtomicU64::new(0));
        if let Some(b) = &breaker {
            b.set_metrics_only(true);
            let counter = would_open.clone();
            let metric =
                metrics::counter!("palisade_shadow_would_open_total", "candidate" => name.to_string());
            b.on_state_change(move |c| {
                if c.to == State::Open {
                    counter.fetch_add(1, Ordering::Relaxed);
                    metric.increment(1);
                }
            });
        }
        let candidate = Candidate {
            name: name.into(),
            breaker,
            limiter,
            would_reject: AtomicU64::new(0),
            would_open,
            reject_metric: metrics::counter!("palisade_shadow_would_reject_total", "candidate" => name.to_string()),
        };
        self.candidates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::new(candidate));
    }

    /// Adds a candidate breaker.
    pub fn add_breaker(&self, name: &str, config: BreakerConfig) -> Result<(), ConfigErrors> {
        let breaker = CircuitBreaker::builder(format!("shadow/{name}"))
            .config(config)
            .build()?;
        self.add(name, Some(breaker), None);
        Ok(())
    }

    /// Adds a candidate breaker built elsewhere (on a chosen clock, say). It is put
    /// in metrics-only mode.
    pub fn add_breaker_instance(&self, name: &str, breaker: CircuitBreaker) {
        self.add(name, Some(breaker), None);
    }

    /// Adds a candidate rate limiter.
    pub fn add_limiter(&self, name: &str, limiter: RateLimiter) {
        self.add(name, None, Some(limiter));
    }

    /// A live call starts: every candidate decides what it would have done.
    pub fn start(&self) -> ShadowCall {
        let candidates = self.candidates.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut permits = Vec::with_capacity(candidates.len());
        for c in &candidates {
            let limited = c.limiter.as_ref().is_some_and(|l| l.check().is_err());
            // A metrics-only breaker lets every call through and says which it
            // would have rejected (open, or half-open with its probes taken).
            let permit = c.breaker.as_ref().and_then(|b| b.try_acquire_owned().ok());
            if limited || permit.as_ref().is_some_and(|p| p.would_have_been_rejected()) {
                c.would_reject.fetch_add(1, Ordering::Relaxed);
                c.reject_metric.increment(1);
            }
            permits.push(permit);
        }
        ShadowCall { permits }
    }

    /// What every candidate would have done so far.
    pub fn report(&self) -> Vec<ShadowReport> {
        let candidates = self.candidates.lock().unwrap_or_else(|e| e.into_inner());
        candidates
            .iter()
            .map(|c| ShadowReport {
                name: c.name.to_string(),
                would_reject: c.would_reject.load(Ordering::Relaxed),
                would_open: c.would_open.load(Ordering::Relaxed),
            })
            .collect()
    }
}

/// A live call as the shadow candidates see it.
#[derive(Debug)]
#[must_use = "finish the call with its outcome"]
pub struct ShadowCall {
    permits: Vec<Option<Permit<CircuitBreaker>>>,
}

impl ShadowCall {
    /// The live call ended with `outcome`.
    pub fn finish(self, outcome: Outcome) {
        for permit in self.permits.into_iter().flatten() {
            permit.record(outcome);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::breaker::OpenDuration;

    /// 100 calls 10 ms apart: calls 20..60 fail.
    fn outage() -> Vec<TraceEvent> {
        (0..100u64)
            .map(|i| TraceEvent {
                at: Duration::from_millis(i * 10),
                latency: Duration::from_millis(5),
                outcome: if (20..60).contains(&i) {
                    Outcome::Failure
                } else {
                    Outcome::Success
                },
            })
            .collect()
    }

    fn breaker(consecutive: u32) -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: Some(consecutive),
            failure_rate: None,
            open_duration: OpenDuration::Fixed(Duration::from_millis(100)),
            half_open_probes: 1,
            success_threshold: 1,
            ..BreakerConfig::default()
        }
    }

    #[test]
    fn replay_shows_the_breaker_opening_during_the_outage_and_closing_after() {
        let trace = outage();
        let timeline = replay(
            &trace,
            &PolicySet {
                breaker: Some(breaker(5)),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(timeline.steps.len(), 100);
        // Five failures open it; it probes every 100 ms and re-opens until call 60.
        assert_eq!(
            timeline.transitions[0],
            (Duration::from_millis(245), State::Closed, State::Open)
        );
        assert_eq!(timeline.transitions.last().unwrap().2, State::Closed);
        let (avoided, lost) = timeline.failures_avoided_and_successes_lost(&trace);
        assert!(avoided >= 30, "avoided {avoided}");
        assert!(lost <= 10, "lost {lost}");
        assert!(timeline.steps[99].verdict == Verdict::Admitted);
    }

    #[test]
    fn a_stricter_config_avoids_more_and_no_breaker_avoids_nothing() {
        let trace = outage();
        let run = |b: Option<BreakerConfig>| {
            replay(
                &trace,
                &PolicySet {
                    breaker: b,
                    ..Default::default()
                },
            )
            .unwrap()
            .failures_avoided_and_successes_lost(&trace)
        };
        let (strict, _) = run(Some(breaker(2)));
        let (lenient, _) = run(Some(breaker(20)));
        assert!(strict > lenient, "{strict} vs {lenient}");
        assert_eq!(run(None), (0, 0));
    }

    #[test]
    fn rate_limit_and_bulkhead_are_replayed_with_overlap() {
        // 10 calls at once, each 1 s long: a bulkhead of 4 admits 4.
        let trace: Vec<_> = (0..10)
            .map(|_| TraceEvent {
                at: Duration::ZERO,
                latency: Duration::from_secs(1),
                outcome: Outcome::Success,
            })
            .collect();
        let timeline = replay(
            &trace,
            &PolicySet {
                bulkhead: Some(4),
                rate_limit: Some(Quota::per_second(100).burst(6)),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(timeline.count(Verdict::Admitted), 4);
        assert_eq!(timeline.count(Verdict::BulkheadFull), 2);
        assert_eq!(timeline.count(Verdict::RateLimited), 4);
    }

    #[test]
    fn bad_trace_lines_are_all_reported() {
        let errors = parse_trace("0,1,ok\n1,2\n-1,2,ok\n3,4,boom\n").unwrap_err();
        assert_eq!(errors.fields(), ["line 2", "line 3", "line 4"]);
    }
}
