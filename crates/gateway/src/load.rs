//! A route's answers to load: its priority when its cluster sheds (the resilience
//! crate's tiered shedding, on the cluster's adaptive concurrency limit), and its
//! hedges when an attempt is slower than usual (tail-latency hedging).

use std::time::Duration;

use http::HeaderMap;
use palisade_resilience::shed::Priority;
use palisade_resilience::timeout::{AdaptiveConfig, AdaptiveTimeout};

use crate::config::{ConfigError, HedgeConfig, PriorityName, ShedConfig, header_name};

/// A route's priority under its cluster's load shedding, and the header that may
/// choose another for one request.
#[derive(Debug)]
pub struct RoutePriority {
    /// The route's own priority.
    pub priority: Priority,
    header: Option<http::HeaderName>,
    trust_header: bool,
}

impl Default for RoutePriority {
    /// `normal`, whatever the request says.
    fn default() -> Self {
        RoutePriority {
            priority: Priority::Normal,
            header: None,
            trust_header: false,
        }
    }
}

impl From<PriorityName> for Priority {
    fn from(p: PriorityName) -> Self {
        match p {
            PriorityName::Sheddable => Priority::Sheddable,
            PriorityName::Normal => Priority::Normal,
            PriorityName::Critical => Priority::Critical,
        }
    }
}

impl RoutePriority {
    /// Builds a route's priority from its `shed` table (`at`: the table's path).
    pub(crate) fn compile(c: &ShedConfig, at: &str, p: &mut Vec<ConfigError>) -> RoutePriority {
        RoutePriority {
            priority: c.priority.into(),
            header: (c.header.as_deref()).and_then(|h| header_name(h, &format!("{at}.header"), p)),
            trust_header: c.trust_header,
        }
    }

    /// The priority of a request with headers `h`: the one its header names, no
    /// higher than the route's unless the header is trusted; the route's when it
    /// names none.
    pub fn of(&self, h: &HeaderMap) -> Priority {
        let asked = match self
            .header
            .as_ref()
            .and_then(|name| h.get(name))
            .map(|v| v.as_bytes())
        {
            Some(b"critical") => Priority::Critical,
            Some(b"normal") => Priority::Normal,
            Some(b"sheddable") => Priority::Sheddable,
            _ => return self.priority,
        };
        if self.trust_header {
            asked
        } else {
            asked.min(self.priority)
        }
    }

    /// The priority's name, for metric labels.
    pub fn name(p: Priority) -> &'static str {
        match p {
            Priority::Sheddable => "sheddable",
            Priority::Normal => "normal",
            Priority::Critical => "critical",
        }
    }
}

/// A route's hedges: when an attempt has not answered after the delay, a second
/// copy goes to another endpoint (see [`HedgeConfig`]).
#[derive(Debug)]
pub struct RouteHedge {
    delay: Duration,
    /// The route's recent answer latency, when the delay follows a quantile of it.
    adaptive: Option<AdaptiveTimeout>,
}

impl RouteHedge {
    /// Builds a route's hedging (`at`: the table's path; `per_try`: the route's
    /// per-try timeout, which the delay must be shorter than), the timeout core
    /// validating an adaptive delay.
    pub(crate) fn compile(
        c: &HedgeConfig,
        per_try: Duration,
        has_retry: bool,
        at: &str,
        p: &mut Vec<ConfigError>,
    ) -> Option<RouteHedge> {
        let before = p.len();
        if !has_retry {
            p.push(ConfigError::new(
                at,
                "needs the route's `retry` table: its budget, body buffer and idempotency rule apply to hedges (`attempts = 1` hedges without retrying)",
            ));
        }
        let delay = c.delay.get();
        if delay.is_zero() || delay >= per_try {
            p.push(ConfigError::new(
                format!("{at}.delay"),
                format!(
                    "must be longer than zero and shorter than the route's per-try timeout ({per_try:?})"
                ),
            ));
        }
        let adaptive = c.quantile.and_then(|quantile| {
            let config = AdaptiveConfig {
                quantile,
                multiplier: 1.0,
                min: c.min_delay.get(),
                max: c.max_delay.map_or(per_try, |d| d.get()),
                initial: delay,
                min_samples: c.min_samples,
                window: c.window.get(),
            };
            AdaptiveTimeout::new(config)
                .map_err(|e| {
                    p.extend(e.into_iter().map(|mut e| {
                        let key = match e.field.as_str() {
                            "min" => "min_delay",
                            "max" => "max_delay",
                            "initial" => "delay",
                            other => other,
                        };
                        e.field = format!("{at}.{key}");
                        e
                    }));
                })
                .ok()
        });
        (p.len() == before).then_some(RouteHedge { delay, adaptive })
    }

    /// How long an attempt runs before it is hedged.
    pub fn delay(&self) -> Duration {
        self.adaptive
            .as_ref()
            .map_or(self.delay, AdaptiveTimeout::timeout)
    }

    /// Records an answer's latency, which an adaptive delay follows.
    pub fn record(&self, latency: Duration) {
        if let Some(t) = &self.adaptive {
            t.record(latency);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn priority(header: &str, trust_header: bool, route: PriorityName) -> RoutePriority {
        let c = ShedConfig {
            priority: route,
            header: Some(header.into()),
            trust_header,
        };
        let mut p = Vec::new();
        let compiled = RoutePriority::compile(&c, "r.shed", &mut p);
        assert!(p.is_empty(), "{p:?}");
        compiled
    }

    fn asking(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-priority", value.parse().unwrap());
        h
    }

    #[test]
    fn an_untrusted_header_can_lower_a_priority_but_never_raise_it() {
        let p = priority("x-priority", false, PriorityName::Normal);
        assert_eq!(p.of(&asking("sheddable")), Priority::Sheddable);
        assert_eq!(p.of(&asking("critical")), Priority::Normal);
        assert_eq!(p.of(&HeaderMap::new()), Priority::Normal);
        assert_eq!(
            p.of(&asking("urgent")),
            Priority::Normal,
            "unknown values are ignored"
        );
    }

    #[test]
    fn a_trusted_header_chooses_any_priority() {
        let p = priority("x-priority", true, PriorityName::Sheddable);
        assert_eq!(p.of(&asking("critical")), Priority::Critical);
        assert_eq!(p.of(&HeaderMap::new()), Priority::Sheddable);
    }

    #[test]
    fn a_hedge_needs_retry_settings_and_a_delay_inside_the_per_try_timeout() {
        let c = HedgeConfig {
            delay: crate::config::Dur(Duration::from_secs(3)),
            quantile: Some(1.5),
            min_delay: crate::config::Dur(Duration::from_millis(1)),
            max_delay: None,
            min_samples: 20,
            window: crate::config::Dur(Duration::from_secs(60)),
        };
        let mut p = Vec::new();
        assert!(RouteHedge::compile(&c, Duration::from_secs(2), false, "r.hedge", &mut p).is_none());
        let fields: Vec<_> = p.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["r.hedge", "r.hedge.delay", "r.hedge.quantile"]);
    }
}
