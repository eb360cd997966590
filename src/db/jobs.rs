//! Background jobs (migration 000005). Tenants see and act on their own jobs here under row-level
//! security; the pool's cross-tenant work goes through the migration's security-definer functions,
//! one statement each.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::postgres::types::PgInterval;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::domain::job::{JobState, Queue};
use crate::domain::tenant::TenantId;

use super::events::Event;
use super::{CreationCursor, DbError, DbResult};

/// The channel a pool listens on; the payload is the queue with a job newly due.
pub const NOTIFY_CHANNEL: &str = "cybernetic_jobs";

/// What enqueueing writes.
#[derive(Debug, Clone)]
pub struct NewJob<'a> {
    pub kind: &'a str,
    pub queue: Queue,
    pub args: &'a Value,
    pub priority: i16,
    pub max_attempts: i32,
    /// `None`: due now.
    pub run_at: Option<DateTime<Utc>>,
    pub idempotency_key: Option<&'a str>,
}

/// Inserts a job in the caller's transaction (so it commits or rolls back with the caller's write).
/// Returns the job's id and whether it was created: with an idempotency key already used by this
/// tenant, nothing is written and the existing job's id comes back.
///
/// It sends no NOTIFY: PostgreSQL lets one notifying transaction commit at a time, through its
/// flush, so every write that enqueues would wait for every other's. The caller wakes the pools
/// after its commit ([`crate::jobs::Wake`]).
#[tracing::instrument(skip_all, fields(kind = job.kind))]
pub async fn insert(
    conn: &mut PgConnection,
    tenant: TenantId,
    job: &NewJob<'_>,
) -> DbResult<(Uuid, bool)> {
    let query = sqlx::query_as(
        "insert into jobs (id, tenant_id, kind, queue, priority, args, max_attempts, run_at,
                           idempotency_key)
         values ($1, $2, $3, $4, $5, $6, $7, coalesce($8, now()), $9)
         on conflict (tenant_id, idempotency_key) where idempotency_key is not null do nothing
         returning id",
    )
    .bind(Uuid::now_v7())
    .bind(tenant.as_uuid());
    let created: Option<(Uuid,)> = bind_fields(query, job)
        .bind(job.idempotency_key)
        .fetch_optional(&mut *conn)
        .await?;
    if let Some((id,)) = created {
        return Ok((id, true));
    }
    let existing: (Uuid,) =
        sqlx::query_as("select id from jobs where tenant_id = $1 and idempotency_key = $2")
            .bind(tenant.as_uuid())
            .bind(job.idempotency_key)
            .fetch_one(&mut *conn)
            .await?;
    Ok((existing.0, false))
}

/// Binds a job's fields in the order both enqueue statements take them after its id and tenant:
/// kind, queue, priority, args, max attempts, run at.
fn bind_fields<'q, O>(
    query: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    job: &NewJob<'q>,
) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
    query
        .bind(job.kind)
        .bind(job.queue.as_str())
        .bind(job.priority)
        .bind(job.args)
        .bind(job.max_attempts)
        .bind(job.run_at)
}

/// [`insert`] committed on its own, outside any transaction. Concurrent calls of one process for
/// jobs without an idempotency key are inserted by one statement that commits once
/// (`enqueue_jobs`, migration 000012; see [`super::enqueuer`]); a job with a key is one statement
/// of its own (`enqueue_job`, migrations 000006 and 000010), since its insert may wait for another
/// transaction holding the same key. The pools are woken after the commit by the
/// [`Db`](super::Db)'s waker.
#[tracing::instrument(skip_all, fields(kind = job.kind))]
pub async fn insert_alone(
    db: &super::Db,
    tenant: TenantId,
    job: &NewJob<'_>,
) -> DbResult<(Uuid, bool)> {
    let (id, created) = match job.idempotency_key {
        None => {
            let queued = super::enqueuer::QueuedJob {
                tenant,
                kind: job.kind.to_owned(),
                queue: job.queue,
                args: job.args.clone(),
                priority: job.priority,
                max_attempts: job.max_attempts,
                run_at: job.run_at,
            };
            (db.enqueuer().enqueue(queued).await?, true)
        }
        Some(key) => {
            let query =
                sqlx::query_as("select * from enqueue_job($1, $2, $3, $4, $5, $6, $7, $8, $9)")
                    .bind(tenant.as_uuid())
                    .bind(Uuid::now_v7());
            bind_fields(query, job)
                .bind(key)
                .fetch_one(db.primary())
                .await?
        }
    };
    if created && job.run_at.is_none_or(|at| at <= chrono::Utc::now()) {
        db.wake_jobs(job.queue);
    }
    Ok((id, created))
}

/// One cron tick's job, enqueued for every tenant (or those of one timezone) at once.
#[derive(Debug, Clone)]
pub struct TickJobs<'a> {
    pub kind: &'a str,
    pub queue: Queue,
    pub args: &'a Value,
    pub max_attempts: i32,
    /// The tick's idempotency key: each tenant gets one job per key.
    pub key: &'a str,
    /// Only tenants in this timezone (those without one count as UTC); `None`: every tenant.
    pub timezone: Option<&'a str>,
}

/// Enqueues a tick's job for each tenant that has none for its key yet; returns how many.
#[tracing::instrument(skip_all, fields(kind = jobs.kind))]
pub async fn enqueue_tick(pool: &PgPool, jobs: &TickJobs<'_>) -> DbResult<u64> {
    let created: i32 = sqlx::query_scalar("select enqueue_tick_jobs($1, $2, $3, $4, $5, $6)")
        .bind(jobs.kind)
        .bind(jobs.queue.as_str())
        .bind(jobs.args)
        .bind(jobs.max_attempts)
        .bind(jobs.key)
        .bind(jobs.timezone)
        .fetch_one(pool)
        .await?;
    Ok(u64::try_from(created).unwrap_or(0))
}

/// The timezones tenants' settings name (UTC for those without one).
pub async fn tenant_timezones(pool: &PgPool) -> DbResult<Vec<String>> {
    Ok(sqlx::query_scalar("select tenant_timezones()")
        .fetch_all(pool)
        .await?)
}

/// A job as its tenant sees it.
#[derive(Debug, Clone, Serialize)]
pub struct JobView {
    pub id: Uuid,
    pub kind: String,
    pub queue: String,
    /// The job's arguments, as enqueued.
    pub args: Value,
    pub state: String,
    pub priority: i16,
    pub attempts: i32,
    pub max_attempts: i32,
    pub progress: Progress,
    pub result: Option<Value>,
    pub last_error: Option<String>,
    pub run_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    pub percent: Option<i16>,
    pub message: Option<String>,
}

#[derive(sqlx::FromRow)]
struct JobRow {
    id: Uuid,
    kind: String,
    queue: String,
    args: Value,
    state: String,
    priority: i16,
    attempts: i32,
    max_attempts: i32,
    progress_percent: Option<i16>,
    progress_message: Option<String>,
    result: Option<Value>,
    last_error: Option<String>,
    run_at: DateTime<Utc>,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
}

impl From<JobRow> for JobView {
    fn from(r: JobRow) -> Self {
        Self {
            id: r.id,
            kind: r.kind,
            queue: r.queue,
            args: r.args,
            state: r.state,
            priority: r.priority,
            attempts: r.attempts,
            max_attempts: r.max_attempts,
            progress: Progress {
                percent: r.progress_percent,
                message: r.progress_message,
            },
            result: r.result,
            last_error: r.last_error,
            run_at: r.run_at,
            created_at: r.created_at,
            started_at: r.started_at,
            finished_at: r.finished_at,
        }
    }
}

/// The columns of a [`JobRow`], with `scheduled` for available jobs not yet due.
const VIEW_COLUMNS: &str = "id, kind, queue, args,
    case when state = 'available' and run_at > now() then 'scheduled' else state end as state,
    priority, attempts, max_attempts, progress_percent, progress_message, result, last_error,
    run_at, created_at, started_at, finished_at";

#[tracing::instrument(skip_all)]
pub async fn get(conn: &mut PgConnection, tenant: TenantId, id: Uuid) -> DbResult<Option<JobView>> {
    let row: Option<JobRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {VIEW_COLUMNS} from jobs where tenant_id = $1 and id = $2"
    )))
    .bind(tenant.as_uuid())
    .bind(id)
    .fetch_optional(conn)
    .await?;
    Ok(row.map(JobView::from))
}

/// A tenant's jobs, newest first, optionally of one state and one kind.
#[tracing::instrument(skip_all)]
pub async fn list(
    conn: &mut PgConnection,
    tenant: TenantId,
    state: Option<JobState>,
    kind: Option<&str>,
    after: Option<&CreationCursor>,
    fetch: i64,
) -> DbResult<Vec<JobView>> {
    // Scheduled and available are one stored state told apart by run_at.
    let (stored, due): (Option<&str>, Option<bool>) = match state {
        None => (None, None),
        Some(JobState::Scheduled) => (Some("available"), Some(false)),
        Some(JobState::Available) => (Some("available"), Some(true)),
        Some(other) => (Some(other.as_str()), None),
    };
    let rows: Vec<JobRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {VIEW_COLUMNS} from jobs
          where tenant_id = $1
            and ($2::text is null or state = $2)
            and ($3::boolean is null or (run_at <= now()) = $3)
            and ($4::text is null or kind = $4)
            and ($5::timestamptz is null or (created_at, id) < ($5, $6))
          order by created_at desc, id desc
          limit $7"
    )))
    .bind(tenant.as_uuid())
    .bind(stored)
    .bind(due)
    .bind(kind)
    .bind(after.map(|c| c.created_at))
    .bind(after.map(|c| c.id))
    .bind(fetch)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(JobView::from).collect())
}

/// Cancels a job that has not finished; a running one is stopped by its worker at its next
/// heartbeat, and its outcome is then ignored. `None` when no such job; `Err(state)` when it has
/// already finished.
#[tracing::instrument(skip_all)]
pub async fn cancel(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
) -> DbResult<Option<Result<JobView, String>>> {
    transition(
        conn,
        tenant,
        id,
        "state = 'cancelled', finished_at = now(), locked_by = null, locked_until = null",
        &["available", "running", "retrying"],
    )
    .await
}

/// Makes a dead or cancelled job available again with a fresh set of attempts.
#[tracing::instrument(skip_all)]
pub async fn retry(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
) -> DbResult<Option<Result<JobView, String>>> {
    let moved = transition(
        conn,
        tenant,
        id,
        "state = 'available', attempts = 0, run_at = now(), finished_at = null, started_at = null",
        &["dead", "cancelled"],
    )
    .await?;
    if let Some(Ok(job)) = &moved {
        sqlx::query("select pg_notify($1, $2)")
            .bind(NOTIFY_CHANNEL)
            .bind(&job.queue)
            .execute(&mut *conn)
            .await?;
    }
    Ok(moved)
}

/// Applies `set` to the job when its state is one of `from`, under a row lock so the check and the
/// change are one step.
async fn transition(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
    set: &str,
    from: &[&str],
) -> DbResult<Option<Result<JobView, String>>> {
    let current: Option<(String,)> =
        sqlx::query_as("select state from jobs where tenant_id = $1 and id = $2 for update")
            .bind(tenant.as_uuid())
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
    let Some((state,)) = current else {
        return Ok(None);
    };
    if !from.contains(&state.as_str()) {
        return Ok(Some(Err(state)));
    }
    let row: JobRow = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "update jobs set {set} where tenant_id = $1 and id = $2 returning {VIEW_COLUMNS}"
    )))
    .bind(tenant.as_uuid())
    .bind(id)
    .fetch_one(&mut *conn)
    .await?;
    Ok(Some(Ok(JobView::from(row))))
}

/// Records a running job's progress; `false` when the job is no longer running under `worker`
/// (it was cancelled, or rescued after its lease ran out).
#[tracing::instrument(skip_all)]
pub async fn set_progress(
    conn: &mut PgConnection,
    id: Uuid,
    worker: &str,
    percent: i16,
    message: Option<&str>,
) -> DbResult<bool> {
    let done = sqlx::query(
        "update jobs set progress_percent = $3, progress_message = $4
          where id = $1 and state = 'running' and locked_by = $2",
    )
    .bind(id)
    .bind(worker)
    .bind(percent)
    .bind(message)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// A job a worker has claimed.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Claimed {
    #[sqlx(rename = "job_id")]
    pub id: Uuid,
    #[sqlx(rename = "job_tenant_id")]
    pub tenant_id: Option<Uuid>,
    #[sqlx(rename = "job_kind")]
    pub kind: String,
    #[sqlx(rename = "job_args")]
    pub args: Value,
    #[sqlx(rename = "job_priority")]
    pub priority: i16,
    #[sqlx(rename = "job_attempts")]
    pub attempt: i32,
    #[sqlx(rename = "job_max_attempts")]
    pub max_attempts: i32,
    #[sqlx(rename = "job_run_at")]
    pub run_at: DateTime<Utc>,
    #[sqlx(rename = "job_claimed_at")]
    pub claimed_at: DateTime<Utc>,
    /// When the claim's answer reached this process (set by the pool).
    #[sqlx(skip)]
    pub received: Option<std::time::Instant>,
}

fn interval(d: Duration) -> DbResult<PgInterval> {
    PgInterval::try_from(d).map_err(|e| DbError::Sqlx(sqlx::Error::Encode(e)))
}

/// Claims up to `limit` due jobs of `queue` and of one of `kinds` for `worker`, leased for `lease`.
pub async fn claim(
    pool: &PgPool,
    queue: Queue,
    kinds: &[&str],
    limit: usize,
    worker: &str,
    lease: Duration,
) -> DbResult<Vec<Claimed>> {
    Ok(
        sqlx::query_as("select * from claim_jobs($1, $2, $3, $4, $5)")
            .bind(queue.as_str())
            .bind(kinds)
            .bind(i32::try_from(limit).unwrap_or(i32::MAX))
            .bind(worker)
            .bind(interval(lease)?)
            .fetch_all(pool)
            .await?,
    )
}

/// How an attempt ended, as `finish` records it.
#[derive(Debug, Clone)]
pub enum Outcome {
    Completed(Value),
    Retrying { error: String, at: DateTime<Utc> },
    Dead { error: String },
}

#[derive(sqlx::FromRow)]
struct JobEventRow {
    out_tenant_id: Uuid,
    out_position: i64,
    out_type: String,
    out_occurred_at: DateTime<Utc>,
    out_data: Value,
}

impl From<JobEventRow> for Event {
    fn from(r: JobEventRow) -> Self {
        Event {
            id: r.out_position,
            event_type: r.out_type,
            tenant_id: r.out_tenant_id,
            occurred_at: r.out_occurred_at,
            data: r.out_data,
        }
    }
}

/// Records the outcomes of a batch of attempts in one statement, with their `job.*` events; returns
/// the events (to hand to the bus after this commits, which it has when this returns).
pub async fn finish(
    pool: &PgPool,
    worker: &str,
    outcomes: &[(Uuid, Outcome)],
) -> DbResult<Vec<Event>> {
    let mut ids = Vec::with_capacity(outcomes.len());
    let mut states = Vec::with_capacity(outcomes.len());
    let mut results = Vec::with_capacity(outcomes.len());
    let mut errors = Vec::with_capacity(outcomes.len());
    let mut retry_at = Vec::with_capacity(outcomes.len());
    for (id, outcome) in outcomes {
        ids.push(*id);
        match outcome {
            Outcome::Completed(result) => {
                states.push("completed");
                results.push(Some(result));
                errors.push(None);
                retry_at.push(None);
            }
            Outcome::Retrying { error, at } => {
                states.push("retrying");
                results.push(None);
                errors.push(Some(error.as_str()));
                retry_at.push(Some(*at));
            }
            Outcome::Dead { error } => {
                states.push("dead");
                results.push(None);
                errors.push(Some(error.as_str()));
                retry_at.push(None);
            }
        }
    }
    let rows: Vec<JobEventRow> =
        sqlx::query_as("select * from finish_jobs($1, $2, $3, $4, $5, $6)")
            .bind(worker)
            .bind(&ids)
            .bind(&states)
            .bind(&results)
            .bind(&errors)
            .bind(&retry_at)
            .fetch_all(pool)
            .await?;
    Ok(rows.into_iter().map(Event::from).collect())
}

/// Extends the leases of the jobs `worker` holds; returns those it still holds.
pub async fn extend_leases(
    pool: &PgPool,
    worker: &str,
    ids: &[Uuid],
    lease: Duration,
) -> DbResult<Vec<Uuid>> {
    let held: Vec<(Uuid,)> = sqlx::query_as("select * from extend_job_leases($1, $2, $3)")
        .bind(worker)
        .bind(ids)
        .bind(interval(lease)?)
        .fetch_all(pool)
        .await?;
    Ok(held.into_iter().map(|(id,)| id).collect())
}

/// Makes up to `limit` jobs whose lease expired due again (or dead); returns their events.
pub async fn rescue(pool: &PgPool, limit: i32) -> DbResult<Vec<Event>> {
    let rows: Vec<JobEventRow> = sqlx::query_as("select * from rescue_jobs($1)")
        .bind(limit)
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().map(Event::from).collect())
}

/// Hands back jobs `worker` claimed but did not finish, without counting the attempt.
pub async fn release(pool: &PgPool, worker: &str, ids: &[Uuid]) -> DbResult<i32> {
    let (released,): (i32,) = sqlx::query_as("select release_jobs($1, $2)")
        .bind(worker)
        .bind(ids)
        .fetch_one(pool)
        .await?;
    Ok(released)
}

/// Deletes one batch of finished jobs; returns how many.
pub async fn prune(
    pool: &PgPool,
    completed_before: DateTime<Utc>,
    failed_before: DateTime<Utc>,
    batch: i32,
) -> DbResult<i32> {
    let (deleted,): (i32,) = sqlx::query_as("select prune_jobs($1, $2, $3)")
        .bind(completed_before)
        .bind(failed_before)
        .bind(batch)
        .fetch_one(pool)
        .await?;
    Ok(deleted)
}

/// Unfinished and dead jobs by queue and state.
pub async fn counts(pool: &PgPool) -> DbResult<Vec<(String, String, i64)>> {
    Ok(sqlx::query_as("select * from job_counts()")
        .fetch_all(pool)
        .await?)
}
