//! Traffic splitting and mirroring, compiled: a route's `split` (canary releases:
//! requests sent to other clusters by a header's or cookie's value, else by weight)
//! and its `mirror` (a copy of a share of requests to a shadow cluster). A reload
//! swaps the runtime whole, so a split changes without a request dropped: those in
//! flight finish on the clusters they started with.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::{HeaderName, HeaderValue, Request, header};

use crate::config::{ConfigError, MirrorConfig, SplitConfig, header_name};
use crate::upstream::Upstream;

/// Weights are kept in hundredths of a percent.
const WHOLE: u32 = 10_000;

/// A route's split.
#[derive(Debug)]
pub struct RouteSplit {
    /// Header and cookie rules, tried in order.
    rules: Vec<(Matcher, Arc<Upstream>)>,
    /// Weighted ways: cumulative upper bounds (out of 10,000) and their clusters.
    weighted: Vec<(u32, Arc<Upstream>)>,
}

#[derive(Debug)]
enum Matcher {
    Header(HeaderName, HeaderValue),
    Cookie(String, String),
}

impl Matcher {
    fn matches<B>(&self, req: &Request<B>) -> bool {
        match self {
            Matcher::Header(name, value) => req.headers().get_all(name).iter().any(|v| v == value),
            Matcher::Cookie(name, value) => req
                .headers()
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|pair| pair.trim().split_once('='))
                .any(|(n, v)| n == name && v == value),
        }
    }
}

impl RouteSplit {
    /// Compiles a route's `split` list (`at`: its path); `None` when empty.
    pub(crate) fn compile(
        ways: &[SplitConfig],
        clusters: &HashMap<String, Arc<Upstream>>,
        at: &str,
        p: &mut Vec<ConfigError>,
    ) -> Option<RouteSplit> {
        if ways.is_empty() {
            return None;
        }
        let before = p.len();
        let (mut rules, mut weighted, mut total) = (Vec::new(), Vec::new(), 0u32);
        for (i, w) in ways.iter().enumerate() {
            let at = format!("{at}[{i}]");
            // A missing cluster is the file's error (`Config::validate`).
            let up = clusters.get(&w.cluster).cloned();
            match (w.weight, &w.header, &w.cookie, &w.value) {
                (Some(weight), None, None, None) => {
                    if !(weight > 0.0 && weight <= 100.0) {
                        p.push(ConfigError::new(
                            format!("{at}.weight"),
                            "must be more than 0 and at most 100",
                        ));
                        continue;
                    }
                    total += (weight * 100.0).round() as u32;
                    weighted.extend(up.map(|u| (total, u)));
                }
                (None, Some(h), None, Some(v)) => {
                    let name = header_name(h, &format!("{at}.header"), p);
                    let value = HeaderValue::from_str(v)
                        .map_err(|_| p.push(ConfigError::new(format!("{at}.value"), "is not a header value")))
                        .ok();
                    if let (Some(name), Some(value), Some(up)) = (name, value, up) {
                        rules.push((Matcher::Header(name, value), up));
                    }
                }
                (None, None, Some(c), Some(v)) => {
                    rules.extend(up.map(|u| (Matcher::Cookie(c.clone(), v.clone()), u)));
                }
                _ => p.push(ConfigError::new(
                    &at,
                    "give a weight, or a header (or cookie) and its value",
                )),
            }
        }
        if total > WHOLE {
            p.push(ConfigError::new(at, "the weights add up to more than 100"));
        }
        (p.len() == before).then_some(RouteSplit { rules, weighted })
    }

    /// The cluster `req` goes to, or `None` for the route's own.
    pub fn pick<B>(&self, req: &Request<B>) -> Option<&Arc<Upstream>> {
        if let Some((_, up)) = self.rules.iter().find(|(m, _)| m.matches(req)) {
            return Some(up);
        }
        if self.weighted.is_empty() {
            return None;
        }
        let roll = fastrand::u32(..WHOLE);
        self.weighted
            .iter()
            .find(|(bound, _)| roll < *bound)
            .map(|(_, up)| up)
    }
}

/// A route's mirror.
#[derive(Debug)]
pub struct RouteMirror {
    /// The shadow cluster.
    pub upstream: Arc<Upstream>,
    route: String,
    share: u32,
    max_in_flight: usize,
    in_flight: Arc<AtomicUsize>,
}

impl RouteMirror {
    /// Compiles a route's `mirror` table (`at`: its path).
    pub(crate) fn compile(
        route: &str,
        m: &MirrorConfig,
        clusters: &HashMap<String, Arc<Upstream>>,
        at: &str,
        p: &mut Vec<ConfigError>,
    ) -> Option<RouteMirror> {
        if !(m.share > 0.0 && m.share <= 1.0) {
            p.push(ConfigError::new(
                format!("{at}.share"),
                "must be more than 0 and at most 1",
            ));
            return None;
        }
        if m.max_in_flight == 0 {
            p.push(ConfigError::new(
                format!("{at}.max_in_flight"),
                "must be at least 1",
            ));
            return None;
        }
        Some(RouteMirror {
            upstream: clusters.get(&m.cluster)?.clone(),
            route: route.to_owned(),
            share: (m.share * f64::from(WHOLE)).round() as u32,
            max_in_flight: m.max_in_flight,
            in_flight: Arc::default(),
        })
    }

    /// Whether this request is copied: in its share, and a slot free (taken, and
    /// given back when the returned guard drops).
    pub fn take(&self) -> Option<MirrorSlot> {
        if fastrand::u32(..WHOLE) >= self.share {
            return None;
        }
        if self.in_flight.fetch_add(1, Ordering::AcqRel) >= self.max_in_flight {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            self.count("dropped");
            return None;
        }
        Some(MirrorSlot(self.in_flight.clone()))
    }
}

impl RouteMirror {
    /// The counter of copies with `outcome`.
    pub fn counter(&self, outcome: &'static str) -> metrics::Counter {
        metrics::counter!("palisade_route_mirrored_total", "route" => self.route.clone(), "outcome" => outcome)
    }

    /// Counts a copy's fate.
    pub fn count(&self, outcome: &'static str) {
        self.counter(outcome).increment(1);
    }
}

/// A copy in flight.
#[derive(Debug)]
pub struct MirrorSlot(Arc<AtomicUsize>);

impl Drop for MirrorSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
