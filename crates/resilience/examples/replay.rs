//! Replays a trace of calls through two breaker configurations and prints, second
//! by second, what each would have done.
//!
//! ```text
//! cargo run -p palisade-resilience --example replay              # a built-in trace
//! cargo run -p palisade-resilience --example replay -- trace.csv # start_ms,latency_ms,ok|fail|ignore
//! ```

use std::time::Duration;

use palisade_resilience::breaker::{BreakerConfig, OpenDuration, Outcome, RateThreshold, State};
use palisade_resilience::replay::{PolicySet, Timeline, TraceEvent, Verdict, parse_trace, replay};

/// 60 s at 50 calls per second: healthy, a 15 s outage from 10 s, a slow and flaky
/// spell from 40 s, healthy again from 50 s.
fn built_in_trace() -> Vec<TraceEvent> {
    let mut rng = fastrand::Rng::with_seed(7);
    (0..3000u64)
        .map(|i| {
            let at = Duration::from_millis(i * 20);
            let s = at.as_secs();
            let (fail_p, latency_ms) = match s {
                10..25 => (0.95, 30),
                40..50 => (0.3, 400),
                _ => (0.01, 20),
            };
            TraceEvent {
                at,
                latency: Duration::from_millis(latency_ms + rng.u64(0..10)),
                outcome: if rng.f64() < fail_p {
                    Outcome::Failure
                } else {
                    Outcome::Success
                },
            }
        })
        .collect()
}

fn symbol(state: State) -> char {
    match state {
        State::Closed => '.',
        State::Open | State::ForcedOpen => 'O',
        State::HalfOpen => 'h',
        State::Disabled => '-',
    }
}

/// Per second: calls admitted and refused, and the breaker's states during it.
fn per_second(timeline: &Timeline, second: u64) -> (usize, usize, String) {
    let steps: Vec<_> = timeline
        .steps
        .iter()
        .filter(|s| s.at.as_secs() == second)
        .collect();
    let admitted = steps.iter().filter(|s| s.verdict == Verdict::Admitted).count();
    let mut states: Vec<char> = steps.iter().map(|s| symbol(s.breaker)).collect();
    states.dedup();
    (admitted, steps.len() - admitted, states.into_iter().collect())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let trace = match std::env::args().nth(1) {
        Some(path) => parse_trace(&std::fs::read_to_string(path)?)?,
        None => built_in_trace(),
    };
    let lenient = BreakerConfig::default();
    let strict = BreakerConfig {
        consecutive_failures: Some(3),
        failure_rate: Some(RateThreshold {
            threshold: 0.2,
            min_calls: 10,
        }),
        open_duration: OpenDuration::Fixed(Duration::from_secs(2)),
        ..BreakerConfig::default()
    };
    let configs = [("A: defaults", lenient), ("B: strict, 2 s open", strict)];
    let timelines: Vec<Timeline> = configs
        .iter()
        .map(|(_, c)| {
            replay(
                &trace,
                &PolicySet {
                    breaker: Some(c.clone()),
                    ..Default::default()
                },
            )
        })
        .collect::<Result<_, _>>()?;
    let mut out = String::new();
    out.push_str(&format!(
        "{:>4}  {:<28}{:<28}\n",
        "sec", configs[0].0, configs[1].0
    ));
    out.push_str(&format!(
        "{:>4}  {:<28}{:<28}\n",
        "", "admit/reject states", "admit/reject states"
    ));
    let last = trace.last().map_or(0, |e| e.at.as_secs());
    for second in 0..=last {
        out.push_str(&format!("{second:>4}"));
        for t in &timelines {
            let (admitted, refused, states) = per_second(t, second);
            out.push_str(&format!("  {:>5}/{:<5} {:<16}", admitted, refused, states));
        }
        out.push('\n');
    }
    for ((name, _), t) in configs.iter().zip(&timelines) {
        let (avoided, lost) = t.failures_avoided_and_successes_lost(&trace);
        out.push_str(&format!(
            "{name}: {} transitions, {avoided} failing calls kept off the dependency, {lost} good calls refused\n",
            t.transitions.len()
        ));
    }
    use std::io::Write;
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(())
}
