//! `daily_reflection` (cron, 18:00 by default) and `weekly_review` (Fridays 18:00): a summary of
//! the period that ends at the tick, on the tenant's wall clock (`settings.timezone`, else UTC):
//! states recorded, episodes created, violations opened and resolved, jobs that died. Stored as a
//! reflection (`GET /v1/reflections`) with a `reflection.created` event. A period is summarised
//! once: a retried job finds its reflection stored and adds nothing.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::cron::{Scheduled, Tick};
use super::{Job, JobContext, JobError};
use crate::db::reflections::{self, NewReflection};
use crate::db::{DbError, events, tenant as scope};
use crate::domain::event_type::EventType;
use crate::domain::job::Queue;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DailyReflection(pub Tick);

impl From<Tick> for DailyReflection {
    fn from(tick: Tick) -> Self {
        Self(tick)
    }
}

impl Scheduled for DailyReflection {
    const LOCAL_TIME: bool = true;
}

impl Job for DailyReflection {
    const KIND: &'static str = "daily_reflection";
    const QUEUE: Queue = Queue::Analysis;
    const MAX_ATTEMPTS: i32 = 10;
    const TIMEOUT: Duration = Duration::from_secs(120);

    async fn run(self, ctx: JobContext) -> Result<Value, JobError> {
        reflect(&ctx, &self.0, "daily", 1).await
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WeeklyReview(pub Tick);

impl From<Tick> for WeeklyReview {
    fn from(tick: Tick) -> Self {
        Self(tick)
    }
}

impl Scheduled for WeeklyReview {
    const LOCAL_TIME: bool = true;
}

impl Job for WeeklyReview {
    const KIND: &'static str = "weekly_review";
    const QUEUE: Queue = Queue::Analysis;
    const MAX_ATTEMPTS: i32 = 10;
    const TIMEOUT: Duration = Duration::from_secs(300);

    async fn run(self, ctx: JobContext) -> Result<Value, JobError> {
        reflect(&ctx, &self.0, "weekly", 7).await
    }
}

/// The period of `days` local days that ends at the tick: the same wall-clock time `days` days
/// earlier, so a day across a DST change is 23 or 25 hours long.
pub fn period(tick: &Tick, days: u64) -> (DateTime<Utc>, DateTime<Utc>) {
    let zone = tick.zone();
    let end = tick.at;
    let local = end.with_timezone(&zone).naive_local();
    let start = local
        .checked_sub_days(chrono::Days::new(days))
        .and_then(|naive| zone.from_local_datetime(&naive).earliest())
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_else(|| end - chrono::Duration::days(i64::try_from(days).unwrap_or(1)));
    (start, end)
}

async fn reflect(ctx: &JobContext, tick: &Tick, kind: &str, days: u64) -> Result<Value, JobError> {
    let tenant = ctx.tenant()?;
    let (start, end) = period(tick, days);
    let mut tx = scope::begin(ctx.db.primary(), tenant).await?;
    let summary = reflections::summarize(&mut tx, tenant, start, end).await?;
    let stored = reflections::insert(
        &mut tx,
        tenant,
        &NewReflection {
            kind,
            period_start: start,
            period_end: end,
            timezone: &tick.timezone,
            summary: &summary,
        },
    )
    .await?;
    let Some(reflection) = stored else {
        return Ok(json!({"skipped": "this period already has its reflection"}));
    };
    let event = events::append(
        &mut tx,
        tenant,
        &EventType::platform(EventType::REFLECTION_CREATED),
        &crate::routes::event_data(&reflection),
    )
    .await?;
    tx.commit().await.map_err(DbError::from)?;
    ctx.events.committed(std::slice::from_ref(&event)).await;
    Ok(json!({"reflection_id": reflection.id}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tick(at: &str, zone: &str) -> Tick {
        Tick {
            at: DateTime::parse_from_rfc3339(at)
                .unwrap()
                .with_timezone(&Utc),
            timezone: zone.to_owned(),
        }
    }

    #[test]
    fn a_day_ends_at_the_tick_on_the_local_clock() {
        let (start, end) = period(&tick("2026-11-20T17:00:00Z", "Europe/Berlin"), 1);
        assert_eq!(end.to_rfc3339(), "2026-11-20T17:00:00+00:00");
        assert_eq!(start.to_rfc3339(), "2026-11-19T17:00:00+00:00");
        // Berlin left summer time on 2026-10-25: that local day had 25 hours.
        let (start, end) = period(&tick("2026-10-25T17:00:00Z", "Europe/Berlin"), 1);
        assert_eq!((end - start).num_hours(), 25);
        let (start, _) = period(&tick("2026-11-20T18:00:00Z", "UTC"), 7);
        assert_eq!(start.to_rfc3339(), "2026-11-13T18:00:00+00:00");
    }
}
