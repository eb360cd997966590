//! Tenant API keys: creation, listing, revocation, and the pre-tenant authentication lookup.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::domain::ParseError;
use crate::domain::role::Role;
use crate::domain::tenant::{Name, TenantId};

use super::{CreationCursor, DbResult};

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ApiKey {
    pub id: Uuid,
    pub name: String,
    #[sqlx(try_from = "String")]
    pub role: Role,
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl TryFrom<String> for Role {
    type Error = ParseError;
    fn try_from(raw: String) -> Result<Self, Self::Error> {
        Role::parse(&raw)
    }
}

/// Who a valid, unrevoked key belongs to.
#[derive(Debug, Clone, Copy)]
pub struct KeyOwner {
    pub key_id: Uuid,
    pub tenant_id: TenantId,
    pub role: Role,
}

#[tracing::instrument(skip_all)]
pub async fn create(
    conn: &mut PgConnection,
    tenant: TenantId,
    name: &Name,
    role: Role,
    prefix: &str,
    secret_hash: &[u8; 32],
) -> DbResult<ApiKey> {
    Ok(sqlx::query_as(
        "insert into api_keys (id, tenant_id, name, role, prefix, secret_hash)
         values ($1, $2, $3, $4, $5, $6)
         returning id, name, role, prefix, created_at, last_used_at, revoked_at",
    )
    .bind(Uuid::now_v7())
    .bind(tenant.as_uuid())
    .bind(name.as_str())
    .bind(role.as_str())
    .bind(prefix)
    .bind(secret_hash.as_slice())
    .fetch_one(conn)
    .await?)
}

#[tracing::instrument(skip_all)]
pub async fn list(
    conn: &mut PgConnection,
    tenant: TenantId,
    after: Option<&CreationCursor>,
    fetch: i64,
) -> DbResult<Vec<ApiKey>> {
    Ok(sqlx::query_as(
        "select id, name, role, prefix, created_at, last_used_at, revoked_at from api_keys
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

/// Revokes a key; revoking a revoked key is a no-op. `None` when no such key is visible. Every
/// server's key cache hears of it when the transaction commits (a trigger sends the NOTIFY).
#[tracing::instrument(skip_all)]
pub async fn revoke(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
) -> DbResult<Option<ApiKey>> {
    let revoked: Option<ApiKey> = sqlx::query_as(
        "update api_keys set revoked_at = coalesce(revoked_at, now())
          where tenant_id = $1 and id = $2
          returning id, name, role, prefix, created_at, last_used_at, revoked_at",
    )
    .bind(tenant.as_uuid())
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(revoked)
}

/// Looks a key up by the hash of its secret, through the owner's narrow SECURITY DEFINER
/// function (the only cross-tenant read the app role can make). Revoked keys are not found.
#[tracing::instrument(skip_all)]
pub async fn authenticate(pool: &PgPool, secret_hash: &[u8; 32]) -> DbResult<Option<KeyOwner>> {
    // A lookup (its one write, last_used_at, is fine to repeat): retried on a live connection
    // when an idle one turns out dead.
    let hash = secret_hash.to_vec();
    let row: Option<(Uuid, Uuid, String)> = super::on_live_connection(pool, move |conn| {
        let hash = hash.clone();
        Box::pin(async move {
            sqlx::query_as("select key_id, key_tenant_id, key_role from authenticate_api_key($1)")
                .bind(hash)
                .fetch_optional(conn)
                .await
        })
    })
    .await?;
    Ok(row.and_then(|(key_id, tenant_id, role)| {
        Some(KeyOwner {
            key_id,
            tenant_id: TenantId::from_uuid(tenant_id),
            role: Role::parse(&role).ok()?,
        })
    }))
}
