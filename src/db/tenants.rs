//! The tenant registry (platform scope).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::tenant::{Name, Slug, TenantId};

use super::{CreationCursor, DbResult};

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Tenant {
    pub id: Uuid,
    pub name: String,
    pub slug: String,
    pub created_at: DateTime<Utc>,
}

#[tracing::instrument(skip_all)]
pub async fn create(
    conn: &mut PgConnection,
    id: TenantId,
    name: &Name,
    slug: &Slug,
) -> DbResult<Tenant> {
    Ok(sqlx::query_as(
        "insert into tenants (id, name, slug) values ($1, $2, $3)
         returning id, name, slug, created_at",
    )
    .bind(id.as_uuid())
    .bind(name.as_str())
    .bind(slug.as_str())
    .fetch_one(conn)
    .await?)
}

#[tracing::instrument(skip_all)]
pub async fn list(
    conn: &mut PgConnection,
    after: Option<&CreationCursor>,
    fetch: i64,
) -> DbResult<Vec<Tenant>> {
    Ok(sqlx::query_as(
        "select id, name, slug, created_at from tenants
          where ($1::timestamptz is null or (created_at, id) > ($1, $2))
          order by created_at, id
          limit $3",
    )
    .bind(after.map(|c| c.created_at))
    .bind(after.map(|c| c.id))
    .bind(fetch)
    .fetch_all(conn)
    .await?)
}

/// Finds a tenant by id or slug (operator commands accept either).
#[tracing::instrument(skip_all)]
pub async fn find(conn: &mut PgConnection, id_or_slug: &str) -> DbResult<Option<Tenant>> {
    let id = Uuid::parse_str(id_or_slug).ok();
    Ok(sqlx::query_as(
        "select id, name, slug, created_at from tenants where id = $1 or ($1 is null and slug = $2)",
    )
    .bind(id)
    .bind(id_or_slug)
    .fetch_optional(conn)
    .await?)
}
