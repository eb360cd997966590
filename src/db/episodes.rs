//! S4 episodes: observations and reports recorded by a tenant.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::tenant::TenantId;

use super::{CreationCursor, DbResult};

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Episode {
    pub id: Uuid,
    pub title: String,
    pub content: String,
    pub analysis: Option<Value>,
    pub created_at: DateTime<Utc>,
}

#[tracing::instrument(skip_all)]
pub async fn create(
    conn: &mut PgConnection,
    tenant: TenantId,
    title: &str,
    content: &str,
) -> DbResult<Episode> {
    Ok(sqlx::query_as(
        "insert into episodes (id, tenant_id, title, content) values ($1, $2, $3, $4)
         returning id, title, content, analysis, created_at",
    )
    .bind(Uuid::now_v7())
    .bind(tenant.as_uuid())
    .bind(title)
    .bind(content)
    .fetch_one(conn)
    .await?)
}

#[tracing::instrument(skip_all)]
pub async fn list(
    conn: &mut PgConnection,
    tenant: TenantId,
    after: Option<&CreationCursor>,
    fetch: i64,
) -> DbResult<Vec<Episode>> {
    Ok(sqlx::query_as(
        "select id, title, content, analysis, created_at from episodes
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
pub async fn get(conn: &mut PgConnection, tenant: TenantId, id: Uuid) -> DbResult<Option<Episode>> {
    Ok(sqlx::query_as(
        "select id, title, content, analysis, created_at from episodes where tenant_id = $1 and id = $2",
    )
    .bind(tenant.as_uuid())
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// Titles and contents (the first `chars` characters) of the tenant's `limit` most recent
/// episodes other than `except`: what an episode is compared with.
#[tracing::instrument(skip_all)]
pub async fn corpus(
    conn: &mut PgConnection,
    tenant: TenantId,
    except: Uuid,
    limit: i64,
    chars: i32,
) -> DbResult<Vec<(String, String)>> {
    Ok(sqlx::query_as(
        "select title, left(content, $4) from episodes
          where tenant_id = $1 and id <> $2
          order by created_at desc, id desc
          limit $3",
    )
    .bind(tenant.as_uuid())
    .bind(except)
    .bind(limit)
    .bind(chars)
    .fetch_all(conn)
    .await?)
}

/// Stores an episode's analysis; `false` when the episode does not exist.
#[tracing::instrument(skip_all)]
pub async fn set_analysis(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
    analysis: &Value,
) -> DbResult<bool> {
    let done = sqlx::query("update episodes set analysis = $3 where tenant_id = $1 and id = $2")
        .bind(tenant.as_uuid())
        .bind(id)
        .bind(analysis)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}
