//! The tenant registry (platform scope).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::tenant::{Name, Settings, Slug, TenantId};

use super::{CreationCursor, DbResult};

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Tenant {
    pub id: Uuid,
    pub name: String,
    pub slug: String,
    pub settings: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

fn settings_json(settings: &Settings) -> serde_json::Value {
    // Plain strings: serialising cannot fail.
    serde_json::to_value(settings).unwrap_or_else(|_| serde_json::json!({}))
}

#[tracing::instrument(skip_all)]
pub async fn create(
    conn: &mut PgConnection,
    id: TenantId,
    name: &Name,
    slug: &Slug,
    settings: &Settings,
) -> DbResult<Tenant> {
    Ok(sqlx::query_as(
        "insert into tenants (id, name, slug, settings) values ($1, $2, $3, $4)
         returning id, name, slug, settings, created_at",
    )
    .bind(id.as_uuid())
    .bind(name.as_str())
    .bind(slug.as_str())
    .bind(settings_json(settings))
    .fetch_one(conn)
    .await?)
}

/// Changes a tenant's name and/or settings (`None` keeps them); `None` when there is no such tenant.
#[tracing::instrument(skip_all)]
pub async fn update(
    conn: &mut PgConnection,
    id: Uuid,
    name: Option<&Name>,
    settings: Option<&Settings>,
) -> DbResult<Option<Tenant>> {
    Ok(sqlx::query_as(
        "update tenants set name = coalesce($2, name), settings = coalesce($3, settings),
                updated_at = now()
          where id = $1
          returning id, name, slug, settings, created_at",
    )
    .bind(id)
    .bind(name.map(Name::as_str))
    .bind(settings.map(settings_json))
    .fetch_optional(conn)
    .await?)
}

#[tracing::instrument(skip_all)]
pub async fn list(
    conn: &mut PgConnection,
    after: Option<&CreationCursor>,
    fetch: i64,
) -> DbResult<Vec<Tenant>> {
    Ok(sqlx::query_as(
        "select id, name, slug, settings, created_at from tenants
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
        "select id, name, slug, settings, created_at from tenants where id = $1 or ($1 is null and slug = $2)",
    )
    .bind(id)
    .bind(id_or_slug)
    .fetch_optional(conn)
    .await?)
}
