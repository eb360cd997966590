//! Inbound webhook sources and their receipts (migration 000009), and the lookup that finds a
//! source's tenant before the tenant is known.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::events::Event;
use crate::domain::event_type::EventType;
use crate::domain::tenant::TenantId;
use crate::domain::webhook::{Secrets, SourceName, Target};

use super::{CreationCursor, DbError, DbResult};

/// A source as the tenant sees it: never its secrets.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Source {
    pub id: Uuid,
    pub name: String,
    pub target: String,
    pub active: bool,
    /// The path other systems post to: `/v1/webhooks/<id>`.
    pub url: String,
    /// Until when the secret before the last rotation still verifies; `null` when none does.
    pub previous_secret_expires_at: Option<DateTime<Utc>>,
    pub rotated_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

const COLUMNS: &str = "id, name, target, active, '/v1/webhooks/' || id as url,
    case when previous_secret_expires_at > now() then previous_secret_expires_at end
        as previous_secret_expires_at,
    rotated_at, created_at, updated_at";

/// What verifying a request to a source needs, found from its id alone.
#[derive(Debug, Clone)]
pub struct Verification {
    pub source_id: Uuid,
    pub tenant_id: TenantId,
    pub name: String,
    pub target: String,
    pub active: bool,
    pub secrets: Secrets,
}

type VerificationRow = (
    Uuid,
    Uuid,
    String,
    String,
    bool,
    String,
    Option<String>,
    Option<DateTime<Utc>>,
);

/// Looks a source up by id across tenants, through the narrow definer function
/// `webhook_source_for_verification` (the app role sees no source outside a tenant transaction).
#[tracing::instrument(skip_all)]
pub async fn for_verification(pool: &PgPool, id: Uuid) -> DbResult<Option<Verification>> {
    let row: Option<VerificationRow> = super::on_live_connection(pool, |conn| {
        Box::pin(
            sqlx::query_as(
                "select source_id, source_tenant_id, source_name, source_target, source_active,
                        source_secret, source_previous_secret, source_previous_secret_expires_at
                   from webhook_source_for_verification($1)",
            )
            .bind(id)
            .fetch_optional(conn),
        )
    })
    .await?;
    Ok(row.map(
        |(source_id, tenant, name, target, active, current, previous, until)| Verification {
            source_id,
            tenant_id: TenantId::from_uuid(tenant),
            name,
            target,
            active,
            secrets: Secrets {
                current,
                previous: previous.zip(until),
            },
        },
    ))
}

#[tracing::instrument(skip_all)]
pub async fn create(
    conn: &mut PgConnection,
    tenant: TenantId,
    name: &SourceName,
    target: Target,
    secret: &str,
) -> DbResult<Source> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "insert into webhook_sources (id, tenant_id, name, target, secret)
         values ($1, $2, $3, $4, $5)
         returning {COLUMNS}"
    )))
    .bind(Uuid::now_v7())
    .bind(tenant.as_uuid())
    .bind(name.as_str())
    .bind(target.as_str())
    .bind(secret)
    .fetch_one(conn)
    .await?)
}

#[tracing::instrument(skip_all)]
pub async fn list(
    conn: &mut PgConnection,
    tenant: TenantId,
    after: Option<&CreationCursor>,
    fetch: i64,
) -> DbResult<Vec<Source>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {COLUMNS} from webhook_sources
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
pub async fn get(conn: &mut PgConnection, tenant: TenantId, id: Uuid) -> DbResult<Option<Source>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {COLUMNS} from webhook_sources where tenant_id = $1 and id = $2"
    )))
    .bind(tenant.as_uuid())
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// Changes the name and the active flag where given; `None` keeps the current value.
#[tracing::instrument(skip_all)]
pub async fn update(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
    name: Option<&SourceName>,
    active: Option<bool>,
) -> DbResult<Option<Source>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "update webhook_sources
            set name = coalesce($3, name), active = coalesce($4, active), updated_at = now()
          where tenant_id = $1 and id = $2
          returning {COLUMNS}"
    )))
    .bind(tenant.as_uuid())
    .bind(id)
    .bind(name.map(SourceName::as_str))
    .bind(active)
    .fetch_optional(conn)
    .await?)
}

/// Replaces the secret. The one it replaces keeps verifying for `overlap` (not at all for zero);
/// a secret from before the previous rotation stops at once.
#[tracing::instrument(skip_all)]
pub async fn rotate(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
    secret: &str,
    overlap: Duration,
) -> DbResult<Option<Source>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "update webhook_sources
            set previous_secret = case when $4 > 0 then secret end,
                previous_secret_expires_at =
                    case when $4 > 0 then now() + make_interval(secs => $4) end,
                secret = $3, rotated_at = now(), updated_at = now()
          where tenant_id = $1 and id = $2
          returning {COLUMNS}"
    )))
    .bind(tenant.as_uuid())
    .bind(id)
    .bind(secret)
    .bind(overlap.as_secs_f64())
    .fetch_optional(conn)
    .await?)
}

#[tracing::instrument(skip_all)]
pub async fn delete(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
) -> DbResult<Option<Source>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "delete from webhook_sources where tenant_id = $1 and id = $2 returning {COLUMNS}"
    )))
    .bind(tenant.as_uuid())
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// What an earlier, identical request produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Produced {
    Event(i64),
    Episode(Uuid),
}

/// Claims the receipt of a request (`key`: SHA-256 of its signature header). `None` when this
/// request is new: the receipt is held by this transaction until it commits, so an identical
/// request arriving meanwhile waits for it. `Some` with what the earlier one produced when the
/// request was accepted before.
#[tracing::instrument(skip_all)]
pub async fn claim_receipt(
    conn: &mut PgConnection,
    tenant: TenantId,
    source: Uuid,
    key: &[u8; 32],
    expires_at: DateTime<Utc>,
) -> DbResult<Option<Produced>> {
    let claimed: Option<bool> = sqlx::query_scalar(
        "insert into webhook_receipts (source_id, signature_sha256, tenant_id, expires_at)
         values ($1, $2, $3, $4)
         on conflict (source_id, signature_sha256) do nothing
         returning true",
    )
    .bind(source)
    .bind(key.as_slice())
    .bind(tenant.as_uuid())
    .bind(expires_at)
    .fetch_optional(&mut *conn)
    .await?;
    if claimed.is_some() {
        return Ok(None);
    }
    let (position, episode): (Option<i64>, Option<Uuid>) = sqlx::query_as(
        "select event_position, episode_id from webhook_receipts
          where tenant_id = $1 and source_id = $2 and signature_sha256 = $3",
    )
    .bind(tenant.as_uuid())
    .bind(source)
    .bind(key.as_slice())
    .fetch_one(conn)
    .await?;
    // A receipt is committed only together with what it produced (`append_event`,
    // `record_episode`).
    match (position, episode) {
        (_, Some(episode)) => Ok(Some(Produced::Episode(episode))),
        (Some(position), None) => Ok(Some(Produced::Event(position))),
        (None, None) => Err(DbError::Sqlx(sqlx::Error::RowNotFound)),
    }
}

/// Records the episode a claimed request produced, in the transaction that claimed it (an event
/// is recorded by [`append_event`]).
#[tracing::instrument(skip_all)]
pub async fn record_episode(
    conn: &mut PgConnection,
    tenant: TenantId,
    source: Uuid,
    key: &[u8; 32],
    episode: Uuid,
) -> DbResult<()> {
    sqlx::query(
        "update webhook_receipts set episode_id = $4
          where tenant_id = $1 and source_id = $2 and signature_sha256 = $3",
    )
    .bind(tenant.as_uuid())
    .bind(source)
    .bind(key.as_slice())
    .bind(episode)
    .execute(conn)
    .await?;
    Ok(())
}

/// Appends a request's event (as [`super::events::append`] does, through `append_events`) and
/// records its position on the request's receipt, in one statement: the append stays the
/// transaction's last statement, so the tenant's head row is locked only until the commit that
/// follows.
#[tracing::instrument(skip_all, fields(event_type = event_type.as_str()))]
pub async fn append_event(
    conn: &mut PgConnection,
    tenant: TenantId,
    source: Uuid,
    key: &[u8; 32],
    event_type: &EventType,
    data: &Value,
) -> DbResult<Event> {
    let (position, occurred_at, data): (i64, DateTime<Utc>, Value) = sqlx::query_as(
        "with appended as (
             select event_position, event_occurred_at, event_data
               from append_events($1, array[$2::text], array[$3::jsonb]))
         update webhook_receipts r set event_position = a.event_position
           from appended a
          where r.tenant_id = $1 and r.source_id = $4 and r.signature_sha256 = $5
         returning a.event_position, a.event_occurred_at, a.event_data",
    )
    .bind(tenant.as_uuid())
    .bind(event_type.as_str())
    .bind(data)
    .bind(source)
    .bind(key.as_slice())
    .fetch_one(conn)
    .await?;
    Ok(Event {
        id: position,
        event_type: event_type.as_str().to_owned(),
        tenant_id: tenant.as_uuid(),
        occurred_at,
        data,
    })
}

/// Deletes up to `limit` of the tenant's receipts whose window has passed. Rows another
/// transaction is deleting are skipped rather than waited for, so two requests never deadlock
/// here.
#[tracing::instrument(skip_all)]
pub async fn prune_receipts(
    conn: &mut PgConnection,
    tenant: TenantId,
    limit: i64,
) -> DbResult<u64> {
    let done = sqlx::query(
        "delete from webhook_receipts
          where (source_id, signature_sha256) in (
                select source_id, signature_sha256 from webhook_receipts
                 where tenant_id = $1 and expires_at < now()
                 order by expires_at
                 limit $2
                   for update skip locked)",
    )
    .bind(tenant.as_uuid())
    .bind(limit)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}
