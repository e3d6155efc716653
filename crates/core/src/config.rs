//! Configuration files in TOML: durations with units, every problem named by its
//! field and line, and environment overrides.
//!
//! ```
//! use palisade_core::config::{Dur, from_toml};
//!
//! #[derive(Debug, serde::Deserialize)]
//! struct Settings {
//!     timeout: Dur,
//! }
//!
//! let env = [("APP_TIMEOUT".to_string(), "250ms".to_string())];
//! let s: Settings = from_toml("timeout = \"1s\"", "APP_", env).unwrap();
//! assert_eq!(s.timeout.get(), std::time::Duration::from_millis(250));
//!
//! let err = from_toml::<Settings>("timeout = \"1 fortnight\"", "APP_", []).unwrap_err();
//! assert_eq!(err.fields(), ["timeout"]);
//! assert_eq!(err.0[0].line, Some(1));
//! ```

use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{ConfigError, ConfigErrors};

/// A duration written as `"250ms"`, `"30s"`, `"5m"`, `"1h"` (or a combination such
/// as `"1m30s"`), at most [`MAX_DURATION`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dur(pub Duration);

impl Dur {
    /// The duration.
    pub fn get(self) -> Duration {
        self.0
    }

    /// Whether it is zero.
    pub fn is_zero(self) -> bool {
        self.0.is_zero()
    }
}

impl From<Duration> for Dur {
    fn from(d: Duration) -> Self {
        Dur(d)
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms % 1000 == 0 && ms > 0 {
            write!(f, "{}s", ms / 1000)
        } else if ms > 0 || self.0.is_zero() {
            write!(f, "{ms}ms")
        } else {
            write!(f, "{}us", self.0.as_micros())
        }
    }
}

/// Parses `"250ms"`, `"30s"`, `"1m30s"`, `"2h"`, `"100us"`, `"5ns"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!(
                "`{text}` is not a duration (try \"250ms\", \"30s\", \"5m\")"
            ));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("`{text}`: number too large"))?;
        rest = &rest[digits..];
        let unit = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let too_long = || format!("`{text}` is too long");
        let d = match &rest[..unit] {
            "ns" => Duration::from_nanos(n),
            "us" | "µs" => Duration::from_micros(n),
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(too_long)?),
            "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(too_long)?),
            "" => return Err(format!("`{text}` needs a unit (ms, s, m, h)")),
            u => return Err(format!("`{text}`: unknown unit `{u}` (use ms, s, m, h)")),
        };
        total = total.checked_add(d).ok_or_else(too_long)?;
        rest = &rest[unit..];
    }
    Ok(total)
}

/// The longest duration a configuration accepts: longer ones are mistakes (a
/// deadline that far away is no deadline), and bounding them keeps every
/// `now + duration` in range.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let d = parse_duration(&s).map_err(serde::de::Error::custom)?;
        if d > MAX_DURATION {
            return Err(serde::de::Error::custom(format!(
                "`{s}` is longer than 24h, the longest duration accepted"
            )));
        }
        Ok(Dur(d))
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// Reads the TOML file at `path` into `T`, with overrides from the process's
/// environment (see [`from_toml`]).
pub fn read_toml<T: DeserializeOwned>(path: &Path, env_prefix: &str) -> Result<T, ConfigErrors> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigErrors::one(path.display().to_string(), format!("cannot read: {e}")))?;
    from_toml(&text, env_prefix, std::env::vars())
}

/// Parses TOML text into `T`, first applying overrides from the `(name, value)`
/// pairs named `<env_prefix><KEY>[__<KEY>..]`: `PALISADE_GATEWAY__LISTEN` sets
/// `gateway.listen`. A value is read as a TOML literal when it is one (a number, a
/// boolean, an array), else as a string.
///
/// Every wrong type and unknown key is reported, each naming the table and key it
/// is at (a key inside an inline table too: `routes.retry.tries`) and its line
/// (without a line after overrides, whose lines are not the file's).
pub fn from_toml<T: DeserializeOwned>(
    text: &str,
    env_prefix: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T, ConfigErrors> {
    let mut table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigErrors::from(de_error(&e, text)))?;
    let mut problems = Vec::new();
    let mut overrides = false;
    for (name, value) in env {
        let Some(path) = name.strip_prefix(env_prefix) else {
            continue;
        };
        overrides = true;
        let keys: Vec<String> = path.split("__").map(str::to_lowercase).collect();
        if let Err(e) = set_path(&mut table, &keys, &value) {
            problems.push(ConfigError::new(name, e));
        }
    }
    ConfigErrors::result(problems)?;
    // Deserialise from text, not from the table, so an error keeps its place in the
    // file; with overrides, the place is in the file as overridden.
    let overridden;
    let text = if overrides {
        overridden = toml::to_string(&table).map_err(|e| ConfigErrors::one(env_prefix, e.to_string()))?;
        overridden.as_str()
    } else {
        text
    };
    toml::from_str(text).map_err(|e| {
        ConfigErrors(
            type_errors::<T>(text, e)
                .iter()
                .map(|e| {
                    let mut found = de_error(e, text);
                    if overrides {
                        found.line = None;
                        found.problem = format!("{} (after {env_prefix}* overrides)", found.problem);
                    }
                    found
                })
                .collect(),
        )
    })
}

/// A TOML or serde error naming where it is: the table the line is in and the key
/// the error is at, the key before the nearest `=` left of it on its line (so a
/// field of an inline table, `endpoints = [{ tier = -1 }]`, is `endpoints.tier`).
fn de_error(e: &toml::de::Error, text: &str) -> ConfigError {
    let message = e.message().trim();
    let Some(span) = e.span() else {
        return ConfigError::new("(file)", message);
    };
    let start = span.start.min(text.len());
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let line_no = text[..start].matches('\n').count() + 1;
    let line = text[line_start..].lines().next().unwrap_or("").trim();
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(table_name);
    let key = if line.starts_with('[') {
        None
    } else {
        let rest = text[start..].lines().next().unwrap_or("");
        key_at(&text[line_start..start], rest)
    };
    let at = match (table, key) {
        (Some(t), Some(k)) => format!("{t}.{k}"),
        (None, Some(k)) => k,
        (Some(t), None) => t.to_string(),
        (None, None) => format!("`{line}`"),
    };
    ConfigError::new(at, message).at_line(line_no)
}

/// `[a.b] # note` or `[[a]]` -> `a.b`, `a`.
fn table_name(header: &str) -> &str {
    header
        .trim_start_matches('[')
        .split(']')
        .next()
        .unwrap_or("")
        .trim()
}

/// The dotted key of an error on a `key = value` line: `before` is the line up to
/// the error, `rest` the line from it. The line's own key, and the inner key when
/// the error is inside an inline table: the key the error stands on (an unknown
/// field), or else the key whose value it is in.
fn key_at(before: &str, rest: &str) -> Option<String> {
    let clean = |k: &str| k.trim().trim_matches('"').to_string();
    let is_key_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '"';
    let line = format!("{before}{rest}");
    let own = line
        .split_once('=')
        .map(|(k, _)| clean(k))
        .filter(|k| !k.is_empty())?;
    let inner = match before.rsplit_once('=') {
        // Past the last value (a `,` or `{` since): the error stands on a key.
        Some((left, value)) if !value.contains([',', '{']) => left
            .trim_end()
            .rsplit(|c: char| !is_key_char(c))
            .next()
            .map(clean),
        Some(_) => Some(clean(rest.split(|c: char| !is_key_char(c)).next().unwrap_or(""))),
        None => None,
    }
    .filter(|i| !i.is_empty() && *i != own);
    Some(match inner {
        Some(i) => format!("{own}.{i}"),
        None => own,
    })
}

/// Every wrong type and unknown key in `text`, in its order, starting from serde's
/// `first`. Serde stops at one, so the line it names is blanked out and the text read
/// again, until it reads or an error is not on a `key = value` line of its own.
/// Blanking keeps every line number. It stops rather than report what the blanking
/// itself caused: a text no longer valid TOML (a value over several lines), or a
/// field now missing.
fn type_errors<T: DeserializeOwned>(text: &str, first: toml::de::Error) -> Vec<toml::de::Error> {
    const MAX: usize = 32;
    let mut errors = Vec::new();
    let mut next = Some(first);
    let mut text = text.to_string();
    while let Some(e) = next.take() {
        let span = e.span();
        errors.push(e);
        let Some(span) = span else { break };
        if errors.len() >= MAX {
            break;
        }
        let start = text[..span.start.min(text.len())]
            .rfind('\n')
            .map_or(0, |i| i + 1);
        let end = text[start..].find('\n').map_or(text.len(), |i| start + i);
        let line = text[start..end].trim_start();
        if line.starts_with('[') || !line.contains('=') {
            break;
        }
        text.replace_range(start..end, &" ".repeat(end - start));
        if text.parse::<toml::Table>().is_err() {
            break;
        }
        next = match toml::from_str::<T>(&text) {
            Err(e) if !e.message().starts_with("missing field") => Some(e),
            _ => None,
        };
    }
    // In the order of the file, not of serde's walk through it.
    errors.sort_by_key(|e| e.span().map_or(usize::MAX, |s| s.start));
    errors
}

fn set_path(table: &mut toml::Table, keys: &[String], value: &str) -> Result<(), String> {
    let (last, parents) = keys.split_last().ok_or("empty key")?;
    if keys.iter().any(String::is_empty) {
        return Err("an empty key (keys are separated by `__`)".into());
    }
    let mut t = table;
    for k in parents {
        let entry = t
            .entry(k.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{k}` is not a table"))?;
    }
    // A TOML literal if it parses as one (numbers, booleans, arrays), else a string.
    let parsed = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    t.insert(last.clone(), parsed);
    Ok(())
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Server {
        listen: std::net::SocketAddr,
        #[serde(default)]
        workers: u32,
        #[serde(default)]
        retry: Option<Retry>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Retry {
        attempts: u32,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        server: Server,
        #[serde(default)]
        timeout: Option<Dur>,
    }

    fn parse(text: &str) -> Result<File, ConfigErrors> {
        from_toml(text, "APP_", [])
    }

    #[test]
    fn a_valid_file_reads() {
        let f =
            parse("timeout = \"2s\"\n[server]\nlisten = \"127.0.0.1:1\"\nretry = { attempts = 3 }").unwrap();
        assert_eq!(f.timeout, Some(Dur(Duration::from_secs(2))));
        assert_eq!(f.server.retry.map(|r| r.attempts), Some(3));
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("100us"), Ok(Duration::from_micros(100)));
        assert!(parse_duration("30").unwrap_err().contains("unit"));
        assert!(parse_duration("3 weeks").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("99999999999999999999h").is_err());
        assert!(
            parse_duration("5124095576030432h")
                .unwrap_err()
                .contains("too long")
        );
    }

    #[test]
    fn durations_longer_than_a_day_are_refused() {
        let err = parse("timeout = \"25h\"\n[server]\nlisten = \"127.0.0.1:1\"").unwrap_err();
        assert_eq!(err.fields(), ["timeout"]);
        assert!(err.to_string().contains("longer than 24h"), "{err}");
    }

    #[test]
    fn durations_display_as_they_are_written() {
        for text in ["30s", "250ms", "100us", "0ms"] {
            let d = Dur(parse_duration(text).unwrap());
            assert_eq!(d.to_string(), text);
        }
    }

    #[test]
    fn every_wrong_type_and_unknown_key_is_named_with_its_line() {
        let text = "[server] # the listener\nlisten = 12\nworkers = \"two\"\nbacklog = 5\n";
        let err = parse(text).unwrap_err();
        let got: Vec<_> = err.iter().map(|e| (e.field.as_str(), e.line)).collect();
        assert_eq!(
            got,
            [
                ("server.listen", Some(2)),
                ("server.workers", Some(3)),
                ("server.backlog", Some(4))
            ]
        );
        assert!(err.0[2].problem.contains("unknown field"), "{err}");
    }

    #[test]
    fn a_key_inside_an_inline_table_is_named() {
        let base = "[server]\nlisten = \"127.0.0.1:1\"\n";
        let err = parse(&format!("{base}retry = {{ attempts = 2, tries = 1 }}")).unwrap_err();
        assert_eq!(err.fields(), ["server.retry.tries"]);
        let err = parse(&format!("{base}retry = {{ attempts = \"two\" }}")).unwrap_err();
        assert_eq!(err.fields(), ["server.retry.attempts"]);
    }

    #[test]
    fn blanking_a_line_never_reports_what_the_blanking_caused() {
        // `listen` is required: with its bad line blanked it would be missing.
        let err = parse("[server]\nlisten = 5").unwrap_err();
        assert_eq!(err.fields(), ["server.listen"]);
    }

    #[test]
    fn environment_overrides_values_and_errors_say_so() {
        let text = "[server]\nlisten = \"127.0.0.1:1\"\n";
        let env = [
            ("APP_SERVER__LISTEN".to_string(), "127.0.0.1:7000".to_string()),
            ("APP_SERVER__WORKERS".to_string(), "4".to_string()),
            ("HOME".to_string(), "/root".to_string()),
        ];
        let f: File = from_toml(text, "APP_", env).unwrap();
        assert_eq!(f.server.listen.port(), 7000);
        assert_eq!(f.server.workers, 4);

        let env = [("APP_SERVER__LISTEN".to_string(), "nowhere".to_string())];
        let err = from_toml::<File>(text, "APP_", env).unwrap_err();
        assert_eq!(err.fields(), ["server.listen"]);
        assert_eq!(err.0[0].line, None);
        assert!(err.0[0].problem.contains("after APP_* overrides"), "{err}");

        let env = [("APP_SERVER__LISTEN__PORT".to_string(), "1".to_string())];
        let err = from_toml::<File>(text, "APP_", env).unwrap_err();
        assert_eq!(err.fields(), ["APP_SERVER__LISTEN__PORT"]);
    }

    #[test]
    fn a_file_that_cannot_be_read_is_named() {
        let err = read_toml::<File>(Path::new("/nonexistent/app.toml"), "APP_").unwrap_err();
        assert_eq!(err.fields(), ["/nonexistent/app.toml"]);
    }

    #[test]
    fn text_that_is_not_toml_is_located() {
        let err = parse("[server]\nlisten = \n").unwrap_err();
        assert_eq!(err.0[0].line, Some(2), "{err}");
    }
}
