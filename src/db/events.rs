//! The event log: every domain write appends its event here in the same transaction. Positions
//! are per tenant, contiguous and committed in order (see migration 000003).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::domain::event_type::EventType;
use crate::domain::tenant::TenantId;
use crate::domain::topic::TopicFilter;

use super::{DbError, DbResult};

/// An event as clients see it: `id` is its position in the tenant's log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct Event {
    #[sqlx(rename = "position")]
    pub id: i64,
    #[serde(rename = "type")]
    #[sqlx(rename = "type")]
    pub event_type: String,
    pub tenant_id: Uuid,
    pub occurred_at: DateTime<Utc>,
    pub data: Value,
}

/// Appends an event as the tenant's next position. The tenant's head row stays locked until the
/// transaction ends, which is what keeps positions in commit order: append last, then commit.
#[tracing::instrument(skip_all, fields(event_type = event_type.as_str()))]
pub async fn append(
    conn: &mut PgConnection,
    tenant: TenantId,
    event_type: &EventType,
    data: &Value,
) -> DbResult<Event> {
    let mut appended =
        append_many(&mut *conn, tenant, &[(event_type.clone(), data.clone())]).await?;
    appended
        .pop()
        .ok_or_else(|| DbError::Sqlx(sqlx::Error::RowNotFound))
}

/// Appends events as the tenant's next positions, in the given order, with one statement
/// (`append_events`, migration 000004: the head row moves once for the whole batch). Inside a
/// transaction it locks like [`append`]; given a pool it is a transaction of its own, committed in
/// the same round trip.
#[tracing::instrument(skip_all, fields(count = events.len()))]
pub async fn append_many<'c, E>(
    executor: E,
    tenant: TenantId,
    events: &[(EventType, Value)],
) -> DbResult<Vec<Event>>
where
    E: sqlx::PgExecutor<'c>,
{
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let types: Vec<&str> = events.iter().map(|(t, _)| t.as_str()).collect();
    let data: Vec<&Value> = events.iter().map(|(_, d)| d).collect();
    let rows: Vec<(i64, DateTime<Utc>, Value)> = sqlx::query_as(
        "select event_position, event_occurred_at, event_data from append_events($1, $2, $3)",
    )
    .bind(tenant.as_uuid())
    .bind(&types)
    .bind(&data)
    .fetch_all(executor)
    .await?;
    // Positions are head - count + 1 ..= head in input order; RETURNING's row order is not
    // promised, so each row is placed by its position.
    let first = rows.iter().map(|(p, _, _)| *p).min().unwrap_or_default();
    let mut appended: Vec<Option<Event>> = vec![None; events.len()];
    for (position, occurred_at, data) in rows {
        let Some(index) = usize::try_from(position - first)
            .ok()
            .filter(|i| *i < events.len())
        else {
            continue;
        };
        // The data as stored, so the live copy matches what a replay reads back.
        appended[index] = Some(Event {
            id: position,
            event_type: events[index].0.as_str().to_owned(),
            tenant_id: tenant.as_uuid(),
            occurred_at,
            data,
        });
    }
    appended
        .into_iter()
        .map(|e| e.ok_or_else(|| DbError::Sqlx(sqlx::Error::RowNotFound)))
        .collect()
}

/// The tenant's latest position (0 before its first event).
pub async fn head(conn: &mut PgConnection, tenant: TenantId) -> DbResult<i64> {
    Ok(sqlx::query_scalar(
        "select coalesce((select position from event_heads where tenant_id = $1), 0)",
    )
    .bind(tenant.as_uuid())
    .fetch_one(conn)
    .await?)
}

/// The tenant's oldest retained position, if any event is retained.
pub async fn earliest(conn: &mut PgConnection, tenant: TenantId) -> DbResult<Option<i64>> {
    Ok(
        sqlx::query_scalar("select min(position) from events where tenant_id = $1")
            .bind(tenant.as_uuid())
            .fetch_one(conn)
            .await?,
    )
}

/// Events after `after` and up to `upto`, matching `filter`, oldest first.
#[tracing::instrument(skip_all)]
pub async fn page(
    conn: &mut PgConnection,
    tenant: TenantId,
    after: i64,
    upto: i64,
    filter: &TopicFilter,
    limit: i64,
) -> DbResult<Vec<Event>> {
    Ok(sqlx::query_as(
        "select position, type, tenant_id, occurred_at, data from events
          where tenant_id = $1 and position > $2 and position <= $3
            and ($4 or type = any($5) or type like any($6))
          order by position
          limit $7",
    )
    .bind(tenant.as_uuid())
    .bind(after)
    .bind(upto)
    .bind(filter.is_all())
    .bind(filter.exact())
    .bind(filter.like_patterns())
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

/// Head positions of the given tenants, through the owner's narrow definer function (the event
/// hub follows tenants across the platform; positions are all it learns).
pub async fn heads(pool: &PgPool, tenants: &[Uuid]) -> DbResult<Vec<(Uuid, i64)>> {
    Ok(
        sqlx::query_as("select head_tenant_id, head_position from event_head_positions($1)")
            .bind(tenants)
            .fetch_all(pool)
            .await?,
    )
}

/// Deletes one batch of events older than `cutoff` across all tenants; returns how many.
pub async fn prune(pool: &PgPool, cutoff: DateTime<Utc>, batch: i32) -> DbResult<i32> {
    Ok(sqlx::query_scalar("select prune_events($1, $2)")
        .bind(cutoff)
        .bind(batch)
        .fetch_one(pool)
        .await?)
}
