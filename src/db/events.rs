//! The event log: every domain write appends its event here in the same transaction.

use serde_json::Value;
use sqlx::PgConnection;

use crate::domain::event_type::EventType;
use crate::domain::tenant::TenantId;

use super::DbResult;

/// Appends an event and returns its position in the log.
#[tracing::instrument(skip_all, fields(event_type = event_type.as_str()))]
pub async fn append(
    conn: &mut PgConnection,
    tenant: TenantId,
    event_type: &EventType,
    data: &Value,
) -> DbResult<i64> {
    Ok(sqlx::query_scalar(
        "insert into events (tenant_id, type, data) values ($1, $2, $3) returning id",
    )
    .bind(tenant.as_uuid())
    .bind(event_type.as_str())
    .bind(data)
    .fetch_one(conn)
    .await?)
}
