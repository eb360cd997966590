//! VSM system states: an append-only, versioned history per tenant and system.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::system::SystemId;
use crate::domain::tenant::TenantId;

use super::DbResult;

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct SystemState {
    pub system: i16,
    pub version: i64,
    pub state: Value,
    pub recorded_at: DateTime<Utc>,
}

/// Keyset position in a system's history (newest first).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryCursor {
    pub version: i64,
}

/// Bounds of a history query; both ends optional, `since` inclusive, `until` exclusive.
#[derive(Debug, Default, Clone, Copy)]
pub struct Window {
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

/// Advisory-lock class for "next version of one system of one tenant".
pub const VERSION_LOCK_CLASS: i32 = 0x5653; // "VS"

/// Records a new state as the next version of `system`. Concurrent writers to the same system
/// serialise on a transaction-scoped advisory lock, so versions are gap-free and never collide.
#[tracing::instrument(skip_all, fields(system = system.number()))]
pub async fn record(
    conn: &mut PgConnection,
    tenant: TenantId,
    system: SystemId,
    state: &Value,
) -> DbResult<SystemState> {
    sqlx::query("select pg_advisory_xact_lock($1, hashtext($2::text || ':' || $3::text))")
        .bind(VERSION_LOCK_CLASS)
        .bind(tenant.as_uuid())
        .bind(system.number())
        .execute(&mut *conn)
        .await?;
    Ok(sqlx::query_as(
        "insert into system_states (id, tenant_id, system, version, state)
         select $1, $2, $3, coalesce(max(version), 0) + 1, $4
           from system_states where tenant_id = $2 and system = $3
         returning system, version, state, recorded_at",
    )
    .bind(Uuid::now_v7())
    .bind(tenant.as_uuid())
    .bind(system.number())
    .bind(state)
    .fetch_one(conn)
    .await?)
}

/// The latest state of each system that has one, S1 first.
#[tracing::instrument(skip_all)]
pub async fn latest_all(conn: &mut PgConnection, tenant: TenantId) -> DbResult<Vec<SystemState>> {
    Ok(sqlx::query_as(
        "select s.system, s.version, s.state, s.recorded_at
           from unnest('{1,2,3,4,5}'::smallint[]) as sys(n)
           cross join lateral (
                select system, version, state, recorded_at from system_states
                 where tenant_id = $1 and system = sys.n
                 order by version desc limit 1) s
          order by s.system",
    )
    .bind(tenant.as_uuid())
    .fetch_all(conn)
    .await?)
}

#[tracing::instrument(skip_all, fields(system = system.number()))]
pub async fn latest(
    conn: &mut PgConnection,
    tenant: TenantId,
    system: SystemId,
) -> DbResult<Option<SystemState>> {
    Ok(sqlx::query_as(
        "select system, version, state, recorded_at from system_states
          where tenant_id = $1 and system = $2
          order by version desc limit 1",
    )
    .bind(tenant.as_uuid())
    .bind(system.number())
    .fetch_optional(conn)
    .await?)
}

/// A page of history, newest first, strictly below the cursor's version.
#[tracing::instrument(skip_all, fields(system = system.number()))]
pub async fn history(
    conn: &mut PgConnection,
    tenant: TenantId,
    system: SystemId,
    window: Window,
    before: Option<&HistoryCursor>,
    fetch: i64,
) -> DbResult<Vec<SystemState>> {
    Ok(sqlx::query_as(
        "select system, version, state, recorded_at from system_states
          where tenant_id = $1 and system = $2
            and ($3::bigint is null or version < $3)
            and ($4::timestamptz is null or recorded_at >= $4)
            and ($5::timestamptz is null or recorded_at < $5)
          order by version desc
          limit $6",
    )
    .bind(tenant.as_uuid())
    .bind(system.number())
    .bind(before.map(|c| c.version))
    .bind(window.since)
    .bind(window.until)
    .bind(fetch)
    .fetch_all(conn)
    .await?)
}
