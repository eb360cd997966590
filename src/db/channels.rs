//! Notification channels (migration 000006): where a tenant's alerts are delivered.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::policy::Severity;
use crate::domain::tenant::TenantId;

use super::{CreationCursor, DbResult};

/// A channel as the tenant sees it: never its secret.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Channel {
    pub id: Uuid,
    pub name: String,
    pub kind: String,
    pub url: Option<String>,
    pub min_severity: String,
    pub active: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A channel with what delivering through it needs.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Target {
    pub id: Uuid,
    pub kind: String,
    pub config: Value,
    pub secret: Option<String>,
    pub active: bool,
}

const COLUMNS: &str =
    "id, name, kind, config ->> 'url' as url, min_severity, active, created_at, updated_at";

pub struct NewChannel<'a> {
    pub name: &'a str,
    pub kind: &'a str,
    pub config: &'a Value,
    pub secret: Option<&'a str>,
    pub min_severity: Severity,
    pub active: bool,
}

#[tracing::instrument(skip_all)]
pub async fn create(
    conn: &mut PgConnection,
    tenant: TenantId,
    channel: &NewChannel<'_>,
) -> DbResult<Channel> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "insert into notification_channels (id, tenant_id, name, kind, config, secret, min_severity, active)
         values ($1, $2, $3, $4, $5, $6, $7, $8)
         returning {COLUMNS}"
    )))
    .bind(Uuid::now_v7())
    .bind(tenant.as_uuid())
    .bind(channel.name)
    .bind(channel.kind)
    .bind(channel.config)
    .bind(channel.secret)
    .bind(channel.min_severity.as_str())
    .bind(channel.active)
    .fetch_one(conn)
    .await?)
}

#[tracing::instrument(skip_all)]
pub async fn list(
    conn: &mut PgConnection,
    tenant: TenantId,
    after: Option<&CreationCursor>,
    fetch: i64,
) -> DbResult<Vec<Channel>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {COLUMNS} from notification_channels
          where tenant_id = $1
            and ($2::timestamptz is null or (created_at, id) < ($2, $3))
          order by created_at desc, id desc
          limit $4"
    )))
    .bind(tenant.as_uuid())
    .bind(after.map(|c| c.created_at))
    .bind(after.map(|c| c.id))
    .bind(fetch)
    .fetch_all(conn)
    .await?)
}

#[tracing::instrument(skip_all)]
pub async fn get(conn: &mut PgConnection, tenant: TenantId, id: Uuid) -> DbResult<Option<Channel>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {COLUMNS} from notification_channels where tenant_id = $1 and id = $2"
    )))
    .bind(tenant.as_uuid())
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// What a partial update changes; `None` keeps the current value.
#[derive(Default)]
pub struct ChannelChange<'a> {
    pub name: Option<&'a str>,
    pub config: Option<&'a Value>,
    pub min_severity: Option<Severity>,
    pub active: Option<bool>,
}

#[tracing::instrument(skip_all)]
pub async fn update(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
    change: &ChannelChange<'_>,
) -> DbResult<Option<Channel>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "update notification_channels
            set name = coalesce($3, name), config = coalesce($4, config),
                min_severity = coalesce($5, min_severity), active = coalesce($6, active),
                updated_at = now()
          where tenant_id = $1 and id = $2
          returning {COLUMNS}"
    )))
    .bind(tenant.as_uuid())
    .bind(id)
    .bind(change.name)
    .bind(change.config)
    .bind(change.min_severity.map(Severity::as_str))
    .bind(change.active)
    .fetch_optional(conn)
    .await?)
}

#[tracing::instrument(skip_all)]
pub async fn delete(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
) -> DbResult<Option<Channel>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "delete from notification_channels where tenant_id = $1 and id = $2 returning {COLUMNS}"
    )))
    .bind(tenant.as_uuid())
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// The active channels that take alerts of `severity`.
#[tracing::instrument(skip_all)]
pub async fn accepting(
    conn: &mut PgConnection,
    tenant: TenantId,
    severity: Severity,
) -> DbResult<Vec<Uuid>> {
    let allowed: Vec<&str> = [Severity::Info, Severity::Warning, Severity::Critical]
        .into_iter()
        .filter(|min| min.and_above().contains(&severity.as_str()))
        .map(Severity::as_str)
        .collect();
    Ok(sqlx::query_scalar(
        "select id from notification_channels
          where tenant_id = $1 and active and min_severity = any($2)
          order by id",
    )
    .bind(tenant.as_uuid())
    .bind(&allowed)
    .fetch_all(conn)
    .await?)
}

/// A channel with its secret, for delivery.
#[tracing::instrument(skip_all)]
pub async fn target(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
) -> DbResult<Option<Target>> {
    Ok(sqlx::query_as(
        "select id, kind, config, secret, active from notification_channels
          where tenant_id = $1 and id = $2",
    )
    .bind(tenant.as_uuid())
    .bind(id)
    .fetch_optional(conn)
    .await?)
}
