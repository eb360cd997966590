//! Artifact metadata (migrations 000001 and 000007); the bytes live in the storage backend, at the
//! row's `storage_path`.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::tenant::TenantId;

use super::DbResult;

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Artifact {
    #[serde(skip)]
    pub id: Uuid,
    pub key: String,
    pub size: i64,
    pub content_type: String,
    pub sha256: String,
    pub metadata: Value,
    pub tags: Value,
    pub checksum_verified_at: Option<DateTime<Utc>>,
    pub detected_content_type: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[serde(skip)]
    pub storage_path: String,
}

const COLUMNS: &str = "id, key, size, content_type, sha256, metadata, tags, checksum_verified_at, \
     detected_content_type, created_at, updated_at, storage_path";

pub struct NewArtifact<'a> {
    pub key: &'a str,
    pub storage_path: &'a str,
    pub size: i64,
    pub content_type: &'a str,
    pub sha256: &'a str,
    pub metadata: &'a Value,
    pub tags: &'a Value,
}

/// What storing an artifact did to its row.
pub enum Stored {
    Created(Artifact),
    /// Replaced: the row now names the new upload; `previous_path` is the object to delete.
    Replaced {
        artifact: Artifact,
        previous_path: String,
    },
    /// `if_absent` and an artifact with this key exists: nothing changed.
    Exists,
}

/// Points the key's row at a freshly stored upload, creating the row or (unless `if_absent`)
/// replacing what it named. The row of the key is locked until the transaction ends, so
/// concurrent uploads of one key apply one after the other.
#[tracing::instrument(skip_all)]
pub async fn store(
    conn: &mut PgConnection,
    tenant: TenantId,
    new: &NewArtifact<'_>,
    if_absent: bool,
) -> DbResult<Stored> {
    // Callers hold the key's advisory lock, so `previous` is still what the upsert replaces.
    let previous: Option<(String,)> = sqlx::query_as(
        "select storage_path from artifacts where tenant_id = $1 and key = $2 for update",
    )
    .bind(tenant.as_uuid())
    .bind(new.key)
    .fetch_optional(&mut *conn)
    .await?;
    if previous.is_some() && if_absent {
        return Ok(Stored::Exists);
    }
    let inserted: Option<Artifact> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "insert into artifacts (id, tenant_id, key, storage_path, size, content_type, sha256,
                                metadata, tags)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9)
         on conflict (tenant_id, key) do update
            set storage_path = excluded.storage_path, size = excluded.size,
                content_type = excluded.content_type, sha256 = excluded.sha256,
                metadata = excluded.metadata, tags = excluded.tags,
                checksum_verified_at = null, detected_content_type = null, updated_at = now()
          where not $10
         returning {COLUMNS}"
    )))
    .bind(Uuid::now_v7())
    .bind(tenant.as_uuid())
    .bind(new.key)
    .bind(new.storage_path)
    .bind(new.size)
    .bind(new.content_type)
    .bind(new.sha256)
    .bind(new.metadata)
    .bind(new.tags)
    .bind(if_absent)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(match (inserted, previous) {
        (None, _) => Stored::Exists,
        (Some(artifact), None) => Stored::Created(artifact),
        (Some(artifact), Some((previous_path,))) => Stored::Replaced {
            artifact,
            previous_path,
        },
    })
}

#[tracing::instrument(skip_all)]
pub async fn get(
    conn: &mut PgConnection,
    tenant: TenantId,
    key: &str,
) -> DbResult<Option<Artifact>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {COLUMNS} from artifacts where tenant_id = $1 and key = $2"
    )))
    .bind(tenant.as_uuid())
    .bind(key)
    .fetch_optional(conn)
    .await?)
}

/// Deletes the row; returns it so the caller can delete its object after the commit.
#[tracing::instrument(skip_all)]
pub async fn delete(
    conn: &mut PgConnection,
    tenant: TenantId,
    key: &str,
) -> DbResult<Option<Artifact>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "delete from artifacts where tenant_id = $1 and key = $2 returning {COLUMNS}"
    )))
    .bind(tenant.as_uuid())
    .bind(key)
    .fetch_optional(conn)
    .await?)
}

/// A page of artifacts whose key starts with `prefix`, in key order, after the key `after`.
#[tracing::instrument(skip_all)]
pub async fn list(
    conn: &mut PgConnection,
    tenant: TenantId,
    prefix: &str,
    after: Option<&str>,
    fetch: i64,
) -> DbResult<Vec<Artifact>> {
    let pattern = format!("{}%", escape_like(prefix));
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {COLUMNS} from artifacts
          where tenant_id = $1 and key like $2 and ($3::text is null or key > $3 collate \"C\")
          order by key collate \"C\"
          limit $4"
    )))
    .bind(tenant.as_uuid())
    .bind(pattern)
    .bind(after)
    .bind(fetch)
    .fetch_all(conn)
    .await?)
}

/// Records what processing found on the artifact, if it still names the upload processed;
/// `false` when it was replaced or deleted meanwhile.
#[tracing::instrument(skip_all)]
pub async fn record_processing(
    conn: &mut PgConnection,
    tenant: TenantId,
    key: &str,
    storage_path: &str,
    verified: bool,
    detected_content_type: Option<&str>,
) -> DbResult<bool> {
    let done = sqlx::query(
        "update artifacts
            set checksum_verified_at = case when $4 then now() end, detected_content_type = $5
          where tenant_id = $1 and key = $2 and storage_path = $3",
    )
    .bind(tenant.as_uuid())
    .bind(key)
    .bind(storage_path)
    .bind(verified)
    .bind(detected_content_type)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// An artifact row as storage reconciliation sees it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredPath {
    pub storage_path: String,
    pub key: String,
    pub updated_at: DateTime<Utc>,
}

/// The tenant's rows whose `storage_path` sorts (bytewise) after `after` and up to `upto`
/// (both ends open when `None`), in that order: the rows one page of a backend listing covers.
#[tracing::instrument(skip_all)]
pub async fn paths_between(
    conn: &mut PgConnection,
    tenant: TenantId,
    after: Option<&str>,
    upto: Option<&str>,
) -> DbResult<Vec<StoredPath>> {
    Ok(sqlx::query_as(
        "select storage_path, key, updated_at from artifacts
          where tenant_id = $1
            and ($2::text is null or storage_path > $2 collate \"C\")
            and ($3::text is null or storage_path <= $3 collate \"C\")
          order by storage_path collate \"C\"",
    )
    .bind(tenant.as_uuid())
    .bind(after)
    .bind(upto)
    .fetch_all(conn)
    .await?)
}

/// `raw` with LIKE's wildcards and escape character taken literally.
fn escape_like(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for c in raw.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn like_wildcards_are_literal() {
        assert_eq!(super::escape_like(r"50%_off\x"), r"50\%\_off\\x");
    }
}
