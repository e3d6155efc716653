//! Periodic jobs: a job enqueued on a schedule, once per slot across every process.
//!
//! Every runner enqueues each periodic job's next slot ahead of time, as a job
//! scheduled at the slot and unique by (name, slot) in every state. The unique
//! index lets one insert through whichever runner makes it, so no leader is elected
//! and no slot is run twice, on PostgreSQL and on SQLite alike; a slot whose every
//! runner was down is skipped, not run late in a burst.
//!
//! Schedules are [`Schedule::Every`] (slots at multiples of a period since the Unix
//! epoch) or a five-field cron expression in UTC ([`Cron`]).

use std::time::Duration;

use crate::job::{JobState, NewJob, Unique, millis};

/// When a periodic job's slots fall.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// At every multiple of this period since the Unix epoch (at least a second).
    Every(Duration),
    /// At the minutes a cron expression names.
    Cron(Cron),
}

impl Schedule {
    /// The first slot after `after_ms` (milliseconds since the epoch).
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        match self {
            Schedule::Every(p) => {
                let p = millis(*p).max(1000);
                Some((after_ms.div_euclid(p) + 1) * p)
            }
            Schedule::Cron(c) => c.next_after(after_ms),
        }
    }
}

/// A job enqueued on a [`Schedule`].
#[derive(Clone, Debug)]
pub struct Periodic {
    pub(crate) name: String,
    pub(crate) schedule: Schedule,
    pub(crate) job: NewJob,
}

impl Periodic {
    /// `job` every `period` (at multiples of it since the epoch), known as `name`.
    pub fn every(name: impl Into<String>, period: Duration, job: NewJob) -> Periodic {
        Periodic {
            name: name.into(),
            schedule: Schedule::Every(period),
            job,
        }
    }

    /// `job` at the minutes `expression` names (five fields, UTC), known as `name`.
    pub fn cron(name: impl Into<String>, expression: &str, job: NewJob) -> Result<Periodic, CronError> {
        Ok(Periodic {
            name: name.into(),
            schedule: Schedule::Cron(expression.parse()?),
            job,
        })
    }

    /// Its job for the slot at `slot_ms`: scheduled then, unique by name and slot in
    /// every state.
    pub(crate) fn job_for(&self, slot_ms: i64) -> NewJob {
        let at = std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(slot_ms).unwrap_or(0));
        self.job
            .clone()
            .at(at)
            .unique(Unique::by_key(format!("periodic:{}:{slot_ms}", self.name)).states(JobState::ALL))
    }
}

/// A cron expression that does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cron expression {expression:?}: {problem}")]
pub struct CronError {
    /// The expression.
    pub expression: String,
    /// What is wrong with it.
    pub problem: String,
}

/// A five-field cron expression, `minute hour day-of-month month day-of-week`, in
/// UTC. Each field is `*`, a number, a range `a-b`, a list `a,b,c`, any of them
/// with a step `/n` (`*/15`, `8-18/2`); day-of-week 0 or 7 is Sunday. When both
/// day fields are restricted, a day matching either matches (as in Vixie cron).
///
/// ```
/// use palisade_queue::Cron;
///
/// let nightly: Cron = "30 3 * * *".parse().unwrap();
/// // 2026-01-01 00:00 UTC -> 03:30 the same day.
/// assert_eq!(nightly.next_after(1_767_225_600_000), Some(1_767_225_600_000 + 3 * 3_600_000 + 30 * 60_000));
/// assert!("61 * * * *".parse::<Cron>().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cron {
    minutes: u64,
    hours: u32,
    days: u32,
    months: u16,
    weekdays: u8,
    days_restricted: bool,
    weekdays_restricted: bool,
}

impl std::str::FromStr for Cron {
    type Err = CronError;

    fn from_str(expression: &str) -> Result<Cron, CronError> {
        let err = |problem: String| CronError {
            expression: expression.to_string(),
            problem,
        };
        let fields: Vec<&str> = expression.split_whitespace().collect();
        let [minute, hour, day, month, weekday] = fields[..] else {
            return Err(err(format!(
                "{} fields; five are needed: minute hour day-of-month month day-of-week",
                fields.len()
            )));
        };
        let field = |text: &str, name: &str, lo: u32, hi: u32| {
            parse_field(text, lo, hi).map_err(|p| err(format!("{name} field {text:?}: {p}")))
        };
        let mut weekdays = field(weekday, "day-of-week", 0, 7)?;
        if weekdays & (1 << 7) != 0 {
            weekdays |= 1; // 7 is Sunday too
        }
        Ok(Cron {
            minutes: field(minute, "minute", 0, 59)?,
            hours: field(hour, "hour", 0, 23)? as u32,
            days: field(day, "day-of-month", 1, 31)? as u32,
            months: field(month, "month", 1, 12)? as u16,
            weekdays: (weekdays & 0x7f) as u8,
            days_restricted: day != "*",
            weekdays_restricted: weekday != "*",
        })
    }
}

/// A field's values as bits.
fn parse_field(text: &str, lo: u32, hi: u32) -> Result<u64, String> {
    let mut bits = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (
                r,
                s.parse::<u32>()
                    .map_err(|_| format!("step {s:?} is not a number"))?,
            ),
            None => (part, 1),
        };
        if step == 0 {
            return Err("a step of 0".into());
        }
        let number = |t: &str| -> Result<u32, String> {
            let n = t.parse::<u32>().map_err(|_| format!("{t:?} is not a number"))?;
            if (lo..=hi).contains(&n) {
                Ok(n)
            } else {
                Err(format!("{n} is outside {lo}-{hi}"))
            }
        };
        let (a, b) = match range {
            "*" => (lo, hi),
            r => match r.split_once('-') {
                Some((a, b)) => (number(a)?, number(b)?),
                None if step > 1 => (number(r)?, hi),
                None => {
                    let n = number(r)?;
                    (n, n)
                }
            },
        };
        if a > b {
            return Err(format!("range {a}-{b} runs backwards"));
        }
        for v in (a..=b).step_by(step as usize) {
            bits |= 1 << v;
        }
    }
    Ok(bits)
}

const MINUTE: i64 = 60_000;
const DAY: i64 = 86_400_000;

impl Cron {
    /// The first matching minute after `after_ms` (milliseconds since the epoch),
    /// within four years (`None`: never, as for February 30th).
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        let mut t = (after_ms.div_euclid(MINUTE) + 1) * MINUTE;
        let limit = t + 4 * 366 * DAY;
        while t < limit {
            let days = t.div_euclid(DAY);
            let (y, m, d) = civil_from_days(days);
            if self.months & (1 << m) == 0 {
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                t = days_from_civil(ny, nm, 1) * DAY;
                continue;
            }
            if !self.day_matches(d, days) {
                t = (days + 1) * DAY;
                continue;
            }
            let minute_of_day = t.rem_euclid(DAY) / MINUTE;
            let (hour, minute) = (minute_of_day / 60, minute_of_day % 60);
            if self.hours & (1 << hour) == 0 {
                t = days * DAY + (hour + 1) * 60 * MINUTE;
                continue;
            }
            if self.minutes & (1 << minute) == 0 {
                t += MINUTE;
                continue;
            }
            return Some(t);
        }
        None
    }

    fn day_matches(&self, day_of_month: u32, days: i64) -> bool {
        // 1970-01-01 was a Thursday (4).
        let weekday = (days + 4).rem_euclid(7) as u32;
        let by_day = self.days & (1 << day_of_month) != 0;
        let by_weekday = self.weekdays & (1 << weekday) != 0;
        match (self.days_restricted, self.weekdays_restricted) {
            (true, true) => by_day || by_weekday,
            _ => by_day && by_weekday,
        }
    }
}

/// A job's time (milliseconds since the Unix epoch, as [`crate::Job`] keeps them)
/// as UTC text: `2026-11-29 22:07:00.000Z`.
pub fn format_utc(ms: i64) -> String {
    let (days, in_day) = (ms.div_euclid(DAY), ms.rem_euclid(DAY));
    let (y, m, d) = civil_from_days(days);
    let (secs, milli) = (in_day / 1000, in_day % 1000);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{milli:03}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// The day count since 1970-01-01 of (year, month, day).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from(if m > 2 { m - 3 } else { m + 9 });
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Milliseconds of a UTC date and time.
    fn at(y: i64, mo: u32, d: u32, h: i64, mi: i64) -> i64 {
        days_from_civil(y, mo, d) * DAY + h * 3_600_000 + mi * MINUTE
    }

    fn next(expr: &str, from: i64) -> i64 {
        expr.parse::<Cron>().unwrap().next_after(from).unwrap()
    }

    #[test]
    fn epoch_milliseconds_read_as_utc() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00.000Z");
        assert_eq!(format_utc(951_782_400_123), "2000-02-29 00:00:00.123Z");
        assert_eq!(format_utc(1_795_000_000_000), "2026-11-18 11:06:40.000Z");
        assert_eq!(format_utc(-1), "1969-12-31 23:59:59.999Z");
    }

    #[test]
    fn civil_days_round_trip() {
        for days in [-1000, 0, 59, 60, 10_000, 20_454, 50_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(days_from_civil(2000, 2, 29), 11_016);
    }

    #[test]
    fn next_slots_follow_the_fields() {
        let t = at(2026, 11, 29, 22, 7);
        assert_eq!(next("*/15 * * * *", t), at(2026, 11, 29, 22, 15));
        assert_eq!(next("0 * * * *", t), at(2026, 11, 29, 23, 0));
        assert_eq!(next("30 3 * * *", t), at(2026, 11, 30, 3, 30));
        assert_eq!(next("0 0 1 * *", t), at(2026, 12, 1, 0, 0));
        assert_eq!(
            next("0 9 * * 1-5", at(2026, 11, 28, 12, 0)),
            at(2026, 11, 30, 9, 0),
            "Saturday to Monday"
        );
        assert_eq!(next("0 0 29 2 *", t), at(2028, 2, 29, 0, 0), "the next leap day");
        assert_eq!(next("0 12 * * 0", t), at(2026, 12, 6, 12, 0), "Sunday");
        assert_eq!(next("0 12 * * 7", t), at(2026, 12, 6, 12, 0), "7 is Sunday too");
        // Both day fields restricted: either matches.
        assert_eq!(next("0 0 1 * 1", at(2026, 11, 29, 0, 0)), at(2026, 11, 30, 0, 0));
        assert_eq!(
            next("5,10 8-9 * * *", at(2026, 11, 29, 8, 7)),
            at(2026, 11, 29, 8, 10)
        );
        assert_eq!("0 0 30 2 *".parse::<Cron>().unwrap().next_after(t), None);
    }

    #[test]
    fn bad_expressions_name_their_field() {
        for (e, says) in [
            ("* * * *", "4 fields"),
            ("60 * * * *", "minute field"),
            ("* 24 * * *", "hour field"),
            ("* * 0 * *", "day-of-month"),
            ("* * * 13 *", "month field"),
            ("* * * * 8", "day-of-week"),
            ("*/0 * * * *", "step of 0"),
            ("5-1 * * * *", "backwards"),
            ("a * * * *", "not a number"),
        ] {
            let err = e.parse::<Cron>().unwrap_err().to_string();
            assert!(err.contains(says), "{e}: {err}");
        }
    }

    #[test]
    fn every_falls_on_multiples_of_its_period() {
        let s = Schedule::Every(Duration::from_secs(60));
        assert_eq!(s.next_after(0), Some(60_000));
        assert_eq!(s.next_after(59_999), Some(60_000));
        assert_eq!(s.next_after(60_000), Some(120_000));
    }
}
