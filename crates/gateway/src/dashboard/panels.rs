//! Services' own panels (`[[gateway.panels]]`): each second every panel's URLs
//! are read at once, each within its panel's timeout, over a connection kept
//! from one sample to the next. What a service answers is kept to its shape (a
//! flat map of numbers for counters and gauges, at most [`MAX_ROWS`] rows of
//! scalars), so a page never draws more than a panel promised.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use http::Uri;
use serde_json::{Map, Value, json};

use crate::config::{ConfigError, PanelSection};
use crate::connect::UpstreamTls;
use crate::http_client::{Client, http_url};

/// Rows of a panel's table drawn at most.
pub const MAX_ROWS: usize = 100;
/// Figures (counters, gauges) of a panel kept at most.
pub const MAX_FIGURES: usize = 32;
/// The largest answer read.
const MAX_ANSWER_BYTES: usize = 256 << 10;
/// The longest `timeout` a panel may have: the dashboard samples once a second.
const MAX_TIMEOUT: Duration = Duration::from_secs(1);

/// A panel, compiled.
pub struct Panel {
    name: String,
    urls: Vec<Uri>,
    timeout: Duration,
    tls: Option<UpstreamTls>,
}

impl std::fmt::Debug for Panel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Panel")
            .field("name", &self.name)
            .field("urls", &self.urls)
            .finish_non_exhaustive()
    }
}

impl Panel {
    /// The panels `sections` describe; problems to `p`.
    pub(crate) fn compile_all(sections: &[PanelSection], p: &mut Vec<ConfigError>) -> Vec<Panel> {
        let mut names = HashSet::new();
        let mut panels = Vec::new();
        for (i, s) in sections.iter().enumerate() {
            let at = format!("gateway.panels[{i}]");
            let before = p.len();
            if s.name.is_empty() {
                p.push(ConfigError::new(format!("{at}.name"), "must not be empty"));
            } else if !names.insert(s.name.as_str()) {
                let why = format!("another panel is called `{}`", s.name);
                p.push(ConfigError::new(format!("{at}.name"), why));
            }
            if s.urls.is_empty() {
                p.push(ConfigError::new(format!("{at}.urls"), "name at least one URL"));
            }
            let urls: Vec<Uri> = (s.urls.iter().enumerate())
                .filter_map(|(j, u)| http_url(u, &format!("{at}.urls[{j}]"), p))
                .collect();
            if s.timeout.0.is_zero() || s.timeout.0 > MAX_TIMEOUT {
                p.push(ConfigError::new(
                    format!("{at}.timeout"),
                    "must be more than 0 and at most 1s",
                ));
            }
            let tls = if urls.iter().any(|u| u.scheme_str() == Some("https")) {
                UpstreamTls::new(&at, &Default::default(), false)
                    .map_err(|e| p.push(e))
                    .ok()
            } else {
                None
            };
            if p.len() == before {
                panels.push(Panel {
                    name: s.name.clone(),
                    urls,
                    timeout: s.timeout.0,
                    tls,
                });
            }
        }
        panels
    }
}

/// What the sampler keeps for the panels from one sample to the next: a client
/// per URL, and each URL's counters last read.
#[derive(Default)]
pub(super) struct Panels {
    clients: HashMap<Uri, Client>,
    counters: HashMap<(String, Uri), Map<String, Value>>,
}

impl Panels {
    /// One sample of every panel, `secs` after the previous one.
    pub(super) async fn sample(&mut self, panels: &[Panel], secs: f64) -> Vec<Value> {
        let mut timeouts: HashMap<Uri, Duration> = HashMap::new();
        for p in panels {
            for u in &p.urls {
                timeouts.insert(u.clone(), p.timeout);
                if !self.clients.contains_key(u) {
                    let client = Client::new(u.clone(), p.tls.clone(), p.timeout);
                    self.clients.insert(u.clone(), client);
                }
            }
        }
        // URLs a reload took away.
        self.clients.retain(|u, _| timeouts.contains_key(u));
        self.counters.retain(|(_, u), _| timeouts.contains_key(u));
        let mut reads = tokio::task::JoinSet::new();
        for (uri, mut client) in self.clients.drain() {
            let timeout = timeouts.get(&uri).copied().unwrap_or(MAX_TIMEOUT);
            reads.spawn(async move {
                let answer = read(&mut client, &uri, timeout).await;
                (uri, client, answer)
            });
        }
        let mut answers = HashMap::new();
        while let Some(joined) = reads.join_next().await {
            if let Ok((uri, client, answer)) = joined {
                self.clients.insert(uri.clone(), client);
                answers.insert(uri, answer);
            }
        }
        panels.iter().map(|p| self.panel(p, &answers, secs)).collect()
    }

    /// Panel `p`'s sample from the URLs' `answers`.
    fn panel(&mut self, p: &Panel, answers: &HashMap<Uri, Result<Value, String>>, secs: f64) -> Value {
        let mut rates = Map::new();
        let mut shared: Option<&Value> = None;
        let mut errors = Vec::new();
        for u in &p.urls {
            let doc = match answers.get(u) {
                Some(Ok(doc)) => doc,
                Some(Err(e)) => {
                    errors.push(Value::from(e.as_str()));
                    continue;
                }
                None => continue,
            };
            let counters = numbers(doc.get("counters"));
            let before = self
                .counters
                .insert((p.name.clone(), u.clone()), counters.clone());
            if let Some(before) = before {
                add_rates(&mut rates, &before, &counters, secs);
            }
            shared.get_or_insert(doc);
        }
        json!({
            "name": p.name,
            "urls": p.urls.len(),
            "answered": p.urls.len() - errors.len(),
            "rates": rates,
            "gauges": numbers(shared.and_then(|d| d.get("gauges"))),
            "rows": rows(shared.and_then(|d| d.get("rows"))),
            "columns": columns(shared.and_then(|d| d.get("columns"))),
            "errors": errors,
        })
    }
}

/// Adds each counter's rate per second since `before` to `rates`; a counter
/// lower than before (its instance restarted) counts from zero.
fn add_rates(
    rates: &mut Map<String, Value>,
    before: &Map<String, Value>,
    now: &Map<String, Value>,
    secs: f64,
) {
    for (name, v) in now {
        let (Some(now), Some(was)) = (v.as_f64(), before.get(name).and_then(Value::as_f64)) else {
            continue;
        };
        let moved = if now >= was { now - was } else { now };
        let rate = rates.get(name).and_then(Value::as_f64).unwrap_or(0.0) + moved / secs;
        rates.insert(name.clone(), Value::from(rate));
    }
}

/// The numbers of a flat JSON object, at most [`MAX_FIGURES`] of them.
fn numbers(v: Option<&Value>) -> Map<String, Value> {
    (v.and_then(Value::as_object).into_iter().flatten())
        .filter(|(_, v)| v.is_number())
        .take(MAX_FIGURES)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The rows of a table: objects of scalars, at most [`MAX_ROWS`].
fn rows(v: Option<&Value>) -> Vec<Value> {
    let scalar = |v: &Value| v.is_number() || v.is_string() || v.is_boolean() || v.is_null();
    (v.and_then(Value::as_array).into_iter().flatten())
        .filter_map(Value::as_object)
        .take(MAX_ROWS)
        .map(|row| {
            let cells: Map<String, Value> = (row.iter())
                .filter(|(_, v)| scalar(v))
                .take(MAX_FIGURES)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            Value::from(cells)
        })
        .collect()
}

/// The table's columns in the order given, at most [`MAX_FIGURES`] (none: the
/// rows' own keys).
fn columns(v: Option<&Value>) -> Vec<Value> {
    (v.and_then(Value::as_array).into_iter().flatten())
        .filter(|c| c.is_string())
        .take(MAX_FIGURES)
        .cloned()
        .collect()
}

/// `uri`'s JSON, or why it could not be read within `timeout`.
async fn read(client: &mut Client, uri: &Uri, timeout: Duration) -> Result<Value, String> {
    match tokio::time::timeout(timeout, client.get(uri, MAX_ANSWER_BYTES)).await {
        Ok(Ok(body)) => serde_json::from_slice(&body).map_err(|e| format!("{uri}: not JSON: {e}")),
        Ok(Err(e)) => Err(e),
        Err(_) => {
            client.disconnect();
            Err(format!("{uri}: no answer within {timeout:?}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn rates_are_per_second_and_a_restart_counts_from_zero() {
        let mut rates = Map::new();
        let before = map(json!({"a": 10, "b": 50, "new": 1}));
        let now = map(json!({"a": 30, "b": 5, "c": 7}));
        add_rates(&mut rates, &before, &now, 2.0);
        assert_eq!(rates["a"], 10.0);
        assert_eq!(rates["b"], 2.5);
        assert!(!rates.contains_key("c"), "no rate before a second reading");
        add_rates(&mut rates, &before, &now, 2.0);
        assert_eq!(rates["a"], 20.0, "a second URL's rate adds to the first's");
    }

    #[test]
    fn answers_are_kept_to_their_shape() {
        let doc = json!({"gauges": {"n": 1, "s": "x", "o": {"deep": 1}}, "rows": [{"a": 1, "b": [1]}, 3]});
        assert_eq!(Value::from(numbers(doc.get("gauges"))), json!({"n": 1}));
        assert_eq!(rows(doc.get("rows")), vec![json!({"a": 1})]);
        let many: Vec<Value> = (0..500).map(|i| json!({"i": i})).collect();
        assert_eq!(rows(Some(&Value::from(many))).len(), MAX_ROWS);
        assert!(numbers(None).is_empty() && rows(Some(&json!("no"))).is_empty());
        assert_eq!(columns(Some(&json!(["b", 1, "a"]))), [json!("b"), json!("a")]);
    }
}
