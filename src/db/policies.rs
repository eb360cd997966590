//! S5 policies: named, versioned rule sets that the job pool evaluates against system states.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::policy::Rules;
use crate::domain::tenant::{Name, TenantId};

use super::{CreationCursor, DbResult};

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Policy {
    pub id: Uuid,
    pub name: String,
    pub rules: Value,
    pub active: bool,
    pub version: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What a create or a full replacement writes.
pub struct PolicyInput<'a> {
    pub name: &'a Name,
    pub rules: &'a Rules,
    pub active: bool,
}

fn rules_json(rules: &Rules) -> Value {
    // Rules hold only strings, numbers, enums and JSON values: serialising them cannot fail.
    serde_json::to_value(rules).unwrap_or(Value::Null)
}

#[tracing::instrument(skip_all)]
pub async fn create(
    conn: &mut PgConnection,
    tenant: TenantId,
    input: &PolicyInput<'_>,
) -> DbResult<Policy> {
    Ok(sqlx::query_as(
        "insert into policies (id, tenant_id, name, rules, active) values ($1, $2, $3, $4, $5)
         returning id, name, rules, active, version, created_at, updated_at",
    )
    .bind(Uuid::now_v7())
    .bind(tenant.as_uuid())
    .bind(input.name.as_str())
    .bind(rules_json(input.rules))
    .bind(input.active)
    .fetch_one(conn)
    .await?)
}

#[tracing::instrument(skip_all)]
pub async fn list(
    conn: &mut PgConnection,
    tenant: TenantId,
    after: Option<&CreationCursor>,
    fetch: i64,
) -> DbResult<Vec<Policy>> {
    Ok(sqlx::query_as(
        "select id, name, rules, active, version, created_at, updated_at from policies
          where tenant_id = $1
            and ($2::timestamptz is null or (created_at, id) < ($2, $3))
          order by created_at desc, id desc
          limit $4",
    )
    .bind(tenant.as_uuid())
    .bind(after.map(|c| c.created_at))
    .bind(after.map(|c| c.id))
    .bind(fetch)
    .fetch_all(conn)
    .await?)
}

#[tracing::instrument(skip_all)]
pub async fn get(conn: &mut PgConnection, tenant: TenantId, id: Uuid) -> DbResult<Option<Policy>> {
    Ok(sqlx::query_as(
        "select id, name, rules, active, version, created_at, updated_at from policies
          where tenant_id = $1 and id = $2",
    )
    .bind(tenant.as_uuid())
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// Replaces a policy's name, rules and active flag, bumping its version.
#[tracing::instrument(skip_all)]
pub async fn replace(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
    input: &PolicyInput<'_>,
) -> DbResult<Option<Policy>> {
    Ok(sqlx::query_as(
        "update policies set name = $2, rules = $3, active = $4, version = version + 1, updated_at = now()
          where tenant_id = $5 and id = $1
          returning id, name, rules, active, version, created_at, updated_at",
    )
    .bind(id)
    .bind(input.name.as_str())
    .bind(rules_json(input.rules))
    .bind(input.active)
    .bind(tenant.as_uuid())
    .fetch_optional(conn)
    .await?)
}

#[tracing::instrument(skip_all)]
pub async fn delete(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
) -> DbResult<Option<Policy>> {
    Ok(sqlx::query_as(
        "delete from policies where tenant_id = $1 and id = $2
         returning id, name, rules, active, version, created_at, updated_at",
    )
    .bind(tenant.as_uuid())
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// The tenant's active policies, oldest first: what policy evaluation checks.
#[tracing::instrument(skip_all)]
pub async fn active(conn: &mut PgConnection, tenant: TenantId) -> DbResult<Vec<Policy>> {
    Ok(sqlx::query_as(
        "select id, name, rules, active, version, created_at, updated_at from policies
          where tenant_id = $1 and active
          order by created_at, id",
    )
    .bind(tenant.as_uuid())
    .fetch_all(conn)
    .await?)
}
