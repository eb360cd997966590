//! Policy violations (migration 000006): opened when a rule holds, resolved when it stops.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::tenant::TenantId;

use super::{CreationCursor, DbResult};

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Violation {
    pub id: Uuid,
    /// `None` once the policy is deleted.
    pub policy_id: Option<Uuid>,
    pub policy_name: String,
    pub policy_version: i32,
    pub rule_index: i32,
    pub rule: Value,
    pub system: i16,
    pub severity: String,
    pub value: Option<Value>,
    pub state_version: Option<i64>,
    pub opened_at: DateTime<Utc>,
    pub resolved_at: Option<DateTime<Utc>>,
    pub resolved_value: Option<Value>,
    pub resolved_state_version: Option<i64>,
}

const COLUMNS: &str = "id, policy_id, policy_name, policy_version, rule_index, rule, system, severity, value, \
     state_version, opened_at, resolved_at, resolved_value, resolved_state_version";

pub struct NewViolation<'a> {
    pub policy_id: Uuid,
    pub policy_name: &'a str,
    pub policy_version: i32,
    pub rule_index: i32,
    pub rule: &'a Value,
    pub system: i16,
    pub severity: &'a str,
    pub value: Option<&'a Value>,
    pub state_version: Option<i64>,
}

/// The tenant's open violations.
#[tracing::instrument(skip_all)]
pub async fn open(conn: &mut PgConnection, tenant: TenantId) -> DbResult<Vec<Violation>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {COLUMNS} from policy_violations
          where tenant_id = $1 and resolved_at is null
          order by opened_at, id"
    )))
    .bind(tenant.as_uuid())
    .fetch_all(conn)
    .await?)
}

#[tracing::instrument(skip_all)]
pub async fn insert(
    conn: &mut PgConnection,
    tenant: TenantId,
    v: &NewViolation<'_>,
) -> DbResult<Violation> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "insert into policy_violations (id, tenant_id, policy_id, policy_name, policy_version,
                                        rule_index, rule, system, severity, value, state_version)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
         returning {COLUMNS}"
    )))
    .bind(Uuid::now_v7())
    .bind(tenant.as_uuid())
    .bind(v.policy_id)
    .bind(v.policy_name)
    .bind(v.policy_version)
    .bind(v.rule_index)
    .bind(v.rule)
    .bind(v.system)
    .bind(v.severity)
    .bind(v.value)
    .bind(v.state_version)
    .fetch_one(conn)
    .await?)
}

/// Resolves an open violation with the value seen when it stopped holding.
#[tracing::instrument(skip_all)]
pub async fn resolve(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
    value: Option<&Value>,
    state_version: Option<i64>,
) -> DbResult<Option<Violation>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "update policy_violations
            set resolved_at = now(), resolved_value = $3, resolved_state_version = $4
          where tenant_id = $1 and id = $2 and resolved_at is null
          returning {COLUMNS}"
    )))
    .bind(tenant.as_uuid())
    .bind(id)
    .bind(value)
    .bind(state_version)
    .fetch_optional(conn)
    .await?)
}

/// A page of violations, newest first; `open_only` leaves resolved ones out.
#[tracing::instrument(skip_all)]
pub async fn list(
    conn: &mut PgConnection,
    tenant: TenantId,
    open_only: Option<bool>,
    after: Option<&CreationCursor>,
    fetch: i64,
) -> DbResult<Vec<Violation>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {COLUMNS} from policy_violations
          where tenant_id = $1
            and ($2::boolean is null or (resolved_at is null) = $2)
            and ($3::timestamptz is null or (opened_at, id) < ($3, $4))
          order by opened_at desc, id desc
          limit $5"
    )))
    .bind(tenant.as_uuid())
    .bind(open_only)
    .bind(after.map(|c| c.created_at))
    .bind(after.map(|c| c.id))
    .bind(fetch)
    .fetch_all(conn)
    .await?)
}
