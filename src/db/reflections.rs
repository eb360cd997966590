//! Reflections (migration 000006): daily and weekly summaries of a tenant's activity.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::tenant::TenantId;

use super::{CreationCursor, DbResult};

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Reflection {
    pub id: Uuid,
    pub kind: String,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    pub timezone: String,
    pub summary: Value,
    pub created_at: DateTime<Utc>,
}

const COLUMNS: &str = "id, kind, period_start, period_end, timezone, summary, created_at";

pub struct NewReflection<'a> {
    pub kind: &'a str,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    pub timezone: &'a str,
    pub summary: &'a Value,
}

/// Stores a reflection unless one of its kind already covers the period (a job retried after its
/// commit); returns it only when this call stored it.
#[tracing::instrument(skip_all)]
pub async fn insert(
    conn: &mut PgConnection,
    tenant: TenantId,
    r: &NewReflection<'_>,
) -> DbResult<Option<Reflection>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "insert into reflections (id, tenant_id, kind, period_start, period_end, timezone, summary)
         values ($1, $2, $3, $4, $5, $6, $7)
         on conflict (tenant_id, kind, period_start) do nothing
         returning {COLUMNS}"
    )))
    .bind(Uuid::now_v7())
    .bind(tenant.as_uuid())
    .bind(r.kind)
    .bind(r.period_start)
    .bind(r.period_end)
    .bind(r.timezone)
    .bind(r.summary)
    .fetch_optional(conn)
    .await?)
}

#[tracing::instrument(skip_all)]
pub async fn list(
    conn: &mut PgConnection,
    tenant: TenantId,
    kind: Option<&str>,
    after: Option<&CreationCursor>,
    fetch: i64,
) -> DbResult<Vec<Reflection>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {COLUMNS} from reflections
          where tenant_id = $1
            and ($2::text is null or kind = $2)
            and ($3::timestamptz is null or (created_at, id) < ($3, $4))
          order by created_at desc, id desc
          limit $5"
    )))
    .bind(tenant.as_uuid())
    .bind(kind)
    .bind(after.map(|c| c.created_at))
    .bind(after.map(|c| c.id))
    .bind(fetch)
    .fetch_all(conn)
    .await?)
}

#[tracing::instrument(skip_all)]
pub async fn get(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
) -> DbResult<Option<Reflection>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {COLUMNS} from reflections where tenant_id = $1 and id = $2"
    )))
    .bind(tenant.as_uuid())
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// What happened in `[start, end)`: states recorded per system, episodes created (with the newest
/// titles and their words), violations opened, resolved and open at the end, and jobs that died.
#[tracing::instrument(skip_all)]
pub async fn summarize(
    conn: &mut PgConnection,
    tenant: TenantId,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> DbResult<Value> {
    Ok(sqlx::query_scalar(
        "with s as (
             select system, count(*) as n from system_states
              where tenant_id = $1 and recorded_at >= $2 and recorded_at < $3 group by system
         ), e as (
             select id, title, created_at,
                    case when jsonb_typeof(analysis -> 'word_count') = 'number'
                         then (analysis ->> 'word_count')::numeric end as words
               from episodes
              where tenant_id = $1 and created_at >= $2 and created_at < $3
         ), newest as (
             select id, title, created_at from e order by created_at desc, id desc limit 10
         ), vo as (
             select severity, count(*) as n from policy_violations
              where tenant_id = $1 and opened_at >= $2 and opened_at < $3 group by severity
         ), jf as (
             select kind, count(*) as n from jobs
              where tenant_id = $1 and state = 'dead' and finished_at >= $2 and finished_at < $3
              group by kind
         )
         select jsonb_build_object(
             'states', jsonb_build_object(
                 'recorded', (select coalesce(sum(n), 0) from s),
                 'by_system', (select coalesce(jsonb_object_agg(system::text, n), '{}') from s)),
             'episodes', jsonb_build_object(
                 'created', (select count(*) from e),
                 'words', (select coalesce(sum(words), 0) from e),
                 'newest', (select coalesce(jsonb_agg(jsonb_build_object('id', id, 'title', title)
                                                      order by created_at desc, id desc), '[]')
                              from newest)),
             'violations', jsonb_build_object(
                 'opened', (select coalesce(sum(n), 0) from vo),
                 'opened_by_severity', (select coalesce(jsonb_object_agg(severity, n), '{}') from vo),
                 'resolved', (select count(*) from policy_violations
                               where tenant_id = $1 and resolved_at >= $2 and resolved_at < $3),
                 'open_at_end', (select count(*) from policy_violations
                                  where tenant_id = $1 and opened_at < $3
                                    and (resolved_at is null or resolved_at >= $3))),
             'failed_jobs', jsonb_build_object(
                 'count', (select coalesce(sum(n), 0) from jf),
                 'by_kind', (select coalesce(jsonb_object_agg(kind, n), '{}') from jf)))",
    )
    .bind(tenant.as_uuid())
    .bind(start)
    .bind(end)
    .fetch_one(conn)
    .await?)
}
