//! When scheduled jobs run: 6-field cron expressions and IANA timezones.
//!
//! An expression has six fields, `second minute hour day-of-month month day-of-week`, each a
//! value, a list (`1,15`), a range (`9-17`), a step (`*/15`) or `*`; months and weekdays also take
//! names (`Jan`, `Fri`), which are clearer than numbers (weekday numbers run 1-7 from Sunday).
//! Ticks are computed on a timezone's wall clock, so "18:00 Europe/Berlin" is 18:00 there in
//! summer and winter alike.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

use super::ParseError;

/// A validated 6-field cron expression.
#[derive(Clone)]
pub struct Expr {
    source: String,
    schedule: cron::Schedule,
}

impl Expr {
    pub fn parse(raw: &str) -> Result<Self, ParseError> {
        let raw = raw.trim();
        if raw.split_whitespace().count() != 6 {
            return Err(ParseError::new(
                "schedule",
                "must have 6 fields: second minute hour day-of-month month day-of-week",
            ));
        }
        let schedule = cron::Schedule::from_str(raw)
            .map_err(|e| ParseError::new("schedule", format!("is not a cron expression: {e}")))?;
        Ok(Self {
            source: raw.to_owned(),
            schedule,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The first tick strictly after `after`, on `zone`'s wall clock.
    pub fn next_after(&self, zone: Tz, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.schedule
            .after(&after.with_timezone(&zone))
            .next()
            .map(|t| t.with_timezone(&Utc))
    }

    /// The ticks in `(after, until]` on `zone`'s wall clock, oldest first.
    pub fn ticks_between(
        &self,
        zone: Tz,
        after: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Vec<DateTime<Utc>> {
        self.schedule
            .after(&after.with_timezone(&zone))
            .map(|t| t.with_timezone(&Utc))
            .take_while(|t| *t <= until)
            .collect()
    }
}

impl std::fmt::Debug for Expr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Expr").field(&self.source).finish()
    }
}

/// An IANA timezone name such as `Europe/Berlin` or `UTC`.
pub fn parse_timezone(field: &'static str, raw: &str) -> Result<Tz, ParseError> {
    Tz::from_str(raw).map_err(|_| {
        ParseError::new(
            field,
            "must be an IANA timezone name such as UTC or Europe/Berlin",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn utc(y: i32, m: u32, d: u32, h: u32, min: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, h, min, s).unwrap()
    }

    #[test]
    fn needs_six_fields() {
        assert!(Expr::parse("0 0 18 * * *").is_ok());
        assert!(Expr::parse("0 18 * * *").is_err());
        assert!(Expr::parse("0 0 18 * * * 2030").is_err());
        assert!(Expr::parse("0 0 25 * * *").is_err());
        assert!(Expr::parse("").is_err());
    }

    #[test]
    fn hourly_ticks_on_the_hour() {
        let hourly = Expr::parse("0 0 * * * *").unwrap();
        let ticks = hourly.ticks_between(
            Tz::UTC,
            utc(2026, 11, 20, 9, 30, 0),
            utc(2026, 11, 20, 12, 0, 0),
        );
        assert_eq!(
            ticks,
            vec![
                utc(2026, 11, 20, 10, 0, 0),
                utc(2026, 11, 20, 11, 0, 0),
                utc(2026, 11, 20, 12, 0, 0)
            ]
        );
    }

    #[test]
    fn fridays_at_six_in_the_tenants_zone() {
        let weekly = Expr::parse("0 0 18 * * Fri").unwrap();
        let berlin = parse_timezone("timezone", "Europe/Berlin").unwrap();
        // 2026-11-20 is a Friday; Berlin is UTC+1 in November and UTC+2 in July.
        assert_eq!(
            weekly.next_after(berlin, utc(2026, 11, 16, 0, 0, 0)),
            Some(utc(2026, 11, 20, 17, 0, 0))
        );
        assert_eq!(
            weekly.next_after(berlin, utc(2026, 7, 1, 0, 0, 0)),
            Some(utc(2026, 7, 3, 16, 0, 0))
        );
        assert_eq!(
            weekly.next_after(Tz::UTC, utc(2026, 11, 20, 18, 0, 0)),
            Some(utc(2026, 11, 27, 18, 0, 0))
        );
    }

    #[test]
    fn timezones_are_iana_names() {
        assert!(parse_timezone("timezone", "Asia/Kolkata").is_ok());
        assert!(parse_timezone("timezone", "Mars/Olympus").is_err());
        assert!(parse_timezone("timezone", "").is_err());
    }
}
