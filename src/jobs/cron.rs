//! Cron: kinds that run on a schedule, one job per tenant per tick.
//!
//! Every pool (each `serve` and `worker` process) runs the scheduler. At each tick it enqueues the
//! kind for every tenant in one statement, under the idempotency key `cron:<kind>:<tick>`, so however
//! many replicas see the tick, and however often one restarts around it, each tenant gets exactly
//! one job for it. A process that starts up also enqueues the ticks of the last few minutes
//! ([`CATCH_UP`]), so a restart across a tick does not skip it. Kinds on local time are evaluated
//! on each tenant's wall clock (`settings.timezone`, UTC when unset): the scheduler computes the
//! ticks of every timezone tenants use, and each tick goes to the tenants of its timezone.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::Job;
use crate::db::{Db, DbResult, jobs as store};
use crate::domain::job::Queue;
pub use crate::domain::schedule::Expr;

/// Ticks this far back are enqueued when a scheduler starts (and after a database outage).
pub const CATCH_UP: Duration = Duration::from_secs(300);
/// The longest the scheduler sleeps, so a timezone new since its last pass is seen in time (its
/// ticks since that pass are enqueued when it is seen).
const MAX_SLEEP: Duration = Duration::from_secs(30);

/// What a scheduled job is given: the tick it runs for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tick {
    /// The tick's instant.
    pub at: DateTime<Utc>,
    /// The timezone the schedule was read in (the tenant's for local-time kinds, else UTC).
    pub timezone: String,
}

impl Tick {
    /// The timezone, falling back to UTC for a name this build does not know.
    pub fn zone(&self) -> Tz {
        self.timezone.parse().unwrap_or(Tz::UTC)
    }
}

/// A kind that runs on a schedule for every tenant; its arguments are made from the tick.
pub trait Scheduled: Job + From<Tick> {
    /// `true`: ticks follow each tenant's timezone; `false`: UTC for everyone.
    const LOCAL_TIME: bool;
}

/// One scheduled kind with its expression, its type erased.
pub struct Schedule {
    kind: &'static str,
    queue: Queue,
    max_attempts: i32,
    local_time: bool,
    expr: Expr,
    args: fn(Tick) -> Value,
}

impl Schedule {
    pub(super) fn of<J: Scheduled>(expr: Expr) -> Self {
        Self {
            kind: J::KIND,
            queue: J::QUEUE,
            max_attempts: J::MAX_ATTEMPTS,
            local_time: J::LOCAL_TIME,
            expr,
            // A job's arguments are plain data: serialising them cannot fail.
            args: |tick| serde_json::to_value(J::from(tick)).unwrap_or(Value::Null),
        }
    }

    pub fn kind(&self) -> &'static str {
        self.kind
    }
}

/// Enqueues the ticks of every schedule that fall in `(after, until]`. Returns the jobs created
/// (zero when another process, or an earlier call, already enqueued them).
pub async fn enqueue_ticks(
    db: &Db,
    schedules: &[Arc<Schedule>],
    after: DateTime<Utc>,
    until: DateTime<Utc>,
) -> DbResult<u64> {
    let zones = if schedules.iter().any(|s| s.local_time) {
        zones(db).await?
    } else {
        Vec::new()
    };
    enqueue_in(db, schedules, &zones, after, until).await
}

async fn zones(db: &Db) -> DbResult<Vec<Tz>> {
    // Distinct names already: each maps to the tenants that spell it so.
    let names = store::tenant_timezones(db.primary()).await?;
    Ok(names
        .into_iter()
        .filter_map(|name| {
            let zone = name.parse::<Tz>();
            if zone.is_err() {
                tracing::warn!(timezone = %name, "a tenant names an unknown timezone");
            }
            zone.ok()
        })
        .collect())
}

async fn enqueue_in(
    db: &Db,
    schedules: &[Arc<Schedule>],
    zones: &[Tz],
    after: DateTime<Utc>,
    until: DateTime<Utc>,
) -> DbResult<u64> {
    let mut created = 0;
    for schedule in schedules {
        let targets: Vec<Option<Tz>> = if schedule.local_time {
            zones.iter().copied().map(Some).collect()
        } else {
            vec![None]
        };
        for target in targets {
            let zone = target.unwrap_or(Tz::UTC);
            for at in schedule.expr.ticks_between(zone, after, until) {
                let tick = Tick {
                    at,
                    timezone: zone.name().to_owned(),
                };
                let key = format!(
                    "cron:{}:{}",
                    schedule.kind,
                    at.to_rfc3339_opts(SecondsFormat::Secs, true)
                );
                let n = store::enqueue_tick(
                    db.primary(),
                    &store::TickJobs {
                        kind: schedule.kind,
                        queue: schedule.queue,
                        args: &(schedule.args)(tick),
                        max_attempts: schedule.max_attempts,
                        key: &key,
                        timezone: target.map(|z| z.name()),
                    },
                )
                .await?;
                if n > 0 {
                    metrics::counter!("jobs_enqueued_total", "kind" => schedule.kind).increment(n);
                    tracing::info!(kind = schedule.kind, %at, jobs = n, "cron tick enqueued");
                }
                created += n;
            }
        }
    }
    Ok(created)
}

/// The scheduler loop of one pool, until `shutdown`.
pub(super) async fn run(db: Db, schedules: Vec<Arc<Schedule>>, shutdown: CancellationToken) {
    let catch_up = chrono::Duration::from_std(CATCH_UP).unwrap_or_default();
    let mut after = Utc::now() - catch_up;
    let mut zones: Vec<Tz> = Vec::new();
    let local = schedules.iter().any(|s| s.local_time);
    loop {
        let now = Utc::now();
        // Never further back than the catch-up window, however long the database was away.
        after = after.max(now - catch_up);
        // The timezones are read on every pass (one small query at each tick), so a pass never
        // moves on without the ticks of a timezone that appeared since the last one.
        let read = if local {
            self::zones(&db).await.map(|z| zones = z)
        } else {
            Ok(())
        };
        let enqueued = match read {
            Ok(()) => enqueue_in(&db, &schedules, &zones, after, now).await,
            Err(e) => Err(e),
        };
        let failed = match enqueued {
            Ok(_) => {
                after = now;
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "cron: enqueueing ticks failed; will retry");
                true
            }
        };
        let next = schedules
            .iter()
            .flat_map(|s| {
                let targets: Vec<Tz> = if s.local_time {
                    zones.clone()
                } else {
                    vec![Tz::UTC]
                };
                targets
                    .into_iter()
                    .filter_map(|z| s.expr.next_after(z, after))
                    .collect::<Vec<_>>()
            })
            .min();
        let wait = if failed {
            Duration::from_secs(1)
        } else {
            next.and_then(|t| (t - Utc::now()).to_std().ok())
                .unwrap_or(Duration::ZERO)
                .min(MAX_SLEEP)
                // A tick just reached is enqueued on the next pass; never spin.
                .max(Duration::from_millis(5))
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}
